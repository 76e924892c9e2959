"""Fine-tune a Hugging Face model: recipe -> data -> model -> Accelerate loop -> export.

    accelerate launch training/finetune.py --recipe training/recipes/demo-sentiment.yaml [--flag value ...]

Mixed precision and the number of processes come from `accelerate launch` / `accelerate config`.
`--help` lists every option.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch training/finetune.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed

from training.config import ConfigError, FinetuneConfig, parse_args
from training.data import load_raw_datasets
from training.export import RESULTS_FILE, export_model, recover_interrupted_export
from training.loop import CheckpointError, checkpoints_dir, train, world_info
from training.tasks import build_task

logger = logging.getLogger("training")


def check_output_dir(config: FinetuneConfig) -> None:
    """Refuse to clobber a foreign folder or silently restart an existing run."""
    out = Path(config.output_dir)
    recover_interrupted_export(out)  # a previous export killed half-way: put its checkpoints back
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--output_dir {out} is a file")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    ours = (out / "checkpoints").is_dir() or (out / RESULTS_FILE).is_file()
    if not ours and not config.overwrite_output_dir:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(f"--output_dir {out} is not empty and is not a run of this script ({shown}); "
                          "choose another folder or pass --overwrite_output_dir")
    if (out / "checkpoints").is_dir() and not config.resume_from_checkpoint:
        if not config.overwrite_output_dir:
            raise ConfigError(f"--output_dir {out} holds checkpoints of an earlier run: continue it with "
                              "--resume_from_checkpoint latest, or pass --overwrite_output_dir to start over")
        shutil.rmtree(out / "checkpoints")


class ExportError(RuntimeError):
    """Writing the final model folder failed; the previous folder is untouched."""


def run(config: FinetuneConfig) -> Path:
    """Train and export; returns the model folder."""
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=config.report_to if config.with_tracking else None,
        project_dir=config.output_dir,
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        datefmt="%H:%M:%S")
    if not accelerator.is_local_main_process:
        logging.getLogger().setLevel(logging.ERROR)
        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()  # the new-head warning is expected here
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    logger.info("%d process(es), device %s, mixed precision %s", accelerator.num_processes,
                accelerator.device, accelerator.mixed_precision)

    if accelerator.is_main_process:
        check_output_dir(config)
        checkpoints_dir(config).mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(config.seed)

    with accelerator.main_process_first():  # the main process fills the datasets cache first
        raw = load_raw_datasets(config)
        bundle = build_task(config, raw)
    logger.info("data: %s", {split: len(ds) for split, ds in raw.items()})
    if bundle.labels:
        logger.info("labels: %s", ", ".join(bundle.labels.names))

    result = train(config, accelerator, bundle)
    accelerator.wait_for_everyone()
    out = Path(config.output_dir)
    if accelerator.is_main_process:
        try:
            out = export_model(config, bundle, result.best_dir, result.final_metrics, result.state.log_history,
                               world_info(accelerator))
        except OSError as err:
            raise ExportError(f"could not export the model to {out}: {err}. The previous content of {out} is "
                              "unchanged and no partial folder was left; the training state is kept: export again "
                              "with --resume_from_checkpoint latest") from err
        shown = {k: v for k, v in result.final_metrics.items() if isinstance(v, (int, float))}
        logger.info("results: %s", ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
        logger.info("model saved to %s", out)
    accelerator.wait_for_everyone()
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; user errors print one line and exit with code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        config = parse_args(argv)
        run(config)
    except ConfigError as err:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, ExportError) as err:  # disk full and the like: one clear line, exit code 1
        logger.debug("details", exc_info=err)
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
