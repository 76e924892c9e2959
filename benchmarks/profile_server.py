"""Profile our server under load: py-spy samples every thread while the closed-loop client runs.

    python benchmarks/profile_server.py --model minilm-demo --concurrency 32 --seconds 15
    -> benchmarks/results/profile-<kind>-<model>-c<N>.txt  (py-spy's top functions, own + total time)
       benchmarks/results/profile-<kind>-<model>-c<N>.svg  (flame graph)

Needs `pip install py-spy` (and ptrace rights: root, or kernel.yama.ptrace_scope=0).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, WORK  # noqa: E402
from benchmarks.serving import MODELS, Server, closed_loop, inputs_for  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-demo", choices=list(MODELS))
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--kind", default="ours", choices=["ours", "naive"])
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy")
    if not py_spy:
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    task, make_folder, _ = MODELS[args.model]
    server = Server(args.kind, args.model, task, make_folder())
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"profile-{args.kind}-{args.model}-c{args.concurrency}"
    try:
        server.wait_ready()
        inputs = inputs_for(task, 256)
        asyncio.run(closed_loop(server, task, inputs, 4 * args.concurrency, args.concurrency))  # warm-up
        svg = subprocess.Popen([py_spy, "record", "--pid", str(server.proc.pid), "--duration", str(args.seconds),
                                "--rate", "200", "--threads", "--output", f"{stem}.svg", "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        WORK.mkdir(parents=True, exist_ok=True)
        raw_path = WORK / f"{stem.name}.raw"
        raw = subprocess.Popen([py_spy, "record", "--pid", str(server.proc.pid), "--duration", str(args.seconds),
                                "--rate", "200", "--format", "raw", "--output", str(raw_path), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + args.seconds + 1
        total = 0
        while time.monotonic() < deadline:
            r = asyncio.run(closed_loop(server, task, inputs, 4 * args.concurrency, args.concurrency))
            total += r["requests"]
            print(f"{r['throughput_rps']:.1f} req/s, p50 {r['p50_ms']:.1f} ms", flush=True)
        svg.wait()
        raw.wait()
    finally:
        server.stop()
    summarise(raw_path, Path(f"{stem}.txt"))
    print(f"wrote {stem}.svg and {stem}.txt")
    return 0


def summarise(raw: Path, out: Path, top: int = 40) -> None:
    """Collapsed stacks -> share of samples per function (total = anywhere on the stack, own = leaf)."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            total[f] = total.get(f, 0) + n
    lines = [f"{samples} samples (all threads, idle included)", "", "total %  own %  function"]
    for f, n in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * n / samples:6.1f} {100 * own.get(f, 0) / samples:6.1f}  {f}")
    lines += ["", "top by own time:"]
    for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * n / samples:6.1f}  {f}")
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
