"""Load and soak test: many concurrent clients, all four tasks (real SmolLM2 chat among them) and some
bad requests, for minutes.

    python benchmarks/soak.py                                        # 10 minutes; starts its own server
    python benchmarks/soak.py --duration 180 --clients 32
    python benchmarks/soak.py --duration 600 --url http://host:8000 --pid 1234

Two phases of equal length (--phases): first `overload` (all --clients, over max_concurrent_requests:
the overflow gets 429s), then `under` (--under-clients, below the limit: not one 429 may happen).

What it checks (exit code 1 when one fails):
- zero unexpected outcomes: every good request is a 200 (or a 429 when the server is full), every bad
  one exactly its 4xx; no 5xx, no timeout, no dropped connection, no malformed 200 body;
- the queue stays bounded: over `max_concurrent_requests` the server answers 429 at once (so the
  in-flight gauge never exceeds the limit and nothing waits until it times out);
- memory: the server's RSS (median of a minute's samples, one a second) grows less than
  --max-rss-growth % between minute 1-2 and the last minute (a fifth of the run for runs shorter than
  5 minutes). The last minute is in the `under` phase, which holds fewer requests in flight than the
  first: memory that grows anyway is a leak. Each phase's own first-to-last-minute change is reported.

Models: --models-dir if given; else the demo models (models/demo-sentiment, models/demo-images,
models/demo-embeddings) when present, else tiny ones (tests/tiny_models.py), plus a tiny GPT-2 for
TGI-shaped generation and SmolLM2-135M-Instruct (assets/models/smollm2-135m-instruct) for
/v1/chat/completions; with --tiny every model is tiny (a tiny Llama with a chat template for chat).
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
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, start_service  # noqa: E402  (also sets the offline defaults)

SENTENCES = [
    "A gorgeous, witty, seductive movie.", "Dull and lifeless from start to finish.",
    "The plot is thin but the acting carries it.", "I would not watch this again.",
    "An instant classic with a moving score.", "Too long, too loud, too little to say.",
]

# kind: (weight, expected status of a non-429 answer)
KINDS = {
    "classify": (22, 200), "classify_batch": (8, 200), "generate": (10, 200), "generate_stream": (5, 200),
    "chat": (4, 200), "chat_stream": (4, 200), "embed": (6, 200), "embed_v1": (4, 200),
    "image_raw": (12, 200), "image_base64": (5, 200),
    "bad_json": (5, 422), "bad_model": (3, 404), "bad_image": (4, 415), "bad_max_new_tokens": (4, 422),
    "over_batch_cap": (2, 422), "bad_url_input": (2, 422),
}


# -- models and server -----------------------------------------------------------------------------

SMOLLM2 = REPO / "assets" / "models" / "smollm2-135m-instruct"
MINILM = REPO / "assets" / "models" / "all-MiniLM-L6-v2"


def prepare_models(args) -> tuple[Path, dict]:
    """A models dir with one model of each task, and a chat model."""
    if args.models_dir:
        return Path(args.models_dir), {"classify": args.text_model, "generate": args.gen_model, "image": args.image_model,
                                       "chat": args.chat_model, "embed": args.embed_model}
    sys.path.insert(0, str(REPO))
    from tests.tiny_models import (
        build_tiny_bert,
        build_tiny_gpt2,
        build_tiny_llama_chat,
        build_tiny_mobilenet_v2,
        build_tiny_sentence_encoder,
    )

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
    demo_embed = REPO / "models" / "demo-embeddings"
    if not args.tiny and (demo_embed / "config.json").is_file():
        (root / "embedder").symlink_to(demo_embed)
    elif not args.tiny and (MINILM / "config.json").is_file():
        (root / "embedder").symlink_to(MINILM.resolve())
    else:
        build_tiny_sentence_encoder(root / "embedder")
    if not args.tiny and (SMOLLM2 / "config.json").is_file():
        (root / "chat").symlink_to(SMOLLM2.resolve())
        source += " + SmolLM2-135M-Instruct (chat) + MiniLM embeddings"
    else:
        build_tiny_llama_chat(root / "chat")
        source += " + tiny chat model"
    build_tiny_gpt2(root / "writer")
    (root / "writer" / "README.md").write_text("---\npipeline_tag: text-generation\n---\n")
    print(f"models: {source} in {root}", flush=True)
    return root, {"classify": "sentiment", "generate": "writer", "image": "images", "chat": "chat", "embed": "embedder",
                  "source": source}


def start_server(models_dir: Path, args) -> tuple[subprocess.Popen, str, Path]:
    log_path = Path(tempfile.mkstemp(prefix="soak-server-", suffix=".log")[1])
    flags = ["--max-concurrent-requests", str(args.max_concurrent), "--max-new-tokens", "64",
             "--log-level", "warning", "--reload-interval-s", "5"]
    if args.torch_threads:
        flags += ["--torch-threads", str(args.torch_threads)]
    proc, url = start_service(models_dir, flags, log_path)
    return proc, url, log_path


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
    if kind in ("chat", "chat_stream"):
        body = {"model": names["chat"], "max_tokens": rng.randint(4, 16), "temperature": 0,
                "messages": [{"role": "user", "content": f"In one sentence, is this review positive? {text}"}]}
        if kind == "chat_stream":
            return {"path": "/v1/chat/completions", "stream": True, "json": {**body, "stream": True}}
        return {"path": "/v1/chat/completions", "json": body}
    if kind == "embed":
        return {"path": f"/models/{names['embed']}", "json": {"inputs": rng.sample(SENTENCES, 2)}}
    if kind == "embed_v1":
        return {"path": "/v1/embeddings", "json": {"model": names["embed"], "input": text}}
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
    if kind == "chat":
        return isinstance(payload["choices"][0]["message"]["content"], str)
    if kind == "embed":
        return isinstance(payload, list) and len(payload) == 2 and all(isinstance(v, float) for v in payload[0])
    if kind == "embed_v1":
        return isinstance(payload["data"][0]["embedding"][0], float)
    return True


def error_shaped(path: str, payload) -> bool:
    """Our error body, or OpenAI's on the /v1 routes."""
    if path.startswith("/v1/"):
        return isinstance(payload, dict) and set(payload) == {"error"} and "message" in payload["error"]
    return isinstance(payload, dict) and set(payload) == {"error", "error_type"}


