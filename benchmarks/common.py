"""Shared helpers of the benchmarks: hardware line, statistics, result files, plots, model folders.

Every benchmark prints ratios against a baseline measured in the same run on the same machine,
repeats each measurement and keeps the median, and writes `benchmarks/results/<name>.json` and
`<name>.png`.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("BENCH_RESULTS_DIR", REPO / "benchmarks" / "results"))
ASSETS = REPO / "assets"
MINILM = ASSETS / "models" / "all-MiniLM-L6-v2"
MOBILENET = ASSETS / "models" / "mobilenet_v2-imagenet"
GPT2_TOKENIZER = ASSETS / "models" / "gpt2-tokenizer"
RT_DIR = ASSETS / "data" / "rotten_tomatoes"
IMDB_DIR = ASSETS / "data" / "imdb"
FASHION_DIR = ASSETS / "data" / "fashion_mnist"
DEMO_SENTIMENT = REPO / "models" / "demo-sentiment"
DEMO_IMAGES = REPO / "models" / "demo-images"
WORK = Path(os.environ.get("BENCH_WORK_DIR", "/tmp/hf-serve-bench"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def hardware() -> dict:
    """What the numbers were measured on (printed and stored with every result)."""
    import psutil
    import torch

    # the repo root is on sys.path (every script puts it there before importing benchmarks.common)
    from training.precision import cpu_has_fast_bf16

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        # the vector ISA torch dispatches to, and whether bf16 matrix products run natively (AMX or
        # AVX-512 BF16): the bfloat16 rows are only faster where this is true
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_fast_bf16(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def print_hardware(hw: dict) -> None:
    gpu = hw["gpu"] or "no GPU"
    bf16 = " + native bf16" if hw["cpu_native_bf16"] else ""
    print(f"# hardware: {hw['cpu']}, {hw['cpu_capability']}{bf16}, {hw['cores']} cores, {hw['memory_gb']} GB, {gpu}; torch {hw['torch']} "
          f"({hw['torch_threads']} threads); load average at start {hw['load_average_at_start']}", flush=True)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-markdown table (also readable on a terminal)."""
    cells = [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(out)


def write_results(name: str, data: dict, quick: bool = False) -> Path:
    """benchmarks/results/<name>.json (quick runs: <name>.quick.json, never shown in the README;
    BENCH_RESULTS_DIR overrides the folder)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{'.quick' if quick else ''}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)
    return path


def shown(path: Path) -> str:
    """A path for messages: relative to the repository when inside it."""
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def plot_path(name: str, quick: bool = False) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}{'.quick' if quick else ''}.png"


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MB, from /proc (VmRSS, VmHWM)."""
    cur = peak = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    return cur, peak


def run_logged(cmd: list[str], log: Path, env: dict | None = None, nice: int = 0) -> subprocess.CompletedProcess:
    """Run a command with its output in `log`; raise with the log's tail when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env, cwd=REPO,
                              preexec_fn=(lambda: os.nice(nice)) if nice else None)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); log {log}:\n{tail}")
    return proc


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(models_dir: Path, flags: list[str], log_path: Path, timeout_s: float = 180) -> tuple[subprocess.Popen, str]:
    """`python -m service` on a free loopback port with these extra flags, output into `log_path`;
    returns once `/ready` answers 200 (exits with the log's tail if the server dies or never gets ready)."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "service", "--models-dir", str(models_dir), "--port", str(port), *flags]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready")


def python() -> str:
    return sys.executable


# -- model folders of the real sizes (random weights cost exactly what trained ones do) -------------

def _card(folder: Path, tag: str) -> None:
    (folder / "README.md").write_text(f"---\npipeline_tag: {tag}\nlibrary_name: transformers\n---\n# benchmark model\n")


def save_folder(folder: Path, tag: str, *parts) -> Path:
    """Each of `parts` (a model, its tokenizer or processor) `save_pretrained` into `folder`, with a model
    card for pipeline tag `tag`; written beside it and renamed into place, so a half-written folder is
    never taken for a built one."""
    tmp = folder.with_name(folder.name + ".tmp")
    for part in parts:
        part.save_pretrained(tmp)
    _card(tmp, tag)
    tmp.rename(folder)
    return folder


def build_text_model(folder: Path, size: str = "bert-base") -> Path:
    """A BertForSequenceClassification of bert-base size (random weights) with the MiniLM tokenizer;
    `tiny` is hidden 32 (for --quick)."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    kwargs = {} if size == "bert-base" else dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                  intermediate_size=64)
    config = BertConfig(vocab_size=tokenizer.vocab_size, num_labels=2, id2label={0: "negative", 1: "positive"},
                        label2id={"negative": 0, "positive": 1}, **kwargs)
    return save_folder(folder, "text-classification", BertForSequenceClassification(config).eval(), tokenizer)


def mpnet_classifier(folder: Path) -> Path:
    """A fine-tuned all-mpnet-base-v2 sentiment classifier: `make mpnet-sentiment`'s, or the first seed of
    `benchmarks/quality.py --only mpnet`; failing both, the packaged encoder with a fresh 2-label head
    (seeded), which costs exactly what a trained one does (its labels mean nothing)."""
    for trained in (REPO / "models" / "mpnet-sentiment", WORK / "quality" / "runs" / "rt-mpnet-seed1"):
        if (trained / "model.safetensors").is_file():
            return trained
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = ASSETS / "models" / "all-mpnet-base-v2"
    if not (source / "config.json").is_file():
        raise SystemExit(f"{source} is missing: run `make assets-mpnet`")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    return save_folder(folder, "text-classification", model.eval(), AutoTokenizer.from_pretrained(source))


def build_resnet50(folder: Path, size: str = "resnet-50") -> Path:
    """ResNetConfig() (ResNet-50, random weights, 10 classes) with the ImageNet processor of the MobileNetV2
    folder (resize 256, center-crop 224, normalise): the same preprocessing cost as microsoft/resnet-50's."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoImageProcessor, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    labels = {i: f"class_{i}" for i in range(10)}
    kwargs = {} if size == "resnet-50" else dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                  layer_type="basic")
    config = ResNetConfig(num_labels=10, id2label=labels, label2id={v: k for k, v in labels.items()}, **kwargs)
    return save_folder(folder, "image-classification", ResNetForImageClassification(config).eval(),
                       AutoImageProcessor.from_pretrained(MOBILENET))


def build_gpt2(folder: Path, size: str = "gpt2") -> Path:
    """GPT2Config() (124 M, random weights) with the real GPT-2 tokenizer; `tiny` for --quick."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    kwargs = {} if size == "gpt2" else dict(n_embd=32, n_layer=2, n_head=2)
    config = GPT2Config(**kwargs)
    model = GPT2LMHeadModel(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)
    return save_folder(folder, "text-generation", model, tokenizer)


def rt_sentences(split: str = "test", n: int | None = None) -> list[str]:
    import csv

    with (RT_DIR / f"{split}.csv").open(newline="", encoding="utf-8") as fh:
        rows = [r["text"] for r in csv.DictReader(fh)]
    return rows[:n] if n else rows


def fashion_calibration(folder: Path, n: int = 320) -> Path:
    """`folder` filled with n Fashion-MNIST *training* images (PNG, spread over the set; the test images
    are what the benchmarks send and score): the calibration images of HF_SERVE_CALIBRATION_DIR."""
    if len(list(folder.glob("*.png"))) >= n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, png in enumerate(fashion_png(n, split="train", spread=True)):
        (folder / f"{i:04d}.png").write_bytes(png)
    return folder


def fashion_png(n: int, split: str = "test", spread: bool = False) -> list[bytes]:
    """n Fashion-MNIST images of `split` as PNG bytes (28x28 grayscale, as stored): the first n, or with
    `spread` n spread evenly over the split."""
    import pyarrow.parquet as pq

    table = pq.read_table(FASHION_DIR / f"{split}.parquet", columns=["image"])
    rows = table.column("image").to_pylist()[::table.num_rows // n] if spread else table.slice(0, n).column("image").to_pylist()
    return [row["bytes"] for row in rows[:n]]
