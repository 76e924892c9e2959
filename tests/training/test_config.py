"""Recipes and flags -> one typed config; --help documents every field."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import ConfigError, FinetuneConfig, build_parser, field_docs, parse_args

RECIPES = sorted((Path(__file__).parents[2] / "training" / "recipes").glob("*.yaml"))


def test_every_field_has_a_docstring_shown_in_help():
    docs = field_docs(FinetuneConfig)
    fields = [f.name for f in dataclasses.fields(FinetuneConfig)]
    assert set(docs) == set(fields)
    help_text = build_parser().format_help()
    for name in fields:
        assert f"--{name}" in help_text
    assert "Percent of train held out for validation" in help_text


def test_help_runs_as_a_script():
    out = subprocess.run([sys.executable, "training/finetune.py", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).parents[2], timeout=120)
    assert out.returncode == 0
    assert "--resume_from_checkpoint" in out.stdout and "--freeze" in out.stdout


def test_flags_override_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: m\ntrain_file: a.csv\nlearning_rate: 1.0e-3\nnum_train_epochs: 2\n"
                      "label_names: [neg, pos]\n")
    config = parse_args(["--recipe", str(recipe), "--learning_rate", "3e-4", "--group_by_length", "false"])
    assert config.learning_rate == 3e-4
    assert config.num_train_epochs == 2.0
    assert config.group_by_length is False
    assert config.label_names == ["neg", "pos"]
    config = parse_args(["--recipe", str(recipe), "--label_names", "a,b,c", "--max_train_steps", "none"])
    assert config.label_names == ["a", "b", "c"] and config.max_train_steps is None


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_shipped_recipes_parse(recipe):
    config = parse_args(["--recipe", str(recipe)])
    assert config.output_dir.startswith("models/")


def test_required_recipes_are_shipped():
    names = {r.stem for r in RECIPES}
    assert {"bert-sst2", "bert-imdb", "gpt2-sst2", "gpt2-generate", "resnet50-caltech101",
            "mobilenetv2-caltech101", "demo-sentiment", "demo-images"} <= names


@pytest.mark.parametrize(("argv", "message"), [
    (["--model_name_or_path", "m"], "exactly one data source"),
    (["--model_name_or_path", "m", "--train_file", "a.csv", "--freeze", "backbone"], "--freeze applies"),
    (["--model_name_or_path", "m", "--train_file", "a.csv", "--task", "image-classification", "--freeze", "some"],
     "--freeze must be"),
    (["--model_name_or_path", "m", "--train_file", "a.csv", "--checkpointing_steps", "often"],
     "--checkpointing_steps"),
    (["--model_name_or_path", "m", "--train_file", "a.csv", "--learning_rate", "fast"], "--learning_rate must be"),
    (["--model_name_or_path", "m", "--train_file", "a.csv", "--per_device_train_batch_size", "0"], "must be positive"),
])
def test_bad_values_raise_one_clear_error(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_unknown_recipe_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: m\ntrain_file: a.csv\nlerning_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown option.*lerning_rate"):
        parse_args(["--recipe", str(recipe)])


def test_unknown_task_is_a_cli_error():
    out = subprocess.run([sys.executable, "training/finetune.py", "--task", "summarization",
                          "--model_name_or_path", "m", "--train_file", "a.csv"],
                         capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=120)
    assert out.returncode == 2
    assert "invalid choice: 'summarization'" in out.stderr
