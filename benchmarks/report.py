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
    load = hw.get("load_average_at_start")
    end = data.get("load_average_at_end")
    load_text = (f"load average (1/5/15 min) {' / '.join(f'{x:g}' for x in load)} at the start"
                 + (f", {' / '.join(f'{x:g}' for x in end)} at the end" if end else "") + "; ") if load else ""
    return (f"_{hw['cpu']}, {hw['cores']} cores, {hw['memory_gb']} GB, {hw['gpu'] or 'no GPU'}, torch {hw['torch']}; "
            f"{hw['date']}; {load_text}" + (f"median of {data['repeats']}._" if "repeats" in data else "one run each._"))


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
        has_tutorial = all("tutorial" in row for row in s["levels"].values())
        has_naive = all("naive" in row for row in s["levels"].values())  # optional since 2026-12-02
        for c, row in s["levels"].items():
            o = row["ours"]
            tut, nai = [], []
            if has_tutorial:
                t = row["tutorial"]
                tut = [f"{t['throughput_rps']:.1f}", "**" + " / ".join(f"{x:.2f}" for x in row["paired"]["ours_vs_tutorial_runs"])
                       + f"** ({row['paired']['ours_vs_tutorial']:.2f}x)",
                       f"{t['p50_ms']:.0f} / {t['p95_ms']:.0f} / {t['p99_ms']:.0f}"]
            if has_naive:
                n = row["naive"]
                nai = [f"{n['throughput_rps']:.1f}", f"{row['paired']['ours_vs_naive']:.2f}x",
                       f"{n['p50_ms']:.0f} / {n['p95_ms']:.0f} / {n['p99_ms']:.0f}"]
            rows.append([c, f"{o['throughput_rps']:.1f}", *tut[:2], *nai[:2], f"{row['paired']['ours_vs_raw_batched']:.0%}",
                         f"{o['p50_ms']:.0f} / {o['p95_ms']:.0f} / {o['p99_ms']:.0f}", *tut[2:], *nai[2:],
                         o["errors"], f"{o['peak_rss_mb']:.0f}", f"{o['client_cpu_pct']:.0f} %"])
        tut_heads = (["tutorial req/s", "ours / tutorial (each repetition; median)"], ["tutorial p50/p95/p99 ms"]) \
            if has_tutorial else ([], [])
        nai_heads = ["naive req/s", "ours / naive (paired)", "naive p50/p95/p99 ms"] if has_naive else []
        out.append(table(["clients", "ours req/s", *tut_heads[0], *nai_heads[:2], "ours / raw batched (paired)",
                          "ours p50/p95/p99 ms", *tut_heads[1], *nai_heads[2:], "ours errors", "ours peak RSS MB",
                          "client CPU"], rows))
        arms = [k for k in next(iter(s["levels"].values())) if k not in ("ours", "naive", "tutorial", "paired")]
        if has_tutorial and arms:  # the other configurations of ours (ours-onnx, ours-bf16, before), same repetitions
            rows = [[arm, c, f"{row[arm]['throughput_rps']:.1f}", f"**{row['paired'][f'{arm}_vs_tutorial']:.2f}x**",
                     f"{row[arm]['p50_ms']:.0f} / {row[arm]['p95_ms']:.0f} / {row[arm]['p99_ms']:.0f}",
                     row[arm]["errors"], f"{row[arm]['client_cpu_pct']:.0f} %"]
                    for arm in arms for c, row in s["levels"].items()]
            out.append("")
            out.append(table(["server", "clients", "req/s", "/ tutorial (median of the repetitions' ratios)",
                              "p50/p95/p99 ms", "errors", "client CPU"], rows))
        if "label_check" in m:
            lc = m["label_check"]
            out.append(f"\nLabels: {lc['inputs_compared']} inputs answered by every server ({', '.join(lc['servers'])}); "
                       f"**{len(lc['disagreements'])} disagree**" + "".join(
                           f"\n- {d['input']!r}: {d['labels']}" for d in lc["disagreements"][:5]))
        t = s["targets"]
        met = lambda ok: "met" if ok else "missed"  # noqa: E731
        if "c1_vs_tutorial" in t and "c32_vs_tutorial" in t:
            out.append(f"\nAgainst the tutorial server: 32 clients **{t['c32_vs_tutorial']:.2f}x** (>= 3x: "
                       f"{met(t['c32_vs_tutorial_met'])}); 1 client **{t['c1_vs_tutorial']:.2f}x** its throughput (>= 1.0x, "
                       f"3 % counts as equal: {met(t['c1_vs_tutorial_met'])}), p50 {t['c1_p50_over_tutorial_p50']:.2f}x its p50.")
        like = t.get("c1_p50_minus_optimised_single_ms")
        c1 = (f"1 client p50 - the same batch-norm-folded, channels-last forward the server runs **{like:+.1f} ms** "
              f"(<= 5 ms: {met(t['c1_p50_met'])}; minus the stock model's forward: {t['c1_p50_minus_raw_single_ms']:+.1f} ms)"
              if like is not None else
              f"1 client p50 - raw single forward **{t['c1_p50_minus_raw_single_ms']:+.1f} ms** (<= 5 ms: {met(t['c1_p50_met'])})")
        naive = (f"ours/naive **{t['c32_vs_naive']:.2f}x** (>= 3x: {met(t['c32_vs_naive_met'])}), "
                 if "c32_vs_naive" in t else "")
        out.append(f"\nTargets: 32 clients {naive}ours/raw **{t['c32_vs_raw_batched']:.0%}** "
                   f"(>= 85 %: {met(t['c32_vs_raw_met'])}); {c1}.\n")
    return "\n".join(out)