class Stats:
    def __init__(self):
        self.outcomes: Counter = Counter()  # (kind, outcome)
        self.unexpected: Counter = Counter()  # outcome type
        self.examples: dict[str, str] = {}
        self.latencies: list[float] = []
        self.done = 0
        self.rejected = 0


class Phases:
    """Which phase a moment belongs to, and how many clients it has: equal shares of the run."""

    def __init__(self, names: list[str], started: float, duration: float, clients: int, under_clients: int):
        self.names, self.started, self.length = names, started, duration / len(names)
        self.clients = {"overload": clients, "under": under_clients}
        self.in_flight = {name: 0 for name in names}  # requests started in each phase, not answered yet

    def at(self, now: float) -> str:
        return self.names[min(len(self.names) - 1, int((now - self.started) / self.length))]

    def bounds(self, name: str) -> tuple[float, float]:
        """(start, end) of a phase in seconds since the start."""
        i = self.names.index(name)
        return i * self.length, (i + 1) * self.length


async def client_loop(index: int, client: httpx.AsyncClient, stop_at: float, names: dict, images, stats: Stats,
                      seed: int, phases: Phases, phase_stats: dict[str, Stats]) -> None:
    rng = random.Random(seed * 1000 + index)
    kinds, weights = list(KINDS), [w for w, _ in KINDS.values()]
    while time.monotonic() < stop_at:
        phase = phases.at(time.monotonic())
        if index >= phases.clients[phase]:  # not one of this phase's clients: wait for the next phase
            await asyncio.sleep(0.2)
            continue
        if any(n for name, n in phases.in_flight.items() if name != phase):
            await asyncio.sleep(0.05)  # a phase starts when the last one's requests are answered
            continue
        kind = rng.choices(kinds, weights)[0]
        phases.in_flight[phase] += 1
        request = build_request(kind, rng, names, images)
        expected = KINDS[kind][1]
        started = time.perf_counter()
        outcome = None
        try:
            if request.get("stream"):
                async with client.stream("POST", request["path"], json=request["json"]) as response:
                    status = response.status_code
                    events = [line async for line in response.aiter_lines() if line.startswith("data:")]
                    if status == 200 and kind == "chat_stream":  # OpenAI's chunks, then [DONE]
                        if not events or events[-1].strip() != "data: [DONE]" or len(events) < 2:
                            outcome = "malformed_stream"
                        elif any("error" in json.loads(e[5:]) for e in events[:-1]):
                            outcome = "stream_error"
                    elif status == 200:
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
                elif status != 200 and not error_shaped(request["path"], response.json()):
                    outcome = f"malformed_error_{status}"
        except httpx.TimeoutException:
            outcome, status = "timeout", None
        except httpx.HTTPError as exc:
            outcome, status = type(exc).__name__, None
        except (ValueError, KeyError, IndexError) as exc:
            outcome, status = f"bad_payload_{type(exc).__name__}", None
        elapsed = time.perf_counter() - started
        phases.in_flight[phase] -= 1
        if outcome is None:
            if status == expected or (status == 429 and kind != "bad_model"):
                outcome = str(status)
            else:
                outcome = f"status_{status}"
        for record in (stats, phase_stats[phase]):
            record.done += 1
            record.outcomes[kind, outcome] += 1
            if outcome == "429":
                record.rejected += 1
            elif not outcome.isdigit():
                record.unexpected[outcome] += 1
                record.examples.setdefault(outcome, f"{kind} -> {outcome}")
            elif outcome == "200":
                record.latencies.append(elapsed)
        if outcome == "429":
            await asyncio.sleep(rng.uniform(0.05, 0.25))  # a polite client backs off (Retry-After says 1 s)


