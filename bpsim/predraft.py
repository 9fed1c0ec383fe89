"""Pre-drafting: the draft proposes the next round from a predicted branch point while the target verifies.

A pre-draft starts from branch point k of a round with draft_len n, the context the next
round would have if the target accepted k drafts. The token at the branch point is always the
target's own (its correction or its bonus token), so the pre-draft has to guess it:

- at k == n (every draft accepted) the guess is the draft's own most probable continuation
  after the last draft, found by the pre-draft's first forward pass;
- at k < n (draft k rejected) the guess is the draft's most probable token other than draft k
  (``Drafts.second_tokens[k]``), because the target never emits a rejected draft.

The pre-draft then drafts ``m`` tokens after the guess. It is kept only when the target
accepted exactly k drafts and emitted the guessed token. The exhaustive strategy pre-drafts
several branch points of the one request as rows of one batch.

Cost model of a batched pre-draft of b branch points: every step is one batched forward pass
of the draft over b rows of one token each. Only the first step feeds more, because each row
gets the drafts between the shared prefix and its branch point (at most b + 1 tokens). A row
whose guess is the draft's own continuation needs one more step, and the whole batch runs it.
On a GPU a small batch costs about as much as one row, while on a CPU the cost grows almost
linearly with b. ``LatencyModel.branch_batch_cost`` is the relative cost of each extra row.

The pre-draft runs concurrently with verification on one of three backends:

- ``thread`` (CPU): a worker thread. ``torch.set_num_threads`` is process-wide, so
  the decoder sets it to ``threads_per_model`` (default 1) while a request runs, and each model
  computes on its own intra-op thread. The GIL serialises the Python part of each forward pass.
- ``cuda-stream`` (CUDA): the pre-draft is queued on a second stream. An event orders it after
  this round's drafting, another orders the next use of the draft's cache after it, and nothing
  inside the overlapped window reads a value back to the host.
- ``inline``: no concurrency; the pre-draft runs after verification (for tests and for
  measuring what the overlap saves).

NOTE: worker processes, the fallback for machines where two threads do not overlap, are not
implemented. On a 2-core CPU they ran at 0.97x of sequential work (analysis/overlap_probe.py),
so they could pay only on a machine with cores to spare.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from bpsim.acceptance import draft_confidence, logits_to_probs
from bpsim.decoding import CachedModel, Drafts, rollback
from bpsim.errors import BpsimError
from bpsim.models import pad_vocab
from bpsim.sampling import SamplingConfig
from bpsim.timing import ComputeTimer

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "thread", "cuda-stream", "inline")


class PredraftError(BpsimError, ValueError):
    """A pre-draft setting that cannot run, such as the CUDA stream backend on a CPU."""


# ---------------------------------------------------------------------------------------------
# What to pre-draft


@dataclass(frozen=True)
class BranchRow:
    """One branch point of a pre-draft."""

    branch: int  # accepted drafts this row assumes, 0..draft_len
    feed: tuple[int, ...]  # tokens fed after the shared prefix; a guess row ends with its guess
    guess: int | None  # guessed target token at the branch point; None: the draft's continuation, found at step 0

    @property
    def offset(self) -> int:
        """Index of the row's first draft among its outputs: 1 when output 0 is its guess."""
        return 1 if self.guess is None else 0


@dataclass(frozen=True)
class PredraftPlan:
    """The branch points to pre-draft from a round, and how their inputs are laid out.

    Every row shares the first ``prefix_len`` tokens of the draft's cache. With one row the
    pre-draft extends the draft's own cache (``in_place``), otherwise it runs on a batched
    copy of that prefix whose rows are left-padded to one width.
    """

    rows: tuple[BranchRow, ...]
    prefix: tuple[int, ...]  # the shared tokens, already in the draft's cache
    draft_len: int  # m, drafts per branch point
    predicted: int  # the predictor's branch point
    inputs: PredraftInputs | None = None  # device tensors of the first step, built by plan_predraft

    @property
    def prefix_len(self) -> int:
        return len(self.prefix)

    @property
    def in_place(self) -> bool:
        return len(self.rows) == 1

    @property
    def steps(self) -> int:
        """Forward passes: m, plus one when a row first has to find its guess."""
        return self.draft_len + max(row.offset for row in self.rows)

    @property
    def width(self) -> int:
        return max(len(row.feed) for row in self.rows)

    def may_hit(self, accepted: int, token: int) -> bool:
        """Return whether a row can still be kept once the target accepted ``accepted`` drafts and emitted ``token``."""
        return any(row.branch == accepted and row.guess in (None, token) for row in self.rows)


