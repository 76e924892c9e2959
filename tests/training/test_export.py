"""Export (training/export.py): the model folder holds the model and nothing else, is swapped into place
atomically, and an export that fails for real (a full disk, SIGKILL) at any stage keeps the previous
model and the training state."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.training.subprocess_runs import (
    classifier_args,
    error_line,
    final_checkpoint,
    finetune,
    hidden_leftovers,
)
from training.export import recover_interrupted_export, replace_dir
from training.finetune import main

MODEL_FOLDER = {"README.md", "all_results.json", "config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "training_config.yaml", "training_curves.png"}


def test_model_folder_holds_the_model_and_nothing_else(tiny_bert, rt_small, tmp_path):
    train, test = rt_small
    assert main(["--model_name_or_path", str(tiny_bert), "--train_file", str(train), "--validation_file", str(test),
                 "--output_dir", "models/sentiment", "--max_train_steps", "4", "--checkpointing_steps", "2"]) == 0
    out = tmp_path / "models" / "sentiment"
    assert {p.name for p in out.iterdir()} == MODEL_FOLDER
    assert [p.name for p in out.parent.iterdir()] == ["sentiment"]  # no hidden export folder left
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_steps"] == 4
    # The weights are the best checkpoint's, copied as they are.
    best = tmp_path / "runs" / "sentiment" / "checkpoints" / "best" / "model.safetensors"
    assert (out / "model.safetensors").read_bytes() == best.read_bytes()


def test_replace_dir_swaps_a_complete_folder_in(tmp_path):
    target, new = tmp_path / "model", tmp_path / ".model.export-1"
    target.mkdir()
    (target / "config.json").write_text("old")
    new.mkdir()
    (new / "config.json").write_text("new")
    old = replace_dir(new, target)
    assert (target / "config.json").read_text() == "new"
    assert old is not None and (old / "config.json").read_text() == "old"  # for the caller to remove
    fresh = tmp_path / ".other.export-2"
    fresh.mkdir()
    assert replace_dir(fresh, tmp_path / "other") is None and (tmp_path / "other").is_dir()


def test_leftovers_of_a_killed_export_are_removed(tmp_path):
    target = tmp_path / "sentiment"
    target.mkdir()
    (target / "config.json").write_text("served")
    for name in (".sentiment.export-ab12cd34", ".sentiment.old-ef56ab78"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".other.export-00000000").mkdir()  # another model's export in progress: not ours to remove
    recover_interrupted_export(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.export-00000000", "sentiment"]
    assert (target / "config.json").read_text() == "served"


def model_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["processor:raise", "swap:raise", "card:kill", "after-swap:kill"])
def test_failed_export_keeps_the_previous_model(fault, tiny_bert, rt_small, tmp_path):
    """A second training run into a served folder whose export fails (a disk-full error, or SIGKILL)
    at different stages: until the swap the previous model is byte-for-byte intact; no partial folder
    stays visible; the training state in the run folder survives, and `--resume_from_checkpoint latest`
    exports the new model."""
    train, test = rt_small
    args = classifier_args(tiny_bert, train, test, "sentiment")
    out, run = tmp_path / "models" / "sentiment", tmp_path / "runs" / "sentiment"
    first = finetune([*args, "--seed", "1"], tmp_path)  # the model being served
    assert first.returncode == 0, first.stderr[-2000:]
    previous = model_files(out)

    stage, action = fault.split(":")
    second = finetune([*args, "--overwrite_output_dir"], tmp_path, {"EXPORT_FAULT": fault}, faults=True)
    if action == "raise":
        assert second.returncode == 1, second.stderr[-3000:]
        last_line = error_line(second.stderr)
        assert last_line.startswith("error: could not export the model to models/sentiment: "), second.stderr[-3000:]
        assert "No space left on device" in last_line and "unchanged" in last_line
        assert "runs/sentiment/checkpoints" in last_line  # where the training state is
        assert "Traceback" not in second.stderr
        assert hidden_leftovers(out) == []
    else:
        assert second.returncode == -signal.SIGKILL
    if stage != "after-swap":
        assert model_files(out) == previous  # every file of the served model untouched
    else:  # killed after the swap: the new model is complete in place, the old one still in a hidden folder
        assert (out / "config.json").is_file() and model_files(out) != previous
    assert {p.name for p in out.iterdir()} == MODEL_FOLDER  # never any training state in the model folder
    assert final_checkpoint(run).name == "step_20"  # the second run's training state is complete

    resumed = finetune([*args, "--resume_from_checkpoint", "latest"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from runs/sentiment/checkpoints/step_20 " in resumed.stderr
    assert hidden_leftovers(out) == []  # stale export folders cleaned up
    assert {p.name for p in out.iterdir()} == MODEL_FOLDER
    # The new model is the second run's best, with its results.
    assert (out / "model.safetensors").read_bytes() == (run / "checkpoints" / "best" / "model.safetensors").read_bytes()
    trainer = json.loads((final_checkpoint(run) / "trainer_state.json").read_text())
    results = json.loads((out / "all_results.json").read_text())
    assert results["best_step"] == trainer["best_step"] and results["train_steps"] == 20
    assert results["eval_accuracy"] == pytest.approx(trainer["best_eval"]["accuracy"])
