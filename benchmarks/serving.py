"""Serving benchmark: our server vs the raw batched forward (the limit), the transformers tutorial's
server and a naive server.

    python benchmarks/serving.py                      # all models, concurrency 1/8/32/64, 3 repeats
    python benchmarks/serving.py --models bert-base --repeats 5
    python benchmarks/serving.py --quick              # tiny models, seconds (CI keeps it from rotting)

For each model, in the same run and on the same CPU:
  raw    the model's forward on pre-tokenized / pre-processed inputs, in the benchmark process:
         batches of `max_batch_size` (throughput limit) and single inputs (latency floor);
         for generation, sequential `model.generate` and one prompt forward pass.
  tutorial  benchmarks/tutorial_server.py, the main baseline: the transformers docs' "pipeline web
         server" tutorial (Starlette, one `server_loop` fed by an `asyncio.Queue`, `pipe(string)` per
         request, one at a time).
  naive  benchmarks/naive_server.py: FastAPI calling `pipeline(x)` per request, no batching.
  ours   `uvicorn service.app:app` serving the same folder (default settings, no reload polling).
Every server's answer is kept per input and the top labels are compared across servers: the
benchmark reports each input on which they disagree (`label_check` in the JSON).
All servers are uvicorn subprocesses on 127.0.0.1, started the same way and pinned with
`taskset` to every core (on this 2-core machine the load client shares them: its CPU use is
measured and reported as `client CPU`). Load: a closed loop of N async clients (a minimal HTTP/1.1 client, or httpx), each
sending its next request when the previous answer arrives, for a fixed number of requests after
a warm-up; inputs are real (Rotten Tomatoes held-out sentences, Fashion-MNIST test images as PNG,
32-token prompts cut from RT sentences). Every cell is the median of `--repeats` repetitions;
the repetitions are interleaved (raw, tutorial, naive, ours, raw, ...) so that machine noise hits all.
"""

from __future__ import annotations

import argparse
import asyncio
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
    GPT2_TOKENIZER,
    REPO,
    RESULTS,
    WORK,
    build_gpt2,
    build_resnet50,
    build_text_model,
    fashion_calibration,
    fashion_png,
    free_port,
    hardware,
    median,
    mpnet_classifier,
    percentile,
    plot_path,
    print_hardware,
    python,
    rss_mb,
    rt_sentences,
    shown,
    table,
    write_results,
)

MAX_BATCH = 32  # the server's default max_batch_size; raw batches use the same size
SLOW_MODELS = ("bert-base", "mpnet", "resnet-50")  # fewer raw inputs per measurement
GEN_NEW_TOKENS = 32
PROMPT_TOKENS = 32

# name -> task, folder (built on first use), requests per concurrency level
MODELS = {
    "bert-base": ("text-classification", lambda: build_text_model(WORK / "models" / "bert-base"), 96),
    "minilm-demo": ("text-classification", lambda: DEMO_SENTIMENT, 384),
    "mpnet": ("text-classification", lambda: mpnet_classifier(WORK / "models" / "mpnet"), 96),
    "mobilenet-v2": ("image-classification", lambda: DEMO_IMAGES, 256),
    "resnet-50": ("image-classification", lambda: build_resnet50(WORK / "models" / "resnet-50"), 96),
    "gpt2": ("text-generation", lambda: build_gpt2(WORK / "models" / "gpt2"), 8),
}
QUICK_MODELS = {
    "tiny-bert": ("text-classification", lambda: build_text_model(WORK / "models" / "tiny-bert", "tiny"), 32),
    "tiny-resnet": ("image-classification", lambda: build_resnet50(WORK / "models" / "tiny-resnet", "tiny"), 32),
    "tiny-gpt2": ("text-generation", lambda: build_gpt2(WORK / "models" / "tiny-gpt2", "tiny"), 4),
}


# -- inputs -------------------------------------------------------------------------------------

