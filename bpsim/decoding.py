"""Target-only and speculative decoding of one request, recording every round.

A round has five steps:

1. the draft proposes ``draft_len`` tokens one by one;
2. an optional predictor guesses how many of them the target will accept;
3. the target scores every draft in one forward pass;
4. acceptance keeps the longest acceptable prefix and adds the target's own token;
5. both KV caches are cropped back to the accepted prefix.

``draft_len = 0`` is a plain target-only round.

The steps are separate functions over ``CachedModel`` so that a decoder that pre-drafts the
next round while the target verifies can reuse them. Their contract: a model's cache always
contains a proper prefix of the token sequence ``ids`` it is given, so the tokens still to
feed are ``ids[model.length:]``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from bpsim.acceptance import draft_confidence, greedy_accept, logits_to_probs, sample_accept, sample_token
from bpsim.errors import BpsimError
from bpsim.models import pad_vocab
from bpsim.sampling import SamplingConfig, request_generator
from bpsim.timing import ComputeTimer, WallTimer
from bpsim.traces import RoundRecord

logger = logging.getLogger(__name__)


class DecodingError(BpsimError, ValueError):
    """An input or setting the decoder cannot run with, such as a batch of several requests."""


@dataclass(frozen=True)
class DecodeConfig:
    """Settings of one decoding run.

    ``draft_len`` is the number of drafts per round (0 decodes with the target alone); a
    predictor, when given, overrides it from the second round on.
    """

    draft_len: int = 4
    max_new_tokens: int = 256
    sampling: SamplingConfig = SamplingConfig()

    def __post_init__(self):
        if isinstance(self.draft_len, bool) or not isinstance(self.draft_len, int) or self.draft_len < 0:
            raise DecodingError(f"draft_len must be an integer >= 0 (0 decodes with the target alone), got {self.draft_len!r}")
        if self.draft_len > 32767:
            raise DecodingError(f"draft_len {self.draft_len} exceeds 32767, the largest value a trace stores")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise DecodingError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.sampling, SamplingConfig):
            raise DecodingError(f"sampling must be a SamplingConfig, got {type(self.sampling).__name__}")


class CachedModel:
    """A causal LM with its own KV cache, whose logits are padded to ``vocab_size``.

    NOTE: cropping restores only full-attention caches; a model with sliding-window layers
    cannot be rolled back this way.
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int):
        from transformers import DynamicCache

        self.model = model
        self.vocab_size = vocab_size
        self.device = next(model.parameters()).device
        self.cache = DynamicCache(config=getattr(model, "config", None))

    @property
    def length(self) -> int:
        """Number of tokens in the cache."""
        return self.cache.get_seq_length()


@dataclass(frozen=True)
class Drafts:
    """The tokens one drafting step proposed and the draft's confidence in each."""

    tokens: torch.Tensor  # (draft_len,) long
    probs: torch.Tensor | None  # (draft_len, vocab) draft_probs that sampling acceptance uses; None if draft_len is 0
    max_prob: torch.Tensor  # (draft_len,)
    entropy: torch.Tensor  # (draft_len,) nats
    second_tokens: torch.Tensor  # (draft_len,) most probable token other than the drafted one

    def __len__(self) -> int:
        return self.tokens.shape[0]