def branch_points(predicted: int, draft_len: int, width: int) -> range:
    """Return the branch points to pre-draft: the ``width`` nearest ``predicted`` in 0..draft_len (0 = all).

    The window is centred on the prediction where it fits, as the replay simulator places it.
    """
    count = draft_len + 1 if width == 0 else min(width, draft_len + 1)
    first = max(min(predicted - (count - 1) // 2, draft_len + 1 - count), 0)
    return range(first, first + count)


def plan_predraft(draft_model: CachedModel, ids: Sequence[int], draft_tokens: Sequence[int],
                  second_tokens: Sequence[int], predicted: int, draft_len: int, width: int = 1) -> PredraftPlan:
    """Plan a pre-draft of ``draft_len`` tokens from the branch points around ``predicted``.

    ``ids`` is the round's context and ``draft_tokens`` its drafts. The draft's cache contains a
    strict prefix of ``ids + draft_tokens``. For one row the cache is cropped to the row's shared
    prefix here, on the calling thread, so that nothing but the pre-draft touches it afterwards.
    """
    n = len(draft_tokens)
    sequence = list(ids) + list(draft_tokens)  # the draft's cache contains a prefix of it
    points = branch_points(predicted, n, width)
    cached = draft_model.length
    prefix_len = min(len(ids) + points[0], cached)
    rows = []
    for branch in points:
        end = len(ids) + branch
        if branch < n:
            guess = int(second_tokens[branch])
            rows.append(BranchRow(branch, tuple(sequence[prefix_len:end]) + (guess,), guess))
        else:
            rows.append(BranchRow(branch, tuple(sequence[prefix_len:end]), None))
    plan = PredraftPlan(tuple(rows), tuple(sequence[:prefix_len]), draft_len, predicted)
    plan = dataclasses.replace(plan, inputs=_first_inputs(plan, draft_model.device))
    if plan.in_place:
        rollback(draft_model, prefix_len)
    return plan


@dataclass(frozen=True)
class PredraftInputs:
    """Inputs of a pre-draft's first step, copied to the device before the overlapped window starts."""

    tokens: torch.Tensor  # (rows, width) long
    mask: torch.Tensor | None  # (rows, prefix_len + width); None for one row
    positions: torch.Tensor | None  # (rows, width); None for one row
    continuation: torch.Tensor  # (rows,) bool, rows whose guess is the draft's own continuation


def _first_inputs(plan: PredraftPlan, device: torch.device) -> PredraftInputs:
    """Build the first step's inputs; several rows are left-padded to one width.

    Padding sits between the shared prefix and each row's feed, masked out, and position ids
    skip it, so each row computes what it would compute alone.
    """
    continuation = torch.tensor([row.guess is None for row in plan.rows]).to(device)
    if plan.in_place:
        return PredraftInputs(torch.tensor([plan.rows[0].feed]).to(device), None, None, continuation)
    rows, width, prefix = len(plan.rows), plan.width, plan.prefix_len
    tokens = torch.zeros(rows, width, dtype=torch.long)  # (rows, width)
    mask = torch.ones(rows, prefix + width, dtype=torch.long)  # (rows, prefix + width)
    positions = torch.full((rows, width), prefix, dtype=torch.long)  # (rows, width)
    for index, row in enumerate(plan.rows):
        pad = width - len(row.feed)
        tokens[index, pad:] = torch.tensor(row.feed)
        mask[index, prefix:prefix + pad] = 0
        positions[index, pad:] = torch.arange(prefix, prefix + len(row.feed))
    return PredraftInputs(tokens.to(device), mask.to(device), positions.to(device), continuation)


# ---------------------------------------------------------------------------------------------
# Running it


@dataclass
class PredraftOutput:
    """Tokens, probabilities and compute time of a pre-draft; tensors stay on the device until the check reads them."""

    tokens: torch.Tensor  # (rows, steps_done) long
    probs: torch.Tensor  # (rows, steps_done, vocab) draft_probs, as ``draft()`` computes them
    steps_done: int
    cache: object | None  # the batched cache of a multi-row pre-draft; None when it ran in place
    timer: ComputeTimer

    @property
    def ms(self) -> float:
        return self.timer.ms


def _batched_cache(draft_model: CachedModel, plan: PredraftPlan):
    """Copy the shared prefix of the draft's cache once per row, (rows, heads, prefix_len, head_dim) per layer."""
    from transformers import DynamicCache

    rows = len(plan.rows)
    data = [(layer.keys[:, :, :plan.prefix_len].expand(rows, -1, -1, -1),
             layer.values[:, :, :plan.prefix_len].expand(rows, -1, -1, -1)) for layer in draft_model.cache.layers]
    return DynamicCache(ddp_cache_data=data, config=getattr(draft_model.model, "config", None))


def _record_stream(tensors, stream) -> None:
    """Tell the CUDA caching allocator that ``stream`` uses these tensors, so it does not reuse their memory early."""
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
            tensor.record_stream(stream)


def _cache_tensors(cache) -> list[torch.Tensor]:
    if cache is None:
        return []
    return [tensor for layer in cache.layers for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None))
            if tensor is not None]