def prompts(n: int) -> list[str]:
    """n prompts of PROMPT_TOKENS GPT-2 tokens, cut from RT sentences."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    out = []
    sentences = rt_sentences("test")
    for s in sentences:
        ids = tok(" ".join([s] * 4))["input_ids"][:PROMPT_TOKENS]
        out.append(tok.decode(ids))
        if len(out) == n:
            break
    return out


def inputs_for(task: str, n: int):
    if task == "text-classification":
        sentences = rt_sentences("test")
        step = max(len(sentences) // n, 1)
        return [sentences[(i * step) % len(sentences)] for i in range(n)]  # spread over the file (both labels)
    if task == "image-classification":
        return fashion_png(n)
    return prompts(n)


# -- raw baselines (in this process, no server running anything) ----------------------------------

def make_raw(task: str, folder: Path, inputs, gen_tokens: int, n_singles: int = 48):
    """Load the model once; returns `measure()`, which times the raw forward passes again."""
    import torch
    from PIL import Image

    if task == "text-classification":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        batches = [tok(inputs[i:i + MAX_BATCH], padding=True, truncation=True, max_length=512, return_tensors="pt")
                   for i in range(0, len(inputs), MAX_BATCH)]
        singles = [tok(t, return_tensors="pt") for t in inputs[:n_singles]]
    elif task == "image-classification":
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(folder).eval()
        proc = AutoImageProcessor.from_pretrained(folder)
        import io

        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in inputs]
        batches = [{"pixel_values": proc(images=images[i:i + MAX_BATCH], return_tensors="pt")["pixel_values"]}
                   for i in range(0, len(images), MAX_BATCH)]
        singles = [{"pixel_values": proc(images=[im], return_tensors="pt")["pixel_values"]} for im in images[:n_singles]]
        # The same forward after the server's inference rewrites (batch norm folded, channels-last):
        # ours' p50 minus this single forward is the server's own overhead.
        import copy

        from service.conv_inference import optimise_for_inference

        optimised = copy.deepcopy(model)
        optimise_for_inference(optimised)

        def measure_images() -> dict:
            out = _measure_forward(model, batches, singles)
            fast = _measure_forward(optimised, batches[:1], singles)
            return {**out, "optimised_single_forward_ms": fast["single_forward_ms"]}

        return measure_images
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        ids = [torch.tensor([tok(p)["input_ids"]]) for p in inputs]

        def measure_generation() -> dict:
            with torch.inference_mode():
                model(input_ids=ids[0])  # warm-up
                forward_ms = []
                for x in ids[: max(len(ids), 8)]:
                    t0 = time.perf_counter()
                    model(input_ids=x)
                    forward_ms.append((time.perf_counter() - t0) * 1000)
                tokens, t0 = 0, time.perf_counter()
                for x in ids:
                    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=gen_tokens,
                                         do_sample=False, pad_token_id=50256)
                    tokens += out.shape[1] - x.shape[1]
                seconds = time.perf_counter() - t0
            return {"generate_tokens_per_s": tokens / seconds, "prompt_forward_ms": median(forward_ms),
                    "generate_ms_per_request": seconds * 1000 / len(ids)}

        return measure_generation

    def measure() -> dict:
        return _measure_forward(model, batches, singles)

    return measure


def _measure_forward(model, batches: list[dict], singles: list[dict]) -> dict:
    import torch

    with torch.inference_mode():
        model(**batches[0])  # warm-up
        model(**singles[0])
        count, t0 = 0, time.perf_counter()
        for b in batches:
            model(**b)
            count += next(iter(b.values())).shape[0]
        batched = count / (time.perf_counter() - t0)
        single_ms = []
        for s in singles:
            t1 = time.perf_counter()
            model(**s)
            single_ms.append((time.perf_counter() - t1) * 1000)
    return {"batched_inputs_per_s": batched, "single_forward_ms": median(single_ms)}


# -- servers ------------------------------------------------------------------------------------

class Server:
    """A uvicorn subprocess (ours or naive) pinned to every core, on a free loopback port."""

    def __init__(self, kind: str, name: str, task: str, folder: Path, env_extra: dict | None = None):
        self.kind, self.name, self.task = kind, name, task
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cwd = REPO
        if kind == "before":
            # ours as served by another checkout's service/ (BENCH_BEFORE_DIR: a folder holding `service/`,
            # e.g. `git archive <commit> service | tar -x -C DIR`): an A/B of a change, side by side
            cwd = Path(os.environ["BENCH_BEFORE_DIR"])
            env["PYTHONPATH"] = str(cwd)
        if kind == "ours-onnx":  # ours on the ONNX Runtime backend, int8 where it keeps float32's labels
            env.update(HF_SERVE_BACKEND="onnx", HF_SERVE_QUANTIZE="int8", HF_SERVE_ONNX_CACHE=str(WORK / "onnx-cache"),
                       HF_SERVE_CALIBRATION_DIR=str(WORK / "calibration"))
            if task == "image-classification":  # static int8 needs images like the requests (not the same ones)
                fashion_calibration(WORK / "calibration" / name)
        if kind == "ours-bf16":  # ours with bfloat16 weights: native on CPUs with AMX or AVX-512 BF16
            env.update(HF_SERVE_DTYPE="bfloat16")
        if kind == "ours-compile":  # ours with torch.compile (float32, compiled at load)
            env.update(HF_SERVE_BACKEND="torch-compile")
        if kind in ("ours", "before", "ours-onnx", "ours-bf16", "ours-compile"):
            models_dir = WORK / "serve" / name
            models_dir.mkdir(parents=True, exist_ok=True)
            link = models_dir / name
            if not link.exists():
                link.symlink_to(folder.resolve())
            env.update(HF_SERVE_MODELS_DIR=str(models_dir), HF_SERVE_RELOAD_INTERVAL_S="0")
            app = os.environ.get("BENCH_APP", "service.app:app")
            self.path = f"/models/{name}"
            self.ready_path = "/ready"
        elif kind == "tutorial":
            env.update(TUTORIAL_MODEL=str(folder), TUTORIAL_TASK=task, TUTORIAL_MAX_NEW_TOKENS=str(GEN_NEW_TOKENS))
            app = "benchmarks.tutorial_server:app"
            self.path = "/"
            self.ready_path = None  # the tutorial has one route: ready once it answers a request
        else:
            env.update(NAIVE_MODEL=str(folder), NAIVE_TASK=task)
            app = "benchmarks.naive_server:app"
            self.path = "/image" if task == "image-classification" else "/text"
            self.ready_path = "/health"
        env.update(env_extra or {})
        cores = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
        cmd = ["taskset", "-c", cores, python(), "-m", "uvicorn", app, "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning"]
        self.log = WORK / "logs" / f"server-{kind}-{name}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited; log {self.log}:\n{self.log.read_text()[-3000:]}")
            try:
                if self.ready_path is None:
                    # the model loads inside server_loop; a request waits for it (as a user's would)
                    probe = b"a probe" if self.task != "image-classification" else fashion_png(1)[0]
                    if httpx.post(self.url + self.path, content=probe, timeout=timeout).status_code == 200:
                        return
                elif httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.kind} server not ready after {timeout} s")

    def rss(self) -> tuple[float, float]:
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- load ---------------------------------------------------------------------------------------

def request_kwargs(server: Server, task: str, item, stream: bool = False) -> dict:
    if task == "image-classification":  # the raw image bytes, for every server
        return {"content": item, "headers": {"content-type": "image/png"}}
    if server.kind == "tutorial":  # the tutorial reads the raw body as UTF-8 text
        return {"content": item.encode("utf-8"), "headers": {"content-type": "text/plain; charset=utf-8"}}
    if task == "text-generation":
        params = {"max_new_tokens": GEN_NEW_TOKENS, "details": True}
        return {"json": {"inputs": item, "parameters": params, "stream": stream}}
    return {"json": {"inputs": item}}


def top_label(body) -> str | None:
    """The highest-scoring label of a classification answer: `[[{label, score}]]` (ours, one list per
    input), `[{label, score}]` (pipeline output) or `{label, score}`."""
    while isinstance(body, list) and body and isinstance(body[0], list):
        body = body[0]
    if isinstance(body, dict):
        body = [body]
    if not isinstance(body, list) or not body or not all(isinstance(x, dict) and "label" in x for x in body):
        return None
    return max(body, key=lambda x: x.get("score", 0))["label"]


def count_tokens(task: str, body) -> int:
    if task != "text-generation":
        return 0
    return int(body[0]["details"]["generated_tokens"])


class RawResponse:
    """What `RawHTTPClient.post` returns: the parts of an httpx response the load loop reads."""

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes):
        self.status_code, self.headers, self.content = status_code, headers, content

    def json(self):
        return json.loads(self.content)


class RawHTTPClient:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: one connection per concurrent caller,
    requests encoded once per input, answers read by Content-Length (or chunked). The load client
    shares the 2 cores with the server; httpx spent several ms of CPU per request there (63-71 % of
    a core against ours-onnx at 91 req/s), which is CPU the server did not get. Same requests, same
    answers, a fraction of the client's CPU (`--client httpx` keeps the old one for comparison)."""

    def __init__(self, url: str, timeout: float = 600):
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port, self.timeout = host, int(port), timeout
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.encoded: dict[object, bytes] = {}  # request bytes per input key

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()

    def encode(self, path: str, key, kwargs: dict) -> bytes:
        if key not in self.encoded:
            body = kwargs["content"] if "content" in kwargs else json.dumps(kwargs["json"]).encode()
            headers = {"content-type": "application/json", **kwargs.get("headers", {})}
            head = (f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-length: {len(body)}\r\n"
                    + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n")
            self.encoded[key] = head.encode("latin-1") + body
        return self.encoded[key]

    async def post(self, path: str, key, **kwargs) -> RawResponse:
        request = self.encode(path, key, kwargs)
        reused = bool(self.idle)
        reader, writer = self.idle.pop() if reused else await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(request)
            response = await asyncio.wait_for(self.read(reader), self.timeout)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            writer.close()
            if reused and not getattr(exc, "partial", b""):  # the server closed an idle keep-alive connection
                return await self.post(path, key, **kwargs)
            raise
        except BaseException:
            writer.close()
            raise
        if response.headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((reader, writer))
        return response

    @staticmethod
    async def read(reader: asyncio.StreamReader) -> RawResponse:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
        if "content-length" in headers:
            return RawResponse(status, headers, await reader.readexactly(int(headers["content-length"])))
        chunks = []  # transfer-encoding: chunked
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
        return RawResponse(status, headers, b"".join(chunks))


def load_client(server: Server, concurrency: int, kind: str):
    """The closed loop's client: RawHTTPClient (default) or httpx.AsyncClient (`--client httpx`)."""
    import httpx

    if kind == "raw":
        return RawHTTPClient(server.url)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits)


