"""service/folders.py: which folders are servable, as which task, and what their card says (no torch)."""

from __future__ import annotations

import shutil

import pytest

from service.folders import InvalidFolder, card_metrics, folder_signature, inspect_folder, read_card


def test_card_task_and_metrics(pristine_models):
    info = inspect_folder(pristine_models / "sentiment")
    assert info.task == "text-classification" and info.card["pipeline_tag"] == "text-classification"
    assert info.metrics == [{"task": "text-classification", "dataset": "Rotten Tomatoes", "split": "test",
                             "type": "accuracy", "name": "Accuracy", "value": 0.81}]
    assert info.results == {"eval_accuracy": 0.81, "epoch": 1.0}


@pytest.mark.parametrize(("name", "task"), [
    ("topics", "text-classification"), ("gpt2-cls", "text-classification"),
    ("writer", "text-generation"), ("mobilenet", "image-classification"), ("resnet", "image-classification"),
    ("embedder", "feature-extraction"),
])
def test_task_from_card_or_architecture(pristine_models, name, task):
    assert inspect_folder(pristine_models / name).task == task


@pytest.mark.parametrize(("name", "reason"), [
    ("corrupt", "not a valid safetensors file"),
    ("no-config", "no config.json"),
    ("base-bert", "cannot tell the task"),
])
def test_invalid_folders_say_why(pristine_models, name, reason):
    with pytest.raises(InvalidFolder, match=reason):
        inspect_folder(pristine_models / name)


def test_pickle_weights_are_refused(pristine_models, tmp_path):
    folder = shutil.copytree(pristine_models / "topics", tmp_path / "pickled")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(InvalidFolder, match="only safetensors"):
        inspect_folder(folder)


def test_unsupported_pipeline_tag(pristine_models, tmp_path):
    folder = shutil.copytree(pristine_models / "topics", tmp_path / "ner")
    (folder / "README.md").write_text("---\npipeline_tag: token-classification\n---\n")
    with pytest.raises(InvalidFolder, match="token-classification"):
        inspect_folder(folder)


def test_card_without_header_or_bad_yaml(tmp_path):
    (tmp_path / "README.md").write_text("# just text\n")
    assert read_card(tmp_path) == {}
    (tmp_path / "README.md").write_text("---\n: : [\n---\n")
    assert read_card(tmp_path) == {}
    assert card_metrics({"model-index": None}) == []


def test_signature_changes_with_content(pristine_models, tmp_path):
    folder = shutil.copytree(pristine_models / "topics", tmp_path / "t")
    before = folder_signature(folder)
    assert folder_signature(folder) == before
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    assert folder_signature(folder) != before


def test_card_tag_wins_over_modules_json(pristine_models, tmp_path):
    """A sentence-transformers folder whose card says text-classification is served as that task."""
    folder = shutil.copytree(pristine_models / "embedder", tmp_path / "e")
    (folder / "README.md").write_text("---\npipeline_tag: sentence-similarity\n---\n")
    assert inspect_folder(folder).task == "feature-extraction"
    (folder / "README.md").write_text("---\npipeline_tag: text-classification\n---\n")
    assert inspect_folder(folder).task == "text-classification"


def test_unknown_pooling_is_refused_at_load(pristine_models, tmp_path):
    import json

    from service.loading import load_runner
    from service.settings import Settings

    folder = shutil.copytree(pristine_models / "embedder", tmp_path / "e")
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    with pytest.raises(InvalidFolder, match="weightedmean"):
        load_runner(folder, inspect_folder(folder), Settings(_env_file=None))
