"""The Accelerate training loop: accumulate, evaluate, keep the best, checkpoint/resume, stop early.

Plain PyTorch: Accelerate contributes `prepare`, `accumulate`, `backward`, `gather_for_metrics`
and `save_state`/`load_state`. Resuming is exact: the data order of every epoch is a function
of (seed, epoch) (see sampler.py), the checkpoint holds model, optimizer, scheduler and RNG
states, and the batches of the interrupted epoch that were already consumed are skipped.

All training state lives in the run folder (`runs/<name>/checkpoints/`: `step_N` checkpoints and
`best`, the best weights so far), never in the model folder that export writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time

try:
    import resource
except ImportError:  # Windows
    resource = None
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from training import lora
from training.config import ConfigError, FinetuneConfig, run_folder
from training.export import replace_dir
from training.sampler import EpochShuffleSampler
from training.tasks.base import TaskBundle

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
BEST_DIR = "best"


@dataclass
class TrainerState:
    """Everything besides tensors needed to resume, saved next to each checkpoint."""

    global_step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Epoch in progress."""
    batches_in_epoch: int = 0
    """Micro-batches of `epoch` already consumed."""
    best_metric: float | None = None
    best_step: int | None = None
    best_eval: dict = field(default_factory=dict)
    """All metrics of the best evaluation (confusion matrix included)."""
    evals_without_improvement: int = 0
    examples_seen: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    log_history: list[dict] = field(default_factory=list)
    unlogged_loss: float = 0.0
    """Sum of the training losses since the last logged one (mean over processes), so that the first
    loss logged after a resume averages the same batches as in an uninterrupted run."""
    unlogged_batches: int = 0
    """Micro-batches summed in unlogged_loss."""

    def save(self, folder: Path) -> None:
        (folder / STATE_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, folder: Path) -> TrainerState:
        return cls(**json.loads((folder / STATE_FILE).read_text()))


class CheckpointError(RuntimeError):
    """Saving training state failed (disk full, file too large, permissions); the message names the
    checkpoint that is still intact. finetune.py prints it as one line (exit code 1)."""


@dataclass
class TrainResult:
    state: TrainerState
    best_dir: Path
    final_metrics: dict
    """eval_* metrics of the best model, test_* if a test split exists, train_* throughput."""


# --------------------------------------------------------------------------------------------
# Checkpoint folders: written under a hidden temporary name, renamed when complete, so a
# crash (even kill -9) never leaves a checkpoint that looks usable but is not.