def forward(state: CachedModel, tokens: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
    """Feed ``tokens`` (n,) through the model, appending them to its cache.

    Returns the float32 logits of the last ``logits_to_keep`` positions, (logits_to_keep, vocab_size).
    """
    output = state.model(input_ids=tokens[None], cache=state.cache, use_cache=True, logits_to_keep=logits_to_keep)
    logits = output.logits[0, -logits_to_keep:].float()  # (logits_to_keep, model vocab)
    return pad_vocab(logits, state.vocab_size)


def _pending(state: CachedModel, ids: Sequence[int]) -> torch.Tensor:
    """Return the tokens of ``ids`` not yet in the cache, (n,) with n >= 1."""
    length = state.length
    if length >= len(ids):
        raise DecodingError(f"the cache contains {length} tokens but the sequence has only {len(ids)}; "
                            "roll the cache back before feeding it")
    return torch.tensor(ids[length:], dtype=torch.long, device=state.device)


def prefill(state: CachedModel, ids: Sequence[int]) -> None:
    """Feed all of ``ids`` but the last token, which the next round feeds with its drafts."""
    if len(ids) - 1 > state.length:
        forward(state, torch.tensor(ids[state.length:-1], dtype=torch.long, device=state.device), 1)


def draft(state: CachedModel, ids: Sequence[int], draft_len: int, sampling: SamplingConfig,
          generator: torch.Generator | None = None) -> Drafts:
    """Propose ``draft_len`` tokens after ``ids``, one forward pass per token.

    Greedy decoding drafts the argmax, and its confidences come from the plain softmax of the
    draft's logits. Sampling draws from the draft's distribution after temperature, top-k and
    top-p, and the confidences come from that distribution. The last draft is not fed back,
    so afterwards the cache contains ``ids`` and all drafts but the last.
    """
    if draft_len == 0:
        return no_drafts(state.device)
    feed = _pending(state, ids)
    tokens, rows = [], []
    for _ in range(draft_len):
        logits = forward(state, feed, 1)[0]  # (vocab,)
        if sampling.greedy:
            probs = torch.softmax(logits, dim=-1)  # (vocab,)
            token = logits.argmax()
        else:
            probs = logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
            token = sample_token(probs, generator)
        tokens.append(token)
        rows.append(probs)
        feed = token[None]
    tokens = torch.stack(tokens)  # (draft_len,)
    probs = torch.stack(rows)  # (draft_len, vocab)
    max_prob, entropy, second_tokens = draft_confidence(probs, tokens)
    return Drafts(tokens, probs, max_prob, entropy, second_tokens)


def no_drafts(device: torch.device) -> Drafts:
    """Return the empty drafts of a target-only round."""
    empty = torch.zeros(0, device=device)
    return Drafts(empty.long(), None, empty, empty, empty.long())


def verify(state: CachedModel, ids: Sequence[int], draft_tokens: torch.Tensor) -> torch.Tensor:
    """Score ``draft_tokens`` (draft_len,) after ``ids`` in one target forward pass.

    Returns the target's logits after the last token of ``ids`` and after each draft,
    (draft_len + 1, vocab). Afterwards the cache contains ``ids`` and every draft.
    """
    feed = torch.cat([_pending(state, ids), draft_tokens])  # (pending + draft_len,)
    return forward(state, feed, draft_tokens.shape[0] + 1)


def accept(drafts: Drafts, target_logits: torch.Tensor, sampling: SamplingConfig,
           generator: torch.Generator | None = None) -> tuple[int, int]:
    """Return ``(accepted, token)``: drafts the target accepts, then its own next token.

    Target probabilities get the same temperature, top-k and top-p as the draft's did.
    """
    if sampling.greedy:
        return greedy_accept(drafts.tokens, target_logits)
    target_probs = logits_to_probs(target_logits, sampling.temperature, sampling.top_k, sampling.top_p)
    if len(drafts) == 0:
        return 0, int(sample_token(target_probs[0], generator))
    return sample_accept(drafts.tokens, drafts.probs, target_probs, generator)


def rollback(state: CachedModel, length: int) -> None:
    """Crop the cache to its first ``length`` tokens; a shorter cache is left as it is."""
    excess = state.length - length
    if excess > 0:
        state.cache.crop(-excess)  # transformers 5 takes the negative count of tokens to remove


@dataclass(frozen=True)
class Generation:
    """The output of one request and the record of its rounds."""

    tokens: tuple[int, ...]  # new tokens, ending with EOS when the request stopped there
    rounds: tuple[RoundRecord, ...]
    prompt_len: int
    prefill_ms: float  # both models' prompt passes, outside every round
    stop_reason: str  # "eos" or "max_new_tokens"


def single_request(input_ids) -> list[int]:
    """Return the token ids of one request, rejecting a batch of several."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise DecodingError(f"input_ids has shape {tuple(input_ids.shape)}, a batch of {input_ids.shape[0]} "
                                    "requests; the decoder handles batch size 1, so pass one request at a time")
            input_ids = input_ids[0]
        elif input_ids.dim() != 1:
            raise DecodingError(f"input_ids must be (seq,) or (1, seq), got shape {tuple(input_ids.shape)}")
        ids = input_ids.tolist()
    else:
        ids = list(input_ids)
        nested = ids and (isinstance(ids[0], (list, tuple)) or (isinstance(ids[0], torch.Tensor) and ids[0].dim() > 0))
        if nested:
            if len(ids) != 1:
                raise DecodingError(f"input_ids contains {len(ids)} sequences; the decoder handles batch size 1, "
                                    "so pass one request at a time")
            ids = list(ids[0])
    if not ids:
        raise DecodingError("input_ids is empty; a request needs at least one prompt token")
    return [int(token) for token in ids]


class SpeculativeDecoder:
    """Decode one request at a time with a target and an optional draft, recording every round.

    Without a draft only ``draft_len = 0`` (target-only decoding) is possible. A
    ``predictor`` follows the ``bpsim.predictors.Predictor`` interface: ``reset()`` per
    request, ``predict(RoundFeatures)`` once the drafts exist and ``update(accepted,
    draft_len)`` after acceptance. Its ``next_draft_len`` sets the next round's draft_len.
    """

    def __init__(self, target: torch.nn.Module, draft: torch.nn.Module | None, config: DecodeConfig, *,
                 eos_token_ids: Iterable[int] = (), vocab_size: int | None = None, predictor=None):
        if draft is None and (config.draft_len > 0 or predictor is not None):
            raise DecodingError(f"draft_len {config.draft_len} and a predictor need a draft model; "
                                "load one or use draft_len 0")
        self.target = target
        self.draft = draft
        self.config = config
        self.eos_token_ids = frozenset(int(token) for token in eos_token_ids)
        self.vocab_size = vocab_size or target.get_output_embeddings().weight.shape[0]
        self.predictor = predictor
        self.device = next(target.parameters()).device

    @classmethod
    def from_pair(cls, pair, config: DecodeConfig, predictor=None) -> "SpeculativeDecoder":
        """Build a decoder from a ``bpsim.models.ModelPair``, stopping at the tokenizer's and model's EOS ids."""
        draft = pair.draft.model if pair.draft is not None else None
        return cls(pair.target.model, draft, config, eos_token_ids=eos_token_ids(pair.tokenizer, pair.target.model),
                   vocab_size=pair.vocab_size, predictor=predictor)

    def close(self) -> None:
        """Release what the decoder holds beside the models; a plain decoder holds nothing."""

    def __enter__(self) -> "SpeculativeDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.inference_mode()
    def generate(self, input_ids, generator: torch.Generator | None = None) -> Generation:
        """Decode one request; ``generator`` drives sampling (default: seeded from the sampling seed)."""
        sampling = self.config.sampling
        ids = single_request(input_ids)
        prompt_len = len(ids)
        if generator is None and not sampling.greedy:
            generator = request_generator(sampling.seed, 0, self.device)

        target, draft_model, prefill_timer = self._start_request(ids)

        draft_len = self.config.draft_len
        rounds: list[RoundRecord] = []
        stop_reason = None
        while stop_reason is None:
            record, stop_reason, next_draft_len = self._round(target, draft_model, ids, prompt_len, len(rounds),
                                                              draft_len, generator)
            rounds.append(record)
            draft_len = next_draft_len
        return Generation(tuple(ids[prompt_len:]), tuple(rounds), prompt_len, prefill_timer.ms, stop_reason)

    def _start_request(self, ids: list[int]):
        """Create both caches, feed them the prompt and reset the predictor for a new request.

        Returns ``(target, draft_model, prefill_timer)``; ``draft_model`` is None without a draft.
        """
        target = CachedModel(self.target, self.vocab_size)
        draft_model = CachedModel(self.draft, self.vocab_size) if self.draft is not None else None
        with WallTimer(self.device) as prefill_timer:
            prefill(target, ids)
            if draft_model is not None:
                prefill(draft_model, ids)
        if self.predictor is not None:
            self.predictor.reset()
        return target, draft_model, prefill_timer

    def _round(self, target: CachedModel, draft_model: CachedModel | None, ids: list[int], prompt_len: int,
               round_index: int, draft_len: int, generator) -> tuple[RoundRecord, str | None, int]:
        """Run one round, extending ``ids`` in place; return its record, the stop reason and the next draft_len."""
        sampling = self.config.sampling
        position = len(ids) - prompt_len
        prediction = None
        with WallTimer(self.device) as round_timer:
            # 1. Draft draft_len tokens one by one.
            with ComputeTimer(self.device) as draft_timer:
                if draft_len > 0:
                    drafts = draft(draft_model, ids, draft_len, sampling, generator)
                else:
                    drafts = no_drafts(self.device)
            # 2. Predict the accepted count before the target's verdict.
            if self.predictor is not None:
                prediction = self._predict(drafts, draft_len, position, len(ids))
            # 3. Verify every draft in one target forward pass.
            with ComputeTimer(self.device) as verify_timer:
                target_logits = verify(target, ids, drafts.tokens)
            # 4. Accept the longest acceptable prefix and add the target's own token.
            verdict, token = accept(drafts, target_logits, sampling, generator)
            new_tokens, stop_reason = self._stop(drafts.tokens[:verdict].tolist() + [token], position)
            ids.extend(new_tokens)
            # 5. Roll both caches back to the accepted prefix; the newest token is fed next round.
            rollback(target, len(ids) - 1)
            if draft_model is not None:
                rollback(draft_model, len(ids) - 1)
        if self.predictor is not None:
            self.predictor.update(verdict, draft_len)

        record = RoundRecord(
            round=round_index, position=position, context_len=prompt_len + position, draft_len=draft_len,
            # A stop inside the round keeps only the drafts before it.
            accepted=min(verdict, len(new_tokens)), emitted=len(new_tokens), tokens=tuple(new_tokens),
            draft_tokens=tuple(drafts.tokens.tolist()), draft_second_tokens=tuple(drafts.second_tokens.tolist()),
            draft_max_prob=tuple(drafts.max_prob.tolist()), draft_entropy=tuple(drafts.entropy.tolist()),
            draft_ms=draft_timer.ms if draft_len > 0 else 0.0, verify_ms=verify_timer.ms, round_ms=round_timer.ms,
            finished=stop_reason is not None, predicted=prediction.predicted if prediction else None,
        )
        next_draft_len = prediction.next_draft_len if prediction else draft_len
        return record, stop_reason, next_draft_len

    def _predict(self, drafts: Drafts, draft_len: int, position: int, context_len: int):
        from bpsim.predictors.base import RoundFeatures

        features = RoundFeatures(draft_len, tuple(drafts.max_prob.tolist()), tuple(drafts.entropy.tolist()),
                                 position, context_len)
        prediction = self.predictor.predict(features)
        if not 0 <= prediction.predicted <= draft_len:
            raise DecodingError(f"predictor {type(self.predictor).__name__} predicted {prediction.predicted} accepted "
                                f"drafts for draft_len {draft_len}; a prediction must lie in 0..draft_len")
        if prediction.next_draft_len > 32767:
            raise DecodingError(f"predictor {type(self.predictor).__name__} asked for draft_len "
                                f"{prediction.next_draft_len}, more than the 32767 a trace stores")
        return prediction

    def _stop(self, new_tokens: list[int], position: int) -> tuple[list[int], str | None]:
        """Cut ``new_tokens`` after the first EOS or at max_new_tokens; return them and the stop reason."""
        for index, token in enumerate(new_tokens):
            if token in self.eos_token_ids:
                new_tokens = new_tokens[: index + 1]
                break
        remaining = self.config.max_new_tokens - position
        new_tokens = new_tokens[:remaining]
        if new_tokens[-1] in self.eos_token_ids:
            return new_tokens, "eos"
        if len(new_tokens) == remaining:
            return new_tokens, "max_new_tokens"
        return new_tokens, None


def eos_token_ids(tokenizer, model: torch.nn.Module | None = None) -> tuple[int, ...]:
    """Collect the end-of-sequence ids of a tokenizer and of a model's generation config."""
    found = set()
    candidates = [getattr(tokenizer, "eos_token_id", None)]
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        candidates.append(generation_config.eos_token_id)
    for candidate in candidates:
        if isinstance(candidate, int):
            found.add(candidate)
        elif isinstance(candidate, (list, tuple)):
            found.update(int(token) for token in candidate)
    return tuple(sorted(found))