async def closed_loop(server: Server, task: str, inputs: list, n_requests: int, concurrency: int,
                      labels: dict | None = None, client_kind: str = "raw") -> dict:
    """`concurrency` clients, each sending its next request when its answer arrives. With `labels`, the
    top label of every classification answer is added to `labels[input index]` (a set)."""
    import httpx

    labels = {} if labels is None else labels
    server_ms: list[tuple[float, float]] = []  # (queue, inference) ms per answer, when the server says

    async with load_client(server, concurrency, client_kind) as client:
        async def one(i: int):
            t0 = time.perf_counter()
            try:
                kwargs = request_kwargs(server, task, inputs[i % len(inputs)])
                if client_kind == "raw":
                    kwargs["key"] = i % len(inputs)
                r = await client.post(server.path, **kwargs)
                ok = r.status_code == 200
                body = r.json() if ok else None
                # the tutorial's answers are exactly GEN_NEW_TOKENS tokens (TUTORIAL_MAX_NEW_TOKENS)
                tokens = (GEN_NEW_TOKENS if server.kind == "tutorial" and task == "text-generation"
                          else count_tokens(task, body)) if ok else 0
                if ok and task != "text-generation":
                    labels.setdefault(i % len(inputs), set()).add(top_label(body))
                if ok and "x-inference-time" in r.headers:  # ours: where the time went, server side
                    server_ms.append((float(r.headers["x-queue-time"]), float(r.headers["x-inference-time"])))
            except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                ok, tokens = False, 0
            return time.perf_counter() - t0, ok, tokens

        # warm-up: one round at this concurrency (connections open, first batches run)
        await asyncio.gather(*(one(i) for i in range(concurrency)))
        next_i = 0
        latencies, errors, tokens = [], 0, 0

        async def client_loop():
            nonlocal next_i, errors, tokens
            while next_i < n_requests:
                i = next_i
                next_i += 1
                lat, ok, tok = await one(i)
                if ok:
                    latencies.append(lat * 1000)
                    tokens += tok
                else:
                    errors += 1

        server_ms.clear()  # not the warm-up's
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    return {
        "requests": n_requests, "errors": errors, "wall_s": wall,
        "throughput_rps": len(latencies) / wall,
        "tokens_per_s": tokens / wall if task == "text-generation" else None,
        "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95), "p99_ms": percentile(latencies, 99),
        "client_cpu_pct": 100 * cpu / wall,  # of one core
        # ours only: the server's own x-queue-time / x-inference-time (the batcher's wait, and tokenizing +
        # the forward pass + post-processing); p50 minus their sum is the HTTP + routing + thread hops part
        "server_queue_p50_ms": percentile([q for q, _ in server_ms], 50),
        "server_inference_p50_ms": percentile([i for _, i in server_ms], 50),
    }


