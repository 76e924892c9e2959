"""Settings (env vars, flags, help) and the registry's folder rules, without HTTP."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from service.__main__ import main
from service.registry import (
    InvalidFolder,
    Registry,
    card_metrics,
    folder_signature,
    inspect_folder,
    read_card,
)
from service.settings import Settings

ENV_NAMES = [
    "MODELS_DIR", "HOST", "PORT", "API_KEY", "MAX_BATCH_SIZE", "MAX_BATCH_WAIT_MS", "MAX_BATCH_TOKENS",
    "MAX_CONCURRENT_REQUESTS", "MAX_REQUEST_BYTES", "MAX_INPUT_LENGTH", "MAX_NEW_TOKENS", "TORCH_THREADS",
    "DEVICE", "DTYPE", "PRELOAD", "RELOAD_INTERVAL_S", "CORS_ORIGINS", "LOG_LEVEL",
    "BODY_TIMEOUT_S", "MAX_IMAGE_PIXELS", "ALLOW_PICKLE",
]


def test_every_setting_is_an_env_var_with_help():
    fields = Settings.model_fields
    assert sorted(f.upper() for f in fields) == sorted(ENV_NAMES)
    assert all(field.description for field in fields.values())


def test_defaults():
    s = Settings(_env_file=None)
    assert (str(s.models_dir), s.host, s.port, s.api_key) == ("models", "127.0.0.1", 8000, None)
    assert (s.max_batch_size, s.preload, s.cors_origins, s.dtype) == (32, True, [], "auto")
    assert s.resolved_device() in ("cpu", "cuda")


def test_env_vars(monkeypatch):
    monkeypatch.setenv("HF_SERVE_PORT", "9001")
    monkeypatch.setenv("HF_SERVE_API_KEY", "s3cret")
    monkeypatch.setenv("HF_SERVE_PRELOAD", "false")
    monkeypatch.setenv("HF_SERVE_CORS_ORIGINS", "http://a.example, http://b.example")
    monkeypatch.setenv("HF_SERVE_LOG_LEVEL", "DEBUG")
    s = Settings(_env_file=None)
    assert s.port == 9001 and s.api_key.get_secret_value() == "s3cret" and s.preload is False
    assert s.cors_origins == ["http://a.example", "http://b.example"] and s.log_level == "debug"
    assert "s3cret" not in repr(s)


def test_cli_flags_override_env(monkeypatch):
    monkeypatch.setenv("HF_SERVE_PORT", "9001")
    s = Settings(_cli_parse_args=["--port", "9002", "--max-batch-size", "4", "--dtype", "bfloat16"], _cli_kebab_case=True, _env_file=None)
    assert (s.port, s.max_batch_size, s.dtype) == (9002, 4, "bfloat16")


def test_help_lists_flags_with_descriptions(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--models-dir", "--max-concurrent-requests", "--reload-interval-s", "--api-key"):
        assert flag in out
    assert "429" in out  # the help text, not only the flag names


def test_card_task_and_metrics(pristine_models):
    info = inspect_folder(pristine_models / "sentiment")
    assert info.task == "text-classification" and info.card["pipeline_tag"] == "text-classification"
    assert info.metrics == [{"task": "text-classification", "dataset": "Rotten Tomatoes", "split": "test",
                             "type": "accuracy", "name": "Accuracy", "value": 0.81}]
    assert info.results == {"eval_accuracy": 0.81, "epoch": 1.0}


@pytest.mark.parametrize(("name", "task"), [
    ("topics", "text-classification"), ("gpt2-cls", "text-classification"),
    ("writer", "text-generation"), ("mobilenet", "image-classification"), ("resnet", "image-classification"),
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


def test_registry_scan_hidden_broken_and_lazy(pristine_models, tmp_path):
    for name in ("topics", "corrupt", "base-bert"):
        shutil.copytree(pristine_models / name, tmp_path / name)
    shutil.copytree(pristine_models / "topics", tmp_path / ".partial")

    async def scenario():
        registry = Registry(Settings(models_dir=tmp_path, preload=False, reload_interval_s=0, _env_file=None))
        summary = await registry.scan()
        assert registry.names() == ["base-bert", "corrupt", "topics"]
        assert sorted(summary["failed"]) == ["base-bert", "corrupt"]
        assert registry.get("topics").status == "available"  # lazy: not loaded yet
        entry = await registry.acquire("topics")  # the first use loads it
        assert entry.status == "ready" and entry.worker is not None
        registry.release(entry)
        await registry.stop()

    asyncio.run(scenario())


def test_loading_and_failed_models_are_503_not_crashes(pristine_models, tmp_path):
    from service.registry import Entry, ModelNotFound, ModelUnavailable

    async def scenario():
        registry = Registry(Settings(models_dir=tmp_path, reload_interval_s=0, _env_file=None))
        registry.entries["busy"] = Entry("busy", tmp_path / "busy", (), "loading")
        registry.entries["bad"] = Entry("bad", tmp_path / "bad", (), "failed", error="no config.json")
        with pytest.raises(ModelUnavailable) as loading:
            await registry.acquire("busy")
        assert loading.value.loading and not registry.ready
        with pytest.raises(ModelUnavailable, match="no config.json") as failed:
            await registry.acquire("bad")
        assert not failed.value.loading
        with pytest.raises(ModelNotFound, match="bad, busy"):
            await registry.acquire("other")

    asyncio.run(scenario())