async def warm_up(client: httpx.AsyncClient, names: dict, images: list[bytes], stats: Stats, args) -> None:
    """Bursts of the largest requests from every client at once, so the server reaches its peak
    working set (the biggest batches max_concurrent_requests allows) inside the warm-up: memory that
    grows after it is a leak, not a new high-water mark of the allocator."""
    biggest = max(images, key=len)
    longest = sorted(SENTENCES, key=len)[-4:] * 2
    requests = [{"path": f"/models/{names['image']}", "content": biggest, "headers": {"content-type": "image/png"}},
                {"path": f"/models/{names['classify']}", "json": {"inputs": longest}},
                {"path": f"/models/{names['generate']}", "json": {"inputs": " ".join(longest),
                                                                   "parameters": {"max_new_tokens": 24}}},
                {"path": "/v1/chat/completions", "json": {"model": names["chat"], "max_tokens": 16, "temperature": 0,
                                                          "messages": [{"role": "user", "content": " ".join(longest)}]}},
                {"path": f"/models/{names['embed']}", "json": {"inputs": longest}}]

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


def _median_mb(rss: list[tuple[float, int]], start: float, end: float) -> float | None:
    values = [v for t, v in rss if start <= t < end]
    return round(statistics.median(values) / 2**20, 1) if values else None


def _growth(mark: float | None, end: float | None) -> float | None:
    return round((end - mark) / mark * 100, 2) if mark and end else None


def summarise(stats: Stats, wall: float) -> dict:
    """Counts, rates and latency percentiles of one set of requests."""
    ok_latency = sorted(stats.latencies)

    def pct(p):
        return round(ok_latency[min(len(ok_latency) - 1, int(p / 100 * len(ok_latency)))] * 1000, 1) if ok_latency else None

    by_kind: dict[str, dict] = {}
    for (kind, outcome), n in sorted(stats.outcomes.items()):
        by_kind.setdefault(kind, {})[outcome] = n
    answered = sum(n for (_, outcome), n in stats.outcomes.items() if outcome != "429")
    return {
        "requests": stats.done, "throughput_rps": round(stats.done / wall, 1), "answered_rps": round(answered / wall, 1),
        "ok_200": sum(n for (_, o), n in stats.outcomes.items() if o == "200"),
        "rejected_429": stats.rejected,
        "expected_4xx": sum(n for (k, o), n in stats.outcomes.items() if o.isdigit() and o not in ("200", "429")),
        "unexpected": dict(stats.unexpected), "unexpected_examples": stats.examples,
        "latency_ms_200": {"p50": pct(50), "p95": pct(95), "p99": pct(99), "max": pct(100)},
        "by_kind": by_kind,
    }