async def time_to_first_token(server: Server, prompts_: list[str]) -> float:
    """Median ms from sending a streamed request to its first server-sent event."""
    import httpx

    times = []
    async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
        for i, p in enumerate([prompts_[0]] + prompts_):
            t0 = time.perf_counter()
            async with client.stream("POST", server.path, **request_kwargs(server, "text-generation", p, stream=True)) as r:
                first = True
                async for line in r.aiter_lines():  # read to the end (max_new_tokens)
                    if first and line.startswith("data:"):
                        first = False
                        if i > 0:  # the first request is a warm-up
                            times.append((time.perf_counter() - t0) * 1000)
    return median(times)


# -- one model ------------------------------------------------------------------------------------

def bench_model(name: str, spec, args) -> dict:
    task, make_folder, n_requests = spec
    n_requests = args.requests or n_requests
    folder = make_folder()
    generation = task == "text-generation"
    levels = args.gen_concurrency if generation else args.concurrency
    inputs = inputs_for(task, max(n_requests, 64) if not generation else max(n_requests, 8))
    kinds = ["ours"] if generation else args.servers
    print(f"\n## {name} ({task}, {folder})", flush=True)
    servers = {k: Server(k, name, task, folder) for k in kinds}
    out: dict = {"task": task, "folder": str(folder), "requests_per_level": n_requests, "raw": [],
                 "servers": {k: {str(c): [] for c in levels} for k in kinds}, "rss_mb": {}, "ttft_ms": []}
    labels: dict = {k: {} for k in kinds}  # server -> input index -> top labels seen
    try:
        for s in servers.values():
            s.wait_ready()
        raw_inputs = inputs[: (16 if args.quick else 64 if name in SLOW_MODELS else 128)] if not generation \
            else inputs[: (2 if args.quick else 6)]
        measure_raw = make_raw(task, folder, raw_inputs, GEN_NEW_TOKENS, 8 if args.quick else 24)
        for rep in range(args.repeats):
            for c in levels:
                if not generation or c == levels[0]:
                    # raw again before every level: the machine is shared, so the baseline is
                    # sampled as close in time to the servers' runs as possible (median of all)
                    settle([s.proc.pid for s in servers.values()])
                    raw = measure_raw()
                    out["raw"].append(raw)
                    print(f"  rep {rep + 1}: raw {json.dumps({k: round(v, 2) for k, v in raw.items()})}", flush=True)
                for kind, s in servers.items():
                    n = max(n_requests, 2 * c)
                    r = asyncio.run(closed_loop(s, task, inputs, n, c, labels[kind], args.client))
                    r["rss_mb"], r["peak_rss_mb"] = s.rss()
                    out["servers"][kind][str(c)].append(r)
                    extra = f", {r['tokens_per_s']:.1f} tok/s" if generation else ""
                    print(f"  rep {rep + 1} c={c:<3} {kind:5}: {r['throughput_rps']:7.1f} req/s{extra}, p50 {r['p50_ms']:.1f} ms, "
                          f"p99 {r['p99_ms']:.1f} ms, errors {r['errors']}, client CPU {r['client_cpu_pct']:.0f} %", flush=True)
            if generation:
                ttft = asyncio.run(time_to_first_token(servers["ours"], inputs[: (2 if args.quick else 8)]))
                out["ttft_ms"].append(ttft)
                print(f"  rep {rep + 1} time to first streamed token {ttft:.1f} ms", flush=True)
        for kind, s in servers.items():
            out["rss_mb"][kind] = s.rss()[1]
            out[f"{kind}_stats"] = stats_of(s)
    finally:
        for s in servers.values():
            s.stop()
    if not generation:
        out["label_check"] = label_check(labels, inputs)
        lc = out["label_check"]
        print(f"  labels: {lc['inputs_compared']} inputs answered by every server, {len(lc['disagreements'])} disagree"
              + (f" (first: {lc['disagreements'][0]})" if lc["disagreements"] else ""), flush=True)
    out["summary"] = summarise(out, levels, generation)
    return out


