"""Test-side launcher: training/finetune.py's `main()` with a real fault injected at a named point.

    python tests/training/fault_launcher.py <finetune flags ...>
    accelerate launch tests/training/fault_launcher.py <finetune flags ...>

The product has no test switches: this script patches the functions the fault belongs to, then runs
the unchanged `main()` in this (real, separate) process. The fault comes from the environment:

  KILL_AT_STEP=N                  SIGKILL the process right after optimizer step N: exactly what `kill -9`
                                  at that moment does (no cleanup, no flush), without racing a timer.
  EXPORT_FAULT=<stage>:<action>   fail the export at a stage (weights, processor, results, card: just after
                                  writing those files; swap: instead of the swap; after-swap: just after it)
                                  with `raise` (ENOSPC, a full disk) or `kill` (SIGKILL).
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout this file belongs to

from training import export, finetune, loop  # noqa: E402

# stage -> (function of training.export, fail before or after it runs)
EXPORT_STAGES = {
    "weights": ("write_weights", "after"),
    "processor": ("write_processor", "after"),
    "results": ("write_results", "after"),
    "card": ("write_card", "after"),
    "swap": ("replace_dir", "before"),  # export's own binding; loop.py's checkpoint swaps are not touched
    "after-swap": ("replace_dir", "after"),
}


def fail(stage: str, action: str) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, f"No space left on device (injected by fault_launcher.py at {stage})")


def inject_export_fault(spec: str) -> None:
    stage, _, action = spec.partition(":")
    if stage not in EXPORT_STAGES or action not in ("raise", "kill"):
        raise SystemExit(f"EXPORT_FAULT={spec!r}: want <{'|'.join(EXPORT_STAGES)}>:<raise|kill>")
    name, when = EXPORT_STAGES[stage]
    real = getattr(export, name)

    @functools.wraps(real)
    def failing(*args, **kwargs):
        if when == "before":
            fail(stage, action)
        real(*args, **kwargs)
        fail(stage, action)

    setattr(export, name, failing)


def kill_at_step(step: int) -> None:
    """Replace the loop's TrainerState with one that SIGKILLs the process when global_step reaches `step`
    by counting up (not when a checkpoint's state is loaded)."""

    class KillAtStep(loop.TrainerState):
        def __setattr__(self, name: str, value) -> None:
            counting_up = name == "global_step" and self.__dict__.get(name) == step - 1
            super().__setattr__(name, value)
            if counting_up and value == step:
                os.kill(os.getpid(), signal.SIGKILL)

    loop.TrainerState = KillAtStep


if __name__ == "__main__":
    if os.environ.get("KILL_AT_STEP"):
        kill_at_step(int(os.environ["KILL_AT_STEP"]))
    if os.environ.get("EXPORT_FAULT"):
        inject_export_fault(os.environ["EXPORT_FAULT"])
    sys.exit(finetune.main(sys.argv[1:]))
