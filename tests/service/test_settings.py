"""service/settings.py: every knob an env var and a flag, with help."""

from __future__ import annotations

import logging

import pytest

from service.__main__ import main
from service.settings import Settings

ENV_NAMES = [
    "MODELS_DIR", "HOST", "PORT", "API_KEY", "MAX_BATCH_SIZE", "MAX_BATCH_WAIT_MS", "MAX_BATCH_TOKENS",
    "MAX_CONCURRENT_REQUESTS", "MAX_REQUEST_BYTES", "MAX_INPUT_LENGTH", "MAX_NEW_TOKENS", "TORCH_THREADS",
    "DEVICE", "DTYPE", "PRELOAD", "RELOAD_INTERVAL_S", "CORS_ORIGINS", "LOG_LEVEL",
    "BODY_TIMEOUT_S", "MAX_IMAGE_PIXELS", "ALLOW_PICKLE", "MAX_IMAGE_MEMORY_MB", "MAX_INPUT_CHARS",
    "MAX_REQUEST_CHARS", "MAX_CLIENT_BATCH_SIZE", "MAX_BATCH_REQUESTS", "MAX_CONCURRENT_SEQUENCES",
    "MAX_BATCH_PREFILL_TOKENS", "MAX_BATCH_TOTAL_TOKENS", "ADAPTER_MODE", "REQUEST_TIMEOUT_S",
    "BACKEND", "QUANTIZE", "ONNX_CACHE", "CALIBRATION_DIR",
]


def test_every_setting_is_an_env_var_with_help():
    fields = Settings.model_fields
    assert sorted(f.upper() for f in fields) == sorted(ENV_NAMES)
    assert all(field.description for field in fields.values())


def test_defaults():
    s = Settings(_env_file=None)
    assert (str(s.models_dir), s.host, s.port, s.api_key) == ("models", "127.0.0.1", 8000, None)
    assert (s.max_client_batch_size, s.max_batch_requests, s.preload, s.cors_origins, s.dtype) == (32, 32, True, [], "auto")
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
    s = Settings(_cli_parse_args=["--port", "9002", "--max-batch-requests", "4", "--dtype", "bfloat16"], _cli_kebab_case=True, _env_file=None)
    assert (s.port, s.max_batch_requests, s.max_client_batch_size, s.dtype) == (9002, 4, 32, "bfloat16")


def test_old_max_batch_size_sets_both_limits(monkeypatch):
    """HF_SERVE_MAX_BATCH_SIZE meant both limits; for one release it still sets both."""
    monkeypatch.setenv("HF_SERVE_MAX_BATCH_SIZE", "6")
    s = Settings(_env_file=None)
    assert (s.max_client_batch_size, s.max_batch_requests) == (6, 6)
    flag = Settings(_cli_parse_args=["--max-batch-size", "3"], _cli_kebab_case=True, _env_file=None)
    assert (flag.max_client_batch_size, flag.max_batch_requests) == (3, 3)


def test_help_lists_flags_with_descriptions(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--models-dir", "--max-concurrent-requests", "--reload-interval-s", "--api-key"):
        assert flag in out
    assert "429" in out  # the help text, not only the flag names


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "auto"])
def test_bfloat16_on_a_cpu_that_emulates_it_is_warned_about_at_startup(dtype, tmp_path, caplog):
    from service.app import create_app
    from training.precision import emulated_bf16_note

    with caplog.at_level(logging.WARNING, logger="service.loading"):
        create_app(Settings(_env_file=None, models_dir=tmp_path, device="cpu", dtype=dtype))
    warned = "dtype bfloat16 on the CPU" in caplog.text
    assert warned == (dtype == "bfloat16" and emulated_bf16_note() is not None)
