"""glibc's malloc settings against its defaults, for the served runners themselves (no HTTP): the
evidence for (not) setting them in the server (docs/performance.md, Serving, "The allocator").

Modes, each measured in fresh processes (the allocator's state is per process), after the server's
own arena cap (`service.memory.limit_arenas`):
- `default`: glibc's adaptive thresholds (a block above the mmap threshold, 128 KiB rising to at
  most 32 MiB, is a fresh mmap; a heap top is trimmed when twice that is free);
- `thresholds`: `mallopt` M_MMAP_THRESHOLD 32 MiB (the most glibc accepts on 64-bit) and
  M_TRIM_THRESHOLD 1 GiB, what `MALLOC_*_THRESHOLD_` tunables do;
- `no-mmap`: M_MMAP_MAX 0 and the same trim threshold: even blocks above 32 MiB come from the heap.

The model is loaded as the server loads it and every forward pass runs on the server's torch thread
(arenas are per thread, so the thread matters). In each process, 32 inputs go through `run_batch`
as the batcher hands them over under load, for every value of the knob that the allocator's
behaviour should set:

- image models: `CPU_IMAGES_PER_FORWARD` (images per forward pass within the batch of 32);
- text models: `CPU_PADDING_SLACK` (how much padding a sub-batch of the length-sorted 32 may carry).

Values run interleaved, --repeats passes each after a warm-up pass; processes alternate between
modes for --rounds rounds; a cell is the median over rounds of the per-process medians. RSS is read
at the end of each process (after the periodic trim the server would run: `malloc_trim(0)`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    DEMO_IMAGES,
    DEMO_SENTIMENT,
    WORK,
    build_resnet50,
    fashion_png,
    hardware,
    median,
    mpnet_classifier,
    print_hardware,
    python,
    rss_mb,
    rt_sentences,
    table,
    write_results,
)

MODES = ("default", "thresholds", "no-mmap")
# mallopt parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
MALLOPT = {"default": [], "thresholds": [(M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30)],
           "no-mmap": [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 1 << 30)]}
BATCH = 32
MODELS = {
    "minilm-demo": ("text", lambda: DEMO_SENTIMENT),
    "mpnet": ("text", lambda: mpnet_classifier(WORK / "models" / "mpnet")),
    "mobilenet-v2": ("image", lambda: DEMO_IMAGES),
    "resnet-50": ("image", lambda: build_resnet50(WORK / "models" / "resnet-50")),
}
KNOBS = {"image": [1, 2, 4, 8, 16, 32], "text": [1.0, 1.25, 1.5, 2.0, 1000.0]}


def child(mode: str, model: str, repeats: int) -> dict:
    """One process: load, warm up, time every knob value; returns per-value medians (inputs/s)."""
    import ctypes
    import io

    from PIL import Image

    from service import memory, torch_thread
    from service.folders import inspect_folder
    from service.loading import load_runner
    from service.settings import Settings
    from service.tasks.classifier import ClassificationParameters

    memory.limit_arenas()
    libc = ctypes.CDLL("libc.so.6")
    took = all(libc.mallopt(param, value) == 1 for param, value in MALLOPT[mode])
    kind, folder = MODELS[model][0], MODELS[model][1]()
    settings = Settings(models_dir=folder.parent)
    runner = torch_thread.run(load_runner, folder, inspect_folder(folder), settings)
    params = [ClassificationParameters()] * BATCH
    if kind == "image":
        payloads = [(Image.open(io.BytesIO(png)), p) for png, p in zip(fashion_png(BATCH), params, strict=True)]
    else:
        payloads = [([text], p) for text, p in zip(rt_sentences("test", BATCH), params, strict=True)]
    prepared = [runner.prepare(payload)[0] for payload in payloads]

    def set_knob(value):
        if kind == "image":
            runner.CPU_IMAGES_PER_FORWARD = int(value)
        else:
            runner.encoder.CPU_PADDING_SLACK = float(value)

    def one_pass(value) -> float:
        set_knob(value)
        started = time.perf_counter()
        torch_thread.run(runner.run_batch, prepared, params)
        return BATCH / (time.perf_counter() - started)

    samples: dict[float, list[float]] = {v: [] for v in KNOBS[kind]}
    for value in KNOBS[kind]:
        one_pass(value)  # warm-up
    for _ in range(repeats):
        for value in KNOBS[kind]:
            samples[value].append(one_pass(value))
    before_trim, peak = rss_mb(os.getpid())
    trim = memory._malloc_trim()
    if trim is not None:
        trim(0)
    return {"mode": mode, "model": model, "mallopt_took": took,
            "inputs_per_s": {str(v): median(s) for v, s in samples.items()},
            "rss_mb": round(before_trim, 1), "rss_after_trim_mb": round(rss_mb(os.getpid())[0], 1), "peak_rss_mb": round(peak, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "MODEL"), help=argparse.SUPPRESS)
    ap.add_argument("--name", default="allocator")
    args = ap.parse_args(argv)
    args.modes = args.modes.split(",")
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.repeats)))
        return 0
    hw = hardware()
    print_hardware(hw)
    runs = []
    for model in args.models.split(","):
        for r in range(args.rounds):
            for mode in (args.modes if r % 2 == 0 else args.modes[::-1]):
                out = subprocess.run([python(), __file__, "--child", mode, model, "--repeats", str(args.repeats)],
                                     capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                result["round"] = r
                runs.append(result)
                print(json.dumps(result), flush=True)
    summary = {}
    modes = args.modes
    for model in args.models.split(","):
        kind = MODELS[model][0]
        mine = [x for x in runs if x["model"] == model]
        rows = []
        for value in KNOBS[kind]:
            cells = {m: median([x["inputs_per_s"][str(value)] for x in mine if x["mode"] == m]) for m in modes}
            rows.append([value] + [f"{cells[m]:.1f}" for m in modes]
                        + [f"{cells[m] / cells[modes[0]]:.2f}x" for m in modes[1:]])
            summary.setdefault(model, {})[str(value)] = cells
        for key in ("rss_after_trim_mb", "peak_rss_mb"):
            summary[model][key] = {m: median([x[key] for x in mine if x["mode"] == m]) for m in modes}
        knob = "images per forward" if kind == "image" else "padding slack"
        print(f"\n{model}: inputs/s through run_batch (batch {BATCH}), median of {args.rounds} processes; "
              "RSS after malloc_trim / peak, MB: "
              + ", ".join(f"{m} {summary[model]['rss_after_trim_mb'][m]:.0f} / {summary[model]['peak_rss_mb'][m]:.0f}"
                          for m in modes))
        print(table([knob, *modes, *[f"{m} / {modes[0]}" for m in modes[1:]]], rows))
    write_results(args.name, {"hardware": hw, "rounds": args.rounds, "repeats": args.repeats, "runs": runs,
                              "summary": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
