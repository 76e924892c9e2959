"""Each benchmark's --quick mode runs and writes its JSON (keeps benchmarks/ from rotting).

No timing is asserted: speed and quality numbers live in benchmarks/results/, produced by `make bench`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (ASSETS / "models" / "all-MiniLM-L6-v2").is_dir() or not (ASSETS / "data" / "fashion_mnist").is_dir(),
                       reason="offline assets not built (make assets)"),
]


@pytest.mark.parametrize("script, keys, extra, plots", [
    ("serving", ["models", "hardware"], [], True),
    ("training", ["summary", "hardware"], [], True),
    ("quality", ["rotten_tomatoes", "imdb", "fashion_mnist"], [], True),
    # the GPU check's whole path on this CPU (tiny configs): it only ever runs on a lent GPU otherwise
    ("gpu_check", ["training", "serving"], ["--device", "cpu"], False),
])
def test_quick_mode_writes_results(script, keys, extra, plots, tmp_path):
    env = {**os.environ, "BENCH_RESULTS_DIR": str(tmp_path / "results"), "BENCH_WORK_DIR": str(tmp_path / "work"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, f"benchmarks/{script}.py", "--quick", *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name = script.replace("_", "-")
    data = json.loads((tmp_path / "results" / f"{name}.quick.json").read_text())
    assert data["quick"] is True and all(key in data for key in keys)
    assert (tmp_path / "results" / f"{name}.quick.png").is_file() or not plots
    assert "| " in proc.stdout  # the table was printed
    if script == "serving":  # the load client got an answer to every request from every server
        for model in data["models"].values():
            runs = [run for levels in model["servers"].values() for reps in levels.values() for run in reps]
            assert runs and all(run["errors"] == 0 and run["throughput_rps"] > 0 for run in runs), model["folder"]
            if model["task"] != "text-generation":
                check = model["label_check"]
                assert check["inputs_compared"] > 0 and check["servers"] == data["servers"]
