"""Fine-tune a Hugging Face model: recipe -> data -> model -> Accelerate loop -> export.

    accelerate launch training/finetune.py --recipe training/recipes/demo-sentiment.yaml [--flag value ...]

Mixed precision and the number of processes come from `accelerate launch` / `accelerate config`.
`--help` lists every option.

A run has two folders: the model folder (`--output_dir`, what is served: the exported model and
nothing else) and the run folder (`--run_dir`, default `runs/<name>`: checkpoints, tracker logs).
Everything that can be checked (folders, files, columns, labels) is checked before the first write,
so a run refused for bad input leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch training/finetune.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets
import transformers
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from training import precision
from training.config import ConfigError, FinetuneConfig, parse_args, run_folder
from training.data import load_raw_datasets
from training.export import RESULTS_FILE, export_model
from training.loop import STATE_FILE, CheckpointError, checkpoints_dir, list_checkpoints, train, world_info
from training.tasks import build_task

logger = logging.getLogger("training")


@dataclass(frozen=True)
class RunPlan:
    """What a run will do with its folders, decided before anything is written (see check_folders)."""

    resume_dir: Path | None = None
    """The checkpoint to resume from, at the place it has once the plan is carried out; None: fresh start."""
    clear: list[Path] = field(default_factory=list)
    """Training state of an earlier attempt that a fresh start removes."""
    move: tuple[Path, Path] | None = None
    """A previous version's `<output_dir>/checkpoints`, and where it goes in the run folder."""


def legacy_checkpoints_dir(config: FinetuneConfig) -> Path:
    """Where versions before the run folder kept the training state: inside the model folder."""
    return Path(config.output_dir) / "checkpoints"


def check_folders(config: FinetuneConfig) -> RunPlan:
    """Refuse to clobber a foreign folder or silently restart an earlier run; find the checkpoint to
    resume from. Only reads: nothing is written until the data has been checked too."""
    out, run = Path(config.output_dir), run_folder(config)
    # Export writes a temporary folder beside the model folder; checkpoints go inside the run folder.
    for flag, folder, written in (("--output_dir", out, out.parent), ("--run_dir", run, run)):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{flag} {folder} is a file")
        existing = next(p for p in (written.absolute(), *written.absolute().parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {folder} cannot be written ({existing} is not a writable folder); "
                              f"choose another one with {flag}")
    ckpts, legacy = checkpoints_dir(config), legacy_checkpoints_dir(config)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    ours = (out / RESULTS_FILE).is_file() or legacy.is_dir()
    if entries and not ours and not config.overwrite_output_dir:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(f"--output_dir {out} is not empty and is not a run of this script ({shown}); "
                          "choose another folder or pass --overwrite_output_dir")
    # Only a complete checkpoint is an earlier run: an empty folder or a half-written save is not.
    earlier = list_checkpoints(ckpts) or list_checkpoints(legacy)
    resume = config.resume_from_checkpoint
    if not resume:
        if earlier and not config.overwrite_output_dir:
            flag = "--run_dir" if earlier[-1].parent == ckpts else "--output_dir"
            raise ConfigError(f"{flag} {earlier[-1].parent.parent} holds checkpoints of an earlier run "
                              f"({earlier[-1].name}): continue it with --resume_from_checkpoint latest, or "
                              "pass --overwrite_output_dir to start over")
        return RunPlan(clear=[p for p in (ckpts, legacy) if p.exists()])
    if resume == "latest":
        if not earlier:
            logger.warning("no checkpoint in %s: starting from scratch", ckpts)
            return RunPlan(clear=[p for p in (ckpts, legacy) if p.exists()])
        resume_dir = earlier[-1]
    else:
        resume_dir = Path(resume)
        if not (resume_dir / STATE_FILE).is_file():
            raise ConfigError(f"{resume_dir} is not a checkpoint folder (no {STATE_FILE})")
    if list_checkpoints(legacy) and not list_checkpoints(ckpts) and resume_dir.resolve().is_relative_to(
            legacy.resolve()):  # a run of the previous version: its state moves to the run folder
        return RunPlan(resume_dir=ckpts / resume_dir.resolve().relative_to(legacy.resolve()), move=(legacy, ckpts))
    return RunPlan(resume_dir=resume_dir)


def prepare_folders(plan: RunPlan) -> None:
    """Carry out the plan: the first writes of a run, once everything has been checked."""
    for folder in plan.clear:
        shutil.rmtree(folder)
    if plan.move is not None:
        legacy, ckpts = plan.move
        if ckpts.exists():
            shutil.rmtree(ckpts)  # no complete checkpoint in it (check_folders): leftovers only
        ckpts.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(legacy), str(ckpts))  # a rename on one file system
        logger.info("checkpoints of an earlier version found in %s: moved to %s, where the training state "
                    "of this run now goes", legacy, ckpts)


