"""Running training/finetune.py as a user does, in a real subprocess, and comparing what two runs leave.

Each run works in its own directory `cwd`, with `--output_dir models/<name>`, so its folders are the
default ones a user gets: the model folder `cwd/models/<name>` and the run folder `cwd/runs/<name>`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training.loop import STATE_FILE, list_checkpoints

REPO = Path(__file__).resolve().parents[2]
FINETUNE = REPO / "training" / "finetune.py"
FAULT_LAUNCHER = REPO / "tests" / "training" / "fault_launcher.py"  # the same main() with a fault injected
# One thread per run: the same arithmetic in every run, and no OpenMP spinning when the machine is busy.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _env(extra: dict | None) -> dict:
    env = {**os.environ, **ONE_THREAD, **(extra or {})}
    # The subprocess imports `training` from this checkout, whatever an installed copy says.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def finetune(args: list[str], cwd: Path, env: dict | None = None, launcher: list[str] | None = None,
             faults: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run finetune.py (or, with `faults`, fault_launcher.py, which reads KILL_AT_STEP / EXPORT_FAULT)."""
    script = FAULT_LAUNCHER if faults else FINETUNE
    cmd = [*(launcher or [sys.executable]), str(script), *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(env), capture_output=True, text=True, timeout=timeout)


def start(args: list[str], cwd: Path, log: Path, env: dict | None = None, preexec=None,
          launcher: list[str] | None = None, new_session: bool = False) -> subprocess.Popen:
    """finetune.py in the background, stderr to `log`; with `new_session`, in its own process group
    (so that a launcher and the workers it started can be killed together)."""
    return subprocess.Popen([*(launcher or [sys.executable]), str(FINETUNE), *args], cwd=cwd, env=_env(env),
                            stdout=subprocess.DEVNULL, stderr=log.open("w"), preexec_fn=preexec,
                            start_new_session=new_session)


# Accelerate's torchrun launcher on CPU: `--multi_gpu` picks torchrun (one process per rank, gloo),
# ACCELERATE_USE_CPU keeps it on the CPU. (`accelerate launch --cpu --num_processes 2` is not that:
# without mpirun it starts one independent process per launcher.)
CPU_DISTRIBUTED = {"ACCELERATE_USE_CPU": "true"}


def distributed_launcher(num_processes: int = 2, num_machines: int = 1, machine_rank: int = 0,
                         port: int = 0) -> list[str]:
    """`accelerate launch` for `num_processes` CPU processes in all, over `num_machines` machines."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                str(num_processes), "--num_machines", str(num_machines), "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(port)]
    if num_machines > 1:
        launcher += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    return launcher


def distributed_args(model: Path, train: Path, test: Path, name: str) -> list[str]:
    """classifier_args shortened for distributed runs: 6 steps, checkpoints at 3 and 6, 41 evaluation
    examples (odd: the second process pads its last batch, and gather_for_metrics must drop the copy)."""
    return [*classifier_args(model, train, test, name), "--max_eval_samples", "41", "--max_train_steps", "6",
            "--checkpointing_steps", "3", "--gradient_accumulation_steps", "1"]


def classifier_args(model: Path, train: Path, test: Path, name: str = "run") -> list[str]:
    """Text classification, 20 optimizer steps (2 epochs of 10), checkpoints every 4, evaluations every 3."""
    return ["--model_name_or_path", str(model), "--train_file", str(train), "--validation_file", str(test),
            "--output_dir", f"models/{name}", "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
            "--gradient_accumulation_steps", "2", "--learning_rate", "5e-4", "--checkpointing_steps", "4",
            "--eval_steps", "3", "--num_warmup_steps", "2", "--seed", "7"]


def lm_args(model: Path, train: Path, test: Path, name: str = "run") -> list[str]:
    """A causal LM, 20 optimizer steps (2 epochs of 10), checkpoints every 4, evaluations every 3.
    Perplexity improves at every evaluation, so the best model is the last one, chosen long after any
    resume. Dropout is on (GPT-2's 0.1) and gradients are accumulated: both must resume exactly."""
    return ["--task", "text-generation", "--model_name_or_path", str(model), "--train_file", str(train),
            "--validation_file", str(test), "--output_dir", f"models/{name}", "--max_train_samples", "50",
            "--max_eval_samples", "20", "--block_size", "16", "--num_train_epochs", "2",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--learning_rate", "3e-3",
            "--checkpointing_steps", "4", "--eval_steps", "3", "--num_warmup_steps", "2", "--seed", "7"]


def error_line(stderr: str) -> str:
    """The one-line `error: ...` message (tqdm's progress lines may share its line)."""
    found = re.findall(r"error: [^\r\n]*", stderr)
    assert found, stderr[-3000:]
    return found[-1]


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}"))


