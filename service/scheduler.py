"""Continuous batching for generation: concurrent sequences share every decoding step.

One scheduler (a thread) per text-generation model. Requests become `Job`s on its queue; between two
decoding steps it admits waiting sequences (up to `max_concurrent_sequences` in flight,
`max_batch_prefill_tokens` of prompt per prefill, `max_batch_total_tokens` of prompt + new tokens in
all), prefills them together, and merges them into the running batch; sequences that finish (EOS,
stop sequence, max tokens, client gone) leave after the step that finished them. Each sequence keeps
its own sampling parameters, seed and stream (service/tasks/text_generation.py: `Sequence`).

The batch is the shape TGI's first Python server used: one left-padded batch whose KV cache (a
transformers `DynamicCache`) grows by one column per step; joining pads the shorter side on the left,
leaving drops rows and the columns no row needs any more. Position ids come from the attention mask,
so padding never shifts a sequence. Every step (forward pass and sampling) is one task on the torch
thread (service/torch_thread.py), so other models' forward passes run between two steps: a long
generation never stalls them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from . import torch_thread
from .batching import Job, failure, resolve
from .errors import InputError
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("service.scheduler")
_STOP = object()


class Sequence(Protocol):
    """What the scheduler needs of one generation (the task's runner makes them)."""

    prompt_ids: list[int]
    max_new_tokens: int

    def cancelled(self) -> bool: ...

    def push(self, logits: torch.Tensor) -> int | None:
        """Choose the next token from this step's logits (vocab,); None once the sequence is done."""

    def result(self) -> Any: ...


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@dataclass
class CausalBatch:
    """Sequences decoding together: their KV cache, attention mask and the token each feeds next."""

    cache: Any  # transformers DynamicCache, layers of [batch, heads, length, head_dim]
    mask: torch.Tensor  # [batch, length]: 1 for real tokens (prompt and generated), 0 for padding
    next_ids: torch.Tensor  # [batch, 1]: the token chosen last step, not yet in the cache

    def __len__(self) -> int:
        return self.mask.shape[0]

    @staticmethod
    def forward(model, input_ids, mask, cache) -> torch.Tensor:
        """Logits of the last position of each row, [batch, vocab]."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        accepts = _forward_parameters(model)
        kwargs = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        # transformers 5.24 renamed past_key_values to cache (the old name goes in 5.40)
        kwargs["cache" if "cache" in accepts else "past_key_values"] = cache
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        return out.logits[:, -1, :].float()

    @classmethod
    def prefill(cls, model, prompts: list[list[int]], pad_id: int) -> tuple[CausalBatch, torch.Tensor]:
        """Run the prompts (left-padded together); returns the batch and each row's next-token logits."""
        from transformers import DynamicCache

        device = model.device
        longest = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
        cache = DynamicCache(config=model.config)
        logits = cls.forward(model, ids, mask, cache)
        return cls(cache, mask, torch.zeros((len(prompts), 1), dtype=torch.long, device=device)), logits

    def decode(self, model) -> torch.Tensor:
        """One step: feed each row's next token; returns each row's next-token logits."""
        ones = self.mask.new_ones((len(self), 1))
        self.mask = torch.cat([self.mask, ones], dim=1)
        return self.forward(model, self.next_ids, self.mask, self.cache)

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in `rows`, then the leading columns that are padding in all rows left."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask, self.next_ids = self.mask[index], self.next_ids[index]
        self.cache.batch_select_indices(index)
        empty = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
        if empty:
            self.mask = self.mask[:, empty:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., empty:, :], layer.values[..., empty:, :]

    def extend(self, other: CausalBatch) -> None:
        """Append `other`'s rows, padding the shorter cache on the left."""
        length = max(self.mask.shape[1], other.mask.shape[1])
        self.mask = torch.cat([_pad_left(self.mask, length, 1), _pad_left(other.mask, length, 1)])
        self.next_ids = torch.cat([self.next_ids, other.next_ids])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, length, 2), _pad_left(theirs.keys, length, 2)])
            mine.values = torch.cat([_pad_left(mine.values, length, 2), _pad_left(theirs.values, length, 2)])


_PARAMETERS: dict[type, frozenset[str]] = {}


def _forward_parameters(model) -> frozenset[str]:
    # a PEFT model passes keyword arguments through to the transformers model it wraps
    kind = type(model.get_base_model()) if hasattr(model, "peft_config") else type(model)
    if kind not in _PARAMETERS:
        _PARAMETERS[kind] = frozenset(inspect.signature(kind.forward).parameters)
    return _PARAMETERS[kind]


