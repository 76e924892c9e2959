"""The ONNX Runtime backend (`backend=onnx`): a loaded torch runner's model swapped for an ONNX
Runtime session of the same model, exported once per folder version (service/onnx_cache.py).

A runner that can run on ONNX Runtime says so with two attributes: `model_output` (the name of the
model output it reads: `logits`, `last_hidden_state`) and `onnx_probe()` (a few input batches of
different shapes, padded as the runner pads them). Everything around the forward pass (tokenizing,
padding, sub-batching, pooling, softmax, ranking) stays the runner's own code: `OnnxModel` takes
the torch model's place and answers the same call.

Export: `torch.onnx.export` with the TorchScript exporter first (2-8 s for the served models on 2
cores; it handles every architecture the tests build), the torch.export-based one (`dynamo=True`,
5-10x slower to export here) only when the first fails. Batch and sequence axes are dynamic.
The exported session must agree with torch on every probe batch (float32: 1e-4 + 1e-3 of the largest
output; int8: class probabilities within 0.15, token vectors within cosine distance 0.1) or the model stays on torch, with one log line saying why.

int8 (`quantize=int8`) comes two ways, as the runner's `onnx_int8` says: "dynamic" for the text
models (int8 weights of MatMul/Gemm, activations quantized at run time), and "static" for the image
models (weights and activations, with ranges fixed from the deployment's calibration images:
service/calibration.py). A static int8 graph is refused when the held-out calibration images show,
at 95 % confidence, that it keeps the float32 graph's top label on fewer than INT8_MIN_LABEL_AGREEMENT
of inputs; then, and without calibration images, the model is served by the float32 graph, with a
note saying why.

Threads: the session runs on the torch thread (service/torch_thread.py), like every forward pass,
so one model's forward pass at a time uses the cores, whichever backend runs it; ONNX Runtime's own
intra-op pool has `torch_threads` threads (torch's count when unset), counting the calling thread.
Its pool does not spin-wait between runs (`allow_spinning` 0): spinning workers would take the cores
from the next torch forward pass or the batcher's tokenizing, the slowdown torch_thread.py exists to
avoid (a choice by reasoning, not measured against spinning: docs/performance.md, ONNX Runtime).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from . import onnx_cache
from .backends import Backend
from .folders import FolderInfo, read_adapter
from .settings import Settings

log = logging.getLogger("service.onnx")
OPSET = 18
FP32_ATOL, FP32_RTOL = 1e-4, 1e-3
# int8 weights move every output a little. Bounds on what a caller reads: a class probability, the
# direction of a token vector. (Measured on the demo MiniLM: 0.02-0.05; on tiny random models up to 0.1.)
INT8_MAX_PROBABILITY_ERROR = 0.15
INT8_MAX_COSINE_DISTANCE = 0.1
# Static int8 (image models) is refused when it keeps float32's top label on fewer than this share of
# inputs (the dynamic int8 text models keep 97-99 % on RT: docs/performance.md), judged on the held-out
# calibration images with a one-sided 95 % bound: a few hundred images cannot tell 97.7 % from 99 %
# (a trained ResNet-18 showed both, on 256 held-out and 2,000 test images), but do tell 91 % from 98 %.
INT8_MIN_LABEL_AGREEMENT = 0.98
INT8_CHECK_Z = 1.645  # one-sided 95 %
# Missing inputs the graph has (a smoke test that sends only input_ids): what the model assumes.
_DEFAULTS = {"attention_mask": torch.ones_like, "token_type_ids": torch.zeros_like}


class ExportMismatch(RuntimeError):
    """The exported graph does not compute what the torch model computes."""


class OnnxModel:
    """Stands in for a torch model inside a runner: called with the same keyword tensors, returns an
    object whose `output` attribute holds the (float32, CPU) result; keeps `config`."""

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, session, config, output: str):
        self.session, self.config, self.output = session, config, output
        # The graph's own inputs: an input the model never reads (DeBERTa's token_type_ids) is pruned.
        self.input_names = [i.name for i in session.get_inputs()]

    def __call__(self, **inputs: torch.Tensor) -> SimpleNamespace:
        reference = next(iter(inputs.values()))
        feed = {}
        for name in self.input_names:
            value = inputs.get(name)
            if value is None:
                value = _DEFAULTS[name](reference)
            feed[name] = value.cpu().numpy()
        (out,) = self.session.run([self.output], feed)
        return SimpleNamespace(**{self.output: torch.from_numpy(out)})


class _Exportable(torch.nn.Module):
    """The model with positional tensor inputs and one tensor output, as the exporters want it."""

    def __init__(self, model, input_names: list[str], output: str):
        super().__init__()
        self.model, self.input_names, self.output = model, input_names, output

    def forward(self, *tensors):
        return getattr(self.model(**dict(zip(self.input_names, tensors, strict=True))), self.output)


def _axes(name: str, tensor: torch.Tensor) -> dict[int, str]:
    # Text inputs (batch, tokens): both dynamic. Images (batch, channels, h, w): the batch only
    # (the processor fixes the size).
    return {0: "batch", 1: "sequence"} if tensor.dim() == 2 else {0: "batch"}


def export(model, example: dict[str, torch.Tensor], output: str, target: Path) -> str:
    """Write `model` as ONNX to `target`; returns the exporter that worked ("torchscript" or "dynamo")."""
    import warnings

    names = list(example)
    wrapped = _Exportable(model, names, output).eval()
    args = tuple(example[n] for n in names)
    with torch.inference_mode(False), torch.no_grad():
        out_dims = wrapped(*args).dim()
        output_axes = {0: "batch", 1: "sequence"} if out_dims == 3 else {0: "batch"}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, tracer warnings
                torch.onnx.export(wrapped, args, str(target), input_names=names, output_names=[output],
                                  dynamic_axes={**{n: _axes(n, example[n]) for n in names}, output: output_axes},
                                  opset_version=OPSET, dynamo=False)
            return "torchscript"
        except Exception as exc:
            log.info("TorchScript export failed (%s: %s); trying the dynamo exporter", type(exc).__name__,
                     str(exc)[:200])
        batch, sequence = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=1)
        shapes = tuple({0: batch, 1: sequence} if example[n].dim() == 2 else {0: batch} for n in names)
        torch.onnx.export(wrapped, args, str(target), input_names=names, output_names=[output],
                          dynamic_shapes=(shapes,), opset_version=OPSET, dynamo=True, optimize=True)
        return "dynamo"


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantization of MatMul and Gemm (ONNX Runtime's recipe for transformer encoders on
    CPU): int8 weights with one scale per output channel, activations quantized at run time. Per
    channel, not per tensor: on the demo MiniLM (RT, 2,121 sentences) per tensor lost 0.57 pt of
    accuracy against float32, per channel 0.24 (docs/performance.md, ONNX Runtime)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gemm"])


def quantize_int8_static(source: Path, target: Path, batches: Iterable[dict[str, torch.Tensor]]) -> None:
    """Static int8 quantization of a convolutional network (ONNX Runtime's recipe for CNNs on CPU):
    QDQ format, int8 weights with one scale per output channel, uint8 activations whose ranges are
    fixed from `batches` (real images: service/calibration.py).

    Two choices measured on the demo MobileNetV2 (Fashion-MNIST, 1,000 test images; docs/performance.md):
    weights in 7 bits (`reduce_range`), because x86 CPUs without VNNI multiply uint8 by int8 with an
    instruction that saturates 16-bit sums; and the first convolution left in float32: it reads the
    normalised pixels, and keeping it in float32 alone won back 5.7 of the 7.5 points lost by quantizing
    everything."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.items = ({k: v.cpu().numpy() for k, v in b.items()} for b in batches)

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory(prefix="hf-serve-quant-") as scratch:
        prepped = Path(scratch) / "prepped.onnx"
        quant_pre_process(str(source), str(prepped))  # shape inference + graph clean-up, as ORT asks
        first_conv = next((n.name for n in onnx.load(str(prepped)).graph.node if n.op_type == "Conv"), None)
        quantize_static(str(prepped), str(target), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=[first_conv] if first_conv else [])


def label_agreement(candidate: OnnxModel, reference: OnnxModel,
                    batches: Iterable[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """(share of inputs whose top label is the same under both classifiers, largest class probability difference)."""
    same = total = 0
    worst = 0.0
    for batch in batches:
        got, ref = candidate(**batch).logits.numpy(), reference(**batch).logits.numpy()
        same += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ref)
        worst = max(worst, float(np.abs(_softmax(got) - _softmax(ref)).max()))
    return same / max(total, 1), worst


def agreement_upper_bound(share: float, count: int, z: float = INT8_CHECK_Z) -> float:
    """Wilson score upper bound of a proportion `share` observed on `count` inputs."""
    if count <= 0:
        return 1.0
    centre = share + z * z / (2 * count)
    spread = z * (share * (1 - share) / count + z * z / (4 * count * count)) ** 0.5
    return (centre + spread) / (1 + z * z / count)


def session(path: Path, threads: int):
    """An ONNX Runtime CPU session: `threads` intra-op threads, no spinning between runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def disagreement(candidate, torch_model, probes: list[dict[str, torch.Tensor]], output: str,
                 int8: bool, scale: float = 1.0) -> tuple[float, bool]:
    """(largest error over the probes, whether it is within tolerance) of `candidate` (an ONNX graph, or
    a compiled model: service/compiled_backend.py) against the eager torch model; `scale` widens the
    float tolerance for half-precision models. Padded positions of a per-token output are not compared
    (the runner never reads them)."""
    worst, ok = 0.0, True
    for batch in probes:
        with torch.inference_mode():
            ref = getattr(torch_model(**batch), output).float().cpu().numpy()
        try:
            with torch.inference_mode():
                got = getattr(candidate(**batch), output).float().cpu().numpy()
        except Exception as exc:  # e.g. a shape the tracer baked in: the graph fails on other lengths
            raise ExportMismatch(f"the exported model fails on a probe batch of shape "
                                 f"{tuple(next(iter(batch.values())).shape)}: {str(exc)[:200]}") from None
        if got.shape != ref.shape or not np.isfinite(got).all():
            return float("inf"), False
        if ref.ndim == 3 and "attention_mask" in batch:
            mask = batch["attention_mask"].cpu().numpy().astype(bool)
            ref, got = ref[mask], got[mask]
        if int8 and ref.ndim == 2:  # logits: what the caller sees are the probabilities
            error = float(np.abs(_softmax(got) - _softmax(ref)).max())
            ok = ok and error <= INT8_MAX_PROBABILITY_ERROR
        elif int8:  # per-token vectors: their direction (what pooling and cosine similarity read)
            error = float(1 - _cosine(got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1])).min())
            ok = ok and error <= INT8_MAX_COSINE_DISTANCE
        else:
            error = float(np.abs(got - ref).max())
            ok = ok and error <= scale * (FP32_ATOL + FP32_RTOL * float(np.abs(ref).max()))
        worst = max(worst, error)
    return worst, ok


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def _why_not(runner) -> str | None:
    if not hasattr(runner, "onnx_probe"):
        return "this task runs on torch only"
    model = runner.model
    if hasattr(model, "peft_config") or not isinstance(model, torch.nn.Module):
        return "a shared-base adapter (adapter_mode=share) runs on torch"
    if model.device.type != "cpu":
        return f"backend=onnx runs on the CPU and this model is on {model.device}"
    if model.dtype != torch.float32:
        return f"backend=onnx exports float32 weights, this model has {model.dtype}"
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install '.[onnx]')"
    return None


def use_onnx(runner, path: Path, info: FolderInfo, settings: Settings) -> Backend:
    """Put `runner` on ONNX Runtime if its model exports and agrees with torch; else leave it on
    torch. Returns the backend that serves it (blocking: call on the torch thread)."""
    reason = _why_not(runner)
    if reason is not None:
        return Backend("torch", note=reason)
    started = time.perf_counter()
    try:
        backend, onnx_model = _build(runner, path, info, settings)
    except ExportMismatch as exc:
        return Backend("torch", note=str(exc))
    except Exception as exc:  # any export or runtime failure: the model still serves, on torch
        return Backend("torch", note=f"ONNX export failed: {type(exc).__name__}: {str(exc)[:300]}")
    if onnx_model is None:
        return backend
    backend.seconds = round(time.perf_counter() - started, 3)
    runner.model = onnx_model  # the torch model is dropped here: only the session serves
    return backend


def _build(runner, path: Path, info: FolderInfo, settings: Settings) -> tuple[Backend, OnnxModel | None]:
    model, output = runner.model, runner.model_output
    probes = runner.onnx_probe()
    # How int8 applies to this runner: "dynamic" (text: weights only), "static" (images: calibrated) or None.
    int8 = getattr(runner, "onnx_int8", "dynamic") if settings.quantize == "int8" else None
    adapter = read_adapter(path, settings.models_dir)
    key, _source = onnx_cache.cache_key(path, info.task, adapter.base_path if adapter else None)
    cache = Path(settings.onnx_cache).expanduser()
    threads = settings.torch_threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="hf-serve-onnx-") as scratch:
        # An unwritable cache (a read-only volume): export into a scratch folder on every load.
        folder = onnx_cache.entry_dir(cache, path.name, key) if onnx_cache.writable(cache) else Path(scratch)
        fp32, exporter = folder / "model.onnx", None
        if not fp32.is_file():
            with onnx_cache.atomic_file(fp32) as tmp:
                exporter = export(model, probes[0], output, tmp)
            log.info("model %s: exported to ONNX with the %s exporter: %s", path.name, exporter, fp32)
        else:
            log.info("model %s: ONNX file reused from the cache: %s", path.name, fp32)
        target = fp32
        if int8 == "dynamic":
            target = folder / "model.int8.onnx"
            if not target.is_file():
                with onnx_cache.atomic_file(target) as tmp:
                    quantize_int8(fp32, tmp)
        onnx_model = OnnxModel(session(target, threads), model.config, output)
        cached = folder != Path(scratch)  # GET /models shows a cached file, not a scratch one
        error, ok = disagreement(onnx_model, model, probes, output, int8 == "dynamic")
        name = "onnx-int8" if int8 == "dynamic" else "onnx"
        if not ok:
            what = ("largest probability or cosine difference" if int8 == "dynamic" else "max abs difference")
            return Backend("torch", note=f"{name} disagrees with torch on the probe inputs ({what} {error:.3g})",
                           file=str(target) if cached else None, exporter=exporter, max_error=error), None
        backend = Backend(name, file=str(target) if cached else None, exporter=exporter, max_error=error)
        if int8 == "static":
            try:
                backend, onnx_model = _static_int8(runner, onnx_model, backend, folder, cached, path.name, settings,
                                                   threads)
            except Exception as exc:  # an op the quantizer or its calibration cannot take: float32 still serves
                backend.note = f"static int8 failed ({type(exc).__name__}: {str(exc)[:200]}): served in float32"
    return backend, onnx_model


def _static_int8(runner, fp32_model: OnnxModel, fp32: Backend, folder: Path, cached: bool, name: str,
                 settings: Settings, threads: int) -> tuple[Backend, OnnxModel]:
    """The float32 session (already checked against torch) replaced by a statically quantized one when
    the model has calibration images and the held-out ones do not show the int8 graph keeping
    float32's top label on fewer than INT8_MIN_LABEL_AGREEMENT of inputs; else float32 stays, with a
    note saying why. The quantized file and the check's verdict are cached under the images' digest:
    a restart that finds both decodes no image and runs no check."""
    from . import calibration

    where = calibration.folder_for(settings.calibration_dir, name)
    if where is None:
        fp32.note = ("int8 for image models needs calibration images (calibration_dir): served in float32 "
                     "(docs/performance.md, ONNX Runtime)")
        return fp32, fp32_model
    found = calibration.find(where)
    if isinstance(found, str):
        fp32.note = f"{found}: served in float32"
        return fp32, fp32_model
    target = folder / f"model.int8-static-{found.digest}.onnx"
    verdict = target.with_suffix(".check.json")
    int8_model = None
    try:
        checked = json.loads(verdict.read_text()) if target.is_file() else None  # None: no verdict to use
        agreement, error, held_out = (float(checked["label_agreement"]), float(checked["max_probability_difference"]),
                                      int(checked["held_out_images"]))
    except (OSError, ValueError, KeyError, TypeError):
        images = found.decode()
        if isinstance(images, str):
            fp32.note = f"{images}: served in float32"
            return fp32, fp32_model
        if not target.is_file():
            with onnx_cache.atomic_file(target) as tmp:
                quantize_int8_static(folder / "model.onnx", tmp, runner.onnx_batches(images.calibrate))
            log.info("model %s: quantized to int8 on %d calibration images of %s", name, len(images.calibrate), where)
        int8_model = OnnxModel(session(target, threads), fp32_model.config, fp32_model.output)
        # The check costs a few seconds (ResNet-50: about 25 s); its verdict is kept beside the file it is about.
        agreement, error = label_agreement(int8_model, fp32_model, runner.onnx_batches(images.check))
        held_out = len(images.check)
        if cached:
            with onnx_cache.atomic_file(verdict) as tmp:
                tmp.write_text(json.dumps({"label_agreement": agreement, "max_probability_difference": error,
                                           "held_out_images": held_out}))
    if agreement_upper_bound(agreement, held_out) < INT8_MIN_LABEL_AGREEMENT:
        fp32.note = (f"static int8 kept the float32 top label on {agreement:.1%} of {held_out} held-out "
                     f"calibration images, fewer than {INT8_MIN_LABEL_AGREEMENT:.0%} at 95 % confidence: served in float32")
        return fp32, fp32_model
    if int8_model is None:
        int8_model = OnnxModel(session(target, threads), fp32_model.config, fp32_model.output)
    note = f"static int8 calibrated on {where}; top label equal to float32 on {agreement:.1%} of {held_out} held-out images"
    # max_error: the largest class probability difference to float32 on the held-out images
    return (Backend("onnx-int8", note=note, file=str(target) if cached else None, exporter=fp32.exporter,
                    max_error=error), int8_model)
