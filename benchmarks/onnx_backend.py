"""The ONNX Runtime backend against torch, side by side in one run: accuracy on the full held-out
sets and speed, per backend (torch, onnx float32, onnx int8, torch bfloat16), for the served runners themselves
(the server's tokenizing, padding, sub-batching and post-processing; no HTTP).

- MiniLM: a fine-tuned all-MiniLM-L6-v2 (`models/demo-sentiment`, or --minilm), Rotten Tomatoes test (2,121).
- MPNet: a fine-tuned all-mpnet-base-v2, only when a folder is given or found (--mpnet).
- MobileNetV2: `models/demo-images` (or --mobilenet), Fashion-MNIST test (10,000). The served int8
  row is what the server does with calibration images (320 Fashion-MNIST *training* images in
  HF_SERVE_CALIBRATION_DIR): static int8 if it passes the label check, else float32. Besides the
  served backends, three int8 variants are measured on the first --cnn-int8-images images whatever
  the check says: dynamic (ConvInteger), static QDQ calibrated on the runner's own probe images, and
  the served static recipe calibrated on the training images.

Speed: "batched" is examples/s over the accuracy pass (micro-batches of 32 through `run_batch`, as
the batcher forms them under load); "single" is the p50 of one-example requests (prepare +
run_batch), in --rounds rounds interleaved across the backends, median over rounds. All torch and
ONNX Runtime work runs on the main thread, the only thread that touches either (as the server's
torch thread). Run it under `nice` on a shared machine and read the load average it prints.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DEMO_IMAGES,
    DEMO_SENTIMENT,
    FASHION_DIR,
    REPO,
    RT_DIR,
    WORK,
    fashion_calibration,
    hardware,
    median,
    percentile,
    print_hardware,
    shown,
    table,
    write_results,
)
from training.precision import cpu_has_fast_bf16  # noqa: E402

# (row label, HF_SERVE_BACKEND, HF_SERVE_QUANTIZE, HF_SERVE_DTYPE); torch float32 first: the reference
BACKENDS = (("torch", "torch", "none", "float32"), ("onnx float32", "onnx", "none", "float32"),
            ("onnx int8", "onnx", "int8", "float32"), ("torch bfloat16", "torch", "none", "bfloat16"))
# `make mpnet-sentiment`, or the first seed of `benchmarks/quality.py --only mpnet` (its model folder)
MPNET_CANDIDATES = (REPO / "models" / "mpnet-sentiment", WORK / "quality" / "runs" / "rt-mpnet-seed1")


def rt_test(limit: int | None) -> tuple[list[str], list[str]]:
    import csv

    with (RT_DIR / "test.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    rows = rows[::max(1, len(rows) // limit)][:limit] if limit else rows
    return [r["text"] for r in rows], [r["label"] for r in rows]


def fashion_test(limit: int | None, id2label: dict) -> tuple[list, list[str]]:
    import pyarrow.parquet as pq
    from PIL import Image

    table_ = pq.read_table(FASHION_DIR / "test.parquet")
    if limit:
        table_ = table_.slice(0, limit)
    images = [Image.open(io.BytesIO(row["bytes"])) for row in table_.column("image").to_pylist()]
    return images, [id2label[int(k)] for k in table_.column("label").to_pylist()]


THREADS: int | None = None  # --threads: torch's and ONNX Runtime's intra-op threads
CALIBRATION = WORK / "calibration"  # HF_SERVE_CALIBRATION_DIR: Fashion-MNIST training images per image model


def load(folder: Path, backend: str, quantize: str, cache: Path, dtype: str = "float32"):
    from service.folders import inspect_folder
    from service.loading import load_runner
    from service.settings import Settings

    settings = Settings(_env_file=None, models_dir=folder.parent, backend=backend, quantize=quantize, onnx_cache=cache,
                        torch_threads=THREADS, dtype=dtype, calibration_dir=CALIBRATION)
    started = time.perf_counter()
    runner = load_runner(folder, inspect_folder(folder), settings)
    return runner, time.perf_counter() - started


def classify(runner, inputs: list, batch: int) -> tuple[list[str], float]:
    """Top labels of every input through prepare + run_batch in micro-batches; (labels, examples/s)."""
    from service.tasks.classifier import ClassificationParameters

    params = ClassificationParameters(top_k=1)
    text = isinstance(inputs[0], str)
    labels, started = [], time.perf_counter()
    for i in range(0, len(inputs), batch):
        chunk = inputs[i:i + batch]
        if text:
            prepared, plist = [runner.prepare((chunk, params))[0]], [params]
            rows = runner.run_batch(prepared, plist)[0]
        else:
            prepared = [runner.prepare((image, params))[0] for image in chunk]
            rows = runner.run_batch(prepared, [params] * len(prepared))
        labels += [row[0]["label"] for row in rows]
    return labels, len(inputs) / (time.perf_counter() - started)


def single_latency_ms(runner, inputs: list, count: int) -> float:
    from service.tasks.classifier import ClassificationParameters

    params = ClassificationParameters()
    times = []
    for item in inputs[:count]:
        started = time.perf_counter()
        payload = ([item], params) if isinstance(item, str) else (item, params)
        runner.run_batch([runner.prepare(payload)[0]], [params])
        times.append((time.perf_counter() - started) * 1000)
    return percentile(times, 50)


def cnn_int8_variants(runner, fp32_file: Path, work: Path, calibration: Path) -> dict[str, Path]:
    """int8 MobileNetV2 three ways, whatever the server's check would decide: dynamic, static QDQ
    calibrated on the probe images, and the served recipe calibrated on real training images."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from service import calibration as calibration_images
    from service.onnx_backend import quantize_int8_static

    class Probes(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"pixel_values": b["pixel_values"].numpy()} for b in probes])

        def get_next(self):
            return next(self.batches, None)

    probes = runner.onnx_probe()
    dynamic, prepped, static = work / "dynamic.onnx", work / "prepped.onnx", work / "static-qdq.onnx"
    quantize_dynamic(str(fp32_file), str(dynamic), weight_type=QuantType.QInt8, per_channel=True)
    quant_pre_process(str(fp32_file), str(prepped))
    quantize_static(str(prepped), str(static), Probes(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    served = work / "static-served-recipe.onnx"
    images = calibration_images.load(calibration)
    quantize_int8_static(fp32_file, served, runner.onnx_batches(images.calibrate))
    return {"onnx int8 dynamic (not served)": dynamic, "onnx int8 static QDQ, probe calibration (not served)": static,
            f"onnx int8 static, served recipe, {len(images.calibrate)} training images (check not applied)": served}


def bench_model(name: str, folder: Path, inputs: list, truth: list[str], args, cache: Path, extra_cnn: bool) -> dict:
    print(f"\n## {name}: {shown(folder)}, {len(inputs)} examples", flush=True)
    runners, rows = {}, []
    for label, backend, quantize, dtype in BACKENDS:
        runner, load_s = load(folder, backend, quantize, cache, dtype)
        served = getattr(runner, "backend", None)
        expected = "onnx-int8" if quantize == "int8" else "onnx" if backend == "onnx" else None
        if served is not None and served.name != expected:
            label += f" (served by {served.name})"
        runners[label] = runner
        if served is not None and rows and served.file == rows[-1].get("file"):  # the same ONNX file as the row above
            rows.append({**rows[-1], "backend": label, "note": served.note, "load_s": round(load_s, 2)})
            print(f"  {label}: the same model file as the row above (accuracy and batched speed reused)", flush=True)
            continue
        # Emulated bf16 (no AMX / AVX-512 BF16) is many times slower: a prefix of the set, against
        # torch float32 on the same prefix, keeps the row without an hour-long pass.
        emulated = dtype == "bfloat16" and not cpu_has_fast_bf16()
        items = inputs[:args.emulated_bf16_examples] if emulated else inputs
        classify(runner, items[:args.batch], args.batch)  # warm-up (first-call allocations, kernel choice)
        predicted, per_s = classify(runner, items, args.batch)
        accuracy = float(np.mean([p == t for p, t in zip(predicted, truth, strict=False)]))
        rows.append({"backend": label, "served_by": served.name if served else "torch", "note": served.note if served else None,
                     "load_s": round(load_s, 2), "accuracy": accuracy,
                     "batched_per_s": round(per_s, 1), "predictions": predicted, "file": served.file if served else None})
        if emulated:
            reference = float(np.mean([p == t for p, t in zip(rows[0]["predictions"], truth[:len(items)], strict=False)]))
            rows[-1].update(note=f"emulated bf16 (no AMX or AVX-512 BF16): first {len(items)} examples; torch float32 on "
                                 f"them: {reference:.4f}", accuracy_vs_fp32_same_images=accuracy - reference)
        print(f"  {label}: accuracy {accuracy:.4f} on {len(items)}, {per_s:.1f} examples/s batched (load {load_s:.1f} s)",
              flush=True)
    if extra_cnn:
        from service.onnx_backend import OnnxModel, session

        fp32 = runners[rows[1]["backend"]]
        work = Path(tempfile.mkdtemp(prefix="onnx-bench-"))
        subset, subset_truth = inputs[:args.cnn_int8_images], truth[:args.cnn_int8_images]
        reference, _ = classify(fp32, subset, args.batch)
        ref_acc = float(np.mean([p == t for p, t in zip(reference, subset_truth, strict=True)]))
        for label, path in cnn_int8_variants(fp32, Path(fp32.backend.file), work, CALIBRATION / folder.name).items():
            runner, _ = load(folder, "onnx", "none", cache)
            runner.model = OnnxModel(session(path, runner.model.session.get_session_options().intra_op_num_threads),
                                     runner.model.config, "logits")
            classify(runner, subset[:args.batch], args.batch)  # warm-up
            predicted, per_s = classify(runner, subset, args.batch)
            acc = float(np.mean([p == t for p, t in zip(predicted, subset_truth, strict=True)]))
            runners[label] = runner
            rows.append({"backend": label, "served_by": None, "note": f"first {len(subset)} images; float32 onnx on them: "
                         f"{ref_acc:.4f}", "accuracy": acc, "accuracy_vs_fp32_same_images": acc - ref_acc,
                         "batched_per_s": round(per_s, 1), "predictions": predicted})
            print(f"  {label}: accuracy {acc:.4f} on {len(subset)} (float32 {ref_acc:.4f}), {per_s:.1f}/s", flush=True)
    latencies: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(args.rounds):  # interleaved: every backend once per round
        for label, runner in runners.items():
            latencies[label].append(single_latency_ms(runner, inputs[-args.single:], args.single))
    fp32_acc = rows[1]["accuracy"] if rows[1]["served_by"] == "onnx" else None
    torch_row = rows[0]
    for row in rows:
        row["single_p50_ms"] = round(median(latencies[row["backend"]]), 2)
        row["single_p50_ms_rounds"] = [round(v, 2) for v in latencies[row["backend"]]]
        row["agreement_with_torch"] = float(np.mean([a == b for a, b in zip(row["predictions"], torch_row["predictions"], strict=False)]))
        row["batched_vs_torch"] = round(row["batched_per_s"] / torch_row["batched_per_s"], 2)
        if "accuracy_vs_fp32_same_images" in row:
            row["vs_fp32_pt"] = round(100 * row["accuracy_vs_fp32_same_images"], 2)
        elif fp32_acc is not None and row is rows[2] and row["served_by"] == "onnx-int8":
            row["vs_fp32_pt"] = round(100 * (row["accuracy"] - fp32_acc), 2)
        elif row["backend"] == "torch bfloat16":  # against torch's float32 (the same runner, float32 weights)
            row["vs_fp32_pt"] = round(100 * (row["accuracy"] - torch_row["accuracy"]), 2)
    for row in rows:
        del row["predictions"]
    torch_single = rows[0]["single_p50_ms"]
    for row in rows:
        row["single_vs_torch"] = round(torch_single / row["single_p50_ms"], 2)
    return {"folder": str(folder), "examples": len(inputs), "rows": rows}


def verdict(row: dict) -> str:
    miss = row.get("vs_fp32_pt")
    if miss is None:
        return ""
    return "within 0.5 pt" if miss >= -0.5 else f"misses the 0.5 pt bound by {-miss - 0.5:.2f} pt"


def print_table(result: dict) -> None:
    headers = ["backend", "accuracy", "vs float32", "agrees with torch", "batched examples/s (x torch)",
               "single p50 ms (x torch)", "load s"]
    rows = [[r["backend"], f"{100 * r['accuracy']:.2f} %",
             f"{r['vs_fp32_pt']:+.2f} pt: {verdict(r)}" if "vs_fp32_pt" in r else "-",
             f"{100 * r['agreement_with_torch']:.1f} %", f"{r['batched_per_s']:.1f} ({r['batched_vs_torch']:.2f}x)",
             f"{r['single_p50_ms']:.1f} ({r['single_vs_torch']:.2f}x)", r.get("load_s", "-")] for r in result["rows"]]
    print(table(headers, rows), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", type=Path, default=DEMO_SENTIMENT, help="fine-tuned MiniLM folder (RT)")
    parser.add_argument("--mpnet", type=Path, default=None, help="fine-tuned MPNet folder (RT); default: the first that exists of "
                        + ", ".join(map(str, MPNET_CANDIDATES)))
    parser.add_argument("--mobilenet", type=Path, default=DEMO_IMAGES, help="fine-tuned MobileNetV2 folder (Fashion-MNIST)")
    parser.add_argument("--texts", type=int, default=None, help="RT test sentences (default all 2,121)")
    parser.add_argument("--images", type=int, default=None, help="Fashion-MNIST test images (default all 10,000)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads of torch and ONNX Runtime "
                        "(default: torch's choice, as the server's HF_SERVE_TORCH_THREADS unset)")
    parser.add_argument("--cnn-int8-images", type=int, default=1000, help="images for the int8 CNN variants that are not served")
    parser.add_argument("--emulated-bf16-examples", type=int, default=500,
                        help="examples for the torch bfloat16 row on a CPU without native bf16 (it is emulated there)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--single", type=int, default=60, help="single requests per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "hf-serve-bench-onnx-cache")
    parser.add_argument("--quick", action="store_true", help="tiny inputs counts (checks that the script runs)")
    parser.add_argument("--name", default="onnx", help="results file name (benchmarks/results/<name>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.texts, args.images, args.cnn_int8_images, args.single, args.rounds = 64, 64, 32, 5, 1
    global THREADS
    THREADS = args.threads
    if THREADS is not None:
        import torch

        torch.set_num_threads(THREADS)
    hw = hardware()
    print_hardware(hw)
    results: dict = {"hardware": hw, "quick": args.quick, "settings": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    mpnet = args.mpnet or next((p for p in MPNET_CANDIDATES if (p / "config.json").is_file()), None)
    texts, text_truth = rt_test(args.texts)
    for name, folder in (("minilm", args.minilm), ("mpnet", mpnet)):
        if folder is None or not (folder / "config.json").is_file():
            print(f"\n## {name}: no fine-tuned folder ({folder}): skipped", flush=True)
            results["models"][name] = {"skipped": f"no folder at {folder}"}
            continue
        results["models"][name] = bench_model(name, folder, texts, text_truth, args, args.cache, extra_cnn=False)
        print_table(results["models"][name])
    if (args.mobilenet / "config.json").is_file():
        id2label = {int(k): v for k, v in json.loads((args.mobilenet / "config.json").read_text())["id2label"].items()}
        images, image_truth = fashion_test(args.images, id2label)
        fashion_calibration(CALIBRATION / args.mobilenet.name)
        results["models"]["mobilenet-v2"] = bench_model("mobilenet-v2", args.mobilenet, images, image_truth, args,
                                                        args.cache, extra_cnn=True)
        print_table(results["models"]["mobilenet-v2"])
    results["load_average_at_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    print(f"\nwrote {shown(write_results(args.name, results, args.quick))}")


if __name__ == "__main__":
    main()
