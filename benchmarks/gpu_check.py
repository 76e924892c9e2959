"""The GPU check: the CUDA path measured against the baselines users would run, in one short script
(about 5 minutes on one GPU), for the device machine this project is sometimes lent.

Randomly initialised models of the real configs (weights do not change what a step or a forward
pass costs): bert-base (`BertConfig()`, MiniLM's tokenizer), MobileNetV2 (the packaged model's
config and image processor) and a SmolLM2-135M-size Llama (its config and tokenizer).

1. Training, bert-base on Rotten Tomatoes, batch 32, max length 128, with benchmarks/training.py's
   arms (the same flags, steps, learning rate and seeds): ours (`training/finetune.py` at its defaults:
   `--mixed_precision auto` is bf16 autocast on a GPU with bf16) against `run_glue_no_trainer.py`'s
   default loop (`benchmarks/train_baseline.py`) under bf16 (`ACCELERATE_MIXED_PRECISION=bf16`, what
   `accelerate launch --mixed_precision bf16` sets), alternating, --repeats each; examples/s of the
   training loop, evaluation accuracy on the 2,121 held-out sentences.
2. Serving, ours (`HF_SERVE_DTYPE=auto`: float16 on CUDA) against the docs' tutorial server
   (`benchmarks/tutorial_server.py` with the pipeline on `cuda:0` in float16, what a user adds there),
   closed-loop clients on the same machine: classifiers at 1 and 32 clients, the Llama at 1 and 8
   (32 new greedy tokens each; tokens/s). `--compile` adds ours with `HF_SERVE_BACKEND=torch-compile`
   for the classifiers (about a minute more per model; triton needs a C compiler on the device).
Prints one table; JSON in benchmarks/results/gpu-check.json (BENCH_RESULTS_DIR; $OUT on the device).

The device machine has its own torch and transformers but not this project's serving and data
libraries, no network, and carries at most 64 MiB. So, here:

    make gpu-check-bundle     # .gpu-check/ (git-ignored): the wheels it lacks + the small asset files

and on the device (the `device` tool's run, carry [".gpu-check"]):

    ln -sfn .gpu-check/assets assets && python3 benchmarks/gpu_check.py

which installs the wheels into /tmp/gpu-check-site first. `--device cpu --quick` runs the same on a
CPU with tiny configs and 2 steps (tests/test_benchmarks_quick.py keeps it from rotting).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / ".gpu-check"
SITE = Path("/tmp/gpu-check-site")
# What the device image lacks (KINDS.md's package list), at this checkout's versions: the data loader
# (datasets and its pure-Python needs) and the serving stack. Everything else is there.
BUNDLED = ["datasets", "dill", "multiprocess", "fastapi", "starlette", "pydantic", "pydantic-core",
           "pydantic-settings", "python-dotenv", "annotated-types", "typing-inspection", "uvicorn",
           "python-multipart",
           # the versions this checkout is tested with, over the image's own (transformers 5.17 there, 2026-11)
           "transformers", "huggingface-hub", "peft"]
ASSET_FILES = [
    "models/all-MiniLM-L6-v2/vocab.txt", "models/all-MiniLM-L6-v2/tokenizer.json",
    "models/all-MiniLM-L6-v2/tokenizer_config.json", "models/all-MiniLM-L6-v2/special_tokens_map.json",
    "models/mobilenet_v2-imagenet/config.json", "models/mobilenet_v2-imagenet/preprocessor_config.json",
    "models/smollm2-135m-instruct/config.json", "models/smollm2-135m-instruct/generation_config.json",
    "models/smollm2-135m-instruct/tokenizer.json", "models/smollm2-135m-instruct/tokenizer_config.json",
    "models/smollm2-135m-instruct/chat_template.jinja",
    "data/rotten_tomatoes/train.csv", "data/rotten_tomatoes/test.csv",
]
FASHION_IMAGES = 256  # test images carried for the image load (PNG bytes in one parquet file)


# -- here: the bundle ------------------------------------------------------------------------------

def make_bundle(out: Path) -> None:
    """Wheels of BUNDLED at this checkout's versions for the device's Python 3.12 on x86-64, and the
    asset files the check reads, in `out`."""
    import importlib.metadata as metadata

    import pyarrow as pa
    import pyarrow.parquet as pq

    wheels = out / "wheels"
    if wheels.exists():
        shutil.rmtree(wheels)
    wheels.mkdir(parents=True)
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
    pins = [f"{name}=={metadata.version(name)}" for name in BUNDLED]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(wheels), *pins],
                   check=True)
    source = REPO / "assets"
    for rel in ASSET_FILES:
        src = source / rel
        if not src.is_file():
            raise SystemExit(f"{src} is missing: run `make assets`")
        dst = out / "assets" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.resolve(), dst)
    table = pq.read_table(source / "data" / "fashion_mnist" / "test.parquet").slice(0, FASHION_IMAGES)
    (out / "assets" / "data" / "fashion_mnist").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": table.column("image"), "label": table.column("label")}),
                   out / "assets" / "data" / "fashion_mnist" / "test.parquet")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB: {len(list(wheels.iterdir()))} wheels, {len(ASSET_FILES) + 1} asset files)")


def ensure_bundled_packages() -> None:
    """On the device: install the bundle's wheels into SITE and re-run this script with it on PYTHONPATH
    (the servers and training runs it starts inherit it)."""
    if all(importlib.util.find_spec(m) for m in ("datasets", "fastapi", "uvicorn", "pydantic_settings")):
        return
    wheels = sorted((BUNDLE / "wheels").glob("*.whl"))
    if not wheels:
        raise SystemExit("datasets / fastapi / uvicorn are not installed, and there is no .gpu-check/wheels: "
                         "run `make gpu-check-bundle` and carry .gpu-check")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)], check=True)
    paths = [str(SITE), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


# -- models ---------------------------------------------------------------------------------------

def build_models(work: Path, quick: bool) -> dict[str, tuple[str, Path]]:
    """name -> (task, folder): random weights of the real configs (tiny ones with --quick)."""
    import torch
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoTokenizer,
    )

    from benchmarks.common import ASSETS, MOBILENET, build_text_model, save_folder

    work.mkdir(parents=True, exist_ok=True)
    models = {"bert-base": ("text-classification", build_text_model(work / "bert-base", "tiny" if quick else "bert-base"))}

    mobilenet = work / "mobilenet-v2"
    if not (mobilenet / "model.safetensors").is_file():
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(MOBILENET)
        processor = AutoImageProcessor.from_pretrained(MOBILENET)
        if quick:  # a quarter of the channels, 64-pixel inputs
            config.depth_multiplier = 0.25
            processor.size, processor.crop_size = {"shortest_edge": 72}, {"height": 64, "width": 64}
        save_folder(mobilenet, "image-classification", AutoModelForImageClassification.from_config(config).eval(),
                    processor)
    models["mobilenet-v2"] = ("image-classification", mobilenet)

    smollm2_source = ASSETS / "models" / "smollm2-135m-instruct"
    llama = work / "smollm2-size-llama"
    if not (llama / "model.safetensors").is_file():
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(smollm2_source)
        if quick:
            config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16})
        save_folder(llama, "text-generation", AutoModelForCausalLM.from_config(config).eval(),
                    AutoTokenizer.from_pretrained(smollm2_source))
    models["smollm2-size-llama"] = ("text-generation", llama)
    return models


# -- training ---------------------------------------------------------------------------------------

def train_arms(model: Path, args, on_gpu: bool) -> dict:
    """benchmarks/training.py's two main arms on `model`, alternating, repeat k with seed k: ours at its
    defaults (`--mixed_precision auto`: bf16 on a GPU with bf16) and the baseline under bf16 on a GPU
    (what `accelerate launch --mixed_precision bf16` sets), at its default (float32) on a CPU."""
    from benchmarks.common import RT_DIR
    from benchmarks.training import baseline, ours

    files = (RT_DIR / "train.csv", RT_DIR / "test.csv")
    precision = "bf16" if on_gpu else "no"
    runs: dict = {"ours": [], "baseline": [], "baseline_mixed_precision": precision}
    for rep in range(args.repeats):
        runs["ours"].append(ours(args, files, rep, seed=rep + 1, model=model))
        runs["baseline"].append(baseline(args, files, rep, seed=rep + 1, model=model, mixed_precision=precision))
        print(f"  training rep {rep + 1}: ours {runs['ours'][-1]['train_samples_per_second']:.0f} ex/s, "
              f"baseline {runs['baseline'][-1]['train_samples_per_second']:.0f} ex/s", flush=True)
    return runs


# -- serving ----------------------------------------------------------------------------------------

def serve_arms(models: dict, args) -> dict:
    from benchmarks.serving import GEN_NEW_TOKENS, Server, closed_loop, inputs_for

    out: dict = {}
    for name, (task, folder) in models.items():
        generation = task == "text-generation"
        levels = ([1, 2] if generation else [1, 4]) if args.quick else ([1, 8] if generation else [1, 32])
        n_requests = (4 if args.quick else 48) if generation else (16 if args.quick else 400)
        extra = {"tutorial": {"TUTORIAL_DEVICE": args.tutorial_device or "", "TUTORIAL_DTYPE": args.tutorial_dtype or ""},
                 "ours": {"HF_SERVE_DEVICE": args.device}, "ours-compile": {"HF_SERVE_DEVICE": args.device}}
        kinds = ("tutorial", "ours") + (("ours-compile",) if args.compile and not generation else ())
        servers = {kind: Server(kind, name, task, folder, extra[kind]) for kind in kinds}
        inputs = inputs_for(task, max(n_requests, 8))
        out[name] = {"task": task, "levels": {}}
        try:
            for s in servers.values():
                s.wait_ready()
            for c in levels:
                row = {}
                for kind, s in servers.items():
                    r = asyncio.run(closed_loop(s, task, inputs, max(n_requests, 2 * c), c))
                    row[kind] = {k: r[k] for k in ("throughput_rps", "tokens_per_s", "p50_ms", "p99_ms", "errors")}
                out[name]["levels"][str(c)] = row
                value = "tokens_per_s" if generation else "throughput_rps"
                print(f"  {name} c={c}: ours {row['ours'][value]:.1f}, tutorial {row['tutorial'][value]:.1f} "
                      f"({value}; {GEN_NEW_TOKENS} new tokens per request)" if generation else
                      f"  {name} c={c}: ours {row['ours'][value]:.1f} req/s, tutorial {row['tutorial'][value]:.1f} req/s"
                      + (f", ours-compile {row['ours-compile'][value]:.1f} req/s" if "ours-compile" in row else ""),
                      flush=True)
        finally:
            for s in servers.values():
                s.stop()
    return out


# -- report -----------------------------------------------------------------------------------------

def report(results: dict) -> str:
    from benchmarks.common import median, table

    rows = []
    tr = results["training"]
    ours = median([r["train_samples_per_second"] for r in tr["ours"]])
    base = median([r["train_samples_per_second"] for r in tr["baseline"]])
    precisions = f"{tr['ours'][0]['mixed_precision']} / {tr['baseline_mixed_precision']}"
    rows.append([f"training bert-base (examples/s; mixed precision {precisions})", ours, base, f"{ours / base:.2f}x",
                 f"accuracy {100 * median([r['eval_accuracy'] for r in tr['ours']]):.1f} / "
                 f"{100 * median([r['eval_accuracy'] for r in tr['baseline']]):.1f} %"])
    for name, m in results["serving"].items():
        value = "tokens_per_s" if m["task"] == "text-generation" else "throughput_rps"
        unit = "tokens/s" if value == "tokens_per_s" else "req/s"
        for c, row in m["levels"].items():
            t = row["tutorial"]
            for kind in [k for k in ("ours", "ours-compile") if k in row]:
                o = row[kind]
                rows.append([f"serving {name}, {c} client(s) ({unit}){', torch-compile' if kind != 'ours' else ''}",
                             o[value], t[value], f"{o[value] / t[value]:.2f}x" if t[value] else "-",
                             f"p50 {o['p50_ms']:.1f} / {t['p50_ms']:.1f} ms, errors {o['errors']} / {t['errors']}"])
    return table(["what", "ours", "baseline", "ours / baseline", "notes (ours / baseline)"], rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="write the device bundle to this folder and exit")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny configs, 2 training steps, a few requests")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each run")
    parser.add_argument("--repeats", type=int, default=2, help="training runs of each arm, alternating")
    parser.add_argument("--max-length", type=int, default=128, help="truncation of the training texts")
    parser.add_argument("--compile", action="store_true",
                        help="also serve the classifiers with HF_SERVE_BACKEND=torch-compile (needs a C compiler for "
                             "triton; compiling adds about a minute per model)")
    args = parser.parse_args(argv)
    if args.bundle:
        make_bundle(args.bundle)
        return 0
    ensure_bundled_packages()
    if os.environ.get("OUT"):  # on the device: what is written under $OUT comes back
        os.environ["BENCH_RESULTS_DIR"] = os.environ["OUT"]
    sys.path.insert(0, str(REPO))
    import torch

    from benchmarks.common import WORK, hardware, print_hardware, shown, write_results

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here (use --device cpu for a dry run)")
    if args.quick:
        args.steps, args.repeats = 2, 1
    on_gpu = args.device.startswith("cuda")
    # the tutorial's pipeline as a user puts it on a GPU; on a CPU it stays the tutorial's own
    args.tutorial_device, args.tutorial_dtype = ("cuda:0", "float16") if on_gpu else (None, None)
    if not on_gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # every training run and server started here stays on the CPU
    hw = hardware()
    print_hardware(hw)
    work = WORK / "gpu-check"
    started = time.perf_counter()
    models = build_models(work / "models", args.quick)
    results: dict = {"hardware": hw, "quick": args.quick, "device": args.device, "steps": args.steps}
    print("\ntraining: ours vs run_glue_no_trainer's default loop", flush=True)
    results["training"] = train_arms(models["bert-base"][1], args, on_gpu)
    print("\nserving: ours vs the tutorial server", flush=True)
    results["serving"] = serve_arms(models, args)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    path = write_results("gpu-check", results, args.quick)
    print()
    print(report(results))
    print(f"\nwrote {shown(path)} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
