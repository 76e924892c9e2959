"""The training loop (training/loop.py), in real subprocesses: a run killed with SIGKILL (at a chosen
step, or from outside at a random moment) or stopped by a full disk resumes to the final training state
of an uninterrupted run (a causal LM, a LoRA run, an image classifier); early stopping; `accelerate
launch` with two CPU processes (gloo DDP)."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.subprocess_runs import (
    CPU_DISTRIBUTED,
    NUMPY_RNG,
    assert_same_final_state,
    distributed_launcher,
    error_line,
    final_checkpoint,
    finetune,
    lm_args,
    start,
    training_state,
)
from training.finetune import main

pytestmark = pytest.mark.slow
# Under pytest-xdist the tests that share a session fixture's run stay on one worker, which runs it once.
SHARES_REFERENCE = pytest.mark.xdist_group("gpt2-reference")
SHARES_TWO_PROCESS_RUN = pytest.mark.xdist_group("two-process-run")


def assert_resumed_like_reference(cwd: Path, reference: Path, resume_step: int, context: str = "") -> None:
    """The last checkpoint holds the uninterrupted run's training state, and the exported model is the
    same best one, picked at an evaluation after the resume (so the resumed part of the run chose it)."""
    assert_same_final_state(cwd / "runs" / "run", reference / "runs" / "run", context)
    ref, res = (json.loads((p / "models" / "run" / "all_results.json").read_text()) for p in (reference, cwd))
    assert res["best_step"] == ref["best_step"], context
    assert res["best_step"] > resume_step, context
    assert res["eval_perplexity"] == pytest.approx(ref["eval_perplexity"], rel=1e-4), context
    assert res["train_steps"] == ref["train_steps"] == 20, context


@SHARES_REFERENCE
def test_kill_9_then_resume_matches_uninterrupted_run(tiny_gpt2, rt_small, reference, tmp_path):
    train, test = rt_small
    args = lm_args(tiny_gpt2, train, test)
    killed = finetune(args, tmp_path, {"KILL_AT_STEP": "7"}, faults=True)
    assert killed.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "runs" / "run" / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir())
    assert "step_4" in names and "step_8" not in names
    assert not (tmp_path / "models" / "run").exists()  # nothing exported: no half model
    # A checkpoint whose save was cut short must be ignored by `latest`.
    (checkpoints / ".tmp-step_6").mkdir()
    (checkpoints / "step_6").mkdir()  # no trainer_state.json: incomplete

    again = finetune(args, tmp_path)
    assert again.returncode == 2 and "--resume_from_checkpoint latest" in again.stderr

    resumed = finetune([*args, "--resume_from_checkpoint", "latest"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from runs/run/checkpoints/step_4 " in resumed.stderr
    assert_resumed_like_reference(tmp_path, reference, resume_step=4)


@SHARES_REFERENCE
def test_external_sigkill_at_a_random_moment_then_resume(tiny_gpt2, rt_small, reference, tmp_path):
    """kill -9 from outside, at a random checkpoint (while it is being written, or just after), then
    `--resume_from_checkpoint latest`: the uninterrupted run's training state. FAULT_SEED=<n> replays one choice."""
    seed = int(os.environ.get("FAULT_SEED", random.randrange(10_000)))
    rng = random.Random(seed)
    step = rng.choice([4, 8, 12, 16])
    moment = rng.choice(["while-saving", "just-after"])
    delay = rng.uniform(0, 0.05)
    context = f"(FAULT_SEED={seed}: kill {moment} checkpoint step_{step}, delay {delay:.3f}s)"
    train, test = rt_small
    args = lm_args(tiny_gpt2, train, test)
    checkpoints = tmp_path / "runs" / "run" / "checkpoints"
    proc = start(args, tmp_path, tmp_path / "killed.log")
    killed_at = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            saving = (checkpoints / f".tmp-step_{step}").exists()
            saved = (checkpoints / f"step_{step}").exists()
            if (moment == "while-saving" and (saving or saved)) or (moment == "just-after" and saved):
                if moment == "just-after":
                    time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                killed_at = "saving" if saving and not saved else "saved"
                break
            time.sleep(0.0005)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_at is not None and code == -signal.SIGKILL, f"the run ended before the kill {context}"
    assert not (tmp_path / "models" / "run").exists(), context  # nothing exported: no half model
    done = sorted((p.name for p in checkpoints.iterdir() if p.name.startswith("step_")), key=lambda n: int(n[5:]))

    resumed = finetune([*args, "--resume_from_checkpoint", "latest"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:] + context
    if done:  # from the last complete checkpoint; a half-written one is never picked
        assert f"resumed from runs/run/checkpoints/{done[-1]} " in resumed.stderr, context
    else:  # killed while writing the very first checkpoint: nothing usable, so a fresh start
        assert "starting from scratch" in resumed.stderr, context
    assert_resumed_like_reference(tmp_path, reference, int(done[-1][5:]) if done else 0, context)
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".tmp")], context