def run_predraft(draft_model: CachedModel, plan: PredraftPlan, sampling: SamplingConfig,
                 generator: torch.Generator | None, cancel: threading.Event | None = None) -> PredraftOutput:
    """Draft ``plan.steps`` tokens after every row of ``plan``, stopping early once ``cancel`` is set.

    Tokens are chosen as ``decoding.draft`` chooses them (argmax, or a sample from the filtered
    distribution drawn with ``generator``), except that a continuation row takes the draft's
    argmax at step 0 as its guess of the target's token.
    """
    device = draft_model.device
    model = draft_model.model
    inputs = plan.inputs
    feed, mask, positions = inputs.tokens, inputs.mask, inputs.positions  # (rows, width) and so on
    if device.type == "cuda":
        # Tensors made on the decoding stream are read on this one; keep the allocator from reusing them early.
        _record_stream([feed, mask, positions, inputs.continuation, *_cache_tensors(draft_model.cache)],
                       torch.cuda.current_stream(device))
    with ComputeTimer(device) as timer:
        cache = draft_model.cache if plan.in_place else _batched_cache(draft_model, plan)
        outputs, rows_probs = [], []
        for step in range(plan.steps):
            if cancel is not None and cancel.is_set():
                break
            logits = model(input_ids=feed, attention_mask=mask, position_ids=positions, cache=cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1].float()  # (rows, model vocab)
            logits = pad_vocab(logits, draft_model.vocab_size)  # (rows, vocab)
            greedy_tokens = logits.argmax(dim=-1)  # (rows,)
            if sampling.greedy:
                probs = torch.softmax(logits, dim=-1)
                tokens = greedy_tokens
            else:
                probs = logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
                tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]  # (rows,)
                if step == 0:
                    tokens = torch.where(inputs.continuation, greedy_tokens, tokens)
            outputs.append(tokens)
            rows_probs.append(probs)
            feed = tokens[:, None]
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                positions = positions[:, -1:] + 1
    rows = len(plan.rows)
    if outputs:
        tokens = torch.stack(outputs, dim=1)  # (rows, steps_done)
        probs = torch.stack(rows_probs, dim=1)  # (rows, steps_done, vocab)
    else:
        tokens = torch.zeros(rows, 0, dtype=torch.long, device=device)
        probs = torch.zeros(rows, 0, draft_model.vocab_size, device=device)
    return PredraftOutput(tokens, probs, len(outputs), None if plan.in_place else cache, timer)


