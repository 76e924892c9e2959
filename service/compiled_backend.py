"""The torch.compile backend (`backend=torch-compile`): a loaded runner's torch model compiled with
inductor, warmed at load on every input shape the runner will feed it, and checked against the eager
model before it serves. It pays most where Python's per-layer overhead is a large part of a forward
pass (one short sentence) and on convolutions (oneDNN with prepacked weights); the cost is seconds to
a minute of compiling per model at load, and the compiled graphs' memory (docs/performance.md,
"torch.compile").

- **Freezing** (inductor's `freezing`, on a CPU): the weights become constants of the graph, so
  oneDNN's convolutions get prepacked weights and fused activations. Without it compiled ResNet-50 ran
  slower than eager here.
- **Shapes.** Dynamo compiles one graph per set of guards; a request that needs a new one would
  compile on the torch thread for seconds while every model waits. So the runner lists the shapes it
  will ever feed (`compile_batches()`), and all are compiled here, before the model is ready:
  - text runners feed (batch, tokens) of any size: one graph with dynamic sizes, plus those dynamo
    specialises for a size of 1 (one input, one token);
  - image runners feed a fixed image size in CPU sub-batches of 1 to 4: one static graph per
    sub-batch size (with dynamic sizes oneDNN's prepacked convolutions are lost: ResNet-50 ran no
    faster than eager), dynamic on a GPU, where a micro-batch runs whole.
- **Check.** The compiled model must agree with eager torch on those batches within the float
  tolerance of the ONNX backend (service/onnx_backend.py); a model that fails to compile (no C++
  compiler on a CPU, an unsupported op) or disagrees is served eagerly, with the reason in
  GET /models.

Text generation stays eager: its decoding steps change the KV cache's shapes every step.

Compiling and running both stay on the torch thread (service/torch_thread.py): neither dynamo nor
inductor is thread safe (pytorch/pytorch#118260, #136833), so a graph must never compile while
another thread runs one. The price: while a changed folder is reloaded and compiled, the other
models' requests wait for it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .backends import Backend
from .folders import FolderInfo
from .settings import Settings

# Dynamo keeps its compiled graphs per Python code object, so every model of one class (several
# BERT folders, and each reload of one) shares one cache: its default limit of 8 would leave later
# models silently eager. Each model here needs at most 4 graphs.
RECOMPILE_LIMIT = 256
# The check's float tolerance, as a multiple of float32's, for half-precision weights.
HALF_TOLERANCE_SCALE = {torch.float16: 10.0, torch.bfloat16: 50.0}


def _why_not(runner) -> str | None:
    if not hasattr(runner, "compile_batches"):
        return "this task runs eagerly (text generation's decoding changes its shapes every step)"
    model = runner.model
    if hasattr(model, "peft_config") or not isinstance(model, torch.nn.Module):
        return "a shared-base adapter (adapter_mode=share) runs eagerly"
    return None


def use_compiled(runner, path: Path, info: FolderInfo, settings: Settings) -> Backend:
    """Compile `runner.model` for every shape the runner feeds it and swap it in if it agrees with eager
    torch; else leave the eager model. Returns the backend that serves it (blocking: call on the torch
    thread, which is the one that will call the compiled model)."""
    reason = _why_not(runner)
    if reason is not None:
        return Backend("torch", note=reason)
    from .onnx_backend import disagreement

    eager = runner.model
    started = time.perf_counter()
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, RECOMPILE_LIMIT)
    on_cpu = eager.device.type == "cpu"
    compiled = torch.compile(eager, dynamic=runner.compile_dynamic, options={"freezing": on_cpu})
    try:
        # In inference mode, as the runners call their model and make its inputs: both the mode and
        # whether an input is an inference tensor are guards of every graph.
        with torch.inference_mode():
            batches = runner.compile_batches()
            for batch in batches:
                compiled(**batch)
        error, ok = disagreement(compiled, eager, batches, runner.model_output, int8=False,
                                 scale=HALF_TOLERANCE_SCALE.get(eager.dtype, 1.0))
    except Exception as exc:  # a missing compiler, an op inductor cannot lower, ...: eager still serves
        return Backend("torch", note=f"torch.compile failed: {type(exc).__name__}: {str(exc).strip()[:300]}")
    if not ok:
        return Backend("torch", note=f"the compiled model disagrees with eager torch on the probe inputs "
                                     f"(max difference {error:.3g})")
    runner.model = compiled  # keeps config, device and dtype: OptimizedModule forwards them to the model
    shapes = sorted({tuple(next(iter(b.values())).shape) for b in batches})
    return Backend("torch-compile", note=f"inductor{', frozen weights' if on_cpu else ''}; "
                   f"{'dynamic' if runner.compile_dynamic else 'static'} shapes, compiled at load for "
                   f"{', '.join('x'.join(map(str, s)) for s in shapes)}",
                   max_error=error, seconds=round(time.perf_counter() - started, 3))
