"""Multi-node training, on one machine: two "nodes" of one CPU process each, joined over loopback
by Accelerate's launcher (torchrun, one agent per node meeting at 127.0.0.1:<port>, gloo), the way
deploy/slurm/train_multinode.sbatch starts one launcher per node. Both nodes share the run and model folders, as nodes share a network
file system.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from tests.service.service_helpers import free_port
from tests.training.subprocess_runs import CPU_DISTRIBUTED, distributed_args, distributed_launcher, start

EVAL_EXAMPLES = 41  # distributed_args: odd, so the last batch is padded on one rank


def _stop(process: subprocess.Popen) -> None:
    """Kill a launcher and the workers it started (its own process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.slow
@pytest.mark.xdist_group("two-process-run")  # shares test_loop.py's run of the two_process_run fixture
def test_two_nodes_over_loopback_train_like_two_processes_on_one_node(two_process_run, tiny_bert, rt_small,
                                                                      tmp_path):
    train, test = rt_small
    port = free_port()
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = [start(distributed_args(tiny_bert, train, test, "ddp"), tmp_path, log, CPU_DISTRIBUTED,
                   launcher=distributed_launcher(num_machines=2, machine_rank=rank, port=port), new_session=True)
             for rank, log in enumerate(logs)]
    try:
        codes = [node.wait(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            _stop(node)
    stderr = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n\n".join(text[-3000:] for text in stderr)

    # Each node's process is its node's main process and logs the world it joined: both see 2 processes.
    for rank, text in enumerate(stderr):
        assert "2 process(es)" in text, f"node {rank}: {text[-2000:]}"
    run = tmp_path / "runs" / "ddp" / "checkpoints" / "step_6"
    assert (run / "random_states_0.pkl").is_file() and (run / "random_states_1.pkl").is_file()  # both ranks saved

    out = tmp_path / "models" / "ddp"
    results = json.loads((out / "all_results.json").read_text())
    # Every evaluation example counted once across the two nodes (gather_for_metrics drops the padding).
    assert sum(map(sum, results["eval_confusion_matrix"])) == EVAL_EXAMPLES
    assert results["eval_examples"] == EVAL_EXAMPLES
    assert results["train_steps"] == 6
    assert "2 process(es)" in (out / "README.md").read_text()

    # The same run as 2 processes on one node, with the same seed: same metrics, same exported weights.
    reference_cwd, _ = two_process_run
    reference_dir = reference_cwd / "models" / "ddp"
    reference = json.loads((reference_dir / "all_results.json").read_text())
    assert results["eval_confusion_matrix"] == reference["eval_confusion_matrix"]
    for key in ("eval_loss", "eval_accuracy", "train_loss"):
        assert results[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-6), key
    assert results["best_step"] == reference["best_step"]
    weights, expected = load_file(out / "model.safetensors"), load_file(reference_dir / "model.safetensors")
    assert weights.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