def checkpoints_dir(config: FinetuneConfig) -> Path:
    """`<run folder>/checkpoints`: the `step_N` checkpoints and the best model of a run."""
    return run_folder(config) / "checkpoints"


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete `step_N` checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step_*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder `tmp` to `final`, replacing what was there."""
    old = replace_dir(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(accelerator: Accelerator, config: FinetuneConfig, state: TrainerState) -> None:
    """accelerator.save_state into checkpoints/step_N (atomically), keeping the newest few."""
    root = checkpoints_dir(config)
    final = root / f"step_{state.global_step}"
    tmp = root / f".tmp-step_{state.global_step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state.save(tmp)
            _replace_dir(tmp, final)
            for old in list_checkpoints(root)[:-config.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    except Exception as err:  # disk full, file too large, permissions: the previous checkpoint stays usable
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not save checkpoint {final}: {_describe_os_error(err, root)}; "
                              f"{_intact(root)}") from err
    accelerator.wait_for_everyone()


def _describe_os_error(err: BaseException, folder: Path) -> str:
    """One line for a failed write, with what the disk and the process limits say. torch.save reports a
    failed write as a RuntimeError without errno ("iostream error"), hence the diagnosis."""
    cause = err
    while not isinstance(cause, OSError) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, OSError):
        text = f"{cause.strerror or cause}" + (f": {cause.filename}" if cause.filename else "")
    else:
        text = f"{type(err).__name__}: {err}"
    facts = []
    with contextlib.suppress(OSError):
        facts.append(f"{shutil.disk_usage(folder).free / 2**20:.0f} MB free on {folder}")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource else -1
    if limit not in (-1, getattr(resource, "RLIM_INFINITY", -1)):
        facts.append(f"file size limit (ulimit -f) {limit / 2**20:.0f} MB")
    return f"{text} ({'; '.join(facts)})" if facts else text


def _intact(root: Path) -> str:
    found = list_checkpoints(root)
    if not found:
        return "no earlier checkpoint exists"
    return f"the previous checkpoint {found[-1]} is intact: free some space, then resume with --resume_from_checkpoint latest"


def save_best(accelerator: Accelerator, model: torch.nn.Module, config: FinetuneConfig) -> None:
    """Write the current weights as the best model (a save_pretrained folder; for LoRA, PEFT's adapter
    folder: adapters and modules_to_save) atomically."""
    root = checkpoints_dir(config)
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP/DeepSpeed
    if accelerator.is_main_process:
        tmp = root / f".tmp-{BEST_DIR}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            unwrapped = accelerator.unwrap_model(model)
            # LoRA: the adapters and modules_to_save (the vocabulary is never resized here, so no embeddings)
            extra = {"save_embedding_layers": False} if lora.is_peft_model(unwrapped) else {}
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, **extra)
            _replace_dir(tmp, root / BEST_DIR)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"could not save the best model to {root / BEST_DIR}: {_describe_os_error(err, root)}; "
                                  f"{_intact(root)}") from err
    accelerator.wait_for_everyone()


def load_best(accelerator: Accelerator, model: torch.nn.Module, config: FinetuneConfig) -> None:
    """Load the best weights back into the (prepared) model, e.g. to evaluate them on test."""
    unwrapped = accelerator.unwrap_model(model)
    if lora.is_peft_model(unwrapped):
        lora.load_adapter_weights(unwrapped, checkpoints_dir(config) / BEST_DIR)
        return
    best = type(unwrapped).from_pretrained(checkpoints_dir(config) / BEST_DIR)
    unwrapped.load_state_dict(best.state_dict())


# --------------------------------------------------------------------------------------------


def _optimizer(model: torch.nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    if not decay and not no_decay:
        raise ConfigError("no trainable parameters (check --freeze, or --lora_target_modules)")
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (CPU and CUDA, float32 parameters): one pass over all tensors instead of a Python
    # loop of small ops; on MiniLM on 2 CPU cores the step took 32 ms instead of 148 (docs/performance.md).
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate, fused=fused or None)


def _dataloaders(bundle: TaskBundle, config: FinetuneConfig) -> tuple[DataLoader, DataLoader, DataLoader | None]:
    # Each loader draws a seed from its generator whenever an iterator is created; without one of its
    # own it draws from the global torch RNG, which dropout and augmentations use. Resuming mid-epoch
    # creates one iterator more than the uninterrupted run did (the one skipping the consumed batches),
    # so with the global RNG every dropout mask after a resume would differ from the uninterrupted run's.
    def own_generator() -> torch.Generator:
        return torch.Generator().manual_seed(config.seed)

    sampler = EpochShuffleSampler(len(bundle.train_dataset), config.seed, bundle.train_lengths,
                                  config.per_device_train_batch_size)
    train = DataLoader(bundle.train_dataset, batch_size=config.per_device_train_batch_size, sampler=sampler,
                       collate_fn=bundle.collate_fn, generator=own_generator())

    def eval_loader(dataset, lengths) -> DataLoader:
        # Evaluating in length order pads least; order does not change the metrics.
        order = list(np.argsort(lengths, kind="stable")) if lengths else None
        return DataLoader(dataset, batch_size=config.per_device_eval_batch_size, sampler=order,
                          collate_fn=bundle.collate_fn, generator=own_generator())

    evaluation = eval_loader(bundle.eval_dataset, bundle.eval_lengths)
    test = eval_loader(bundle.test_dataset, None) if bundle.test_dataset is not None else None
    return train, evaluation, test


def evaluate(accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader, bundle: TaskBundle) -> dict:
    """Run the task's eval step over `loader`; each example counted once across processes."""
    model.eval()
    collected: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for batch in loader:
            out = accelerator.gather_for_metrics(bundle.eval_step(model, batch))
            for key, value in out.items():
                collected.setdefault(key, []).append(value.detach().float().cpu().numpy()
                                                     if key == "loss" else value.cpu().numpy())
    model.train()
    if bundle.on_train_mode:
        bundle.on_train_mode(model)
    return bundle.compute_metrics({k: np.concatenate(v) for k, v in collected.items()})


