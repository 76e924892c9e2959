"""Which autocast precision a run trains in (`--mixed_precision`, default auto).

auto follows `accelerate launch --mixed_precision` when that asked for bf16 or fp16; otherwise
(no launcher, or its default "no") it picks bf16 where the hardware runs bf16 matrix products
natively: a CUDA GPU with bf16 (Ampere and later), or a CPU with AMX or AVX-512 BF16 (Intel
Sapphire Rapids and later, AMD Zen 4 and later). Elsewhere float32. Weights, optimizer state and
checkpoints stay float32 in every case: autocast only changes the precision of the forward and
backward matrix products (docs/performance.md, Training, measures speed and accuracy both ways).
`no` always trains in float32.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch


def cpu_has_fast_bf16() -> bool:
    """AMX tiles or AVX-512 BF16 instructions: oneDNN's bf16 kernels (torch's own probes)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    for name in probes:
        probe = getattr(torch.cpu, name, None)  # private probes; absent on some builds and platforms
        try:
            if probe is not None and probe():
                return True
        except RuntimeError:
            pass
    return False


def emulated_bf16_note() -> str | None:
    """Why bf16 will be slow on this CPU, or None where it runs natively. Without AMX or AVX-512
    BF16, oneDNN emulates bf16 matrix products in float32 with conversions around them: several
    times slower than plain float32 (docs/performance.md, ONNX Runtime backend, measures it)."""
    if cpu_has_fast_bf16():
        return None
    return (f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no AMX or AVX-512 BF16, so bf16 matrix "
            "products are emulated: expect several times slower than float32")


def on_cpu(environ: Mapping[str, str]) -> bool:
    """Whether Accelerate will put this process on the CPU."""
    return environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes") or not torch.cuda.is_available()


def resolve(requested: str, environ: Mapping[str, str] | None = None) -> str:
    """The precision to hand to `Accelerator(mixed_precision=...)`: no, bf16 or fp16."""
    environ = os.environ if environ is None else environ
    if requested != "auto":
        return requested
    launched = environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched in ("bf16", "fp16", "fp8"):
        return launched
    if on_cpu(environ):
        return "bf16" if cpu_has_fast_bf16() else "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "no"