async def run_load(url: str, pid: int | None, names: dict, args) -> dict:
    stats, samples = Stats(), []
    phase_names = [p.strip() for p in args.phases.split(",") if p.strip()]
    phase_stats = {name: Stats() for name in phase_names}
    images = make_images(random.Random(args.seed))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    started = time.monotonic()
    stop_at = started + args.duration
    phases = Phases(phase_names, started, args.duration, args.clients, args.under_clients)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits, headers=headers) as client:

        async def clients() -> None:
            await warm_up(client, names, images, stats, args)
            await asyncio.gather(*(client_loop(i, client, stop_at, names, images, stats, args.seed, phases, phase_stats)
                                   for i in range(args.clients)))

        await asyncio.gather(sample_server(url, pid, stop_at, samples, headers), clients())
    wall = time.monotonic() - started
    rss = [(s["t"], s["rss"]) for s in samples if s.get("rss")]
    # RSS swings with the activations of the batches in flight (tens of MB either way from one
    # second to the next), so a minute's samples are compared as medians: minute 1-2 (minute 0-1 is
    # warm-up) vs the last minute; for runs under 5 minutes a fifth of the run stands for a minute.
    minute = min(60.0, args.duration / 5)
    mark, end = _median_mb(rss, minute, 2 * minute), _median_mb(rss, args.duration - minute, args.duration + 1)
    point_mark = next((v for t, v in rss if t >= minute), None)
    point_growth = _growth(point_mark, rss[-1][1]) if rss else None
    result = {
        "duration_s": round(wall, 1), "clients": args.clients, "max_concurrent_requests": args.max_concurrent,
        **summarise(stats, wall),
        "max_in_flight": max((s.get("in_flight", 0) for s in samples), default=None),
        "max_queue_depth": max((s.get("queue", 0) for s in samples), default=None),
        "sampler_errors": sum(1 for s in samples if "error" in s or s.get("health") not in (None, 200)),
        "rss_window_s": minute,
        "rss_mb_minute_1_2": mark, "rss_mb_last_minute": end, "rss_growth_pct": _growth(mark, end),
        "rss_point_growth_pct": point_growth,
        "rss_mb_timeline": [(t, round(v / 2**20, 1)) for t, v in rss[:: max(1, len(rss) // 30)]],
        "phases": {},
    }
    for name in phase_names:
        begin, finish = phases.bounds(name)
        first = begin + minute if begin == 0 else begin  # the first phase's first minute is warm-up
        in_flight = [s.get("in_flight", 0) for s in samples if begin <= s["t"] < finish]
        phase_mark, phase_end = _median_mb(rss, first, first + minute), _median_mb(rss, finish - minute, finish + 1)
        result["phases"][name] = {
            "from_s": round(begin, 1), "to_s": round(finish, 1), "clients": phases.clients[name],
            **summarise(phase_stats[name], finish - begin),
            "max_in_flight": max(in_flight, default=None),
            "rss_mb_first_minute": phase_mark, "rss_mb_last_minute": phase_end,
            "rss_growth_pct": _growth(phase_mark, phase_end),
        }
    return result


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
    under = result["phases"].get("under")
    if under and under["rejected_429"]:  # fewer clients than the limit: a 429 means a leaked admission slot
        problems.append(f"{under['rejected_429']} 429s with {under['clients']} clients under the limit {args.max_concurrent}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients of the overload phase (default 32)")
    parser.add_argument("--under-clients", type=int, default=None,
                        help="concurrent clients of the under phase (default: half of --max-concurrent)")
    parser.add_argument("--phases", default="overload,under",
                        help="comma-separated phases of equal length, in order (default overload,under)")
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
    parser.add_argument("--chat-model", default="chat")
    parser.add_argument("--embed-model", default="embedder")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="the server's torch threads (default: its own); 1 on a CPU shared with other work, where "
                             "two OpenMP threads collapse")
    parser.add_argument("--tiny", action="store_true", help="tiny models even when the demo models exist")
    parser.add_argument("--url", help="load an already running server instead of starting one")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid, for RSS")
    parser.add_argument("--api-key", default=os.environ.get("HF_SERVE_API_KEY"))
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "soak.json"), help="where to write the result")
    args = parser.parse_args(argv)
    if args.under_clients is None:
        args.under_clients = max(1, args.max_concurrent // 2)
    if args.under_clients >= args.max_concurrent:
        parser.error("--under-clients must be below --max-concurrent")

    proc = log_path = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
        names = {"classify": args.text_model, "generate": args.gen_model, "image": args.image_model,
                 "chat": args.chat_model, "embed": args.embed_model, "source": args.url}
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
    print(f"RSS (median of {result['rss_window_s']:.0f}s of samples): {result['rss_mb_minute_1_2']} MB in minute 1-2 "
          f"-> {result['rss_mb_last_minute']} MB in the last minute ({result['rss_growth_pct']}%; "
          f"single samples: {result['rss_point_growth_pct']}%)")
    for name, phase in result["phases"].items():
        print(f"  phase {name} ({phase['from_s']:.0f}-{phase['to_s']:.0f}s, {phase['clients']} clients): "
              f"{phase['requests']} requests, {phase['answered_rps']} answered/s, 429: {phase['rejected_429']}, "
              f"p50/p95 {phase['latency_ms_200']['p50']}/{phase['latency_ms_200']['p95']} ms, max in flight "
              f"{phase['max_in_flight']}; RSS {phase['rss_mb_first_minute']} -> {phase['rss_mb_last_minute']} MB "
              f"({phase['rss_growth_pct']}%)")
    for kind, outcomes in result["by_kind"].items():
        print(f"  {kind:20s} {outcomes}")
    print("PASS" if not problems else "FAIL: " + "; ".join(problems), f"(details: {args.json})")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
