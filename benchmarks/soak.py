"""Load and soak test: many concurrent clients, all three tasks and some bad requests, for minutes.

    python benchmarks/soak.py --duration 180 --clients 32            # starts its own server
    python benchmarks/soak.py --duration 600 --url http://host:8000 --pid 1234

What it checks (exit code 1 when one fails):
- zero unexpected outcomes: every good request is a 200 (or a 429 when the server is full), every bad
  one exactly its 4xx; no 5xx, no timeout, no dropped connection, no malformed 200 body;
- the queue stays bounded: over `max_concurrent_requests` the server answers 429 at once (so the
  in-flight gauge never exceeds the limit and nothing waits until it times out);
- memory: the server's RSS grows less than --max-rss-growth % between the end of the warm-up
  (minute 1, or a third of shorter runs) and the end.

Models: --models-dir if given; else the demo models (models/demo-sentiment, models/demo-images) when
present, plus a tiny GPT-2 for generation; else tiny models of all three tasks (tests/tiny_models.py).
Clients run in this process (asyncio + httpx); on 2 cores they compete with the server for CPU, so
throughput is a floor, not the server's ceiling. Results go to --json (default
benchmarks/results/soak.json).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SENTENCES = [
    "A gorgeous, witty, seductive movie.", "Dull and lifeless from start to finish.",
    "The plot is thin but the acting carries it.", "I would not watch this again.",
    "An instant classic with a moving score.", "Too long, too loud, too little to say.",
]

# kind: (weight, expected status of a non-429 answer)
KINDS = {
    "classify": (25, 200), "classify_batch": (10, 200), "generate": (14, 200), "generate_stream": (6, 200),
    "image_raw": (14, 200), "image_base64": (6, 200),
    "bad_json": (5, 422), "bad_model": (3, 404), "bad_image": (4, 415), "bad_max_new_tokens": (4, 422),
    "over_batch_cap": (2, 422), "bad_url_input": (2, 422),
}


# -- models and server -----------------------------------------------------------------------------

def prepare_models(args) -> tuple[Path, dict]:
    """A models dir with one text-classification, one text-generation and one image model."""
    if args.models_dir:
        return Path(args.models_dir), {"classify": args.text_model, "generate": args.gen_model, "image": args.image_model}
    sys.path.insert(0, str(REPO))
    from tests.tiny_models import build_tiny_bert, build_tiny_gpt2, build_tiny_mobilenet_v2

    root = Path(tempfile.mkdtemp(prefix="soak-models-"))
    demo_text, demo_images = REPO / "models" / "demo-sentiment", REPO / "models" / "demo-images"
    if not args.tiny and (demo_text / "model.safetensors").is_file() and (demo_images / "model.safetensors").is_file():
        (root / "sentiment").symlink_to(demo_text)
        (root / "images").symlink_to(demo_images)
        source = "demo models (models/demo-sentiment, models/demo-images) + tiny GPT-2"
    else:
        build_tiny_bert(root / "sentiment", labels=["negative", "positive"])
        build_tiny_mobilenet_v2(root / "images", labels=["cat", "dog", "bird"])
        source = "tiny models (tests/tiny_models.py)"
    build_tiny_gpt2(root / "writer")
    (root / "writer" / "README.md").write_text("---\npipeline_tag: text-generation\n---\n")
    print(f"models: {source} in {root}", flush=True)
    return root, {"classify": "sentiment", "generate": "writer", "image": "images", "source": source}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(models_dir: Path, args) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="soak-server-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "service", "--models-dir", str(models_dir), "--port", str(port),
           "--max-concurrent-requests", str(args.max_concurrent), "--max-new-tokens", "64",
           "--log-level", "warning", "--reload-interval-s", "5"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url, log_path
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready")


def rss_bytes(pid: int) -> int | None:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


# -- requests --------------------------------------------------------------------------------------

def make_images(rng: random.Random, count: int = 8) -> list[bytes]:
    import numpy as np
    from PIL import Image

    images = []
    for i in range(count):
        size = (rng.randint(48, 320), rng.randint(48, 320))
        pixels = np.random.default_rng(i).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG" if i % 2 else "JPEG")
        images.append(buf.getvalue())
    return images


def build_request(kind: str, rng: random.Random, names: dict, images: list[bytes]) -> dict:
    text = rng.choice(SENTENCES)
    cls, gen, img = names["classify"], names["generate"], names["image"]
    if kind == "classify":
        return {"path": f"/models/{cls}", "json": {"inputs": text}}
    if kind == "classify_batch":
        return {"path": f"/models/{cls}", "json": {"inputs": rng.sample(SENTENCES, 4) + rng.sample(SENTENCES, 4)}}
    if kind == "generate":
        return {"path": f"/models/{gen}", "json": {"inputs": text, "parameters": {"max_new_tokens": rng.randint(4, 24)}}}
    if kind == "generate_stream":
        return {"path": f"/models/{gen}", "stream": True,
                "json": {"inputs": text, "stream": True, "parameters": {"max_new_tokens": rng.randint(4, 24)}}}
    if kind == "image_raw":
        return {"path": f"/models/{img}", "content": rng.choice(images), "headers": {"content-type": "image/png"}}
    if kind == "image_base64":
        return {"path": f"/models/{img}", "json": {"inputs": base64.b64encode(rng.choice(images)).decode(),
                                                   "parameters": {"top_k": 2}}}
    if kind == "bad_json":
        return {"path": f"/models/{cls}", "content": b'{"inputs": "unterminated', "headers": {"content-type": "application/json"}}
    if kind == "bad_model":
        return {"path": "/models/no-such-model", "json": {"inputs": text}}
    if kind == "bad_image":
        return {"path": f"/models/{img}", "content": rng.choice(images)[:200], "headers": {"content-type": "image/png"}}
    if kind == "bad_max_new_tokens":
        return {"path": f"/models/{gen}", "json": {"inputs": text, "parameters": {"max_new_tokens": 100_000}}}
    if kind == "over_batch_cap":
        return {"path": f"/models/{cls}", "json": {"inputs": [text] * 1000}}
    if kind == "bad_url_input":
        return {"path": f"/models/{img}", "json": {"inputs": "http://127.0.0.1:9/cat.png"}}
    raise ValueError(kind)


def check_body(kind: str, payload) -> bool:
    """A 200's body has the task's shape."""
    if kind in ("classify", "classify_batch"):
        return isinstance(payload, list) and all(isinstance(r, list) and r and "label" in r[0] for r in payload)
    if kind.startswith("image"):
        return isinstance(payload, list) and payload and "label" in payload[0]
    if kind == "generate":
        return isinstance(payload, list) and isinstance(payload[0].get("generated_text"), str)
    return True


class Stats:
    def __init__(self):
        self.outcomes: Counter = Counter()  # (kind, outcome)
        self.unexpected: Counter = Counter()  # outcome type
        self.examples: dict[str, str] = {}
        self.latencies: list[float] = []
        self.done = 0
        self.rejected = 0


async def client_loop(index: int, client: httpx.AsyncClient, stop_at: float, names: dict, images, stats: Stats,
                      seed: int) -> None:
    rng = random.Random(seed * 1000 + index)
    kinds, weights = list(KINDS), [w for w, _ in KINDS.values()]
    while time.monotonic() < stop_at:
        kind = rng.choices(kinds, weights)[0]
        request = build_request(kind, rng, names, images)
        expected = KINDS[kind][1]
        started = time.perf_counter()
        outcome = None
        try:
            if request.get("stream"):
                async with client.stream("POST", request["path"], json=request["json"]) as response:
                    status = response.status_code
                    events = [line async for line in response.aiter_lines() if line.startswith("data:")]
                    if status == 200:
                        last = json.loads(events[-1][5:]) if events else {}
                        if not last.get("generated_text") and last.get("generated_text") != "":
                            outcome = "malformed_stream"
                        if "error" in last:
                            outcome = "stream_error"
            else:
                kwargs = {k: request[k] for k in ("json", "content", "headers") if k in request}
                response = await client.post(request["path"], **kwargs)
                status = response.status_code
                if status == 200 and not check_body(kind, response.json()):
                    outcome = "malformed_body"
                elif status != 200 and set(response.json()) != {"error", "error_type"}:
                    outcome = f"malformed_error_{status}"
        except httpx.TimeoutException:
            outcome, status = "timeout", None
        except httpx.HTTPError as exc:
            outcome, status = type(exc).__name__, None
        except (ValueError, KeyError, IndexError) as exc:
            outcome, status = f"bad_payload_{type(exc).__name__}", None
        elapsed = time.perf_counter() - started
        stats.done += 1
        if outcome is None:
            if status == expected or (status == 429 and kind != "bad_model"):
                outcome = str(status)
            else:
                outcome = f"status_{status}"
        stats.outcomes[kind, outcome] += 1
        if outcome == "429":
            stats.rejected += 1
            await asyncio.sleep(rng.uniform(0.05, 0.25))  # a polite client backs off (Retry-After says 1 s)
        elif not outcome.isdigit():
            stats.unexpected[outcome] += 1
            stats.examples.setdefault(outcome, f"{kind} -> {outcome}")
        elif outcome == "200":
            stats.latencies.append(elapsed)


async def warm_up(client: httpx.AsyncClient, names: dict, images: list[bytes], stats: Stats, args) -> None:
    """Bursts of the largest requests from every client at once, so the server reaches its peak
    working set (the biggest batches max_concurrent_requests allows) inside the warm-up: memory that
    grows after it is a leak, not a new high-water mark of the allocator."""
    biggest = max(images, key=len)
    longest = sorted(SENTENCES, key=len)[-4:] * 2
    requests = [{"path": f"/models/{names['image']}", "content": biggest, "headers": {"content-type": "image/png"}},
                {"path": f"/models/{names['classify']}", "json": {"inputs": longest}},
                {"path": f"/models/{names['generate']}", "json": {"inputs": " ".join(longest),
                                                                   "parameters": {"max_new_tokens": 24}}}]

    async def one(i: int) -> None:
        request = requests[i % len(requests)]
        kwargs = {k: request[k] for k in ("json", "content", "headers") if k in request}
        try:
            status = (await client.post(request["path"], **kwargs)).status_code
            outcome = str(status) if status in (200, 429) else f"status_{status}"
        except httpx.HTTPError as exc:
            outcome = type(exc).__name__
        stats.done += 1
        stats.outcomes["warmup", outcome] += 1
        if outcome == "429":
            stats.rejected += 1
        elif not outcome.isdigit():
            stats.unexpected[outcome] += 1
            stats.examples.setdefault(outcome, f"warmup -> {outcome}")

    for burst in range(args.warmup_bursts):
        await asyncio.gather(*(one(burst + i) for i in range(args.clients)))


async def sample_server(url: str, pid: int | None, stop_at: float, samples: list, headers: dict) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10, headers=headers) as client:
        start = time.monotonic()
        while time.monotonic() < stop_at:
            sample = {"t": round(time.monotonic() - start, 1), "rss": rss_bytes(pid) if pid else None}
            try:
                text = (await client.get("/metrics")).text
                sample["in_flight"] = float(re.search(r"^hf_serve_requests_in_flight (\S+)$", text, re.M).group(1))
                sample["queue"] = sum(float(v) for v in re.findall(r'^hf_serve_queue_depth\{[^}]*\} (\S+)$', text, re.M))
                sample["health"] = (await client.get("/health")).status_code
            except (httpx.HTTPError, AttributeError) as exc:
                sample["error"] = type(exc).__name__
            samples.append(sample)
            await asyncio.sleep(1.0)


async def run_load(url: str, pid: int | None, names: dict, args) -> dict:
    stats, samples = Stats(), []
    images = make_images(random.Random(args.seed))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    started = time.monotonic()
    stop_at = started + args.duration
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits, headers=headers) as client:

        async def clients() -> None:
            await warm_up(client, names, images, stats, args)
            await asyncio.gather(*(client_loop(i, client, stop_at, names, images, stats, args.seed)
                                   for i in range(args.clients)))

        await asyncio.gather(sample_server(url, pid, stop_at, samples, headers), clients())
    wall = time.monotonic() - started
    warmup = min(60.0, args.duration / 3)
    rss = [(s["t"], s["rss"]) for s in samples if s.get("rss")]
    # RSS swings with the activations of the batches in flight (tens of MB either way from one
    # second to the next), so single samples are compared as window medians: the window that
    # starts at the end of warm-up vs the last window of the run. The point values are kept too.
    window = min(30.0, warmup / 2)
    after = [v for t, v in rss if warmup <= t < warmup + window]
    last = [v for t, v in rss if t >= wall - window]
    rss_mark = statistics.median(after) if after else None
    rss_end = statistics.median(last) if last else None
    growth = (rss_end - rss_mark) / rss_mark * 100 if rss_mark and rss_end else None
    point_mark = next((v for t, v in rss if t >= warmup), None)
    point_growth = (rss[-1][1] - point_mark) / point_mark * 100 if point_mark and rss else None
    ok_latency = sorted(stats.latencies)

    def pct(p):
        return round(ok_latency[min(len(ok_latency) - 1, int(p / 100 * len(ok_latency)))] * 1000, 1) if ok_latency else None

    by_kind: dict[str, dict] = {}
    for (kind, outcome), n in sorted(stats.outcomes.items()):
        by_kind.setdefault(kind, {})[outcome] = n
    answered = sum(n for (_, outcome), n in stats.outcomes.items() if outcome != "429")
    return {
        "duration_s": round(wall, 1), "clients": args.clients, "max_concurrent_requests": args.max_concurrent,
        "requests": stats.done, "throughput_rps": round(stats.done / wall, 1),
        "answered_rps": round(answered / wall, 1),
        "ok_200": sum(n for (_, o), n in stats.outcomes.items() if o == "200"),
        "rejected_429": stats.rejected,
        "expected_4xx": sum(n for (k, o), n in stats.outcomes.items() if o.isdigit() and o not in ("200", "429")),
        "unexpected": dict(stats.unexpected), "unexpected_examples": stats.examples,
        "latency_ms_200": {"p50": pct(50), "p95": pct(95), "p99": pct(99), "max": pct(100)},
        "by_kind": by_kind,
        "max_in_flight": max((s.get("in_flight", 0) for s in samples), default=None),
        "max_queue_depth": max((s.get("queue", 0) for s in samples), default=None),
        "sampler_errors": sum(1 for s in samples if "error" in s or s.get("health") not in (None, 200)),
        "rss_mb_at_warmup": round(rss_mark / 2**20, 1) if rss_mark else None, "warmup_s": round(warmup, 1),
        "rss_mb_end": round(rss_end / 2**20, 1) if rss_end else None,
        "rss_growth_pct": round(growth, 2) if growth is not None else None,
        "rss_window_s": window,
        "rss_point_growth_pct": round(point_growth, 2) if point_growth is not None else None,
        "rss_mb_timeline": [(t, round(v / 2**20, 1)) for t, v in rss[:: max(1, len(rss) // 20)]],
    }


def verdict(result: dict, args) -> list[str]:
    problems = []
    if result["unexpected"]:
        problems.append(f"unexpected outcomes: {result['unexpected']}")
    if result["max_in_flight"] is not None and result["max_in_flight"] > args.max_concurrent:
        problems.append(f"in-flight {result['max_in_flight']} above the limit {args.max_concurrent}")
    if result["sampler_errors"]:
        problems.append(f"{result['sampler_errors']} health/metrics samples failed")
    if result["rss_growth_pct"] is not None and result["rss_growth_pct"] > args.max_rss_growth:
        problems.append(f"RSS grew {result['rss_growth_pct']}% (limit {args.max_rss_growth}%)")
    if result["ok_200"] == 0:
        problems.append("no request succeeded")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=180, help="seconds of load (default 180)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--max-concurrent", type=int, default=16,
                        help="the server's max_concurrent_requests (default 16: below --clients, so 429s happen)")
    parser.add_argument("--max-rss-growth", type=float, default=5.0, help="percent allowed after warm-up (default 5)")
    parser.add_argument("--warmup-bursts", type=int, default=5,
                        help="bursts of the largest requests from all clients at the start (default 5; 0: none)")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="client timeout per request, s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models-dir", help="serve this folder (with --text-model/--gen-model/--image-model)")
    parser.add_argument("--text-model", default="sentiment")
    parser.add_argument("--gen-model", default="writer")
    parser.add_argument("--image-model", default="images")
    parser.add_argument("--tiny", action="store_true", help="tiny models even when the demo models exist")
    parser.add_argument("--url", help="load an already running server instead of starting one")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid, for RSS")
    parser.add_argument("--api-key", default=os.environ.get("HF_SERVE_API_KEY"))
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "soak.json"), help="where to write the result")
    args = parser.parse_args(argv)

    proc = log_path = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
        names = {"classify": args.text_model, "generate": args.gen_model, "image": args.image_model, "source": args.url}
    else:
        models_dir, names = prepare_models(args)
        proc, url, log_path = start_server(models_dir, args)
        pid = proc.pid
    print(f"soak: {args.clients} clients for {args.duration:g}s against {url} "
          f"(max_concurrent_requests {args.max_concurrent})", flush=True)
    try:
        result = asyncio.run(run_load(url, pid, names, args))
    finally:
        exit_code = None
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                exit_code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    result["models"] = names.get("source")
    result["server_exit_code"] = exit_code
    if log_path is not None:
        server_log = log_path.read_text(errors="replace")
        result["server_log_errors"] = len(re.findall(r"\bERROR\b|Traceback", server_log))
        log_path.unlink()
    problems = verdict(result, args)
    if result.get("server_log_errors"):
        problems.append(f"{result['server_log_errors']} errors in the server log")
    result["problems"] = problems
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))

    print(f"requests {result['requests']} in {result['duration_s']}s: {result['throughput_rps']} req/s "
          f"({result['answered_rps']} answered/s), 200: {result['ok_200']}, 429: {result['rejected_429']}, "
          f"expected 4xx: {result['expected_4xx']}, unexpected: {result['unexpected'] or 0}")
    print(f"latency of 200s (ms): {result['latency_ms_200']}; max in flight {result['max_in_flight']}, "
          f"max queue depth {result['max_queue_depth']}")
    print(f"RSS (median of {result['rss_window_s']:.0f}s windows): {result['rss_mb_at_warmup']} MB after "
          f"{result['warmup_s']}s warm-up -> {result['rss_mb_end']} MB at the end ({result['rss_growth_pct']}%; "
          f"single samples: {result['rss_point_growth_pct']}%)")
    for kind, outcomes in result["by_kind"].items():
        print(f"  {kind:20s} {outcomes}")
    print("PASS" if not problems else "FAIL: " + "; ".join(problems), f"(details: {args.json})")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
