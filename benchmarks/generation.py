"""Generation serving benchmark: our continuous batching vs `transformers serve --continuous-batching`
(transformers' own OpenAI server) and raw batched `model.generate` (the limit), side by side.

    python benchmarks/generation.py                     # SmolLM2-135M (real) + GPT-2 124M (random), 2 repeats
    python benchmarks/generation.py --models gpt2 --repeats 3
    python benchmarks/generation.py --quick             # a tiny GPT-2, seconds

Same run, same CPU, interleaved per repetition (raw, ours, peer). Workload: greedy, 32-token prompts
cut from Rotten Tomatoes sentences, 32 new tokens; EOS is cleared in both models' copies so that
every request generates exactly 32 tokens on both sides (asserted on every response). Load: N
closed-loop clients (1, 4, 8, 16) streaming from `POST /v1/completions` on both servers; tokens/s
is completion tokens over the level's wall time; time to first token is the p50 over the requests
after each client's first one. Both servers get the same KV cache size (tokens):
`--max-batch-total-tokens` for ours, `--cb-block-size x --cb-num-blocks` for the peer.
raw: `model.generate` on B left-padded prompts at once in this process (B = the client count).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    ASSETS,
    GPT2_TOKENIZER,
    REPO,
    WORK,
    build_gpt2,
    free_port,
    hardware,
    median,
    percentile,
    print_hardware,
    python,
    rss_mb,
    rt_sentences,
    shown,
    table,
    write_results,
)

PROMPT_TOKENS, NEW_TOKENS = 32, 32
KV_TOKENS = 2048  # both servers' KV cache: 16 sequences of 64 tokens, twice over
BLOCK = 32


def prepared_folder(name: str, quick: bool) -> Path:
    """A copy of the model whose EOS is cleared (config and generation config)."""
    target = WORK / f"gen-{name}{'-quick' if quick else ''}"
    if (target / "config.json").is_file():
        return target
    if name == "smollm2":
        source = ASSETS / "models" / "smollm2-135m-instruct"
    else:
        source = build_gpt2(WORK / f"gpt2-{'tiny' if quick else '124m'}", size="tiny" if quick else "gpt2")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    for file in ("config.json", "generation_config.json"):
        data = json.loads((tmp / file).read_text())
        data["eos_token_id"] = None
        (tmp / file).write_text(json.dumps(data, indent=1))
    tmp.rename(target)
    return target


def prompts(folder: Path, n: int) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder if (folder / "tokenizer.json").exists() else GPT2_TOKENIZER)
    out = []
    for sentence in rt_sentences("test"):
        ids = tok(" ".join([sentence] * 4), add_special_tokens=False)["input_ids"][:PROMPT_TOKENS]
        text = tok.decode(ids)
        if len(tok(text, add_special_tokens=False)["input_ids"]) == PROMPT_TOKENS:  # round-trips to 32
            out.append(text)
        if len(out) == n:
            return out
    raise RuntimeError("not enough prompts")


# -- raw batched generate --------------------------------------------------------------------------

def raw_tokens_per_s(folder: Path, texts: list[str], batch: int, rounds: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.convert_ids_to_tokens(0)
    model = _model_cache.get(folder) or AutoModelForCausalLM.from_pretrained(folder).eval()
    _model_cache[folder] = model
    generated, elapsed = 0, 0.0
    for r in range(rounds):
        chunk = texts[r * batch:(r + 1) * batch]
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        elapsed += time.perf_counter() - start
        new = out.shape[1] - enc["input_ids"].shape[1]
        assert new == NEW_TOKENS, new
        generated += new * len(chunk)
    return generated / elapsed


_model_cache: dict = {}


# -- servers ---------------------------------------------------------------------------------------

class Server:
    """Our server on one model folder (served as `model`), or on a whole models folder
    (`adapter_mode` given: benchmarks/adapters.py); or the peer, `transformers serve`."""

    def __init__(self, kind: str, folder: Path, log: Path, adapter_mode: str | None = None):
        self.kind, self.port = kind, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        models = WORK / f"served-{folder.name}"
        if kind == "ours":
            flags = ["--max-batch-total-tokens", str(KV_TOKENS)]
            if adapter_mode is not None:
                models, flags = folder, ["--adapter-mode", adapter_mode]
            else:
                models.mkdir(parents=True, exist_ok=True)
                link = models / "model"
                if not link.exists():
                    link.symlink_to(folder, target_is_directory=True)
            cmd = [python(), "-m", "service", "--models-dir", str(models), "--port", str(self.port),
                   "--reload-interval-s", "0", "--log-level", "warning", *flags]
            self.model = "model"
        else:
            exe = Path(python()).with_name("transformers")
            cmd = [str(exe), "serve", str(folder), "--continuous-batching", "--device", "cpu", "--port", str(self.port),
                   "--host", "127.0.0.1", "--cb-block-size", str(BLOCK), "--cb-num-blocks", str(KV_TOKENS // BLOCK)]
            self.model = str(folder)
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})

    def wait(self, timeout: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        path = "/ready" if self.kind == "ours" else "/v1/models"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited ({self.proc.returncode}); see {self.log.name}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.kind} server not ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


async def one_request(client, server: Server, prompt: str) -> tuple[int, float, float]:
    """(completion tokens, seconds to the first token, seconds in all) of one streamed completion."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens, pieces = None, None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    pieces += 1
                    if first is None:
                        first = time.perf_counter() - start
    if tokens is None:  # a server that does not send usage: count the streamed pieces
        tokens = pieces
    assert tokens == NEW_TOKENS, f"{server.kind}: {tokens} tokens, expected {NEW_TOKENS}"
    return tokens, first or 0.0, time.perf_counter() - start


