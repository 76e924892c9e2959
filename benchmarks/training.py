"""Training benchmark: our fine-tuning entry point vs a plain `run_glue_no_trainer.py`-style loop.

    python benchmarks/training.py             # 3 repeats of 40 steps each, 2-process DDP, one epoch each
    python benchmarks/training.py --quick     # 2 steps on 64 examples (seconds)

Same model (all-MiniLM-L6-v2 + a new 2-class head), data (Rotten Tomatoes train -> accuracy on the
2,121 held-out sentences), batch size (32), learning rate, schedule, number of optimizer steps and
truncation (128 tokens). The baseline (benchmarks/train_baseline.py) pads every example to 128
tokens and draws random batches, as transformers' `run_glue_no_trainer.py` does; ours
(`training/finetune.py`) pads each batch to its longest example and groups similar lengths.
Throughput counts the training loop only (evaluation and saving excluded, in both). Each repeat runs
the baseline and ours back to back; the table shows medians. Peak RSS is the process's VmHWM.

Scaling: `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2` (gloo DDP, the
same global batch of 32 as 2 x 16) against one process, with ours.

LoRA vs full fine-tuning (`--lora-steps`, `--lora-smollm2-steps`; `--lora-only` runs just this part):
ours with `--use_peft` (r 16, alpha 32, every linear layer of the backbone, the head trained fully) against
ours fine-tuning every weight, each at its usual learning rate (full 1e-4, LoRA 5e-4; SmolLM2 full 3e-5),
same data, batch, steps and truncation: trainable parameters, examples/s, peak RSS and accuracy on the
2,121 held-out Rotten Tomatoes sentences, for MiniLM (22.7 M) and the decoder SmolLM2-135M-Instruct.
Accuracy: one run of each to the given steps. Speed and peak RSS: the median of `--lora-speed-repeats`
short runs of each, full and LoRA alternating.
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
    ASSETS,
    MINILM,
    REPO,
    RT_DIR,
    WORK,
    hardware,
    median,
    plot_path,
    print_hardware,
    python,
    rss_mb,
    shown,
    table,
    write_results,
)


def run_measured(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run to completion, polling the peak RSS (MB) of the process and its children."""
    import psutil

    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=fh, stderr=subprocess.STDOUT)
        peak = 0.0
        while proc.poll() is None:
            try:
                procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
                peak = max([peak] + [rss_mb(p.pid)[1] for p in procs])
            except psutil.Error:
                pass
            time.sleep(0.5)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed; log {log}:\n{log.read_text()[-3000:]}")
    return peak


def common_flags(args, train_file: Path, eval_file: Path, batch: int) -> dict:
    return {"model_name_or_path": MINILM, "train_file": train_file, "validation_file": eval_file,
            "max_length": 128, "per_device_train_batch_size": batch, "per_device_eval_batch_size": 64,
            "learning_rate": 1e-4, "weight_decay": 0.01, "num_warmup_steps": 0 if args.quick else 5,
            "max_train_steps": args.steps, "seed": 42}


def argv_of(flags: dict) -> list[str]:
    out = []
    for k, v in flags.items():
        out += [f"--{k}", str(v)]
    return out


def baseline(args, files, rep: int) -> dict:
    log = WORK / "training" / f"baseline-{rep}.log"
    cmd = [python(), "benchmarks/train_baseline.py", *argv_of(common_flags(args, *files, 32))]
    peak = run_measured(cmd, log)
    line = [x for x in log.read_text().splitlines() if x.startswith("{")][-1]
    return {**json.loads(line), "peak_rss_mb": peak}