def _is_better(value: float, best: float | None, greater: bool) -> bool:
    return best is None or (value > best if greater else value < best)


def _scalars(metrics: dict, prefix: str) -> dict:
    return {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}


def train(config: FinetuneConfig, accelerator: Accelerator, bundle: TaskBundle,
          resume_dir: Path | None = None) -> TrainResult:
    """Fine-tune `bundle.model` (from the checkpoint `resume_dir` if given); return the state, the
    best model folder and final metrics."""
    model = bundle.model
    optimizer = _optimizer(model, config)
    train_dl, eval_dl, test_dl = _dataloaders(bundle, config)

    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    if test_dl is not None:
        test_dl = accelerator.prepare(test_dl)

    steps_per_epoch = math.ceil(len(train_dl) / config.gradient_accumulation_steps)
    max_steps = config.max_train_steps or math.ceil(config.num_train_epochs * steps_per_epoch)
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    # The scheduler is stepped by hand once per optimizer step (not prepared), so its step count
    # is the optimizer's whatever the number of processes.
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer=optimizer,
                              num_warmup_steps=config.num_warmup_steps, num_training_steps=max_steps)
    accelerator.register_for_checkpointing(scheduler)
    peft = lora.is_peft_model(accelerator.unwrap_model(model))
    if peft:  # checkpoints hold the trainable tensors only; the frozen rest is the base model's
        lora.keep_trainable_in_checkpoints(accelerator)

    state = TrainerState()
    if resume_dir is not None:
        if peft:
            lora.check_checkpoint(model, resume_dir)
        accelerator.load_state(str(resume_dir), **({"strict": False} if peft else {}))
        state = TrainerState.load(resume_dir)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_dir, state.global_step,
                    state.epoch, state.batches_in_epoch)
    if config.with_tracking:
        accelerator.init_trackers(config.run_name or Path(config.output_dir).name,
                                  {k: v for k, v in asdict(config).items() if isinstance(v, (int, float, str, bool))})

    checkpoint_every = int(config.checkpointing_steps) if (config.checkpointing_steps or "").isdigit() else None
    total_batch = config.per_device_train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    logger.info("training: %d examples, %d epochs, %d optimizer steps, batch %d (x%d processes, x%d accumulation)",
                len(bundle.train_dataset), num_epochs, max_steps, config.per_device_train_batch_size,
                accelerator.num_processes, config.gradient_accumulation_steps)
    logger.info("effective batch size %d", total_batch)

    progress = tqdm(total=max_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                    desc="train", dynamic_ncols=True)
    model.train()
    if bundle.on_train_mode:
        bundle.on_train_mode(model)
    stop = state.global_step >= max_steps
    # A resumed run knows its last evaluation too: an epoch that ends right after it is not evaluated twice.
    last_eval_step = next((r["step"] for r in reversed(state.log_history) if any(k.startswith("eval_") for k in r)), -1)
    running_loss = torch.full((), state.unlogged_loss, device=accelerator.device)
    running_count = state.unlogged_batches
    clock = time.perf_counter()
    start_evaluated = any(r["step"] == 0 and any(k.startswith("eval_") for k in r) for r in state.log_history)

    def checkpoint() -> None:
        nonlocal clock
        state.train_seconds += time.perf_counter() - clock
        state.unlogged_loss = float(accelerator.reduce(running_loss, reduction="mean"))
        state.unlogged_batches = running_count
        save_checkpoint(accelerator, config, state)
        clock = time.perf_counter()

    def run_eval() -> bool:
        """Evaluate, log, keep the best; True when early stopping says stop."""
        nonlocal last_eval_step, clock
        state.train_seconds += time.perf_counter() - clock
        metrics = evaluate(accelerator, model, eval_dl, bundle)
        clock = time.perf_counter()
        last_eval_step = state.global_step
        record = {"step": state.global_step, "epoch": state.epoch, **_scalars(metrics, "eval_")}
        state.log_history.append(record)
        if config.with_tracking:
            accelerator.log(_scalars(metrics, "eval_"), step=state.global_step)
        value = metrics[bundle.main_metric]
        if _is_better(value, state.best_metric, bundle.greater_is_better):
            state.best_metric, state.best_step, state.best_eval = value, state.global_step, metrics
            state.evals_without_improvement = 0
            save_best(accelerator, model, config)
        else:
            state.evals_without_improvement += 1
        progress.write(f"step {state.global_step}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in _scalars(metrics, "eval_").items()))
        patience = config.early_stopping_patience
        return patience is not None and state.evals_without_improvement >= patience

    if config.eval_on_start and state.global_step == 0 and not start_evaluated:
        stop = run_eval() or stop  # the starting model, logged as step 0
    for epoch in range(state.epoch, num_epochs):
        if stop:
            break
        state.epoch = epoch
        # Accelerate's loader sets its sampler's epoch from its own iteration counter each time it is
        # iterated, and a loader built to skip batches (below) copies that counter: both must read
        # `epoch`, or a resumed run would replay another epoch's order.
        train_dl.set_epoch(epoch)
        if bundle.on_epoch:
            bundle.on_epoch(epoch)
        skip = state.batches_in_epoch
        loader = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            state.batches_in_epoch += 1
            running_loss += loss.detach()
            running_count += 1
            examples = batch["labels"].shape[0] * accelerator.num_processes
            state.examples_seen += examples
            if "attention_mask" in batch:
                state.tokens_seen += int(batch["attention_mask"].sum()) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue

            scheduler.step()
            state.global_step += 1
            progress.update(1)
            if state.global_step % config.logging_steps == 0 or state.global_step == max_steps:
                mean_loss = float(accelerator.reduce(running_loss / max(running_count, 1), reduction="mean"))
                lr = scheduler.get_last_lr()[0]
                running_loss.zero_()
                running_count = 0
                state.log_history.append({"step": state.global_step, "epoch": epoch, "loss": mean_loss, "lr": lr})
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                if config.with_tracking:
                    accelerator.log({"train_loss": mean_loss, "lr": lr}, step=state.global_step)
            if config.eval_steps and state.global_step % config.eval_steps == 0:
                stop = run_eval()
            if state.global_step >= max_steps:
                stop = True
            if checkpoint_every and state.global_step % checkpoint_every == 0:
                checkpoint()
            if stop:
                break
        if last_eval_step != state.global_step:
            stop = run_eval() or stop
        epoch_done = not stop or state.batches_in_epoch >= len(train_dl)
        if epoch_done:
            state.epoch, state.batches_in_epoch = epoch + 1, 0
        if config.checkpointing_steps == "epoch" or (stop and checkpoint_every):
            checkpoint()
    progress.close()
    state.train_seconds += time.perf_counter() - clock

    final = {f"eval_{k}": v for k, v in state.best_eval.items()}
    if state.best_step is not None:
        final["best_step"] = state.best_step
        # From here on the model is the best one: for the test split, sample outputs and the export.
        load_best(accelerator, model, config)
    start = next((r for r in state.log_history if r["step"] == 0 and any(k.startswith("eval_") for k in r)), None)
    if start is not None:
        final.update({f"start_{k}": v for k, v in start.items() if k.startswith("eval_")})
    if test_dl is not None:
        final.update({f"test_{k}": v for k, v in evaluate(accelerator, model, test_dl, bundle).items()})
    seconds = max(state.train_seconds, 1e-9)
    final.update({
        "train_runtime_s": round(state.train_seconds, 2),
        "train_samples_per_second": round(state.examples_seen / seconds, 2),
        "train_steps": state.global_step,
        "train_examples": len(bundle.train_dataset),
        "eval_examples": len(bundle.eval_dataset),
    })
    if state.tokens_seen:
        final["train_tokens_per_second"] = round(state.tokens_seen / seconds, 1)
    trainable, total = lora.parameter_counts(accelerator.unwrap_model(model))
    final.update({"trainable_parameters": trainable, "total_parameters": total})
    if resource is not None:  # this process's peak resident memory (a resumed run: since the resume)
        final["train_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    last_loss = next((r["loss"] for r in reversed(state.log_history) if "loss" in r), None)
    if last_loss is not None:
        final["train_loss"] = last_loss
    if config.with_tracking:
        accelerator.end_training()
    return TrainResult(state=state, best_dir=checkpoints_dir(config) / BEST_DIR, final_metrics=final)


def world_info(accelerator: Accelerator) -> dict:
    """Processes, device and precision of this run, for the model card."""
    return {
        "num_processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "distributed_type": str(accelerator.distributed_type),
    }
