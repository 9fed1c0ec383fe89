"""Branch-predicted speculative decoding of one request at a time.

A round is draft -> predict -> verify -> check. Once the round's drafts exist the predictor
returns the branch point k (how many drafts it expects the target to accept) and the next
round's draft_len m. While the target verifies, the draft pre-drafts the next round from
branch point k (``bpsim.predraft``). The check keeps the pre-draft when the target accepted
exactly k drafts and emitted the guessed branch token. The next round then starts with those
drafts and verifies them like any others, so the output is exactly what speculative decoding
without pre-drafting would produce: greedy output equals the target's greedy output, and
sampled output follows the target's distribution.

Sampling keeps that property because the draft's random draws come from generators of their
own, split from the request's generator, which draws only for acceptance. Pre-drafted tokens
are samples from the draft's distribution given the branch context, and whether they are kept
depends only on the target's verdict, not on them. Each pre-draft draws from a generator
seeded afresh on the decoding thread, so a pre-draft stopped early on a miss does not change
any later draw, and a seeded run is reproducible.

Timing follows the trace schema. ``draft_ms`` is the drafting on the round's critical path, 0
when the drafts came from a kept pre-draft. ``predraft_ms`` is the compute of the pre-draft
the round launched, and ``round_ms`` the round's wall time. A round's overlap is therefore
draft_ms + verify_ms + predraft_ms - round_ms, which ``LatencyModel.fit`` expects.

Policies other engines use are configurations of the same decoder:

- PEARL-style pre-drafting (Liu et al. 2024, arXiv 2408.11850): its post-verify strategy,
  which drafts on during verification as if every draft will be accepted, is a static predictor
  that always predicts all drafts accepted. PEARL's pre-verify strategy is not modelled;
- the +2/-1 draft-length heuristic of transformers' assisted generation, without pre-drafting:
  ``PlusTwoMinusOne`` as ``draft_len_rule``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from bpsim.decoding import (CachedModel, DecodeConfig, DecodingError, Drafts, Generation, SpeculativeDecoder, accept,
                            draft, eos_token_ids, no_drafts, rollback, single_request, verify)
from bpsim.predraft import (BACKENDS, Check, adopt_row, check_predraft, make_backend, plan_predraft,
                            restore_after_miss, run_predraft)
from bpsim.sampling import request_generator
from bpsim.timing import ComputeTimer, WallTimer
from bpsim.traces import RoundRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BranchConfig:
    """Pre-drafting settings of the branch-predicted decoder.

    ``width`` is the number of branch points each pre-draft covers: 1 drafts from the
    predicted one only, w > 1 from the w nearest it in one batch, 0 from all draft_len + 1 (the
    exhaustive strategy). ``backend`` is ``auto``, ``thread``, ``cuda-stream`` or ``inline``
    (see ``bpsim.predraft``). ``threads_per_model`` sets torch's intra-op threads while a
    request runs on the thread backend (None leaves torch's setting alone).
    """

    predraft: bool = True
    width: int = 1
    backend: str = "auto"
    threads_per_model: int | None = 1

    def __post_init__(self):
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 0:
            raise DecodingError(f"width must be an integer >= 0 (0 pre-drafts every branch point), got {self.width!r}")
        if self.backend not in BACKENDS:
            raise DecodingError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.threads_per_model is not None and (isinstance(self.threads_per_model, bool)
                                                   or not isinstance(self.threads_per_model, int)
                                                   or self.threads_per_model < 1):
            raise DecodingError(f"threads_per_model must be an integer >= 1 or None, got {self.threads_per_model!r}")

    def to_dict(self) -> dict:
        return {"predraft": self.predraft, "width": self.width, "backend": self.backend,
                "threads_per_model": self.threads_per_model}


class PlusTwoMinusOne:
    """The +2/-1 draft-length schedule of transformers' assisted generation, applied after each verdict.

    After a round that accepted every draft the next drafts two more tokens, otherwise one
    fewer, never fewer than 1 (``num_assistant_tokens_schedule="heuristic"`` in
    ``transformers/generation/candidate_generator.py``, transformers 5.25). Unlike transformers,
    the length is capped at ``max_draft_len``, and each request starts again at
    ``first_draft_len`` as its ``heuristic_transient`` schedule does.
    """

    def __init__(self, first_draft_len: int = 4, max_draft_len: int = 16):
        if not 1 <= first_draft_len <= max_draft_len:
            raise DecodingError(f"need 1 <= first_draft_len <= max_draft_len, got {first_draft_len} and {max_draft_len}")
        self.first_draft_len, self.max_draft_len = first_draft_len, max_draft_len

    def next_draft_len(self, accepted: int, draft_len: int) -> int:
        proposed = draft_len + 2 if accepted >= draft_len else draft_len - 1
        return min(max(proposed, 1), self.max_draft_len)

    def to_dict(self) -> dict:
        return {"rule": "plus2-minus1", "first_draft_len": self.first_draft_len, "max_draft_len": self.max_draft_len}


@dataclass(frozen=True)
class _HostDrafts:
    """A round's drafts read back to the host once, for the predictor, the plan and the record."""

    tokens: list[int]
    second_tokens: list[int]
    max_prob: list[float]
    entropy: list[float]

    @classmethod
    def of(cls, drafts: Drafts) -> "_HostDrafts":
        return cls(drafts.tokens.tolist(), drafts.second_tokens.tolist(), drafts.max_prob.tolist(),
                   drafts.entropy.tolist())


@dataclass
class _Generators:
    """The random streams of one sampled request; all None under greedy decoding."""

    accept: torch.Generator | None  # acceptance draws and target samples
    draft: torch.Generator | None  # draft samples on the decoding thread
    predraft: torch.Generator | None  # draft samples of the pre-draft in flight, reseeded for each
    seeds: torch.Generator | None  # CPU stream of the pre-drafts' seeds

    @classmethod
    def split(cls, generator: torch.Generator, device: torch.device) -> "_Generators":
        seeds = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=generator,
                                                                  device=generator.device)))
        draft_seed = int(torch.randint(0, 2 ** 62, (1,), generator=seeds))
        return cls(generator, torch.Generator(device=device).manual_seed(draft_seed),
                   torch.Generator(device=device), seeds)

    def reseed_predraft(self) -> torch.Generator | None:
        if self.predraft is not None:
            self.predraft.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=self.seeds)))
        return self.predraft