def check_launch(accelerator: Accelerator, environ=os.environ) -> None:
    """Refuse processes that were launched together but did not join one group; warn when FSDP was
    asked for and Accelerate runs without it. `environ`: the launcher's variables (WORLD_SIZE, ...)."""
    launched = environ.get("WORLD_SIZE")
    if launched is not None and int(launched) != accelerator.num_processes:
        # e.g. an FSDP config on a machine without GPUs: torchrun starts the processes, but each one
        # runs alone; they would all train separately and write the same folders.
        raise ConfigError(f"{launched} processes were launched (WORLD_SIZE={launched}) but Accelerate runs "
                          f"{accelerator.num_processes}; on CPU launch with --multi_gpu and ACCELERATE_USE_CPU=true "
                          "(FSDP and DeepSpeed need GPUs; see docs/deployment.md)")
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.distributed_type != DistributedType.FSDP:
        logger.warning("FSDP was asked for, but Accelerate runs %s (FSDP needs GPUs): nothing is sharded",
                       accelerator.distributed_type.value)


class ExportError(RuntimeError):
    """Writing the final model folder failed; the previous folder is untouched."""


def run(config: FinetuneConfig) -> Path:
    """Train and export; returns the model folder."""
    accelerator = Accelerator(
        mixed_precision=precision.resolve(config.mixed_precision),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=config.report_to if config.with_tracking else None,
        project_dir=str(run_folder(config)),  # tracker logs go to the run folder
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
    check_launch(accelerator)
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cpu" and (note := precision.emulated_bf16_note()):
        logger.warning("mixed precision bf16 was asked for, but %s; --mixed_precision no trains faster here", note)

    # Check everything before writing anything: the folders, then the data (files, columns, labels).
    plan = check_folders(config)
    set_seed(config.seed)
    with accelerator.main_process_first():  # the main process fills the datasets cache first
        data = load_raw_datasets(config)
        bundle = build_task(config, data.splits)
    logger.info("data: %s", {split: len(ds) for split, ds in data.splits.items()})
    if data.train_samples_per_class:
        logger.info("validation split off train: %d training examples per class", data.train_samples_per_class)
    if bundle.labels:
        logger.info("labels: %s", ", ".join(bundle.labels.names))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        prepare_folders(plan)
    accelerator.wait_for_everyone()

    result = train(config, accelerator, bundle, plan.resume_dir)
    accelerator.wait_for_everyone()
    results = dict(result.final_metrics)
    if data.train_samples_per_class:
        results["train_samples_per_class"] = data.train_samples_per_class
    out = Path(config.output_dir)
    if accelerator.is_main_process:
        samples = None
        if bundle.samples is not None:  # the model holds the best weights now (train() loaded them)
            samples = bundle.samples(bundle.model)
            for sample in samples:
                logger.info("sample: %r -> %r", sample["prompt"][:80], sample["generated"][:160])
        try:
            out = export_model(config, bundle, result.best_dir, results, result.state.log_history,
                               world_info(accelerator), samples)
        except OSError as err:
            raise ExportError(f"could not export the model to {out}: {err}. The previous content of {out} is "
                              f"unchanged and no partial folder was left; the training state is kept in "
                              f"{checkpoints_dir(config)}: export again with --resume_from_checkpoint latest") from err
        shown = {k: v for k, v in results.items() if isinstance(v, (int, float))}
        logger.info("results: %s", ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
        logger.info("model saved to %s, training state in %s", out, checkpoints_dir(config))
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
