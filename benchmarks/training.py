"""Training benchmark: our fine-tuning entry point vs transformers' `run_glue_no_trainer.py`.

    python benchmarks/training.py             # 3 seeds x 3 arms, alternating, 80 steps each
    python benchmarks/training.py --quick     # 2 steps on 64 examples (seconds)

Same model (all-MiniLM-L6-v2 + a new 2-class head), data (Rotten Tomatoes train -> accuracy on the
2,121 held-out sentences), batch size (32), learning rate, schedule, number of optimizer steps and
truncation (`--max-length`, 64 like the demo recipe) for every arm:
  baseline             benchmarks/train_baseline.py, the default path of `run_glue_no_trainer.py`:
                       `padding=False` + `DataCollatorWithPadding` (each random batch padded to its longest)
  baseline_pad_to_max  the same script with `--pad_to_max_length` (every example padded to max length)
  ours                 `training/finetune.py`: dynamic padding, batches grouped by length
Throughput counts the training loop only (evaluation and saving excluded, in all). Repeat k runs the
three arms back to back with seed k (so machine noise hits all of them alike): examples/s and peak RSS
are the medians over the repeats, accuracy (on `--eval-examples` held-out sentences, default all 2,121) the
mean over the seeds; "equal accuracy" compares those means. Peak RSS is the process's VmHWM.
`--threads N` sets OMP_NUM_THREADS for every arm (on a CPU shared with other jobs a 2-thread OpenMP team
stalls at every barrier whose other core is busy; one thread each keeps the comparison fair).

Scaling (`--ddp-repeats`): `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2` (gloo
DDP, the same global batch of 32 as 2 x 16) against one process, with ours.

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


def common_flags(args, train_file: Path, eval_file: Path, batch: int, steps: int | None = None, seed: int = 42,
                 model: Path = MINILM) -> dict:
    steps = steps or args.steps
    return {"model_name_or_path": model, "train_file": train_file, "validation_file": eval_file,
            "max_length": args.max_length, "per_device_train_batch_size": batch, "per_device_eval_batch_size": 64,
            "learning_rate": 1e-4, "weight_decay": 0.01, "num_warmup_steps": 0 if args.quick else max(steps // 10, 1),
            "max_train_steps": steps, "seed": seed}


def argv_of(flags: dict) -> list[str]:
    out = []
    for k, v in flags.items():
        out += [f"--{k}", str(v)]
    return out


def baseline(args, files, rep, pad_to_max: bool = False, steps: int | None = None, seed: int = 42,
             mixed_precision: str = "no", model: Path = MINILM) -> dict:
    """One run of benchmarks/train_baseline.py (run_glue_no_trainer.py's loop), default or --pad_to_max_length;
    `mixed_precision` as `accelerate launch --mixed_precision` would set it (the script's default: no)."""
    log = WORK / "training" / (f"baseline-{model.name}{'-pad' if pad_to_max else ''}"
                               f"{'-' + mixed_precision if mixed_precision != 'no' else ''}-{rep}.log")
    cmd = [python(), "benchmarks/train_baseline.py", *argv_of(common_flags(args, *files, 32, steps, seed, model))]
    if pad_to_max:
        cmd.append("--pad_to_max_length")
    peak = run_measured(cmd, log, {"ACCELERATE_MIXED_PRECISION": mixed_precision})
    line = [x for x in log.read_text().splitlines() if x.startswith("{")][-1]
    return {**json.loads(line), "peak_rss_mb": peak, "seed": seed}


def baseline_pad_to_max(args, files, rep, **kw) -> dict:
    return baseline(args, files, rep, pad_to_max=True, **kw)


def baseline_bf16(args, files, rep, **kw) -> dict:
    return baseline(args, files, rep, mixed_precision="bf16", **kw)


def ours_fp32(args, files, rep, **kw) -> dict:
    return ours(args, files, rep, mixed_precision="no", **kw)


# torch.compile through Accelerate's own switch (what `accelerate launch --dynamo_backend inductor`
# sets); dynamic shapes, because every length-grouped batch has its own padded length.
COMPILE_ENV = {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR", "ACCELERATE_DYNAMO_USE_DYNAMIC": "true"}


def ours(args, files, rep, processes: int = 1, compiled: bool = False, steps: int | None = None, seed: int = 42,
         mixed_precision: str = "auto", model: Path = MINILM) -> dict:
    """One run of training/finetune.py at its defaults (`--mixed_precision auto`), or the precision given."""
    out = WORK / "training" / f"ours-{model.name}-{processes}p{'-compiled' if compiled else ''}-{mixed_precision}-{rep}"
    flags = {**common_flags(args, *files, 32 // processes, steps, seed, model), "task": "text-classification",
             "text_column": "text", "label_column": "label", "output_dir": out, "overwrite_output_dir": "true",
             "checkpointing_steps": "none", "mixed_precision": mixed_precision}
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
    log = out.with_name(out.name + ".log").read_text()
    precision = log.split("mixed precision ", 1)[1].split()[0] if "mixed precision " in log else None
    return {"train_runtime_s": results["train_runtime_s"], "train_samples_per_second": results["train_samples_per_second"],
            "mixed_precision": precision,
            "train_tokens_per_second": results.get("train_tokens_per_second"), "steps": results["train_steps"],
            "eval_accuracy": results["eval_accuracy"], "eval_examples": results["eval_examples"],
            "num_processes": processes, "peak_rss_mb": peak, "seed": seed, "output_dir": str(out)}


SMOLLM2 = ASSETS / "models" / "smollm2-135m-instruct"
# model -> (path, batch, full fine-tuning learning rate, LoRA learning rate)
LORA_MODELS = {"minilm": (MINILM, 32, 1e-4, 5e-4), "smollm2": (SMOLLM2, 16, 3e-5, 5e-4)}


def lora_vs_full(args, files, model: str, peft: bool, steps: int, tag: str = "", **extra) -> dict:
    """One run of ours on `model`, fine-tuning every weight or LoRA; the numbers of the comparison."""
    path, batch, full_lr, lora_lr = LORA_MODELS[model]
    out = WORK / "training" / f"{model}-{'lora' if peft else 'full'}-{steps}{tag}"
    flags = {**common_flags(args, *files, batch), "max_length": 64, "max_train_steps": steps,
             "num_warmup_steps": 0 if args.quick else 5, **extra,
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


def eval_subset(path: Path, n: int) -> Path:
    """n rows of a held-out csv taken evenly over the file (both labels: the file is sorted by label)."""
    import csv

    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if n >= len(rows):
        return path
    rows = [rows[int(i * len(rows) / n)] for i in range(n)]
    out = WORK / "training" / "data" / f"{path.stem}-{n}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return out


KEYS = ("train_samples_per_second", "train_tokens_per_second", "eval_accuracy", "peak_rss_mb", "train_runtime_s")
ARMS = {  # key -> (function, label in the tables)
    "baseline": (baseline, "baseline: `run_glue_no_trainer.py` default (`padding=False` + `DataCollatorWithPadding`, random batches)"),
    "baseline_pad_to_max": (baseline_pad_to_max, "baseline: `run_glue_no_trainer.py --pad_to_max_length` (every example padded to max length)"),
    "ours": (ours, "ours: `training/finetune.py`, 1 process, its defaults (length-grouped batches, fused AdamW, "
                   "`--mixed_precision auto`: bf16 autocast on a CPU with AMX / AVX-512 BF16)"),
    "ours_fp32": (ours_fp32, "ours, `--mixed_precision no` (float32)"),
    "baseline_bf16": (baseline_bf16, "baseline under `accelerate launch --mixed_precision bf16`"),
}
# arms that run in the first --precision-repeats repeats only (the main comparison is ours vs baseline)
PRECISION_ARMS = ("ours_fp32", "baseline_bf16")
EXTRA_LABELS = {"ours_ddp": "ours: 2-process DDP (gloo, 2 x 16)",
                "ours_compiled": "ours + `torch.compile` (inductor, dynamic shapes; compilation included)"}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]
    labels = {"baseline": "run_glue\ndefault", "baseline_pad_to_max": "run_glue\n--pad_to_max", "ours": "ours",
              "ours_fp32": "ours\nfloat32", "baseline_bf16": "run_glue\nbf16",
              "ours_ddp": "ours,\n2-proc DDP", "ours_compiled": "ours +\ncompile"}
    colors = {"baseline": "grey", "baseline_pad_to_max": "silver", "ours": "C0", "ours_fp32": "C9", "baseline_bf16": "dimgrey", "ours_ddp": "C2", "ours_compiled": "C3"}
    keys = [k for k in labels if k in s]
    run = results.get("accuracy_run")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    ax = axes[0]
    bars = ax.bar([labels[k] for k in keys], [s[k]["train_samples_per_second"] for k in keys], color=[colors[k] for k in keys])
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_title(f"examples/s ({results['steps']} steps, median of {results['repeats']})", fontsize=10)
    ax = axes[1]
    if run:
        names = [k for k in ARMS if k in run]
        bars = ax.bar([labels[k] for k in names], [100 * run[k]["mean_eval_accuracy"] for k in names],
                      yerr=[100 * (max(run[k]["accuracies"]) - min(run[k]["accuracies"])) / 2 for k in names],
                      color=[colors[k] for k in names], capsize=4)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_ylim(50, 100)
        ax.set_title(f"held-out accuracy (%) after {run['steps']} steps, mean of {len(run['seeds'])} seeds", fontsize=10)
    ax = axes[2]
    bars = ax.bar([labels[k] for k in keys], [s[k]["peak_rss_mb"] for k in keys], color=[colors[k] for k in keys])
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_title("peak RSS (MB)", fontsize=10)
    fig.suptitle(f"MiniLM on Rotten Tomatoes, batch 32, max length {results['max_length']}, {results['hardware']['cpu']} "
                 f"({results['hardware']['cores']} cores, shared)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def accuracy_over_seeds(runs: dict) -> dict:
    """Accuracy of the baseline and ours over the seeds of the repeats (each repeat is one seed):
    equal accuracy is judged on the means, not on one run."""
    out: dict = {"steps": runs["ours"][0]["steps"], "seeds": [r["seed"] for r in runs["ours"]]}
    for kind in [k for k in ARMS if runs.get(k)]:
        accs = [r["eval_accuracy"] for r in runs[kind]]
        out[kind] = {"accuracies": accs, "mean_eval_accuracy": mean(accs), "eval_accuracy": mean(accs),
                     "train_samples_per_second": median([r["train_samples_per_second"] for r in runs[kind]])}
    out["accuracy_difference_pt"] = 100 * (out["ours"]["mean_eval_accuracy"] - out["baseline"]["mean_eval_accuracy"])
    if "baseline_pad_to_max" in out:
        out["accuracy_difference_vs_pad_to_max_pt"] = 100 * (out["ours"]["mean_eval_accuracy"]
                                                             - out["baseline_pad_to_max"]["mean_eval_accuracy"])
    out["speedup_examples_per_s"] = out["ours"]["train_samples_per_second"] / out["baseline"]["train_samples_per_second"]
    out["equal_accuracy"] = abs(out["accuracy_difference_pt"]) <= 0.5
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps of every run (267 = one epoch of RT)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each arm, alternating; repeat k uses seed k")
    parser.add_argument("--max-length", type=int, default=64, help="truncation, every arm (the demo recipe's 64)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every arm (default: torch's)")
    parser.add_argument("--pad-repeats", type=int, default=None,
                        help="runs of the --pad_to_max_length arm, in the first repeats (default: --repeats)")
    parser.add_argument("--precision-repeats", type=int, default=1,
                        help="runs of ours in float32 and of the baseline under bf16, in the first repeats")
    parser.add_argument("--eval-examples", type=int, default=None,
                        help="evaluate on this many held-out sentences, spread over the file (default: all 2,121)")
    parser.add_argument("--ddp-repeats", type=int, default=1, help="2-process runs (0 skips the scaling part)")
    parser.add_argument("--compile-repeats", type=int, default=1,
                        help="runs of ours with torch.compile (inductor, dynamic shapes); 0 skips")
    parser.add_argument("--lora-steps", type=int, default=267,
                        help="LoRA vs full fine-tuning of MiniLM, this many steps of batch 32 (0 skips)")
    parser.add_argument("--lora-smollm2-steps", type=int, default=125,
                        help="LoRA vs full fine-tuning of SmolLM2 as a classifier, steps of batch 16 (0 skips)")
    parser.add_argument("--lora-speed-repeats", type=int, default=3,
                        help="short runs of each (alternating) for the examples/s and peak RSS of the LoRA comparison")
    parser.add_argument("--lora-only", action="store_true", help="run only the LoRA vs full fine-tuning part")
    parser.add_argument("--from-runs", type=Path, default=None,
                        help="rebuild the results from an interrupted run's runs-so-far.json (in BENCH_WORK_DIR/training)")
    args = parser.parse_args(argv)
    if args.from_runs:
        return from_runs(args.from_runs, args)
    if args.quick:
        args.steps, args.repeats, args.ddp_repeats, args.compile_repeats, args.precision_repeats = 2, 1, 0, 0, 0
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

    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every arm's process
    hw = hardware()
    print_hardware(hw)
    if args.eval_examples:
        files = (files[0], eval_subset(files[1], args.eval_examples))
    pad_repeats = args.repeats if args.pad_repeats is None else args.pad_repeats
    results: dict = {"hardware": hw, "quick": args.quick, "steps": args.steps, "batch_size": 32, "repeats": args.repeats,
                     "pad_repeats": pad_repeats, "max_length": args.max_length,
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                     "runs": {**{k: [] for k in ARMS}, "ours_ddp": [], "ours_compiled": []}}
    started = time.perf_counter()
    for rep in range(args.repeats):
        for kind, (fn, _) in ARMS.items():
            if kind == "baseline_pad_to_max" and rep >= pad_repeats:
                continue
            if kind in PRECISION_ARMS and rep >= args.precision_repeats:
                continue
            r = fn(args, files, rep, seed=rep + 1)
            results["runs"][kind].append(r)
            # every finished run is kept at once (a long benchmark interrupted late keeps its runs)
            (WORK / "training" / "runs-so-far.json").write_text(json.dumps(results, indent=1, default=str))
            print(f"  rep {rep + 1} {kind:20}: {r['train_samples_per_second']:.1f} ex/s, {r['train_tokens_per_second']:.0f} tok/s, "
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
    if args.lora_steps or args.lora_smollm2_steps:
        results["lora_vs_full"] = run_lora_comparison(args, files)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    return finish(results, args)


def finish(results: dict, args) -> int:
    """Summary, JSON, tables and plot from `results["runs"]` (also for --from-runs)."""
    results["accuracy_run"] = accuracy_over_seeds(results["runs"])
    summary = {k: {key: median([r[key] for r in runs]) for key in KEYS} for k, runs in results["runs"].items() if runs}
    b = summary["baseline"]
    summary["speedup_examples_per_s"] = summary["ours"]["train_samples_per_second"] / b["train_samples_per_second"]
    if "baseline_pad_to_max" in summary:
        summary["speedup_vs_pad_to_max"] = (summary["ours"]["train_samples_per_second"]
                                            / summary["baseline_pad_to_max"]["train_samples_per_second"])
    summary["accuracy_difference_pt"] = 100 * (summary["ours"]["eval_accuracy"] - b["eval_accuracy"])
    summary["speed_ratio_runs"] = [o["train_samples_per_second"] / x["train_samples_per_second"]
                                   for o, x in zip(results["runs"]["ours"], results["runs"]["baseline"], strict=False)]
    if "ours_compiled" in summary:
        summary["compile_speedup"] = summary["ours_compiled"]["train_samples_per_second"] / summary["ours"]["train_samples_per_second"]
    if "ours_ddp" in summary:
        summary["ddp_scaling"] = summary["ours_ddp"]["train_samples_per_second"] / summary["ours"]["train_samples_per_second"]
    results["summary"] = summary
    results.setdefault("load_average_at_end", [round(x, 2) for x in os.getloadavg()])
    path = write_results("training", results, args.quick)

    rows = []
    for key, label in [(k, v[1]) for k, v in ARMS.items()] + list(EXTRA_LABELS.items()):
        if key in summary:
            s = summary[key]
            rows.append([label, s["train_samples_per_second"], f"{s['train_samples_per_second'] / b['train_samples_per_second']:.2f}x",
                         s["train_tokens_per_second"], 100 * s["eval_accuracy"], s["peak_rss_mb"]])
    print(f"\nMiniLM on Rotten Tomatoes train, {results['steps']} steps x batch 32 (max {results['max_length']} tokens) -> accuracy on "
          f"{results['runs']['baseline'][0]['eval_examples']} held-out; median of {results['repeats']} (seeds 1-{results['repeats']}), "
          f"arms alternating; accuracy column: median")
    print(table(["run", "examples/s", "vs baseline", "real tokens/s", "accuracy (%)", "peak RSS (MB)"], rows))
    if "accuracy_run" in results:
        run = results["accuracy_run"]
        print(f"\nAccuracy after {run['steps']} steps, seeds {run['seeds']}, held-out sentences as above:")
        print(table(["run", "examples/s (median)", "vs baseline", "accuracy per seed (%)", "mean (%)"], [
            [kind, run[kind]["train_samples_per_second"],
             f"{run[kind]['train_samples_per_second'] / run['baseline']['train_samples_per_second']:.2f}x",
             " / ".join(f"{100 * a:.1f}" for a in run[kind]["accuracies"]), 100 * run[kind]["mean_eval_accuracy"]]
            for kind in ARMS if kind in run]))
        print(f"accuracy difference of the means (ours - baseline): {run['accuracy_difference_pt']:+.2f} pt (equal: within 0.5)")
    if results.get("lora_vs_full"):
        print_lora_table(results["lora_vs_full"])
    png = plot_path("training", args.quick)
    plot(results, png)
    print(f"\nwrote {shown(path)} and {shown(png)} ({results.get('wall_s', 0):.0f} s)")
    return 0


def from_runs(path: Path, args) -> int:
    """Rebuild the results from the runs an interrupted benchmark kept (runs-so-far.json): only complete
    repeats (every arm's run of it) count, so each arm has the same seeds."""
    results = json.loads(path.read_text())
    runs = results["runs"]
    complete = min(len(runs["baseline"]), len(runs["ours"]))
    runs["baseline"], runs["ours"] = runs["baseline"][:complete], runs["ours"][:complete]
    results["repeats"] = complete
    results["pad_repeats"] = len(runs["baseline_pad_to_max"])
    results["interrupted"] = f"rebuilt from {path.name}: {complete} complete repeat(s) of the {args.repeats} asked for"
    return finish(results, args)


if __name__ == "__main__":
    sys.exit(main())
