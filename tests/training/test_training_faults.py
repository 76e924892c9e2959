"""Training under real faults, as subprocesses: an external SIGKILL at a random moment, a disk that
fills up while a checkpoint is written, an export that fails or is killed half-way.

test_resume_and_ddp.py covers the deterministic kill (FINETUNE_KILL_AT_STEP) and the ignored
half-written checkpoint; these add the faults that come from outside the process.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.test_resume_and_ddp import _common
from tests.training.test_resume_and_ddp import _run as _run_any_threads

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
# One thread per run: exact equality between runs, and no OpenMP spinning when the machine is busy.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    return _run_any_threads(args, {**ONE_THREAD, **(env_extra or {})})


@pytest.fixture(scope="module")
def reference(tiny_bert, rt_small, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must end up identical to."""
    train, test = rt_small
    out = tmp_path_factory.mktemp("reference") / "run"
    result = _run(_common(tiny_bert, train, test, out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def assert_same_run(out: Path, reference: Path, context: str = "") -> None:
    expected, got = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=f"{key} {context}")
    ref, res = (json.loads((p / "all_results.json").read_text()) for p in (reference, out))
    assert res["best_step"] == ref["best_step"], context
    assert res["eval_accuracy"] == pytest.approx(ref["eval_accuracy"]), context
    assert res["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5), context
    assert res["train_steps"] == ref["train_steps"], context


def error_line(stderr: str) -> str:
    """The one-line `error: ...` message (tqdm's progress lines may share its line)."""
    found = re.findall(r"error: [^\r\n]*", stderr)
    assert found, stderr[-3000:]
    return found[-1]


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}"))


def start(args: list[str], log: Path, env_extra: dict | None = None, preexec=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "training" / "finetune.py"), *args], cwd=REPO,
                            env={**os.environ, **ONE_THREAD, **(env_extra or {})}, stdout=subprocess.DEVNULL,
                            stderr=log.open("w"), preexec_fn=preexec)


def test_external_sigkill_at_a_random_moment_then_resume(tiny_bert, rt_small, reference, tmp_path):
    """kill -9 from outside, at a random checkpoint (while it is being written, or just after), then
    `--resume_from_checkpoint latest`: the same weights and metrics as the uninterrupted run.
    FAULT_SEED=<n> replays one choice."""
    seed = int(os.environ.get("FAULT_SEED", random.randrange(10_000)))
    rng = random.Random(seed)
    step = rng.choice([4, 8, 12])
    moment = rng.choice(["while-saving", "just-after"])
    delay = rng.uniform(0, 0.05)
    context = f"(FAULT_SEED={seed}: kill {moment} checkpoint step_{step}, delay {delay:.3f}s)"
    train, test = rt_small
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    proc = start(_common(tiny_bert, train, test, out), tmp_path / "killed.log")
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
    assert not (out / "config.json").exists(), context  # nothing exported: no half model
    done = sorted((p.name for p in checkpoints.iterdir() if p.name.startswith("step_")), key=lambda n: int(n[5:]))

    resumed = _run([*_common(tiny_bert, train, test, out), "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-2000:] + context
    if done:  # from the last complete checkpoint; a half-written one is never picked
        assert f"resumed from {checkpoints / done[-1]}" in resumed.stderr.replace("\n", " "), context
    else:  # killed while writing the very first checkpoint: nothing usable, so a fresh start
        assert "starting from scratch" in resumed.stderr, context
    assert_same_run(out, reference, context)
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".tmp")], context


def limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes beyond it fail with EFBIG

    return apply