# --------------------------------------------------------------------------------------------
# The final training state of a run: its last checkpoint in the run folder.

NUMPY_RNG = [np.ndarray, np.dtype, np._core.multiarray._reconstruct, np.dtypes.UInt32DType]


def training_state(checkpoint: Path) -> dict:
    """Everything `accelerator.save_state` and the loop wrote, loaded without unpickling code."""
    with torch.serialization.safe_globals(NUMPY_RNG):  # numpy's RNG state is an array
        rng = torch.load(checkpoint / "random_states_0.pkl", weights_only=True)
    return {
        "model": load_file(checkpoint / "model.safetensors"),
        "optimizer": torch.load(checkpoint / "optimizer.bin", weights_only=True),
        "scheduler": torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=True),
        "rng": rng,
        "trainer": json.loads((checkpoint / STATE_FILE).read_text()),
    }


def final_checkpoint(run_dir: Path) -> Path:
    found = list_checkpoints(run_dir / "checkpoints")
    assert found, f"no checkpoint in {run_dir}"
    return found[-1]


def _close(got, expected, context: str) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{context}: {m}")


def assert_same_final_state(run_dir: Path, reference_dir: Path, context: str = "") -> None:
    """The last checkpoints of two runs hold the same training state: weights, AdamW moments and
    step counts, learning-rate schedule, RNG streams, data position and the loop's bookkeeping.
    Floats are compared with tolerances (runs may differ in the last bits), counters and RNG states exactly."""
    got_dir, ref_dir = final_checkpoint(run_dir), final_checkpoint(reference_dir)
    assert got_dir.name == ref_dir.name, context
    got, ref = training_state(got_dir), training_state(ref_dir)

    assert got["model"].keys() == ref["model"].keys(), context
    for key in ref["model"]:
        _close(got["model"][key], ref["model"][key], f"weights {key} {context}")

    assert got["optimizer"]["state"].keys() == ref["optimizer"]["state"].keys(), context
    for index, moments in ref["optimizer"]["state"].items():
        for name, value in moments.items():  # step, exp_avg, exp_avg_sq
            _close(got["optimizer"]["state"][index][name], value, f"optimizer {index}.{name} {context}")
    for got_group, ref_group in zip(got["optimizer"]["param_groups"], ref["optimizer"]["param_groups"], strict=True):
        assert got_group.keys() == ref_group.keys(), context
        for key, value in ref_group.items():
            if isinstance(value, float):
                assert got_group[key] == pytest.approx(value, rel=1e-6), f"optimizer {key} {context}"
            else:
                assert got_group[key] == value, f"optimizer {key} {context}"

    for key in ("last_epoch", "_step_count"):
        assert got["scheduler"][key] == ref["scheduler"][key], f"scheduler {key} {context}"
    assert got["scheduler"]["_last_lr"] == pytest.approx(ref["scheduler"]["_last_lr"], rel=1e-6), context

    assert got["rng"]["random_state"] == ref["rng"]["random_state"], f"python RNG {context}"
    assert np.array_equal(got["rng"]["numpy_random_seed"][1], ref["rng"]["numpy_random_seed"][1]), f"numpy RNG {context}"
    assert torch.equal(got["rng"]["torch_manual_seed"], ref["rng"]["torch_manual_seed"]), f"torch RNG {context}"

    position = ("global_step", "epoch", "batches_in_epoch", "examples_seen", "tokens_seen", "best_step",
                "evals_without_improvement")
    assert {k: got["trainer"][k] for k in position} == {k: ref["trainer"][k] for k in position}, context
    assert got["trainer"]["best_metric"] == pytest.approx(ref["trainer"]["best_metric"], rel=1e-6), context
    got_log, ref_log = got["trainer"]["log_history"], ref["trainer"]["log_history"]
    assert [r.keys() for r in got_log] == [r.keys() for r in ref_log], context
    for got_row, ref_row in zip(got_log, ref_log, strict=True):
        assert got_row == pytest.approx(ref_row, rel=1e-5), f"log history {context}"
