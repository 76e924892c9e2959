"""Adapter serving memory: the server's RSS with three LoRA adapters on the real SmolLM2-135M, in
`adapter_mode=merge` (each adapter merged into its own copy of the base) and `share` (one base in
memory), against the base model served alone. Same run, same machine.

    python benchmarks/adapters.py [--adapters 3]

The adapters are LoRA r=16 on every attention and MLP projection, with random (non-zero) weights:
what they cost in memory and time does not depend on what they learned. Each mode: start the
server, wait for /ready, send one generation to every adapter (so each has run), read RSS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ASSETS, WORK, hardware, print_hardware, rss_mb, shown, table, write_results  # noqa: E402
from benchmarks.generation import Server  # noqa: E402

SMOLLM2 = ASSETS / "models" / "smollm2-135m-instruct"


def build(root: Path, count: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (root / f"adapter-{count - 1}" / "adapter_model.safetensors").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "smollm2").symlink_to(SMOLLM2, target_is_directory=True)
    base = AutoModelForCausalLM.from_pretrained(SMOLLM2)
    config = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    for i in range(count):
        torch.manual_seed(i)
        model = get_peft_model(base, config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.01)
        out = root / f"adapter-{i}"
        model.save_pretrained(out)
        adapter = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**adapter, "base_model_name_or_path": str(SMOLLM2)}))
        base = model.unload()  # the plain base again, for the next adapter
    return root


def measure(root: Path, mode: str, names: list[str]) -> dict:
    import httpx

    served = WORK / f"adapters-{mode}"
    shutil.rmtree(served, ignore_errors=True)
    served.mkdir(parents=True)
    for name in names:
        (served / name).symlink_to((root / name).resolve(), target_is_directory=True)
    server = Server("ours", served, WORK / "logs" / f"adapters-{mode}.log", adapter_mode=mode)
    try:
        start = time.perf_counter()
        server.wait(timeout=600)
        ready_s = time.perf_counter() - start
        with httpx.Client(base_url=server.url, timeout=300) as client:
            for name in names:
                r = client.post(f"/models/{name}", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}})
                assert r.status_code == 200, r.text
            statuses = {m["name"]: m["status"] for m in client.get("/models").json()["models"]}
        assert all(statuses[n] == "ready" for n in names), statuses
        rss, peak = rss_mb(server.proc.pid)
        return {"rss_mb": rss, "peak_rss_mb": peak, "ready_s": ready_s}
    finally:
        server.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=3)
    args = parser.parse_args(argv)
    hw = hardware()
    print_hardware(hw)
    root = build(WORK / "adapter-folders", args.adapters)
    adapters = [f"adapter-{i}" for i in range(args.adapters)]
    results = {"hardware": hw, "adapters": args.adapters,
               "base alone": measure(root, "merge", ["smollm2"]),
               "merge": measure(root, "merge", adapters),
               "share": measure(root, "share", adapters)}
    rows = [[k, f"{v['rss_mb']:.0f}", f"{v['peak_rss_mb']:.0f}", f"{v['ready_s']:.1f}"]
            for k, v in results.items() if isinstance(v, dict) and "rss_mb" in v]
    print(f"\nserver memory with {args.adapters} LoRA adapters on SmolLM2-135M")
    print(table(["served", "RSS MB", "peak RSS MB", "ready after s"], rows))
    path = write_results("adapters", results)
    print(f"\nresults: {shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