def _kill_then_resume(args: list[str], cwd: Path, kill_at: int) -> None:
    killed = finetune(args, cwd, {"KILL_AT_STEP": str(kill_at)}, faults=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = finetune([*args, "--resume_from_checkpoint", "latest"], cwd)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from runs/run/checkpoints/step_{kill_at - kill_at % 4} " in resumed.stderr


def test_lora_run_killed_then_resumed_matches_uninterrupted_run(tiny_gpt2, rt_small, tmp_path_factory):
    """LoRA (GPT-2's Conv1D layers, dropout in the adapters): checkpoints hold the adapters only, and a run
    killed with SIGKILL resumes to the uninterrupted run's adapters, AdamW moments, RNG and position."""
    train, test = rt_small
    args = [*lm_args(tiny_gpt2, train, test), "--use_peft", "--lora_r", "4", "--lora_dropout", "0.1",
            "--learning_rate", "2e-2"]
    reference, cwd = tmp_path_factory.mktemp("lora-reference"), tmp_path_factory.mktemp("lora-resumed")
    ref = finetune(args, reference)
    assert ref.returncode == 0, ref.stderr[-2000:]
    _kill_then_resume(args, cwd, kill_at=7)
    assert_same_final_state(cwd / "runs" / "run", reference / "runs" / "run", "(LoRA)")
    state = training_state(final_checkpoint(cwd / "runs" / "run"))
    assert state["model"] and all(".lora_" in k for k in state["model"])  # the trainable tensors only
    ref_res, res = (json.loads((p / "models" / "run" / "all_results.json").read_text()) for p in (reference, cwd))
    assert res["best_step"] == ref_res["best_step"] and res["train_steps"] == 20
    assert res["eval_perplexity"] == pytest.approx(ref_res["eval_perplexity"], rel=1e-4)
    assert (cwd / "models" / "run" / "model.safetensors").is_file()  # merged export


def test_image_classification_killed_then_resumed_matches_uninterrupted_run(tiny_mobilenet, caltech_folder,
                                                                            tmp_path_factory):
    """Random resized crops and flips, dropout, batch-norm statistics in training mode: all resume exactly."""
    args = ["--task", "image-classification", "--model_name_or_path", str(tiny_mobilenet), "--train_dir",
            str(caltech_folder), "--train_samples_per_class", "6", "--output_dir", "models/run", "--num_train_epochs",
            "2", "--per_device_train_batch_size", "3", "--learning_rate", "1e-2", "--checkpointing_steps", "4",
            "--eval_steps", "3", "--seed", "7"]
    reference, cwd = tmp_path_factory.mktemp("image-reference"), tmp_path_factory.mktemp("image-resumed")
    ref = finetune(args, reference)
    assert ref.returncode == 0, ref.stderr[-2000:]
    _kill_then_resume(args, cwd, kill_at=7)
    assert_same_final_state(cwd / "runs" / "run", reference / "runs" / "run", "(image classification)")
    ref_res, res = (json.loads((p / "models" / "run" / "all_results.json").read_text()) for p in (reference, cwd))
    assert res["train_steps"] == ref_res["train_steps"] == 12
    assert res["best_step"] == ref_res["best_step"]
    assert res["eval_accuracy"] == pytest.approx(ref_res["eval_accuracy"])


def limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes beyond it fail with EFBIG

    return apply


@pytest.fixture
def tmpfs(tmp_path):
    """A 36 MB tmpfs (root only): room for one checkpoint (19 MB) and the best model (6 MB), not for a
    second checkpoint."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=36m", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@SHARES_REFERENCE
@pytest.mark.parametrize("disk", ["file-size-limit", "full-tmpfs"])
def test_disk_full_while_checkpointing_is_reported_and_resumable(disk, tiny_gpt2, rt_small, reference, tmp_path,
                                                                 request):
    """The save of checkpoint step_8 fails half-way (EFBIG from RLIMIT_FSIZE, or ENOSPC on a full tmpfs):
    the run stops with one clear line (exit 1, no traceback), no partial checkpoint is left, step_4
    stays usable, and resuming from it ends with the uninterrupted run's training state."""
    train, test = rt_small
    args = lm_args(tiny_gpt2, train, test)
    if disk == "full-tmpfs":
        cwd = request.getfixturevalue("tmpfs")
        first = finetune(args, cwd)
    else:
        cwd = tmp_path
        killed = finetune(args, cwd, {"KILL_AT_STEP": "6"}, faults=True)
        assert killed.returncode == -signal.SIGKILL
        # model.safetensors (6.3 MB) still fits, optimizer.bin (12.5 MB) does not
        log = tmp_path / "limited.log"
        proc = start([*args, "--resume_from_checkpoint", "latest"], cwd, log, preexec=limit_file_size(8 * 2**20))
        proc.wait(timeout=300)
        first = subprocess.CompletedProcess(proc.args, proc.returncode, "", log.read_text())
    assert first.returncode == 1, first.stderr[-3000:]
    last_line = error_line(first.stderr)
    assert last_line.startswith("error: could not save checkpoint"), first.stderr[-3000:]
    assert "step_8" in last_line and "step_4 is intact" in last_line and "--resume_from_checkpoint latest" in last_line
    assert ("file size limit (ulimit -f) 8 MB" in last_line) if disk == "file-size-limit" else ("MB free on" in last_line)
    assert "Traceback" not in first.stderr
    checkpoints = cwd / "runs" / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "step_4"]  # no .tmp-step_8, no step_8
    assert not (cwd / "models" / "run").exists()

    if disk == "full-tmpfs":  # the operator frees space: here, the disk grows
        subprocess.run(["mount", "-o", "remount,size=256m", str(cwd)], check=True)
    resumed = finetune([*args, "--resume_from_checkpoint", "latest"], cwd)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from runs/run/checkpoints/step_4 " in resumed.stderr
    assert_resumed_like_reference(cwd, reference, resume_step=4)