# ---------------------------------------------------------------------------------------------
# Checking it


@dataclass(frozen=True)
class Check:
    """Outcome of checking a pre-draft against the target's verdict."""

    hit: bool | None  # None when nothing was checked because the request ended in this round
    row: int | None  # index of the kept row
    drafts: Drafts | None  # the next round's drafts when kept


def check_predraft(plan: PredraftPlan, output: PredraftOutput, accepted: int, token: int,
                   finished: bool) -> Check:
    """Find the row whose branch point and guess match the target's verdict, and its drafts.

    Reads the pre-draft's tokens back to the host, so call it only after the overlapped window.
    """
    if finished:
        return Check(None, None, None)
    if output.steps_done < plan.steps:
        return Check(False, None, None)
    for index, row in enumerate(plan.rows):
        if row.branch != accepted:
            continue
        guess = row.guess if row.guess is not None else int(output.tokens[index, 0])
        if guess != token:
            return Check(False, None, None)
        tokens = output.tokens[index, row.offset:row.offset + plan.draft_len]  # (m,)
        probs = output.probs[index, row.offset:row.offset + plan.draft_len]  # (m, vocab)
        max_prob, entropy, second_tokens = draft_confidence(probs, tokens)
        return Check(True, index, Drafts(tokens, probs, max_prob, entropy, second_tokens))
    return Check(False, None, None)


def adopt_row(draft_model: CachedModel, plan: PredraftPlan, output: PredraftOutput, row: int) -> None:
    """Make the draft's cache that of a kept row: its branch context and all its drafts but the last.

    An in-place pre-draft already left the cache so. For a batched one the row is cut out of
    the batch without its padding. A guess row also drops its last fed draft when the batch ran
    the extra step that only a continuation row needs.
    """
    if plan.in_place:
        return
    from transformers import DynamicCache

    branch = plan.rows[row]
    pad = plan.width - len(branch.feed)
    end = plan.prefix_len + plan.width
    fed = plan.draft_len - 1 + branch.offset  # outputs fed back that belong to this row's drafts
    keep = torch.cat([torch.arange(plan.prefix_len), torch.arange(plan.prefix_len + pad, end),
                      torch.arange(end, end + fed)]).to(draft_model.device)
    data = [(layer.keys[row:row + 1].index_select(2, keep), layer.values[row:row + 1].index_select(2, keep))
            for layer in output.cache.layers]
    draft_model.cache = DynamicCache(ddp_cache_data=data, config=getattr(draft_model.model, "config", None))


def cached_tokens(plan: PredraftPlan, output: PredraftOutput) -> list[int]:
    """Return the tokens an in-place pre-draft left in the draft's cache, in order."""
    row = plan.rows[0]
    fed = output.tokens[0, :max(output.steps_done - 1, 0)].tolist()
    return list(plan.prefix) + list(row.feed) + fed


def common_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    """Return the length of the longest common prefix of two token sequences."""
    for index, (a, b) in enumerate(zip(first, second)):
        if a != b:
            return index
    return min(len(first), len(second))


def restore_after_miss(draft_model: CachedModel, plan: PredraftPlan, output: PredraftOutput,
                       ids: Sequence[int]) -> None:
    """Roll the draft's cache back to the longest prefix it shares with ``ids``, the real context.

    A batched pre-draft never touched the draft's cache. An in-place one cropped it to the
    branch point first, so accepted drafts past that point are gone and the next ``draft()``
    feeds them again with its first forward pass.
    """
    if plan.in_place:
        rollback(draft_model, min(common_prefix(cached_tokens(plan, output), ids), len(ids) - 1))
    else:
        rollback(draft_model, len(ids) - 1)