def label_check(labels: dict, inputs: list) -> dict:
    """Compare the servers' top labels input by input: an input disagrees when any server gave it a label
    another did not (or one server gave it two labels across its requests, e.g. batched vs alone)."""
    kinds = list(labels)
    common = sorted(set.intersection(*(set(labels[k]) for k in kinds))) if kinds else []
    disagreements = []
    for i in common:
        seen = {k: sorted(str(x) for x in labels[k][i]) for k in kinds}
        if len({tuple(v) for v in seen.values()}) > 1 or any(len(v) > 1 for v in seen.values()):
            text = inputs[i] if isinstance(inputs[i], str) else f"<image {i}>"
            disagreements.append({"input_index": i, "input": text[:200], "labels": seen})
    return {"servers": kinds, "inputs_compared": len(common), "disagreements": disagreements,
            "labels_agree": not disagreements}


def settle(pids: list[int], timeout: float = 20.0) -> None:
    """Before a raw measurement: wait (at most `timeout`) until the servers are idle, so that work
    left over from the previous level (e.g. thread pools spinning down) does not slow the baseline."""
    import psutil

    procs = [psutil.Process(p) for p in pids]
    deadline = time.monotonic() + timeout
    for p in procs:
        p.cpu_percent(None)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if all(p.cpu_percent(None) < 5 for p in procs):
            return