# torch.compile through Accelerate's own switch (what `accelerate launch --dynamo_backend inductor`
# sets); dynamic shapes, because every length-grouped batch has its own padded length.
COMPILE_ENV = {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR", "ACCELERATE_DYNAMO_USE_DYNAMIC": "true"}


def ours(args, files, rep, processes: int = 1, compiled: bool = False) -> dict:
    out = WORK / "training" / f"ours-{processes}p{'-compiled' if compiled else ''}-{rep}"
    flags = {**common_flags(args, *files, 32 // processes), "task": "text-classification", "text_column": "text",
             "label_column": "label", "output_dir": out, "overwrite_output_dir": "true"}
    if processes == 1:
        cmd = [python(), "training/finetune.py", *argv_of(flags)]
        env = COMPILE_ENV if compiled else None
    else:
        accelerate = str(Path(python()).with_name("accelerate"))
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "training/finetune.py", *argv_of(flags)]
        env = {"ACCELERATE_USE_CPU": "true"}
    peak = run_measured(cmd, out.with_name(out.name + ".log"), env)
    results = json.loads((out / "all_results.json").read_text())
    return {"train_runtime_s": results["train_runtime_s"], "train_samples_per_second": results["train_samples_per_second"],
            "train_tokens_per_second": results.get("train_tokens_per_second"), "steps": results["train_steps"],
            "eval_accuracy": results["eval_accuracy"], "eval_examples": results["eval_examples"],
            "num_processes": processes, "peak_rss_mb": peak}


SMOLLM2 = ASSETS / "models" / "smollm2-135m-instruct"
# model -> (path, batch, full fine-tuning learning rate, LoRA learning rate)
LORA_MODELS = {"minilm": (MINILM, 32, 1e-4, 5e-4), "smollm2": (SMOLLM2, 16, 3e-5, 5e-4)}


def lora_vs_full(args, files, model: str, peft: bool, steps: int, tag: str = "", **extra) -> dict:
    """One run of ours on `model`, fine-tuning every weight or LoRA; the numbers of the comparison."""
    path, batch, full_lr, lora_lr = LORA_MODELS[model]
    out = WORK / "training" / f"{model}-{'lora' if peft else 'full'}-{steps}{tag}"
    flags = {**common_flags(args, *files, batch), "max_length": 64, "max_train_steps": steps, **extra,
             "model_name_or_path": path, "learning_rate": lora_lr if peft else full_lr,
             "per_device_eval_batch_size": 32, "task": "text-classification", "text_column": "text",
             "label_column": "label", "output_dir": out, "overwrite_output_dir": "true", "checkpointing_steps": "none"}
    if peft:
        flags.update(use_peft="true", lora_r=16, lora_alpha=32, lora_dropout=0.05)
    cmd = [python(), "training/finetune.py", *argv_of(flags)]
    done = out.with_name(out.name + ".done.json")  # the same command finished earlier (BENCH_WORK_DIR): reuse it
    if done.is_file() and json.loads(done.read_text())["argv"] == cmd[1:] and (out / "all_results.json").is_file():
        peak = json.loads(done.read_text())["peak_rss_mb"]
        print(f"  reusing the finished run in {out}", flush=True)
    else:
        peak = run_measured(cmd, out.with_name(out.name + ".log"))
        done.write_text(json.dumps({"argv": cmd[1:], "peak_rss_mb": peak}))
    results = json.loads((out / "all_results.json").read_text())
    return {"model": model, "method": "LoRA r16" if peft else "full", "steps": results["train_steps"],
            "batch_size": batch, "learning_rate": flags["learning_rate"],
            "trainable_parameters": results["trainable_parameters"], "total_parameters": results["total_parameters"],
            "train_samples_per_second": results["train_samples_per_second"],
            "train_runtime_s": results["train_runtime_s"], "eval_accuracy": results["eval_accuracy"],
            "eval_examples": results["eval_examples"], "peak_rss_mb": peak}


def run_lora_comparison(args, files) -> dict:
    """Accuracy from one long run of each; speed and peak RSS from `--lora-speed-repeats` short runs of each,
    alternating full and LoRA (a busy machine slows both alike), medians."""
    out: dict = {}
    for model, steps in (("minilm", args.lora_steps), ("smollm2", args.lora_smollm2_steps)):
        if not steps:
            continue
        out[model] = {}
        for peft in (False, True):
            r = lora_vs_full(args, files, model, peft, steps)
            out[model]["lora" if peft else "full"] = r
            print(f"  {model} {r['method']:8}: {r['trainable_parameters']:,} trainable, "
                  f"{r['train_samples_per_second']:.1f} ex/s, accuracy {r['eval_accuracy']:.4f}, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        speed_steps = min(steps, {"minilm": 30, "smollm2": 10}[model])
        speed: dict = {"full": [], "lora": []}
        for rep in range(args.lora_speed_repeats):
            for peft in (False, True):
                r = lora_vs_full(args, files, model, peft, speed_steps, tag=f"-speed{rep}", max_eval_samples=64)
                speed["lora" if peft else "full"].append(r)
                print(f"  {model} {r['method']:8} speed run {rep + 1}: {r['train_samples_per_second']:.1f} ex/s, "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        for kind, runs in speed.items():
            if runs:
                out[model][kind].update({
                    "speed_runs": [r["train_samples_per_second"] for r in runs], "speed_steps": speed_steps,
                    "train_samples_per_second": median([r["train_samples_per_second"] for r in runs]),
                    "peak_rss_mb": median([r["peak_rss_mb"] for r in runs])})
    return out


def print_lora_table(comparison: dict) -> None:
    rows = []
    for model, runs in comparison.items():
        for kind in ("full", "lora"):
            r = runs[kind]
            rows.append([model, r["method"], f"{r['trainable_parameters']:,}", f"{r['learning_rate']:g}",
                         r["train_samples_per_second"],
                         f"{r['train_samples_per_second'] / runs['full']['train_samples_per_second']:.2f}x",
                         100 * r["eval_accuracy"], r["peak_rss_mb"]])
    steps = {m: r["full"]["steps"] for m, r in comparison.items()}
    speed = {m: (r["full"].get("speed_steps"), len(r["full"].get("speed_runs", []))) for m, r in comparison.items()}
    print(f"\nLoRA vs full fine-tuning on Rotten Tomatoes: accuracy after {steps} steps (one run each); "
          f"examples/s and peak RSS: median of (steps, runs) {speed}, full and LoRA alternating")
    print(table(["model", "method", "trainable params", "lr", "examples/s", "vs full", "accuracy (%)",
                 "peak RSS (MB)"], rows))


def quick_files() -> tuple[Path, Path]:
    import csv

    data = WORK / "training" / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n in (("train", 64), ("test", 64)):
        with (RT_DIR / f"{split}.csv").open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        rows = rows[: n // 2] + rows[-n // 2:]  # both labels
        path = data / f"rt-{split}-{n}.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows)
        paths.append(path)
    return tuple(paths)


KEYS = ("train_samples_per_second", "train_tokens_per_second", "eval_accuracy", "peak_rss_mb", "train_runtime_s")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]
    labels = {"baseline": "baseline", "ours": "ours", "ours_ddp": "ours,\n2-proc DDP", "ours_compiled": "ours +\ncompile"}
    keys = [k for k in labels if k in s]
    colors = {"baseline": "grey", "ours": "C0", "ours_ddp": "C2", "ours_compiled": "C3"}
    run = results.get("accuracy_run")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    panels = [("train_samples_per_second", f"examples/s ({results['steps']} steps, median of {results['repeats']})", keys, s),
              ("eval_accuracy", f"RT held-out accuracy (%) after {run['steps']} steps" if run
               else "RT held-out accuracy (%)", ["baseline", "ours"] if run else keys, run or s),
              ("peak_rss_mb", "peak RSS (MB)", keys, s)]
    for ax, (key, title, names, source) in zip(axes, panels, strict=True):
        scale = 100 if key == "eval_accuracy" else 1
        bars = ax.bar([labels[k] for k in names], [scale * source[k][key] for k in names], color=[colors[k] for k in names])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"MiniLM on Rotten Tomatoes, batch 32, {results['hardware']['cpu']} ({results['hardware']['cores']} cores); "
                 "baseline = run_glue_no_trainer-style loop (pad to 128, random batches)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ddp-repeats", type=int, default=1, help="2-process runs (0 skips the scaling part)")
    parser.add_argument("--compile-repeats", type=int, default=1,
                        help="runs of ours with torch.compile (inductor, dynamic shapes); 0 skips")
    parser.add_argument("--accuracy-steps", type=int, default=267,
                        help="one more run of each for accuracy, this many steps (267 = one epoch of RT; 0 skips)")
    parser.add_argument("--lora-steps", type=int, default=267,
                        help="LoRA vs full fine-tuning of MiniLM, this many steps of batch 32 (0 skips)")
    parser.add_argument("--lora-smollm2-steps", type=int, default=125,
                        help="LoRA vs full fine-tuning of SmolLM2 as a classifier, steps of batch 16 (0 skips)")
    parser.add_argument("--lora-speed-repeats", type=int, default=3,
                        help="short runs of each (alternating) for the examples/s and peak RSS of the LoRA comparison")
    parser.add_argument("--lora-only", action="store_true", help="run only the LoRA vs full fine-tuning part")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.ddp_repeats, args.accuracy_steps, args.compile_repeats = 2, 1, 0, 0, 0
        args.lora_steps, args.lora_smollm2_steps, args.lora_speed_repeats = 2, 0, 0
    files = quick_files() if args.quick else (RT_DIR / "train.csv", RT_DIR / "test.csv")
    if args.lora_only:
        hw = hardware()
        print_hardware(hw)
        started = time.perf_counter()
        results = {"hardware": hw, "quick": args.quick, "lora_vs_full": run_lora_comparison(args, files)}
        results["wall_s"] = round(time.perf_counter() - started, 1)
        path = write_results("training-lora", results, args.quick)
        print_lora_table(results["lora_vs_full"])
        print(f"\nwrote {shown(path)} ({results['wall_s']:.0f} s)")
        return 0

    hw = hardware()
    print_hardware(hw)
    results: dict = {"hardware": hw, "quick": args.quick, "steps": args.steps, "batch_size": 32, "repeats": args.repeats,
                     "runs": {"baseline": [], "ours": [], "ours_ddp": [], "ours_compiled": []}}
    started = time.perf_counter()
    for rep in range(args.repeats):
        for kind, fn in (("baseline", baseline), ("ours", ours)):
            r = fn(args, files, rep)
            results["runs"][kind].append(r)
            print(f"  rep {rep + 1} {kind:8}: {r['train_samples_per_second']:.1f} ex/s, {r['train_tokens_per_second']:.0f} tok/s, "
                  f"accuracy {r['eval_accuracy']:.4f}, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    for rep in range(args.ddp_repeats):
        r = ours(args, files, rep, processes=2)
        results["runs"]["ours_ddp"].append(r)
        print(f"  rep {rep + 1} ours 2-process DDP: {r['train_samples_per_second']:.1f} ex/s, accuracy {r['eval_accuracy']:.4f}",
              flush=True)
    for rep in range(args.compile_repeats):
        r = ours(args, files, rep, compiled=True)
        results["runs"]["ours_compiled"].append(r)
        print(f"  rep {rep + 1} ours + torch.compile: {r['train_samples_per_second']:.1f} ex/s (compilation included), "
              f"accuracy {r['eval_accuracy']:.4f}", flush=True)
    if args.accuracy_steps:
        # 40 steps is enough for speed but not for accuracy: neither loop has converged. One run of
        # each to the end of an epoch compares what the two loops learn.
        long = argparse.Namespace(**{**vars(args), "steps": args.accuracy_steps})
        results["accuracy_run"] = {"steps": args.accuracy_steps}
        for kind, fn in (("baseline", baseline), ("ours", ours)):
            r = fn(long, files, "accuracy")
            results["accuracy_run"][kind] = r
            print(f"  {args.accuracy_steps} steps {kind:8}: {r['train_samples_per_second']:.1f} ex/s, "
                  f"accuracy {r['eval_accuracy']:.4f}", flush=True)
        run = results["accuracy_run"]
        run["accuracy_difference_pt"] = 100 * (run["ours"]["eval_accuracy"] - run["baseline"]["eval_accuracy"])
        run["speedup_examples_per_s"] = run["ours"]["train_samples_per_second"] / run["baseline"]["train_samples_per_second"]
    if args.lora_steps or args.lora_smollm2_steps:
        results["lora_vs_full"] = run_lora_comparison(args, files)
    summary = {k: {key: median([r[key] for r in runs]) for key in KEYS} for k, runs in results["runs"].items() if runs}
    summary["speedup_examples_per_s"] = summary["ours"]["train_samples_per_second"] / summary["baseline"]["train_samples_per_second"]
    summary["accuracy_difference_pt"] = 100 * (summary["ours"]["eval_accuracy"] - summary["baseline"]["eval_accuracy"])
    if "ours_compiled" in summary:
        summary["compile_speedup"] = summary["ours_compiled"]["train_samples_per_second"] / summary["ours"]["train_samples_per_second"]
    if "ours_ddp" in summary:
        summary["ddp_scaling"] = summary["ours_ddp"]["train_samples_per_second"] / summary["ours"]["train_samples_per_second"]
    results["summary"] = summary
    results["wall_s"] = round(time.perf_counter() - started, 1)
    path = write_results("training", results, args.quick)

    b = summary["baseline"]
    rows = []
    for key, label in (("baseline", "baseline: run_glue_no_trainer-style (pad to 128, random batches)"),
                       ("ours", "ours: training/finetune.py, 1 process"), ("ours_ddp", "ours: 2-process DDP (gloo, 2 x 16)"),
                       ("ours_compiled", "ours + torch.compile (inductor, compilation included)")):
        if key in summary:
            s = summary[key]
            rows.append([label, s["train_samples_per_second"], f"{s['train_samples_per_second'] / b['train_samples_per_second']:.2f}x",
                         s["train_tokens_per_second"], 100 * s["eval_accuracy"], s["peak_rss_mb"]])
    print(f"\nMiniLM on Rotten Tomatoes train, {args.steps} steps x batch 32 (max 128 tokens) -> accuracy on "
          f"{results['runs']['baseline'][0]['eval_examples']} held-out; median of {args.repeats}")
    print(table(["run", "examples/s", "vs baseline", "real tokens/s", "accuracy (%)", "peak RSS (MB)"], rows))
    if "accuracy_run" in results:
        run = results["accuracy_run"]
        print(f"\nTrained {run['steps']} steps (one epoch), one run each:")
        print(table(["run", "examples/s", "vs baseline", "accuracy (%)"], [
            ["baseline", run["baseline"]["train_samples_per_second"], "1.00x", 100 * run["baseline"]["eval_accuracy"]],
            ["ours", run["ours"]["train_samples_per_second"], f"{run['speedup_examples_per_s']:.2f}x",
             100 * run["ours"]["eval_accuracy"]]]))
        print(f"accuracy difference (ours - baseline): {run['accuracy_difference_pt']:+.1f} pt (target within 0.5)")
    if results.get("lora_vs_full"):
        print_lora_table(results["lora_vs_full"])
    png = plot_path("training", args.quick)
    plot(results, png)
    print(f"\nwrote {shown(path)} and {shown(png)} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