# ---------------------------------------------------------------------------------------------
# Concurrency backends


class Pending:
    """A pre-draft in flight; ``result`` waits for it."""

    def cancel(self) -> None:
        """Ask the pre-draft to stop after its current forward pass (honoured by the thread backend only)."""

    def result(self) -> PredraftOutput:
        raise NotImplementedError


class _Done(Pending):
    def __init__(self, output: PredraftOutput):
        self.output = output

    def result(self) -> PredraftOutput:
        return self.output


class InlineBackend:
    """Run the pre-draft after verification on the calling thread, without concurrency."""

    name = "inline"

    @contextlib.contextmanager
    def session(self):
        yield

    def overlap(self, predraft: Callable, verify: Callable, draft_model: CachedModel):
        result = verify()
        return result, _Done(predraft(None))

    def close(self) -> None:
        pass


class _ThreadPending(Pending):
    def __init__(self, future: Future, cancel: threading.Event):
        self.future = future
        self.event = cancel

    def cancel(self) -> None:
        self.event.set()

    def result(self) -> PredraftOutput:
        return self.future.result()


class ThreadBackend:
    """Run the pre-draft on one worker thread while the calling thread verifies (CPU).

    While a request runs (``session``), torch computes on ``threads_per_model`` intra-op
    threads per calling thread; None leaves torch's setting alone.
    """

    name = "thread"

    def __init__(self, threads_per_model: int | None = 1):
        if threads_per_model is not None and threads_per_model < 1:
            raise PredraftError(f"threads_per_model must be >= 1 or None, got {threads_per_model}")
        self.threads = threads_per_model
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bpsim-predraft")

    @contextlib.contextmanager
    def session(self):
        previous = torch.get_num_threads()
        self.session_threads = previous
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    @contextlib.contextmanager
    def alone(self):
        """Give work that runs with no pre-draft beside it every thread the session started with.

        Without this, a round that drafts or verifies alone (draft_len 0, or drafting after a
        miss) would run on ``threads_per_model`` threads and leave cores idle.
        """
        if self.threads is None:
            yield
            return
        torch.set_num_threads(getattr(self, "session_threads", self.threads))
        try:
            yield
        finally:
            torch.set_num_threads(self.threads)

    def _job(self, predraft: Callable, cancel: threading.Event) -> PredraftOutput:
        # A thread takes torch's intra-op thread count when it first runs an operation, so set it
        # on every job rather than rely on the setting made on the calling thread.
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return predraft(cancel)

    def overlap(self, predraft: Callable, verify: Callable, draft_model: CachedModel):
        cancel = threading.Event()
        future = self.pool.submit(self._job, predraft, cancel)
        try:
            result = verify()
        except BaseException:
            cancel.set()
            with contextlib.suppress(Exception):
                future.result()  # wait for the worker before the caller touches the draft's cache
            raise
        return result, _ThreadPending(future, cancel)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class _StreamPending(Pending):
    def __init__(self, output: PredraftOutput, done: torch.cuda.Event, device: torch.device):
        self.output = output
        self.done = done
        self.device = device

    def result(self) -> PredraftOutput:
        main = torch.cuda.current_stream(self.device)
        main.wait_event(self.done)
        _record_stream([self.output.tokens, self.output.probs, *_cache_tensors(self.output.cache)], main)
        return self.output


class CudaStreamBackend:
    """Queue the pre-draft on a second CUDA stream while the current stream verifies.

    Verification is queued first, then the pre-draft, which waits on an event recorded after
    this round's drafting and not on verification. ``result`` makes the current stream wait on
    the pre-draft's end event, a device-side wait with no host synchronisation.

    NOTE: this backend has not run on a GPU yet; only its CPU counterpart is tested.
    """

    name = "cuda-stream"

    def __init__(self, device: torch.device):
        if device.type != "cuda":
            raise PredraftError(f"the cuda-stream backend needs a CUDA device, got {device}; use thread or inline")
        self.device = device
        self.side = torch.cuda.Stream(device)

    @contextlib.contextmanager
    def session(self):
        yield

    def overlap(self, predraft: Callable, verify: Callable, draft_model: CachedModel):
        main = torch.cuda.current_stream(self.device)
        drafted = torch.cuda.Event()
        drafted.record(main)
        result = verify()
        with torch.cuda.stream(self.side):
            self.side.wait_event(drafted)
            output = predraft(None)
            done = torch.cuda.Event()
            done.record(self.side)
        return result, _StreamPending(output, done, self.device)

    def close(self) -> None:
        pass


