"""The entry point (training/finetune.py): a run has a model folder and a run folder; everything is
checked before the first write; an earlier run is continued or refused, a run of the previous version
(checkpoints inside the model folder) is resumed and its state moved to the run folder."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from tests.training.subprocess_runs import training_state
from training.finetune import main


def _args(model: Path, train: Path, test: Path, *extra: str) -> list[str]:
    """4 optimizer steps, a checkpoint every 2, into the default folders (models/finetuned, runs/finetuned)."""
    return ["--model_name_or_path", str(model), "--train_file", str(train), "--validation_file", str(test),
            "--max_train_steps", "4", "--checkpointing_steps", "2", "--per_device_train_batch_size", "16", *extra]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_run_has_a_model_folder_and_a_run_folder(tiny_bert, rt_small, tmp_path):
    train, test = rt_small
    assert main(_args(tiny_bert, train, test)) == 0
    assert _names(tmp_path) == ["models", "runs"]  # the defaults, relative to the current directory
    model = tmp_path / "models" / "finetuned"
    assert (model / "model.safetensors").is_file() and not (model / "checkpoints").exists()
    assert _names(tmp_path / "runs" / "finetuned" / "checkpoints") == ["best", "step_2", "step_4"]

    assert main(_args(tiny_bert, train, test, "--output_dir", "models/other", "--run_dir", "state/other")) == 0
    assert _names(tmp_path / "state" / "other" / "checkpoints") == ["best", "step_2", "step_4"]
    assert not (tmp_path / "runs" / "other").exists() and (tmp_path / "models" / "other" / "config.json").is_file()


def test_a_run_that_fails_before_its_first_step_leaves_nothing_behind(tiny_bert, rt_small, tmp_path, capsys):
    train, test = rt_small
    assert main(["--model_name_or_path", str(tiny_bert), "--train_file", "nope.csv"]) == 2
    assert "nope.csv does not exist" in capsys.readouterr().err
    assert main(_args(tiny_bert, train, test, "--label_column", "stars")) == 2  # files, columns, labels: all
    assert "label column 'stars' not found" in capsys.readouterr().err       # checked before any write
    assert main(_args(tiny_bert, train, test, "--resume_from_checkpoint", "nowhere/step_4")) == 2
    assert "nowhere/step_4 is not a checkpoint folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

    assert main(_args(tiny_bert, train, test)) == 0  # the corrected command is not taken for a rerun
    assert (tmp_path / "models" / "finetuned" / "config.json").is_file()


@pytest.mark.parametrize("flag", ["--output_dir", "--run_dir"])
def test_a_folder_that_cannot_be_written_is_refused_up_front(flag, tiny_bert, rt_small, tmp_path, capsys):
    """Not after the first evaluation, when the best model is saved (a read-only mount, a file in the way)."""
    train, test = rt_small
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    assert main(_args(tiny_bert, train, test, flag, "notes.txt/run")) == 2
    assert (f"error: {flag} notes.txt/run cannot be written ({tmp_path / 'notes.txt'} is not a writable folder)"
            in capsys.readouterr().err)
    assert _names(tmp_path) == ["notes.txt"]


def test_only_a_complete_checkpoint_is_an_earlier_run(tiny_bert, rt_small, tmp_path, capsys, caplog):
    train, test = rt_small
    caplog.set_level(logging.INFO, logger="training")
    checkpoints = tmp_path / "runs" / "finetuned" / "checkpoints"
    for leftover in (".tmp-step_2", "step_2", "best"):  # a run killed while writing its first checkpoint
        (checkpoints / leftover).mkdir(parents=True)
    (tmp_path / "models" / "finetuned" / "checkpoints").mkdir(parents=True)  # an empty one, by the old version
    assert main(_args(tiny_bert, train, test)) == 0  # a fresh start, not "an earlier run"
    assert _names(checkpoints) == ["best", "step_2", "step_4"]
    assert not (tmp_path / "models" / "finetuned" / "checkpoints").exists()

    assert main(_args(tiny_bert, train, test)) == 2  # a complete checkpoint: refused
    assert ("error: --run_dir runs/finetuned holds checkpoints of an earlier run (step_4): continue it with "
            "--resume_from_checkpoint latest, or pass --overwrite_output_dir to start over") in capsys.readouterr().err

    caplog.clear()
    assert main(_args(tiny_bert, train, test, "--overwrite_output_dir")) == 0  # starts over
    assert "resumed from" not in caplog.text and _names(checkpoints) == ["best", "step_2", "step_4"]
    assert main(_args(tiny_bert, train, test, "--resume_from_checkpoint", "latest")) == 0  # continues (done: exports)
    assert "resumed from runs/finetuned/checkpoints/step_4 at step 4" in caplog.text


def test_a_run_of_the_previous_version_is_resumed_and_its_state_moved(tiny_bert, rt_small, tmp_path, capsys, caplog):
    """The previous version kept checkpoints in <output_dir>/checkpoints, and its trainer state had fewer fields."""
    train, test = rt_small
    caplog.set_level(logging.INFO, logger="training")
    assert main(_args(tiny_bert, train, test)) == 0
    uninterrupted = training_state(tmp_path / "runs" / "finetuned" / "checkpoints" / "step_4")
    legacy = tmp_path / "models" / "finetuned" / "checkpoints"
    shutil.move(tmp_path / "runs" / "finetuned" / "checkpoints", legacy)  # the old layout, stopped after step 2
    shutil.rmtree(legacy / "step_4")
    shutil.rmtree(tmp_path / "runs")
    state_file = legacy / "step_2" / "trainer_state.json"
    old_state = {k: v for k, v in json.loads(state_file.read_text()).items() if not k.startswith("unlogged_")}
    state_file.write_text(json.dumps(old_state))

    assert main(_args(tiny_bert, train, test)) == 2
    assert "--output_dir models/finetuned holds checkpoints of an earlier run (step_2)" in capsys.readouterr().err

    caplog.clear()
    assert main(_args(tiny_bert, train, test, "--resume_from_checkpoint", "latest")) == 0
    moved = [r.getMessage() for r in caplog.records if "earlier version" in r.getMessage()]
    assert moved == ["checkpoints of an earlier version found in models/finetuned/checkpoints: moved to "
                     "runs/finetuned/checkpoints, where the training state of this run now goes"]
    assert "resumed from runs/finetuned/checkpoints/step_2 at step 2" in caplog.text
    assert not (tmp_path / "models" / "finetuned" / "checkpoints").exists()
    checkpoints = tmp_path / "runs" / "finetuned" / "checkpoints"
    assert _names(checkpoints) == ["best", "step_2", "step_4"]
    resumed = training_state(checkpoints / "step_4")
    assert resumed["trainer"]["global_step"] == 4
    for key, value in uninterrupted["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize(("extra", "message"), [
    (["--text_column", "review_text"], "text column 'review_text' not found; columns are: text, label"),
    (["--label_column", "stars"], "label column 'stars' not found"),
])
def test_bad_columns_exit_2_with_one_line(tiny_bert, rt_small, tmp_path, capsys, extra, message):
    train, test = rt_small
    code = main(["--model_name_or_path", str(tiny_bert), "--train_file", str(train), "--output_dir",
                 str(tmp_path / "out"), *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_one_class_label_column(tiny_bert, tmp_path, capsys):
    data = tmp_path / "one.csv"
    data.write_text("text,label\n" + "".join(f"sentence {i},positive\n" for i in range(20)))
    assert main(["--model_name_or_path", str(tiny_bert), "--train_file", str(data), "--output_dir",
                 str(tmp_path / "out")]) == 2
    assert "has only one class (positive)" in capsys.readouterr().err


def test_foreign_output_dir_is_refused(tiny_bert, rt_small, tmp_path, capsys):
    train, _ = rt_small
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    assert main(["--model_name_or_path", str(tiny_bert), "--train_file", str(train), "--output_dir",
                 str(foreign)]) == 2
    assert "is not empty and is not a run of this script (holiday.jpg)" in capsys.readouterr().err
    assert (foreign / "holiday.jpg").read_bytes() == b"precious"


def test_tensorboard_tracking_writes_loss_and_eval_metrics_into_the_run_folder(tiny_bert, rt_small, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, test = rt_small
    assert main(_args(tiny_bert, train, test, "--with_tracking", "--report_to", "tensorboard", "--eval_steps", "2",
                      "--logging_steps", "1", "--run_name", "tracked")) == 0
    run = tmp_path / "runs" / "finetuned"
    events = sorted(run.rglob("events.out.tfevents.*"))
    assert events and all(run in e.parents for e in events)
    scalars: dict[str, list] = {}
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    assert [step for step, _ in scalars["train_loss"]] == [1, 2, 3, 4]
    assert {"lr", "eval_accuracy", "eval_loss", "eval_f1_macro"} <= set(scalars)
    assert [step for step, _ in scalars["eval_accuracy"]] == [2, 4]
    results = json.loads((tmp_path / "models" / "finetuned" / "all_results.json").read_text())
    assert max(v for _, v in scalars["eval_accuracy"]) == pytest.approx(results["eval_accuracy"])  # the best one
    assert not list((tmp_path / "models").rglob("events.out.tfevents.*"))  # logs stay out of the model folder


def test_processes_that_did_not_join_one_group_are_refused(caplog):
    """torchrun started 2 processes (WORLD_SIZE=2) but Accelerate runs each alone (what an FSDP config
    does on a machine without GPUs): refused before anything is written. FSDP asked for and not active
    (on CPU with ACCELERATE_USE_CPU) is said in a warning."""
    from accelerate import Accelerator

    from training.config import ConfigError
    from training.finetune import check_launch

    accelerator = Accelerator()  # this test process: one process, no distributed group
    with pytest.raises(ConfigError, match=r"2 processes were launched .* Accelerate runs 1; on CPU launch with --multi_gpu"):
        check_launch(accelerator, {"WORLD_SIZE": "2"})
    check_launch(accelerator, {"WORLD_SIZE": "1"})
    check_launch(accelerator, {})
    with caplog.at_level(logging.WARNING, logger="training"):
        check_launch(accelerator, {"ACCELERATE_USE_FSDP": "true"})
    assert "FSDP was asked for, but Accelerate runs NO" in caplog.text