def test_early_stopping_stops_a_run_that_no_longer_improves(tiny_bert, rt_small, tmp_path):
    train, test = rt_small
    out = tmp_path / "early"
    # A learning rate this small leaves the eval metric unchanged: no evaluation improves on the first.
    assert main(["--model_name_or_path", str(tiny_bert), "--train_file", str(train), "--validation_file", str(test),
                 "--output_dir", str(out), "--num_train_epochs", "5", "--per_device_train_batch_size", "16",
                 "--learning_rate", "1e-12", "--eval_steps", "2", "--early_stopping_patience", "2",
                 "--checkpointing_steps", "none"]) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_steps"] == 6  # evals at 2 (best), 4, 6 -> stop; 5 epochs would be 50 steps
    assert results["best_step"] == 2


@SHARES_TWO_PROCESS_RUN
def test_two_cpu_processes_ddp(two_process_run):
    cwd, stderr = two_process_run
    assert "2 process(es)" in stderr
    out, checkpoints = cwd / "models" / "ddp", cwd / "runs" / "ddp" / "checkpoints"
    results = json.loads((out / "all_results.json").read_text())
    # 41 is odd: the second process pads its last batch; gather_for_metrics must drop the copy.
    assert sum(map(sum, results["eval_confusion_matrix"])) == 41
    assert results["train_steps"] == 6
    assert "2 process(es)" in (out / "README.md").read_text()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "step_3", "step_6"]
    assert (checkpoints / "step_6" / "random_states_1.pkl").is_file()  # per-process RNG state
    assert not (out / "checkpoints").exists()


def test_two_process_ddp_run_killed_then_resumed_matches_uninterrupted_run(tiny_gpt2, rt_small, tmp_path_factory):
    """`accelerate launch` with 2 CPU processes (gloo DDP), both SIGKILLed right after step 7: resumed
    from step_4 it ends with the uninterrupted 2-process run's weights, AdamW moments, schedule, the
    RNG streams of *both* ranks, step and data position, and the best model is picked after the resume."""
    train, test = rt_small
    # lm_args' 20 steps of 4x2 blocks per process become 10 with two processes: 2 epochs of 6 steps here
    args = [*lm_args(tiny_gpt2, train, test), "--per_device_train_batch_size", "2", "--max_train_samples", "40"]
    env, launcher = CPU_DISTRIBUTED, distributed_launcher()
    reference, cwd = tmp_path_factory.mktemp("ddp-reference"), tmp_path_factory.mktemp("ddp-resumed")
    ref = finetune(args, reference, env, launcher)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "2 process(es)" in ref.stderr
    killed = finetune(args, cwd, {**env, "KILL_AT_STEP": "7"}, launcher, faults=True)
    assert killed.returncode != 0, killed.stderr[-3000:]
    checkpoints = cwd / "runs" / "run" / "checkpoints"
    assert "step_4" in {p.name for p in checkpoints.iterdir()} and not (checkpoints / "step_8").exists()
    assert not (cwd / "models" / "run").exists()
    resumed = finetune([*args, "--resume_from_checkpoint", "latest"], cwd, env, launcher)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from runs/run/checkpoints/step_4 " in resumed.stderr

    assert_same_final_state(cwd / "runs" / "run", reference / "runs" / "run", "(2-process DDP)")
    got, ref_dir = final_checkpoint(cwd / "runs" / "run"), final_checkpoint(reference / "runs" / "run")
    with torch.serialization.safe_globals(NUMPY_RNG):  # rank 1's RNG streams too (rank 0's: above)
        rng_got, rng_ref = (torch.load(d / "random_states_1.pkl", weights_only=True) for d in (got, ref_dir))
    assert rng_got["random_state"] == rng_ref["random_state"]
    assert np.array_equal(rng_got["numpy_random_seed"][1], rng_ref["numpy_random_seed"][1])
    assert torch.equal(rng_got["torch_manual_seed"], rng_ref["torch_manual_seed"])
    ref_res, res = (json.loads((p / "models" / "run" / "all_results.json").read_text()) for p in (reference, cwd))
    assert res["train_steps"] == ref_res["train_steps"] > 8
    assert res["best_step"] == ref_res["best_step"] > 4  # chosen by the resumed part of the run
    assert res["eval_perplexity"] == pytest.approx(ref_res["eval_perplexity"], rel=1e-4)