@pytest.fixture
def tmpfs(tmp_path):
    """A 24 MB tmpfs (root only): room for one checkpoint and the best model, not for a second checkpoint."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize("disk", ["file-size-limit", "full-tmpfs"])
def test_disk_full_while_checkpointing_is_reported_and_resumable(disk, tiny_bert, rt_small, reference, tmp_path, request):
    """The save of checkpoint step_8 fails half-way (EFBIG from RLIMIT_FSIZE, or ENOSPC on a full tmpfs):
    the run stops with one clear line (exit 1, no traceback), no partial checkpoint is left, step_4
    stays usable, and resuming from it ends with the uninterrupted run's weights."""
    train, test = rt_small
    args_env, preexec = {}, None
    if disk == "full-tmpfs":
        small = request.getfixturevalue("tmpfs")
        out = small / "run"
        first = _run(_common(tiny_bert, train, test, out))
    else:
        out = tmp_path / "run"
        killed = _run(_common(tiny_bert, train, test, out), {"FINETUNE_KILL_AT_STEP": "6"})
        assert killed.returncode == -signal.SIGKILL
        # model.safetensors (4 MB) still fits, optimizer.bin (8 MB) does not
        preexec = limit_file_size(6 * 2**20)
        log = tmp_path / "limited.log"
        proc = start([*_common(tiny_bert, train, test, out), "--resume_from_checkpoint", "latest"], log, args_env, preexec)
        proc.wait(timeout=300)
        first = subprocess.CompletedProcess(proc.args, proc.returncode, "", log.read_text())
    assert first.returncode == 1, first.stderr[-3000:]
    last_line = error_line(first.stderr)
    assert last_line.startswith("error: could not save checkpoint"), first.stderr[-3000:]
    assert "step_8" in last_line and "step_4 is intact" in last_line and "--resume_from_checkpoint latest" in last_line
    assert ("file size limit (ulimit -f) 6 MB" in last_line) if disk == "file-size-limit" else ("MB free on" in last_line)
    assert "Traceback" not in first.stderr
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "step_4"]  # no .tmp-step_8, no step_8
    assert not (out / "config.json").exists()

    if disk == "full-tmpfs":  # the operator frees space: here, the disk grows
        subprocess.run(["mount", "-o", "remount,size=256m", str(out.parent)], check=True)
    resumed = _run([*_common(tiny_bert, train, test, out), "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "step_4" in resumed.stderr and "resumed from" in resumed.stderr
    assert_same_run(out, reference)


def model_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("fault", ["processor:raise", "swap:raise", "card:kill", "after-swap:kill"])
def test_failed_export_keeps_the_previous_model(fault, tiny_bert, rt_small, reference, tmp_path):
    """A second training run into a served folder whose export fails (a disk-full error, or SIGKILL)
    at different stages: until the swap the previous model is byte-for-byte intact; no partial folder
    stays visible; the training state survives, and `--resume_from_checkpoint latest` exports the new
    model (identical to an uninterrupted run)."""
    train, test = rt_small
    out = tmp_path / "models" / "sentiment"
    first = _run([*_common(tiny_bert, train, test, out), "--seed", "1"])  # the model being served
    assert first.returncode == 0, first.stderr[-2000:]
    previous = model_files(out)

    stage, action = fault.split(":")
    second = _run([*_common(tiny_bert, train, test, out), "--overwrite_output_dir"], {"FINETUNE_EXPORT_FAULT": fault})
    if action == "raise":
        assert second.returncode == 1, second.stderr[-3000:]
        last_line = error_line(second.stderr)
        assert last_line.startswith(f"error: could not export the model to {out}"), second.stderr[-3000:]
        assert "No space left on device" in last_line and "unchanged" in last_line
        assert "Traceback" not in second.stderr
        assert hidden_leftovers(out) == []
    else:
        assert second.returncode == -signal.SIGKILL
    if stage != "after-swap":
        assert model_files(out) == previous  # every file of the served model untouched
    else:  # killed after the swap: the new model is complete in place, its checkpoints in the hidden folder
        assert (out / "config.json").is_file() and model_files(out) != previous
    assert (out / "checkpoints").is_dir() or action == "kill"

    resumed = _run([*_common(tiny_bert, train, test, out), "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr  # the training state was found (recovered after a kill)
    assert_same_run(out, reference, fault)
    assert hidden_leftovers(out) == []  # stale export folders cleaned up
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[:1] == ["best"]
