"""Markdown tables of the latest results (benchmarks/results/*.json), for docs/performance.md.

    python benchmarks/report.py [serving|training|quality ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, table  # noqa: E402


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def hw_line(data: dict) -> str:
    hw = data["hardware"]
    return (f"_{hw['cpu']}, {hw['cores']} cores, {hw['memory_gb']} GB, {hw['gpu'] or 'no GPU'}, torch {hw['torch']}; "
            f"{hw['date']}; " + (f"median of {data['repeats']}._" if "repeats" in data else "one run each._"))


def serving(data: dict) -> str:
    out = [hw_line(data), ""]
    for name, m in data["models"].items():
        s, raw = m["summary"], m["summary"]["raw"]
        if m["task"] == "text-generation":
            out.append(f"**{name}** (text-generation, 32-token prompts, 32 new tokens, greedy)\n")
            rows = [["sequential `model.generate` (raw)", raw["generate_tokens_per_s"], "1.00x", "-", "-"]]
            for c, row in s["levels"].items():
                o = row["ours"]
                rows.append([f"ours, {c} client(s)", o["tokens_per_s"], f"{o['tokens_per_s'] / raw['generate_tokens_per_s']:.2f}x",
                             f"{o['p50_ms']:.0f} / {o['p99_ms']:.0f}", o["errors"]])
            out.append(table(["", "tokens/s", "vs raw", "request p50 / p99 (ms)", "errors"], rows))
            out.append(f"\nTime to first streamed token: {s['ttft_ms']:.1f} ms; one forward pass over the 32-token "
                       f"prompt: {raw['prompt_forward_ms']:.1f} ms.\n")
            continue
        raws = m["raw"]
        out.append(f"**{name}** ({m['task']}): raw batched forward (32) {raw['batched_inputs_per_s']:.1f} inputs/s, "
                   f"raw single forward {raw['single_forward_ms']:.1f} ms (medians of {len(raws)} samples; best "
                   f"{max(r['batched_inputs_per_s'] for r in raws):.1f} inputs/s, {min(r['single_forward_ms'] for r in raws):.1f} ms)\n")
        rows = []
        for c, row in s["levels"].items():
            o, n = row["ours"], row["naive"]
            rows.append([c, f"{o['throughput_rps']:.1f}", f"{n['throughput_rps']:.1f}",
                         f"{row['paired']['ours_vs_naive']:.2f}x", f"{row['paired']['ours_vs_raw_batched']:.0%}",
                         f"{o['p50_ms']:.0f} / {o['p95_ms']:.0f} / {o['p99_ms']:.0f}",
                         f"{n['p50_ms']:.0f} / {n['p95_ms']:.0f} / {n['p99_ms']:.0f}",
                         f"{o['errors']} / {n['errors']}", f"{o['peak_rss_mb']:.0f} / {n['peak_rss_mb']:.0f}",
                         f"{o['client_cpu_pct']:.0f} %"])
        out.append(table(["clients", "ours req/s", "naive req/s", "ours / naive (paired)", "ours / raw batched (paired)",
                          "ours p50/p95/p99 ms", "naive p50/p95/p99 ms", "errors (ours/naive)",
                          "peak RSS MB (ours/naive)", "client CPU"], rows))
        t = s["targets"]
        met = lambda ok: "met" if ok else "missed"  # noqa: E731
        out.append(f"\nTargets: 32 clients ours/naive **{t['c32_vs_naive']:.2f}x** (>= 3x: {met(t['c32_vs_naive_met'])}), "
                   f"ours/raw **{t['c32_vs_raw_batched']:.0%}** (>= 85 %: {met(t['c32_vs_raw_met'])}); 1 client p50 - raw single "
                   f"forward **{t['c1_p50_minus_raw_single_ms']:+.1f} ms** (<= 5 ms: {met(t['c1_p50_met'])}).\n")
        if "c1_p50_minus_optimised_single_ms" in t:
            out.append(f"1 client p50 minus the same batch-norm-folded, channels-last forward the server runs: "
                       f"**{t['c1_p50_minus_optimised_single_ms']:+.1f} ms** (the server's own overhead).\n")
    return "\n".join(out)


def training(data: dict) -> str:
    s = data["summary"]
    b = s["baseline"]
    rows = []
    for key, label in (("baseline", "baseline: `run_glue_no_trainer`-style loop (pad to 128, random batches)"),
                       ("ours", "ours: `training/finetune.py`, 1 process"),
                       ("ours_ddp", "ours: 2-process DDP (gloo, 2 x 16)"),
                       ("ours_compiled", "ours + `torch.compile` (inductor, dynamic shapes; compilation included)")):
        if key in s:
            r = s[key]
            rows.append([label, f"{r['train_samples_per_second']:.1f}", f"{r['train_samples_per_second'] / b['train_samples_per_second']:.2f}x",
                         f"{r['train_tokens_per_second']:.0f}", f"{100 * r['eval_accuracy']:.1f}", f"{r['peak_rss_mb']:.0f}"])
    out = [hw_line(data), "", f"{data['steps']} steps x batch 32, median of {data['repeats']}:", "",
           table(["run", "examples/s", "vs baseline", "real tokens/s", "accuracy (%)", "peak RSS (MB)"], rows)]
    if "accuracy_run" in data:
        run = data["accuracy_run"]
        out += ["", f"One epoch ({run['steps']} steps), one run each:", "", table(["run", "examples/s", "vs baseline", "accuracy (%)"], [
            [label, f"{run[key]['train_samples_per_second']:.1f}",
             f"{run[key]['train_samples_per_second'] / run['baseline']['train_samples_per_second']:.2f}x",
             f"{100 * run[key]['eval_accuracy']:.1f}"] for key, label in (("baseline", "baseline"), ("ours", "ours"))]),
            "", f"Accuracy difference: {run['accuracy_difference_pt']:+.1f} pt (target: within 0.5)."]
    return "\n".join(out)


def quality(data: dict) -> str:
    out = [hw_line(data), ""]
    if "rotten_tomatoes" in data:
        rt = data["rotten_tomatoes"]
        rows = [["TF-IDF + logistic regression (same run)", f"{100 * rt['tfidf_lr_accuracy']:.1f}", "-"]]
        for r in rt["minilm"].values():
            flags = r["flags"]
            rows.append([f"MiniLM, {flags['num_train_epochs']} epoch(s), lr {flags['learning_rate']}, max_length {flags['max_length']}",
                         f"{100 * r['test_accuracy']:.1f}", f"{r['train_samples_per_second']:.0f}"])
        out += [f"Rotten Tomatoes: {rt['train_examples']} train sentences (10 % held out to pick the best step) -> "
                f"{rt['test_examples']} held-out sentences", "", table(["model", "accuracy (%)", "train ex/s"], rows), ""]
    if "imdb" in data:
        im = data["imdb"]
        out += [f"IMDB: {im['train_examples']} training reviews -> {im['test_examples']} test reviews (seeded samples), "
                f"MiniLM max_length {im['max_length']}", "", table(["model", "accuracy (%)"], [
                    ["TF-IDF + LR on the same subset", f"{100 * im['tfidf_lr_same_subset']:.1f}"],
                    ["TF-IDF + LR on all 25,000", "-" if im["tfidf_lr_full_train"] is None else f"{100 * im['tfidf_lr_full_train']:.1f}"],
                    ["MiniLM fine-tuned on the subset", f"{100 * im['minilm']['test_accuracy']:.1f}"]]), ""]
    if "fashion_mnist" in data:
        fm = data["fashion_mnist"]
        trains = {"backbone": "head only", "partial:4": "head + last 4 blocks", "none": "everything"}
        from benchmarks.quality import transfer_gaps

        out += [f"Fashion-MNIST, MobileNetV2: accuracy on the first {fm['test_examples']} test images", "",
                table(["train images", "epochs", "weights", "trains", "accuracy (%)"],
                      [[r["train_images"], r.get("epochs", "-"), "ImageNet" if r["init"] == "imagenet" else "random init",
                        trains.get(r["freeze"], r["freeze"]), f"{100 * r['test_accuracy']:.1f}"] for r in fm["runs"]])]
        gaps = transfer_gaps(fm["runs"])
        if gaps:
            out += ["", "ImageNet weights minus random init: " + "; ".join(
                f"{n} images, {trains.get(freeze, freeze)}: {gap:+.1f} pt" for n, freeze, gap in gaps) + "."]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    for name in argv or ["serving", "training", "quality"]:
        data = load(name)
        if data is None:
            print(f"(no benchmarks/results/{name}.json yet)\n")
            continue
        print(f"## {name}\n")
        kind = name.split("-")[0]  # serving-images.json is a serving run of a subset of the models
        print({"serving": serving, "training": training, "quality": quality}[kind](data))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