async def closed_loop(server: Server, texts: list[str], clients: int, per_client: int) -> dict:
    import httpx

    results: list[tuple[int, float, float, int]] = []

    async def client_loop(c: int, http) -> None:
        for i in range(per_client):
            prompt = texts[(c * per_client + i) % len(texts)]
            tokens, ttft, total = await one_request(http, server, prompt)
            results.append((tokens, ttft, total, i))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as http:
        await one_request(http, server, texts[0])  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(c, http) for c in range(clients)))
        wall = time.perf_counter() - start
    later = [r[1] for r in results if r[3] > 0] or [r[1] for r in results]
    return {"tokens_per_s": sum(r[0] for r in results) / wall, "ttft_p50_ms": percentile(later, 50) * 1000,
            "latency_p50_s": percentile([r[2] for r in results], 50), "requests": len(results), "wall_s": wall}


def bench_model(name: str, args) -> dict:
    folder = prepared_folder(name, args.quick)
    texts = prompts(folder, 96)
    levels = [1, 4, 8, 16] if not args.quick else [1, 4]
    runs: dict = {"raw": {}, "ours": {}, "peer": {}}
    for rep in range(args.repeats):
        for level in levels:
            runs["raw"].setdefault(level, []).append(raw_tokens_per_s(folder, texts, level, 1))
        for kind in ("ours", "peer"):
            server = Server(kind, folder, WORK / "logs" / f"gen-{name}-{kind}-{rep}.log")
            try:
                server.wait()
                for level in levels:
                    per_client = max(1, args.requests // level) if not args.quick else 2
                    res = asyncio.run(closed_loop(server, texts, level, per_client))
                    res["rss_mb"] = rss_mb(server.proc.pid)[0]
                    runs[kind].setdefault(level, []).append(res)
                    print(f"  {name} rep {rep} {kind:4s} {level:2d} clients: {res['tokens_per_s']:.1f} tok/s, "
                          f"TTFT p50 {res['ttft_p50_ms']:.0f} ms", flush=True)
            finally:
                server.stop()
    _model_cache.clear()
    summary = {}
    for level in levels:
        ours = median([r["tokens_per_s"] for r in runs["ours"][level]])
        peer = median([r["tokens_per_s"] for r in runs["peer"][level]])
        raw = median(runs["raw"][level])
        summary[level] = {
            "ours_tokens_per_s": ours, "peer_tokens_per_s": peer, "raw_tokens_per_s": raw,
            "ours_vs_peer": ours / peer, "ours_vs_raw": ours / raw,
            "ours_ttft_p50_ms": median([r["ttft_p50_ms"] for r in runs["ours"][level]]),
            "peer_ttft_p50_ms": median([r["ttft_p50_ms"] for r in runs["peer"][level]]),
            "ours_rss_mb": median([r["rss_mb"] for r in runs["ours"][level]]),
            "peer_rss_mb": median([r["rss_mb"] for r in runs["peer"][level]]),
        }
    return {"levels": summary, "runs": runs}


def print_table(name: str, result: dict) -> None:
    rows = []
    for level, s in result["levels"].items():
        rows.append([level, f"{s['ours_tokens_per_s']:.1f}", f"{s['peer_tokens_per_s']:.1f}", f"{s['ours_vs_peer']:.2f}x",
                     f"{s['raw_tokens_per_s']:.1f}", f"{100 * s['ours_vs_raw']:.0f} %",
                     f"{s['ours_ttft_p50_ms']:.0f} / {s['peer_ttft_p50_ms']:.0f}",
                     f"{s['ours_rss_mb']:.0f} / {s['peer_rss_mb']:.0f}"])
    print(f"\n{name}: tokens/s (32 prompt + 32 new tokens, greedy)")
    print(table(["clients", "ours", "transformers serve", "ours/peer", "raw generate", "ours/raw",
                 "TTFT p50 ms ours / peer", "RSS MB ours / peer"], rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "gpt2"], choices=["smollm2", "gpt2"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--requests", type=int, default=16, help="requests per level, spread over its clients (at least 1 each)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.repeats = ["gpt2"], 1
    hw = hardware()
    print_hardware(hw)
    results = {"hardware": hw, "models": {}}
    for name in args.models:
        results["models"][name] = bench_model(name, args)
        print_table(name, results["models"][name])
    path = write_results("generation", results, quick=args.quick)
    print(f"\nresults: {shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