def make_backend(name: str, device: torch.device, threads_per_model: int | None = 1):
    """Build a concurrency backend; ``auto`` picks ``cuda-stream`` on CUDA and ``thread`` otherwise."""
    if name not in BACKENDS:
        raise PredraftError(f"unknown pre-draft backend {name!r}; use one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = "cuda-stream" if device.type == "cuda" else "thread"
    if name == "cuda-stream":
        return CudaStreamBackend(device)
    if name == "thread":
        return ThreadBackend(threads_per_model)
    return InlineBackend()


# ---------------------------------------------------------------------------------------------
# Does the machine overlap two threads?


@dataclass(frozen=True)
class OverlapProbe:
    """Wall time of a draft job and a verify job run one after the other and on two threads.

    ``sequential_ms`` runs both on every intra-op thread torch had, as a decoder without
    pre-drafting does; ``sequential_split_ms`` runs both on ``threads_per_model`` threads. The
    speedup compares the concurrent run with ``sequential_ms``, the alternative a decoder has.
    """

    sequential_ms: float
    concurrent_ms: float
    threads_per_model: int | None
    repeats: int
    sequential_split_ms: float | None = None
    threads: int | None = None  # torch's intra-op threads outside the concurrent window

    @property
    def speedup(self) -> float:
        return self.sequential_ms / self.concurrent_ms if self.concurrent_ms > 0 else float("nan")

    def describe(self) -> str:
        return (f"{self.repeats} x (draft job + verify job): sequential on {self.threads or torch.get_num_threads()} "
                f"thread(s) {self.sequential_ms / 1000:.2f} s, on two threads with "
                f"{self.threads_per_model or torch.get_num_threads()} intra-op thread(s) each "
                f"{self.concurrent_ms / 1000:.2f} s ({self.speedup:.2f}x)")

    def to_dict(self) -> dict:
        return {"sequential_ms": self.sequential_ms, "concurrent_ms": self.concurrent_ms,
                "sequential_split_ms": self.sequential_split_ms, "threads": self.threads,
                "threads_per_model": self.threads_per_model, "repeats": self.repeats, "speedup": self.speedup}


def probe_thread_overlap(draft_job: Callable[[], object], verify_job: Callable[[], object], repeats: int = 3,
                         threads_per_model: int | None = 1) -> OverlapProbe:
    """Time ``repeats`` rounds of both jobs sequentially, then on two threads.

    The sequential run uses every intra-op thread, as a decoder that does not pre-draft would.
    It is also timed on ``threads_per_model`` threads, which separates the cost of fewer threads
    from the gain of concurrency. Two threads pay only when the concurrent time is below the first.
    """
    threads = torch.get_num_threads()
    backend = ThreadBackend(threads_per_model)

    def sequential() -> float:
        started = time.perf_counter()
        for _ in range(repeats):
            draft_job()
            verify_job()
        return time.perf_counter() - started

    try:
        with backend.session(), torch.inference_mode():
            draft_job()
            verify_job()  # warm-up
            with backend.alone():
                full = sequential()
            split = sequential()
            started = time.perf_counter()
            for _ in range(repeats):
                future = backend.pool.submit(backend._job, lambda cancel: draft_job(), threading.Event())
                verify_job()
                future.result()
            concurrent = time.perf_counter() - started
    finally:
        backend.close()
    return OverlapProbe(full * 1000.0, concurrent * 1000.0, threads_per_model, repeats, split * 1000.0, threads)
