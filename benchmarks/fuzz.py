"""API fuzzing for minutes with a fresh random seed (`make fuzz`): schemathesis' CLI, every check
(`--checks all`), against a real server (`python -m service` in a subprocess).

    python benchmarks/fuzz.py                      # FUZZ_MINUTES (default 5), a new seed, tiny models
    python benchmarks/fuzz.py --minutes 1 --seed 1234
    python benchmarks/fuzz.py --demo               # the demo models in models/ when trained

The seed is printed first: `--seed N` replays the same cases. CI runs the bounded, derandomised
variant (tests/e2e/test_fuzz.py); this one explores further. Exit code: schemathesis' (0 = no
failure), or 1 when the server died or logged an error.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, start_service  # noqa: E402  (also sets the offline defaults)

DEMO = ("demo-sentiment", "demo-images", "demo-embeddings", "demo-generate")


def tiny_models(root: Path) -> Path:
    """One tiny real model per served task, plus a chat model (tests/tiny_models.py)."""
    sys.path.insert(0, str(REPO))
    from tests.tiny_models import (
        build_tiny_bert,
        build_tiny_gpt2,
        build_tiny_llama_chat,
        build_tiny_mobilenet_v2,
        build_tiny_sentence_encoder,
    )

    build_tiny_bert(root / "sentiment", labels=["negative", "positive"])
    build_tiny_gpt2(root / "writer")
    (root / "writer" / "README.md").write_text("---\npipeline_tag: text-generation\n---\n")
    build_tiny_llama_chat(root / "chatty")
    build_tiny_mobilenet_v2(root / "images", labels=["cat", "dog", "bird"])
    build_tiny_sentence_encoder(root / "embedder")
    return root


def demo_models(root: Path) -> Path:
    """Links to the trained demo models (models/demo-*), those that exist."""
    found = [name for name in DEMO if (REPO / "models" / name / "config.json").is_file()]
    if not found:
        raise SystemExit("no demo model in models/: run `make demo-train`, or fuzz the tiny models")
    for name in found:
        (root / name).symlink_to(REPO / "models" / name)
    return root


def start_server(models_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """The server as a user starts it, with a small generation cap so generated requests stay fast
    (anything above it must be a declared 422)."""
    return start_service(models_dir, ["--reload-interval-s", "0", "--max-new-tokens", "16", "--max-batch-wait-ms", "1",
                                      "--max-request-bytes", str(256 * 1024), "--log-level", "warning"], log_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("FUZZ_MINUTES", "5")),
                        help="time budget (default: FUZZ_MINUTES or 5)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: a fresh random seed)")
    parser.add_argument("--demo", action="store_true", help="fuzz the trained demo models instead of tiny ones")
    parser.add_argument("--report-dir", default=str(REPO / "benchmarks" / "results" / "fuzz"),
                        help="schemathesis' reports (JUnit XML and an ndjson event log)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"fuzz seed: {seed}   (replay: python benchmarks/fuzz.py --seed {seed} --minutes {args.minutes:g})", flush=True)

    root = Path(tempfile.mkdtemp(prefix="fuzz-models-"))
    log_path = root / "server.log"
    models_dir = (demo_models if args.demo else tiny_models)(root / "models")
    proc, url = start_server(models_dir, log_path)
    try:
        cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{url}/openapi.json",
               "--checks", "all", "--seed", str(seed), "--max-time", str(int(args.minutes * 60)),
               "--workers", "2", "--request-timeout", "60", "--continue-on-failure",
               # /admin/reload rescans the models folder: fuzzing it only reloads the same models.
               "--exclude-path", "/admin/reload",
               "--report", "junit,ndjson", "--report-dir", args.report_dir]
        print(" ".join(cmd), flush=True)
        code = subprocess.call(cmd, cwd=REPO)
        alive = proc.poll() is None and httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    log = log_path.read_text(errors="replace")
    errors = re.findall(r"^.*\b(?:ERROR|Traceback)\b.*$", log, re.M)
    print(f"fuzz seed {seed}: schemathesis exit {code}; server alive after the run: {alive}; "
          f"errors in the server log: {len(errors)}", flush=True)
    for line in errors[:10]:
        print("  " + line)
    shutil.rmtree(root, ignore_errors=True)
    if code == 0 and (not alive or errors):
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