class BranchPredictedDecoder(SpeculativeDecoder):
    """Decode one request at a time, pre-drafting each next round from the predicted branch point.

    ``predictor`` follows the ``bpsim.predictors.Predictor`` interface and is required for
    pre-drafting. Without pre-drafting the decoder runs plain speculative decoding with the
    predictor's draft lengths, or with ``draft_len_rule`` (for example ``PlusTwoMinusOne``),
    which chooses the next draft_len after each verdict. ``config.draft_len`` is the first
    round's draft_len. Use the decoder as a context manager, or call ``close``, to stop its
    worker thread.
    """

    def __init__(self, target: torch.nn.Module, draft_model: torch.nn.Module | None, config: DecodeConfig, *,
                 predictor=None, branch: BranchConfig = BranchConfig(), draft_len_rule: PlusTwoMinusOne | None = None,
                 eos_token_ids: Iterable[int] = (), vocab_size: int | None = None):
        super().__init__(target, draft_model, config, eos_token_ids=eos_token_ids, vocab_size=vocab_size,
                         predictor=predictor)
        if draft_len_rule is not None and predictor is not None:
            raise DecodingError("pass a predictor or a draft_len_rule, not both: each sets the next draft_len")
        if branch.predraft and (predictor is None or draft_model is None):
            raise DecodingError("pre-drafting needs a draft model and a predictor that gives the branch point; "
                                "pass both, or BranchConfig(predraft=False)")
        self.branch = branch
        self.draft_len_rule = draft_len_rule
        self.backend = make_backend(branch.backend, self.device, branch.threads_per_model) if branch.predraft else None

    @classmethod
    def from_pair(cls, pair, config: DecodeConfig, predictor=None, branch: BranchConfig = BranchConfig(),
                  draft_len_rule: PlusTwoMinusOne | None = None) -> "BranchPredictedDecoder":
        """Build a decoder from a ``bpsim.models.ModelPair``, stopping at the tokenizer's and model's EOS ids."""
        return cls(pair.target.model, pair.draft.model, config, predictor=predictor, branch=branch,
                   draft_len_rule=draft_len_rule, eos_token_ids=eos_token_ids(pair.tokenizer, pair.target.model),
                   vocab_size=pair.vocab_size)

    def close(self) -> None:
        """Stop the pre-draft worker; the decoder cannot pre-draft afterwards."""
        if self.backend is not None:
            self.backend.close()

    @torch.inference_mode()
    def generate(self, input_ids, generator: torch.Generator | None = None,
                 on_round: Callable[[RoundRecord], None] | None = None) -> Generation:
        """Decode one request; ``generator`` drives sampling, ``on_round`` receives each round's record as it ends."""
        sampling = self.config.sampling
        ids = single_request(input_ids)
        prompt_len = len(ids)
        generators = _Generators(None, None, None, None)
        if not sampling.greedy:
            if generator is None:
                generator = request_generator(sampling.seed, 0, self.device)
            generators = _Generators.split(generator, self.device)

        target, draft_model, prefill_timer = self._start_request(ids)

        draft_len = self.config.draft_len
        if self.draft_len_rule is not None:
            draft_len = self.draft_len_rule.first_draft_len
        ready = None  # this round's drafts when the previous round's pre-draft was kept
        rounds: list[RoundRecord] = []
        stop_reason = None
        session = self.backend.session() if self.backend is not None else contextlib.nullcontext()
        with session:
            while stop_reason is None:
                record, stop_reason, draft_len, ready = self._branch_round(
                    target, draft_model, ids, prompt_len, len(rounds), draft_len, ready, generators)
                rounds.append(record)
                if on_round is not None:
                    on_round(record)
        return Generation(tuple(ids[prompt_len:]), tuple(rounds), prompt_len, prefill_timer.ms, stop_reason)

    def _alone(self):
        """Context in which work with nothing running beside it may use every CPU thread."""
        alone = getattr(self.backend, "alone", None)
        return alone() if alone is not None else contextlib.nullcontext()

    def _branch_round(self, target: CachedModel, draft_model: CachedModel | None, ids: list[int], prompt_len: int,
                      round_index: int, draft_len: int, ready: Drafts | None, generators: _Generators):
        """Run one round, extending ``ids`` in place.

        Returns its record, the stop reason, the next draft_len and the next round's drafts when
        this round's pre-draft was kept.
        """
        sampling = self.config.sampling
        position = len(ids) - prompt_len
        prediction = plan = output = None
        check = Check(None, None, None)
        draft_timer = None
        with WallTimer(self.device) as round_timer:
            # 1. Draft draft_len tokens one by one, unless the previous round's pre-draft did.
            if ready is not None:
                drafts = ready
            elif draft_len > 0:
                with self._alone(), ComputeTimer(self.device) as draft_timer:
                    drafts = draft(draft_model, ids, draft_len, sampling, generators.draft)
            else:
                drafts = no_drafts(self.device)
            host = _HostDrafts.of(drafts)

            # 2. Predict the branch point and the next draft_len before the target's verdict.
            next_draft_len = draft_len
            if self.predictor is not None:
                prediction = self._predict(drafts, len(drafts), position, len(ids))
                next_draft_len = prediction.next_draft_len

            # 3. Verify every draft in one target pass, pre-drafting the next round meanwhile.
            def verify_drafts():
                with ComputeTimer(self.device) as timer:
                    logits = verify(target, ids, drafts.tokens)  # (draft_len + 1, vocab)
                return logits, timer

            if self.backend is not None and next_draft_len > 0:
                plan = plan_predraft(draft_model, ids, host.tokens, host.second_tokens, prediction.predicted,
                                     next_draft_len, self.branch.width)
                predraft_generator = generators.reseed_predraft()
                (target_logits, verify_timer), pending = self.backend.overlap(
                    lambda cancel: run_predraft(draft_model, plan, sampling, predraft_generator, cancel),
                    verify_drafts, draft_model)
            else:
                with self._alone():
                    (target_logits, verify_timer), pending = verify_drafts(), None

            # 4. Accept the longest acceptable prefix and add the target's own token.
            verdict, token = accept(drafts, target_logits, sampling, generators.accept)
            new_tokens, stop_reason = self._stop(host.tokens[:verdict] + [token], position)
            ids.extend(new_tokens)

            # 5. Check the pre-draft, then roll both caches back to the real context; the newest
            #    token is fed next round.
            if pending is not None:
                if stop_reason is not None or not plan.may_hit(verdict, token):
                    pending.cancel()
                output = pending.result()
                check = check_predraft(plan, output, verdict, token, stop_reason is not None)
                if check.hit:
                    adopt_row(draft_model, plan, output, check.row)
                else:
                    restore_after_miss(draft_model, plan, output, ids)
            elif draft_model is not None:
                rollback(draft_model, len(ids) - 1)
            rollback(target, len(ids) - 1)

        if self.predictor is not None:
            self.predictor.update(verdict, len(drafts))
        if self.draft_len_rule is not None:
            next_draft_len = self.draft_len_rule.next_draft_len(verdict, len(drafts))
        record = RoundRecord(
            round=round_index, position=position, context_len=prompt_len + position, draft_len=len(drafts),
            # A stop inside the round keeps only the drafts before it.
            accepted=min(verdict, len(new_tokens)), emitted=len(new_tokens), tokens=tuple(new_tokens),
            draft_tokens=tuple(host.tokens), draft_second_tokens=tuple(host.second_tokens),
            draft_max_prob=tuple(host.max_prob), draft_entropy=tuple(host.entropy),
            draft_ms=draft_timer.ms if draft_timer is not None else 0.0, verify_ms=verify_timer.ms,
            round_ms=round_timer.ms, finished=stop_reason is not None,
            predicted=prediction.predicted if prediction is not None else None,
            predraft_hit=check.hit, predraft_ms=output.ms if output is not None else None,
        )
        return record, stop_reason, next_draft_len, check.drafts

