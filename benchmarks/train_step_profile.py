"""Where one MiniLM training step's time goes: forward + backward, gradient clipping, AdamW step, for
AdamW's for-loop (torch's CPU default), foreach and fused kernels, and fused under bf16 autocast
(docs/performance.md, Training). Batch 32 x 48 tokens, torch's threads, median of 6 steps after 2.

    python benchmarks/train_step_profile.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

from benchmarks.common import MINILM, hardware, print_hardware, table  # noqa: E402


def step_ms(model, optimizer, x, y, autocast: bool, steps: int = 8) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=x, labels=y).loss
        loss.backward()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        times.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    kept = times[2:]
    return [1000 * sorted(column)[len(column) // 2] for column in zip(*kept, strict=True)]


def main() -> int:
    print_hardware(hardware())
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2).train()
    x, y = torch.randint(1000, 20000, (32, 48)), torch.randint(0, 2, (32,))
    rows = []
    for name, kwargs, autocast in (("float32, AdamW for-loop", {"foreach": False}, False),
                                   ("float32, foreach", {"foreach": True}, False),
                                   ("float32, fused", {"fused": True}, False),
                                   ("bf16 autocast, fused", {"fused": True}, True)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **kwargs)
        fwd_bwd, clip, opt = step_ms(model, optimizer, x, y, autocast)
        rows.append([name, fwd_bwd, clip, opt, fwd_bwd + clip + opt])
    print(table(["", "forward + backward (ms)", "clip (ms)", "AdamW step (ms)", "step (ms)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
