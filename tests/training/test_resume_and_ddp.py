"""Real subprocesses: a run killed with SIGKILL resumes to the same weights as an uninterrupted
one; `accelerate launch` with two CPU processes (gloo DDP) trains and evaluates correctly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(args: list[str], env_extra: dict | None = None, launcher: list[str] | None = None,
         timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    cmd = (launcher or [sys.executable]) + [str(REPO / "training" / "finetune.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _common(model: Path, train: Path, test: Path, out: Path) -> list[str]:
    # Dropout is on (BERT's 0.1) and gradients are accumulated: both must resume exactly.
    return ["--model_name_or_path", str(model), "--train_file", str(train), "--validation_file", str(test),
            "--output_dir", str(out), "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
            "--gradient_accumulation_steps", "2", "--learning_rate", "5e-4", "--checkpointing_steps", "4",
            "--eval_steps", "3", "--num_warmup_steps", "2", "--seed", "7"]


def test_kill_9_then_resume_matches_uninterrupted_run(tiny_bert, rt_small, tmp_path):
    train, test = rt_small
    reference = _run(_common(tiny_bert, train, test, tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "interrupted"
    killed = _run(_common(tiny_bert, train, test, out), {"FINETUNE_KILL_AT_STEP": "7"})
    assert killed.returncode == -signal.SIGKILL
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "step_4" in names and "step_8" not in names
    assert not (out / "config.json").exists()  # nothing exported: no half model
    # A checkpoint whose save was cut short must be ignored by `latest`.
    (out / "checkpoints" / ".tmp-step_6").mkdir()
    (out / "checkpoints" / "step_6").mkdir()  # no trainer_state.json: incomplete

    again = _run(_common(tiny_bert, train, test, out))
    assert again.returncode == 2 and "--resume_from_checkpoint latest" in again.stderr

    resumed = _run([*_common(tiny_bert, train, test, out), "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr and "step_4" in resumed.stderr

    expected, got = load_file(tmp_path / "reference" / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    ref_results = json.loads((tmp_path / "reference" / "all_results.json").read_text())
    results = json.loads((out / "all_results.json").read_text())
    assert results["best_step"] == ref_results["best_step"]
    assert results["eval_accuracy"] == pytest.approx(ref_results["eval_accuracy"])
    assert results["eval_loss"] == pytest.approx(ref_results["eval_loss"], rel=1e-5)


def test_two_cpu_processes_ddp(tiny_bert, rt_small, tmp_path):
    train, test = rt_small
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                "0"]
    result = _run(["--model_name_or_path", str(tiny_bert), "--train_file", str(train), "--validation_file",
                   str(test), "--max_eval_samples", "41", "--output_dir", str(out), "--max_train_steps", "6",
                   "--per_device_train_batch_size", "8", "--checkpointing_steps", "3"],
                  {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}, launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr
    results = json.loads((out / "all_results.json").read_text())
    # 41 is odd: the second process pads its last batch; gather_for_metrics must drop the copy.
    assert sum(map(sum, results["eval_confusion_matrix"])) == 41
    assert results["train_steps"] == 6
    assert "2 process(es)" in (out / "README.md").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "step_3", "step_6"]
    assert (out / "checkpoints" / "step_6" / "random_states_1.pkl").is_file()  # per-process RNG state