def training(data: dict) -> str:
    s = data["summary"]
    b = s["baseline"]
    rows = []
    from benchmarks.training import ARMS, EXTRA_LABELS

    for key, label in [(k, v[1]) for k, v in ARMS.items()] + list(EXTRA_LABELS.items()):
        if key in s:
            r = s[key]
            rows.append([label, f"{r['train_samples_per_second']:.1f}", f"{r['train_samples_per_second'] / b['train_samples_per_second']:.2f}x",
                         f"{r['train_tokens_per_second']:.0f}", f"{100 * r['eval_accuracy']:.1f}", f"{r['peak_rss_mb']:.0f}"])
    threads = f", OMP_NUM_THREADS={data['omp_num_threads']} for every arm" if data.get("omp_num_threads") else ""
    out = [hw_line(data), "", f"{data['steps']} steps x batch 32, max length {data.get('max_length', 128)}{threads}; "
           f"median of {data['repeats']} runs per arm (arms alternating, repeat k with seed k); the accuracy column is "
           "the median too, the means are below:", "",
           table(["run", "examples/s", "vs baseline", "real tokens/s", "accuracy (%)", "peak RSS (MB)"], rows)]
    if "accuracy_run" in data:
        run = data["accuracy_run"]
        seeds = run.get("seeds")
        rows = []
        for key, label in [(k, v[1]) for k, v in ARMS.items()]:
            if key not in run:
                continue
            r = run[key]
            accs = r.get("accuracies", [r["eval_accuracy"]])
            rows.append([label, f"{r['train_samples_per_second']:.1f}",
                         f"{r['train_samples_per_second'] / run['baseline']['train_samples_per_second']:.2f}x",
                         " / ".join(f"{100 * a:.1f}" for a in accs), f"{100 * r['eval_accuracy']:.2f}"])
        out += ["", f"Accuracy: {run['steps']} steps, " + (f"seeds {seeds}" if seeds else "one run each")
                + f", {data['runs']['baseline'][0]['eval_examples']} held-out sentences:", "",
                table(["run", "examples/s (median)", "vs baseline", "accuracy per seed (%)", "mean (%)"], rows),
                "", f"Difference of the means: {run['accuracy_difference_pt']:+.2f} pt (equal: within 0.5)."]
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