def stats_of(server: Server) -> dict | None:
    """Batch statistics from our /metrics (forward passes and inputs per pass)."""
    if server.kind not in ("ours", "before"):
        return None
    import re

    import httpx

    try:
        text = httpx.get(server.url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    count = re.search(rf'hf_serve_batch_size_count{{model="{server.name}"}} (\S+)', text)
    total = re.search(rf'hf_serve_batch_size_sum{{model="{server.name}"}} (\S+)', text)
    if not count or not total or float(count.group(1)) == 0:
        return None
    return {"forward_passes": float(count.group(1)), "mean_batch": float(total.group(1)) / float(count.group(1))}


def summarise(out: dict, levels: list[int], generation: bool) -> dict:
    raw = {k: median([r[k] for r in out["raw"]]) for k in out["raw"][0]}
    summary: dict = {"raw": raw, "levels": {}}
    for c in levels:
        row = {}
        for kind, per in out["servers"].items():
            runs = per[str(c)]
            row[kind] = {k: median([r.get(k) for r in runs]) for k in (
                "throughput_rps", "tokens_per_s", "p50_ms", "p95_ms", "p99_ms", "client_cpu_pct", "rss_mb", "peak_rss_mb",
                "server_queue_p50_ms", "server_inference_p50_ms")}
            row[kind]["errors"] = sum(r["errors"] for r in runs)
        summary["levels"][str(c)] = row
    if generation:
        summary["ttft_ms"] = median(out["ttft_ms"])
        one = summary["levels"][str(levels[0])]["ours"]
        summary["targets"] = {
            "tokens_per_s_vs_sequential_generate_c1": one["tokens_per_s"] / raw["generate_tokens_per_s"],
            "ttft_vs_prompt_forward_ms": [summary["ttft_ms"], raw["prompt_forward_ms"]],
        }
        if len(levels) > 1:
            summary["targets"]["tokens_per_s_vs_sequential_generate_c8"] = (
                summary["levels"][str(levels[1])]["ours"]["tokens_per_s"] / raw["generate_tokens_per_s"])
        return summary
    # Paired ratios: each level's run against the raw measurement taken just before it (same
    # repetition), then the median over repetitions. On a shared machine the load changes from
    # minute to minute; pairing in time cancels most of it.
    n_levels = len(levels)
    for i, c in enumerate(levels):
        row = summary["levels"][str(c)]
        naive = out["servers"].get("naive")  # optional: the older ratios use it
        pairs = [(out["raw"][rep * n_levels + i], out["servers"]["ours"][str(c)][rep], naive[str(c)][rep] if naive else None)
                 for rep in range(len(out["servers"]["ours"][str(c)])) if rep * n_levels + i < len(out["raw"])]
        row["paired"] = {
            "ours_vs_raw_batched": median([o["throughput_rps"] / r["batched_inputs_per_s"] for r, o, _ in pairs]),
            "ours_p50_minus_raw_single_ms": median([o["p50_ms"] - r["single_forward_ms"] for r, o, _ in pairs]),
        }
        if naive:
            row["paired"]["ours_vs_naive"] = median([o["throughput_rps"] / n["throughput_rps"] for _, o, n in pairs if n["throughput_rps"]])
            row["paired"]["naive_p50_minus_raw_single_ms"] = median([n["p50_ms"] - r["single_forward_ms"] for r, _, n in pairs])
        if "tutorial" in out["servers"]:  # the same repetition's runs, side by side
            tut = out["servers"]["tutorial"][str(c)]
            ours_runs = out["servers"]["ours"][str(c)]
            row["paired"]["ours_vs_tutorial"] = median([o["throughput_rps"] / t["throughput_rps"]
                                                        for o, t in zip(ours_runs, tut, strict=False) if t["throughput_rps"]])
            row["paired"]["ours_vs_tutorial_runs"] = [o["throughput_rps"] / t["throughput_rps"]
                                                      for o, t in zip(ours_runs, tut, strict=False) if t["throughput_rps"]]
            row["paired"]["ours_p50_over_tutorial_p50"] = median([o["p50_ms"] / t["p50_ms"]
                                                                  for o, t in zip(ours_runs, tut, strict=False)])
            for other in [k for k in out["servers"] if k not in ("ours", "naive", "tutorial")]:  # A/B arms
                runs = out["servers"][other][str(c)]
                row["paired"][f"{other}_vs_tutorial"] = median([b["throughput_rps"] / t["throughput_rps"]
                                                                for b, t in zip(runs, tut, strict=False)])
                row["paired"][f"ours_vs_{other}"] = median([o["throughput_rps"] / b["throughput_rps"]
                                                            for o, b in zip(ours_runs, runs, strict=False)])
        if all("optimised_single_forward_ms" in r for r, _, _ in pairs):
            row["paired"]["ours_p50_minus_optimised_single_ms"] = median(
                [o["p50_ms"] - r["optimised_single_forward_ms"] for r, o, _ in pairs])
    targets = {}
    if "32" in summary["levels"]:
        paired = summary["levels"]["32"]["paired"]
        targets["c32_vs_raw_batched"] = paired["ours_vs_raw_batched"]
        if "ours_vs_naive" in paired:
            targets["c32_vs_naive"] = paired["ours_vs_naive"]
            targets["c32_vs_naive_met"] = targets["c32_vs_naive"] >= 3
        targets["c32_vs_raw_met"] = targets["c32_vs_raw_batched"] >= 0.85
        if "ours_vs_tutorial" in paired:
            targets["c32_vs_tutorial"] = paired["ours_vs_tutorial"]
            targets["c32_vs_tutorial_met"] = paired["ours_vs_tutorial"] >= 3
    if "1" in summary["levels"]:
        targets["c1_p50_minus_raw_single_ms"] = summary["levels"]["1"]["paired"]["ours_p50_minus_raw_single_ms"]
        targets["c1_p50_met"] = targets["c1_p50_minus_raw_single_ms"] <= 5
        one = summary["levels"]["1"]["paired"]
        if "ours_vs_tutorial" in one:
            # the 1-client target: >= 1.0x the tutorial's throughput (within 3 % counts as equal)
            targets["c1_vs_tutorial"] = one["ours_vs_tutorial"]
            targets["c1_vs_tutorial_met"] = one["ours_vs_tutorial"] >= 0.97
            targets["c1_p50_over_tutorial_p50"] = one["ours_p50_over_tutorial_p50"]
        if "ours_p50_minus_optimised_single_ms" in summary["levels"]["1"]["paired"]:
            targets["c1_p50_minus_optimised_single_ms"] = summary["levels"]["1"]["paired"]["ours_p50_minus_optimised_single_ms"]
            # like for like: the server runs the folded, channels-last model, so its overhead is measured
            # against that forward (the stock model's forward is slower and would hide part of it)
            targets["c1_p50_met"] = targets["c1_p50_minus_optimised_single_ms"] <= 5
    summary["targets"] = targets
    return summary


# -- report ---------------------------------------------------------------------------------------

def print_tables(results: dict) -> None:
    for name, m in results["models"].items():
        s = m["summary"]
        raw = s["raw"]
        print(f"\n### {name} ({m['task']})")
        if m["task"] == "text-generation":
            rows = [["sequential generate (raw)", raw["generate_tokens_per_s"], "1.00x", "-", "-"]]
            for c, row in s["levels"].items():
                o = row["ours"]
                rows.append([f"ours, {c} client(s)", o["tokens_per_s"], f"{o['tokens_per_s'] / raw['generate_tokens_per_s']:.2f}x",
                             o["p50_ms"], o["errors"]])
            print(table(["", "tokens/s", "vs raw", "p50 request (ms)", "errors"], rows))
            print(f"time to first streamed token {s['ttft_ms']:.1f} ms vs one {PROMPT_TOKENS}-token prompt forward "
                  f"{raw['prompt_forward_ms']:.1f} ms")
            continue
        print(f"raw batched forward ({MAX_BATCH}): {raw['batched_inputs_per_s']:.1f} inputs/s; "
              f"raw single forward: {raw['single_forward_ms']:.1f} ms")
        rows = []
        has_tutorial = all("tutorial" in row for row in s["levels"].values())
        has_naive = all("naive" in row for row in s["levels"].values())
        for c, row in s["levels"].items():
            o = row["ours"]
            tut, nai = [], []
            if has_tutorial:
                t = row["tutorial"]
                tut = [t["throughput_rps"], f"{row['paired']['ours_vs_tutorial']:.2f}x",
                       f"{t['p50_ms']:.1f} / {t['p95_ms']:.1f} / {t['p99_ms']:.1f}"]
            if has_naive:
                n = row["naive"]
                nai = [n["throughput_rps"], f"{row['paired']['ours_vs_naive']:.2f}x",
                       f"{n['p50_ms']:.1f} / {n['p95_ms']:.1f} / {n['p99_ms']:.1f}", n["errors"], f"{n['peak_rss_mb']:.0f}"]
            rows.append([c, o["throughput_rps"], *tut[:2], *nai[:2], f"{row['paired']['ours_vs_raw_batched']:.0%}",
                         f"{o['p50_ms']:.1f} / {o['p95_ms']:.1f} / {o['p99_ms']:.1f}", *tut[2:], *nai[2:3],
                         o["errors"], *nai[3:4], f"{o['peak_rss_mb']:.0f}", *nai[4:], f"{o['client_cpu_pct']:.0f} %"])
        tut_heads = (["tutorial req/s", "ours/tutorial"], ["tutorial p50/p95/p99 ms"]) if has_tutorial else ([], [])
        nai_heads = (["naive req/s", "ours/naive", "naive p50/p95/p99 ms", "naive errors", "naive peak RSS MB"]
                     if has_naive else [])
        print(table(["clients", "ours req/s", *tut_heads[0], *nai_heads[:2], "ours/raw", "ours p50/p95/p99 ms",
                     *tut_heads[1], *nai_heads[2:3], "ours errors", *nai_heads[3:4], "ours peak RSS MB", *nai_heads[4:],
                     "client CPU"], rows))
        for other in [k for k in next(iter(s["levels"].values())) if k not in ("ours", "naive", "tutorial", "paired")]:
            print(f"A/B, ours vs {other} (req/s ratio; p50 ms {other} -> ours): " + "; ".join(
                f"{c} client(s) {row['paired'][f'ours_vs_{other}']:.2f}x, {row[other]['p50_ms']:.1f} -> {row['ours']['p50_ms']:.1f}"
                for c, row in s["levels"].items()))
        if "label_check" in m:
            lc = m["label_check"]
            print(f"labels ({', '.join(lc['servers'])}): {lc['inputs_compared']} inputs compared, "
                  f"{len(lc['disagreements'])} disagree")
            for d in lc["disagreements"][:5]:
                print(f"  {d['input']!r}: {d['labels']}")
        t = s["targets"]
        if "c1_vs_tutorial" in t:
            print(f"vs the tutorial server: c32 {t.get('c32_vs_tutorial', float('nan')):.2f}x (>= 3), c1 {t['c1_vs_tutorial']:.2f}x "
                  f"(>= 1.0, 3 % counts as equal), c1 p50 ours/tutorial {t['c1_p50_over_tutorial_p50']:.2f}")
        if t:
            naive = f"ours/naive {t['c32_vs_naive']:.2f}x (>= 3), " if "c32_vs_naive" in t else ""
            print(f"targets: c32 {naive}ours/raw {t.get('c32_vs_raw_batched', 0):.0%} "
                  f"(>= 85 %), c1 p50 - raw single = {t.get('c1_p50_minus_raw_single_ms', 0):+.1f} ms (<= 5)"
                  + (f"; minus the optimised single forward {t['c1_p50_minus_optimised_single_ms']:+.1f} ms"
                     if "c1_p50_minus_optimised_single_ms" in t else ""))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cls = [(n, m) for n, m in results["models"].items() if m["task"] != "text-generation"]
    gen = [(n, m) for n, m in results["models"].items() if m["task"] == "text-generation"]
    cols = max(len(cls), 1) + (1 if gen else 0)
    fig, axes = plt.subplots(2, cols, figsize=(4.2 * cols, 7.5), squeeze=False)
    for j, (name, m) in enumerate(cls):
        s = m["summary"]
        levels = [int(c) for c in s["levels"]]
        ax = axes[0][j]
        for kind, color in (("ours", "C0"), ("tutorial", "C1"), ("naive", "C3")):
            if kind in s["levels"][str(levels[0])]:
                ax.plot(levels, [s["levels"][str(c)][kind]["throughput_rps"] for c in levels], "o-", color=color, label=kind)
        ax.axhline(s["raw"]["batched_inputs_per_s"], color="grey", ls="--", label="raw batched forward")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{name}: throughput")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("requests/s")
        ax.legend(fontsize=7)
        ax = axes[1][j]
        for kind, color in (("ours", "C0"), ("tutorial", "C1"), ("naive", "C3")):
            if kind not in s["levels"][str(levels[0])]:
                continue
            ax.plot(levels, [s["levels"][str(c)][kind]["p50_ms"] for c in levels], "o-", color=color, label=f"{kind} p50")
            ax.plot(levels, [s["levels"][str(c)][kind]["p99_ms"] for c in levels], "x:", color=color, label=f"{kind} p99")
        ax.axhline(s["raw"]["single_forward_ms"], color="grey", ls="--", label="raw single forward")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{name}: latency")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
    if gen:
        name, m = gen[0]
        s = m["summary"]
        ax = axes[0][cols - 1]
        labels = ["sequential\ngenerate"] + [f"ours\n{c} client(s)" for c in s["levels"]]
        values = [s["raw"]["generate_tokens_per_s"]] + [r["ours"]["tokens_per_s"] for r in s["levels"].values()]
        ax.bar(labels, values, color=["grey"] + ["C0"] * len(s["levels"]))
        ax.set_title(f"{name}: generated tokens/s")
        ax = axes[1][cols - 1]
        ax.bar(["one prompt\nforward", "first streamed\ntoken"], [s["raw"]["prompt_forward_ms"], s["ttft_ms"]],
               color=["grey", "C0"])
        ax.set_title(f"{name}: time to first token (ms)")
    fig.suptitle(f"Serving on {results['hardware']['cpu']} ({results['hardware']['cores']} cores), "
                 f"median of {results['repeats']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, few requests, 1 repeat (seconds)")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--gen-concurrency", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=None, help="requests per level (default: per model)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for every server and torch threads of the raw forward (default: torch's). "
                             "On a CPU shared with other jobs use 1: a 2-thread OpenMP team stalls at every barrier "
                             "whose other core is busy (a MiniLM forward took 2 s instead of 10 ms at load average 10)")
    parser.add_argument("--servers", default=None,
                        help="classification servers, in the order each level runs them (default: tutorial,naive,ours,"
                             "ours-onnx, and ours-bf16 where the CPU has native bf16; ours must be among them; "
                             "naive is optional: the older ratios use it; ours-onnx: ours with HF_SERVE_BACKEND=onnx, "
                             "HF_SERVE_QUANTIZE=int8; ours-bf16: ours with HF_SERVE_DTYPE=bfloat16; ours-compile: ours with "
                             "HF_SERVE_BACKEND=torch-compile; before: ours from "
                             "BENCH_BEFORE_DIR's service/)")
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw",
                        help="load client: raw (a minimal keep-alive HTTP/1.1 client, little CPU) or httpx.AsyncClient "
                             "(what every run before 2026-12-03 used; several times the CPU per request)")
    parser.add_argument("--name", default="serving", help="results file name (benchmarks/results/<name>.json)")
    parser.add_argument("--summarise-only", action="store_true", help="recompute summaries, tables and plot from the JSON")
    args = parser.parse_args(argv)
    if args.summarise_only:
        path = RESULTS / f"{args.name}{'.quick' if args.quick else ''}.json"
        results = json.loads(path.read_text())
        for m in results["models"].values():
            gen = m["task"] == "text-generation"
            m["summary"] = summarise(m, [int(c) for c in next(iter(m["servers"].values()))], gen)
        write_results(args.name, results, args.quick)
        print_tables(results)
        plot(results, plot_path(args.name, args.quick))
        return 0
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.servers is None:  # emulated bf16 (AVX2 only) is many times slower: not worth a run there
        from training.precision import cpu_has_fast_bf16

        args.servers = "tutorial,naive,ours,ours-onnx" + (",ours-bf16" if cpu_has_fast_bf16() else "")
    args.servers = args.servers.split(",")
    if args.threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # every server subprocess inherits it
        torch.set_num_threads(args.threads)
    args.gen_concurrency = [int(c) for c in args.gen_concurrency.split(",")]
    models = QUICK_MODELS if args.quick else MODELS
    if args.quick:
        args.repeats, args.concurrency, args.gen_concurrency = 1, [1, 8], [1, 2]
    chosen = args.models.split(",") if args.models else list(models)

    hw = hardware()
    print_hardware(hw)
    results: dict = {"hardware": hw, "quick": args.quick, "repeats": args.repeats, "max_batch": MAX_BATCH,
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "servers": args.servers,
                     "client": f"{'RawHTTPClient' if args.client == 'raw' else 'httpx.AsyncClient'} closed loop on 127.0.0.1, same cores as the server", "models": {}}
    started = time.perf_counter()
    for name in chosen:
        results["models"][name] = bench_model(name, models[name], args)
        results["wall_s"] = round(time.perf_counter() - started, 1)
        path = write_results(args.name, results, args.quick)
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_results(args.name, results, args.quick)
    print_tables(results)
    png = plot_path(args.name, args.quick)
    plot(results, png)
    print(f"\nwrote {shown(path)} and {shown(png)} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
