"""--mixed_precision (training/precision.py): auto follows the launcher when it asks for one, else bf16
where this CPU has native bf16 (read here from /proc/cpuinfo, independently of torch's probes); a
real run records what it trained in, and `no` keeps float32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.training.subprocess_runs import finetune
from training import precision


def cpuinfo_has_bf16() -> bool:
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return "amx_tile" in flags or "avx512_bf16" in flags


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="Linux only")
def test_the_cpu_probe_agrees_with_cpuinfo():
    assert precision.cpu_has_fast_bf16() == cpuinfo_has_bf16()


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="Linux only")
def test_bf16_is_called_emulated_exactly_where_the_cpu_lacks_native_bf16():
    note = precision.emulated_bf16_note()
    assert (note is None) == cpuinfo_has_bf16()
    if note is not None:
        assert "AMX or AVX-512 BF16" in note and "slower than float32" in note


@pytest.mark.parametrize("requested", ["no", "bf16", "fp16"])
def test_an_explicit_choice_is_kept(requested):
    assert precision.resolve(requested, {"ACCELERATE_MIXED_PRECISION": "fp16"}) == requested


@pytest.mark.parametrize("launched", ["bf16", "fp16"])
def test_auto_follows_the_launcher(launched):
    assert precision.resolve("auto", {"ACCELERATE_MIXED_PRECISION": launched, "ACCELERATE_USE_CPU": "true"}) == launched


@pytest.mark.parametrize("environ", [{}, {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "true"}])
def test_auto_on_a_cpu_is_bf16_exactly_when_it_has_native_bf16(environ):
    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("Linux only")
    expected = "bf16" if cpuinfo_has_bf16() else "no"
    assert precision.resolve("auto", {**environ, "ACCELERATE_USE_CPU": "true"}) == expected


@pytest.mark.slow
def test_a_run_records_its_precision_and_no_means_float32_and_emulated_bf16_is_warned_about(tiny_bert, rt_small, tmp_path):
    train, test = rt_small
    args = ["--model_name_or_path", str(tiny_bert), "--train_file", str(train), "--validation_file", str(test),
            "--max_train_steps", "2", "--checkpointing_steps", "none", "--per_device_train_batch_size", "8"]
    auto = finetune([*args, "--output_dir", "models/auto"], tmp_path, {"ACCELERATE_USE_CPU": "true"})
    assert auto.returncode == 0, auto.stderr[-2000:]
    fp32 = finetune([*args, "--output_dir", "models/fp32", "--mixed_precision", "no"], tmp_path,
                    {"ACCELERATE_USE_CPU": "true"})
    assert fp32.returncode == 0, fp32.stderr[-2000:]
    expected = "bf16" if cpuinfo_has_bf16() else "no"
    assert f"mixed precision {expected}" in auto.stderr
    assert f"mixed precision {expected}" in (tmp_path / "models" / "auto" / "README.md").read_text()
    assert "mixed precision no" in fp32.stderr
    assert "mixed precision no" in (tmp_path / "models" / "fp32" / "README.md").read_text()
    assert "emulated" not in auto.stderr  # auto never picks an emulated bf16
    bf16 = finetune([*args, "--output_dir", "models/bf16", "--mixed_precision", "bf16", "--max_train_steps", "1"],
                    tmp_path, {"ACCELERATE_USE_CPU": "true"})
    assert bf16.returncode == 0, bf16.stderr[-2000:]
    assert "mixed precision bf16" in bf16.stderr
    assert ("bf16 matrix products are emulated" in bf16.stderr) == (not cpuinfo_has_bf16())
    for name in ("auto", "fp32"):  # weights stay float32 either way
        config = json.loads((tmp_path / "models" / name / "config.json").read_text())
        assert config.get("dtype", config.get("torch_dtype", "float32")) == "float32"