def supports_batching(model) -> bool:
    """Whether this model's cache is made of plain growing layers that `CausalBatch` can merge and
    trim (sliding-window, static or recurrent caches cannot); otherwise sequences run one at a time."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except Exception:
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


class GenerationScheduler:
    """The batcher of a text-generation model (same interface as service/batching.ModelWorker)."""

    def __init__(self, name: str, runner, settings: Settings, metrics: Metrics):
        self.name, self.runner, self.metrics = name, runner, metrics
        self.max_sequences = settings.max_concurrent_sequences if supports_batching(runner.model) else 1
        if self.max_sequences == 1 and settings.max_concurrent_sequences > 1:
            log.info("model %s: its KV cache cannot be batched; sequences run one at a time", name)
        self.max_prefill_tokens = settings.max_batch_prefill_tokens
        self.timeout_s = settings.request_timeout_s
        self.max_total_tokens = settings.max_batch_total_tokens
        self._queue: queue.Queue = queue.Queue()
        self._waiting: list[Job] = []  # taken from the queue, not admitted yet (budget)
        self._active: list[tuple[Job, Sequence]] = []
        self._batch: CausalBatch | None = None
        self.batches = 0  # decoding steps run
        self.largest_batch = 0  # most sequences in one step
        self._closing = False
        self._on_stopped: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._loop, name=f"generate-{name}", daemon=True)
        self._thread.start()

    # -- called on the event loop ---------------------------------------------------------------
    def submit(self, payload, params, size: int = 1, emit=None) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(payload, params, loop.create_future(), loop, emit=emit, size=size)
        self._queue.put(job)
        self.metrics.queue_depth.labels(self.name).set(self._queue.qsize() + len(self._waiting))
        return job

    def close(self, on_stopped: Callable[[], None] | None = None) -> None:
        """Finish the sequences in flight and those queued, then stop the thread (then call
        `on_stopped` on it)."""
        self._on_stopped = on_stopped
        self._queue.put(_STOP)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # -- scheduler thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._take(block=not self._active and not self._waiting)
            if self._closing and not self._active and not self._waiting:
                if self._on_stopped is not None:
                    self._on_stopped()
                return
            admitted = self._admit()
            try:
                torch_thread.run(self._step, admitted, owner=self.name, limit=self.timeout_s)
            except Exception as exc:  # a model that raises fails the sequences of this step, not the server
                error = exc if isinstance(exc, torch_thread.TorchTaskHung) else failure(self.name, exc)
                for job, _ in self._active + admitted:
                    resolve(job, error)
                self._active, self._batch = [], None

    def _take(self, block: bool) -> None:
        """Move queued jobs to `_waiting`; wait for one when nothing else is to be done."""
        while True:
            try:
                item = self._queue.get(block=block)
            except queue.Empty:
                return
            block = False
            if item is _STOP:
                self._closing = True
                continue
            if not (item.future.cancelled() or item.cancel.is_set()):
                self._waiting.append(item)

    def _admit(self) -> list[tuple[Job, Sequence]]:
        """Start the waiting sequences that fit the budgets (first come, first served)."""
        admitted: list[tuple[Job, Sequence]] = []
        total = sum(len(s.prompt_ids) + s.max_new_tokens for _, s in self._active)
        prefill = 0
        while self._waiting and len(self._active) + len(admitted) < self.max_sequences:
            job = self._waiting[0]
            if job.future.cancelled() or job.cancel.is_set():
                self._waiting.pop(0)
                continue
            if job.prepared is None:
                try:
                    job.prepared = self.runner.start(job.payload, job.params, job.emit, job.cancel.is_set)
                except InputError as exc:
                    self._waiting.pop(0)
                    resolve(job, exc)
                    continue
                except Exception as exc:
                    self._waiting.pop(0)
                    resolve(job, failure(self.name, exc))
                    continue
            seq = job.prepared
            cost = len(seq.prompt_ids) + seq.max_new_tokens
            alone = not self._active and not admitted  # the budgets never refuse a sequence that fits alone
            if not alone and (total + cost > self.max_total_tokens or prefill + len(seq.prompt_ids) > self.max_prefill_tokens):
                break
            self._waiting.pop(0)
            job.started = time.perf_counter()
            admitted.append((job, seq))
            total += cost
            prefill += len(seq.prompt_ids)
        self.metrics.queue_depth.labels(self.name).set(self._queue.qsize() + len(self._waiting))
        return admitted

    def _step(self, admitted: list[tuple[Job, Sequence]]) -> None:
        """The prefill of the admitted sequences, then one decoding step of the running batch (on the
        torch thread)."""
        model = self.runner.model
        start = time.perf_counter()
        with torch.inference_mode():
            if self._active:
                self._drop_cancelled()
            # The prefill first: a new sequence's first token comes one decoding step sooner (time to
            # first token), and the running ones wait one prefill, as in TGI.
            joined = None
            if admitted:
                joined, logits = CausalBatch.prefill(model, [s.prompt_ids for _, s in admitted], self.runner.pad_id)
                self._advance(admitted, joined, logits)
            if self._active:
                logits = self._batch.decode(model)
                self._advance(self._active, self._batch, logits)
            if joined is not None and len(joined):
                if self._batch is None or not len(self._batch):
                    self._batch = joined
                else:
                    self._batch.extend(joined)
                self._active += admitted
        rows = len(self._active)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, rows + len(admitted))
        self.metrics.batch_size.labels(self.name).observe(max(rows, 1))
        self.metrics.forward_seconds.labels(self.name).observe(time.perf_counter() - start)

    def _advance(self, members: list[tuple[Job, Sequence]], batch: CausalBatch, logits: torch.Tensor) -> None:
        """Each sequence picks its token; finished ones are resolved and leave `members` and `batch`."""
        keep = []
        for row, (job, seq) in enumerate(members):
            token = seq.push(logits[row])
            if token is None:
                job.finished = time.perf_counter()
                resolve(job, seq.result())
            else:
                batch.next_ids[row, 0] = token
                keep.append(row)
        if len(keep) < len(members):
            members[:] = [members[i] for i in keep]
            if keep:
                batch.keep(keep)
            else:
                batch.mask = batch.mask[:0]

    def _drop_cancelled(self) -> None:
        keep = [i for i, (job, seq) in enumerate(self._active) if not seq.cancelled()]
        if len(keep) == len(self._active):
            return
        for i, (job, seq) in enumerate(self._active):
            if i not in keep:
                resolve(job, seq.result())
        self._active = [self._active[i] for i in keep]
        if keep:
            self._batch.keep(keep)
        else:
            self._batch = None
