"""Acceptance profiles: one teacher-forced pass of both models over each request's output.

For each output position j of a request (the j-th token the trace emitted), with the prompt and
the emitted tokens before j as context:

- ``match``: the draft's argmax equals the emitted token (greedy acceptance of a draft there);
- ``second_match``: the draft's second-best token equals the emitted token (the correction guess);
- ``accept_prob``: sum over tokens of min(p, q), with target p and draft q after the trace's
  temperature, top-k and top-p. Under greedy decoding it is 1 when both argmaxes agree, else 0;
- ``draft_max_prob`` and ``draft_entropy`` (nats) of the draft's distribution, computed as the
  decoder computes them (plain softmax under greedy decoding, else after the sampling filters);
- ``target_gap`` and ``draft_gap``: the top-1 minus top-2 logit of each model, so a
  disagreement with a recorded round can be told apart from a near-tie.

Under greedy decoding a round that starts after s emitted tokens with draft_len n accepts exactly
the run of consecutive matches in ``match[s:s + n]`` (``greedy_accepted``), because every
accepted draft equals the token the profile was teacher-forced on.
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bpsim import __version__
from bpsim.atomic import atomic_path
from bpsim.errors import BpsimError

logger = logging.getLogger(__name__)

PROFILE_VERSION = 1
METADATA_KEY = b"bpsim"
PROFILE_SUFFIX = ".profile.parquet"
NEAR_TIE_LOGIT_GAP = 1e-3  # top-2 logit gaps below this count as near-ties (float32 kernels differ by ~1e-5)

PROFILE_SCHEMA = pa.schema([
    ("request_id", pa.int32()),
    ("prompt_id", pa.string()),
    ("prompt_len", pa.int32()),
    ("tokens", pa.list_(pa.int32())),
    ("match", pa.list_(pa.bool_())),
    ("second_match", pa.list_(pa.bool_())),
    ("accept_prob", pa.list_(pa.float32())),
    ("draft_max_prob", pa.list_(pa.float32())),
    ("draft_entropy", pa.list_(pa.float32())),
    ("target_gap", pa.list_(pa.float32())),
    ("draft_gap", pa.list_(pa.float32())),
])


class ProfileError(BpsimError, ValueError):
    """A trace that cannot be profiled, or a profile that does not match its trace."""


def default_profile_path(trace_path: Path | str) -> Path:
    """Return ``X.profile.parquet`` for the trace ``X.parquet``."""
    trace_path = Path(trace_path)
    return trace_path.with_name(trace_path.name.removesuffix(".parquet") + PROFILE_SUFFIX)


@dataclass(frozen=True)
class RequestOutput:
    """The emitted tokens of one request, gathered from its rounds."""

    request_id: int
    prompt_id: str
    prompt_len: int
    tokens: tuple[int, ...]


def request_outputs(trace: pa.Table) -> list[RequestOutput]:
    """Concatenate each request's emitted tokens, in round order; rounds of a request are contiguous."""
    request_id = trace.column("request_id").to_numpy()
    prompt_id = trace.column("prompt_id").to_pylist()
    tokens = trace.column("tokens").to_pylist()
    prompt_len = (trace.column("context_len").to_numpy() - trace.column("position").to_numpy())
    outputs, start = [], 0
    for row in range(1, len(request_id) + 1):
        if row == len(request_id) or request_id[row] != request_id[start]:
            emitted = tuple(token for round_tokens in tokens[start:row] for token in round_tokens)
            outputs.append(RequestOutput(int(request_id[start]), prompt_id[start], int(prompt_len[start]), emitted))
            start = row
    return outputs


def prompt_token_ids(metadata: dict, prompt_id: str, tokenizer, prompts: dict | None = None) -> list[int]:
    """Return the prompt's token ids: from ``prompts``, the trace's ``prompt_tokens`` metadata or its suite."""
    if prompts and prompt_id in prompts:
        return list(prompts[prompt_id])
    stored = metadata.get("prompt_tokens") or {}
    if prompt_id in stored:
        return list(stored[prompt_id])
    from bpsim.prompts import encode_prompt, load_suite

    suite = metadata.get("suite")
    if isinstance(suite, dict):
        suite = suite.get("path") or suite.get("name")
    if not suite:
        raise ProfileError(f"the trace names no prompt suite, so prompt {prompt_id!r} cannot be re-encoded; "
                           "record the trace with a suite or store prompt_tokens in its metadata")
    found = [prompt for prompt in load_suite(str(suite)).prompts if prompt.prompt_id == prompt_id]
    if not found:
        raise ProfileError(f"prompt {prompt_id!r} is not in suite {suite!r}; profile with the suite the trace used")
    return encode_prompt(tokenizer, found[0])


def _sampling_settings(metadata: dict) -> tuple[float, int | None, float]:
    sampling = metadata.get("sampling") or {}
    if sampling.get("mode") == "greedy":
        return 0.0, None, 1.0
    top_k = sampling.get("top_k")
    return float(sampling.get("temperature") or 0.0), (int(top_k) if top_k else None), float(sampling.get("top_p", 1.0))


def _last_logits(model: torch.nn.Module, ids: torch.Tensor, keep: int, vocab_size: int) -> torch.Tensor:
    from bpsim.models import pad_vocab

    logits = model(input_ids=ids[None], logits_to_keep=keep).logits[0].float()  # (keep, vocab)
    return pad_vocab(logits, vocab_size)


@torch.inference_mode()
def profile_request(pair, prompt_ids: list[int], tokens: list[int], temperature: float = 0.0,
                    top_k: int | None = None, top_p: float = 1.0) -> dict[str, np.ndarray]:
    """Teacher-force both models of ``pair`` over prompt + tokens; return per-position arrays, each (len(tokens),)."""
    from bpsim.acceptance import logits_to_probs

    if not tokens:
        raise ProfileError("a request with no emitted tokens cannot be profiled")
    ids = torch.tensor(list(prompt_ids) + list(tokens)[:-1], device=pair.device)
    keep = len(tokens)  # the logits predicting output positions 0..len(tokens) - 1
    target_logits = _last_logits(pair.target.model, ids, keep, pair.vocab_size)  # (tokens, vocab)
    draft_logits = _last_logits(pair.draft.model, ids, keep, pair.vocab_size)  # (tokens, vocab)
    emitted = torch.tensor(tokens, device=pair.device)  # (tokens,)

    draft_top = draft_logits.topk(2, dim=-1)
    target_top = target_logits.topk(2, dim=-1)
    if temperature > 0:
        target_probs = logits_to_probs(target_logits, temperature, top_k, top_p)
        draft_probs = logits_to_probs(draft_logits, temperature, top_k, top_p)
        accept_prob = torch.minimum(target_probs, draft_probs).sum(dim=-1)
    else:
        draft_probs = torch.softmax(draft_logits, dim=-1)
        accept_prob = (draft_top.indices[:, 0] == target_top.indices[:, 0]).float()
    return {
        "match": (draft_top.indices[:, 0] == emitted).cpu().numpy(),
        "second_match": (draft_top.indices[:, 1] == emitted).cpu().numpy(),
        "accept_prob": accept_prob.clamp(0.0, 1.0).cpu().numpy().astype(np.float32),
        "draft_max_prob": draft_probs.max(dim=-1).values.cpu().numpy().astype(np.float32),
        "draft_entropy": torch.special.entr(draft_probs).sum(dim=-1).cpu().numpy().astype(np.float32),
        "target_gap": (target_top.values[:, 0] - target_top.values[:, 1]).cpu().numpy().astype(np.float32),
        "draft_gap": (draft_top.values[:, 0] - draft_top.values[:, 1]).cpu().numpy().astype(np.float32),
    }


def _check_pair(metadata: dict, pair) -> None:
    for role in ("target", "draft"):
        entry = metadata.get(role)
        recorded = entry.get("sha256") if isinstance(entry, dict) else None
        loaded = getattr(pair, role).sha256
        if recorded and loaded not in (None, "unknown") and recorded != loaded:
            raise ProfileError(f"the loaded {role} {getattr(pair, role).name!r} has weights {loaded[:12]} but the "
                               f"trace was recorded with {recorded[:12]}; profile with the models that recorded it")


def model_names(metadata: dict) -> tuple[str, str]:
    """Return the ``(target, draft)`` names a trace was recorded with."""
    names = []
    for role in ("target", "draft"):
        entry = metadata.get(role)
        name = entry.get("name") if isinstance(entry, dict) else entry
        if not name:
            raise ProfileError(f"the trace metadata names no {role} model; pass --{role} to choose one")
        names.append(str(name))
    return names[0], names[1]


def profile_table(trace: pa.Table, pair, prompts: dict | None = None, progress: bool = False,
                  other_draft: bool = False) -> pa.Table:
    """Profile every request of ``trace`` with ``pair``; return the profile table with its metadata.

    With ``other_draft`` the draft may differ from the one that recorded the trace: the output
    text is the target's either way (decoding is lossless), so the profile then gives that
    draft's acceptances on the same text, and its metadata names the draft actually used.
    """
    from bpsim.traces import trace_metadata

    metadata = trace_metadata(trace)
    if other_draft:
        _check_pair({"target": metadata.get("target")}, pair)
    else:
        _check_pair(metadata, pair)
    temperature, top_k, top_p = _sampling_settings(metadata)
    columns: dict[str, list] = {name: [] for name in PROFILE_SCHEMA.names}
    outputs = request_outputs(trace)
    if progress:
        from tqdm import tqdm

        outputs = tqdm(outputs, desc="profile", unit="request")
    for output in outputs:
        prompt_ids = prompt_token_ids(metadata, output.prompt_id, pair.tokenizer, prompts)
        if len(prompt_ids) != output.prompt_len:
            raise ProfileError(f"prompt {output.prompt_id!r} of request {output.request_id} encodes to "
                               f"{len(prompt_ids)} tokens but the trace's context_len implies {output.prompt_len}; "
                               "profile with the tokenizer and suite the trace was recorded with")
        arrays = profile_request(pair, prompt_ids, list(output.tokens), temperature, top_k, top_p)
        columns["request_id"].append(output.request_id)
        columns["prompt_id"].append(output.prompt_id)
        columns["prompt_len"].append(output.prompt_len)
        columns["tokens"].append(list(output.tokens))
        for name, values in arrays.items():
            columns[name].append(values.tolist())
    profile_metadata = {
        "profile_version": PROFILE_VERSION,
        "bpsim_version": __version__,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "trace_run_id": metadata.get("run_id"),
        **{key: metadata[key] for key in ("target", "draft", "sampling", "suite") if key in metadata},
    }
    if other_draft:
        profile_metadata["draft"] = {"name": pair.draft.name, "sha256": pair.draft.sha256}
    table = pa.table(columns, schema=PROFILE_SCHEMA)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(profile_metadata).encode()})


def write_profile(table: pa.Table, path: Path | str, overwrite: bool = False) -> Path:
    with atomic_path(path, overwrite=overwrite) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def greedy_accepted(match, start: int, draft_len: int) -> int:
    """Return the greedy accepted count of a round starting after ``start`` emitted tokens with ``draft_len`` drafts.

    That is the run of consecutive matches in ``match[start:start + draft_len]``, capped by the
    positions the profile covers.
    """
    window = np.asarray(match[start:start + draft_len], dtype=bool)
    misses = np.flatnonzero(~window)
    return int(misses[0]) if len(misses) else len(window)


@dataclass(frozen=True)
class Disagreement:
    """A recorded round whose accepted count the profile does not reproduce."""

    request_id: int
    round: int
    position: int  # output position of the first token where the two disagree
    recorded: int
    profiled: int
    target_gap: float
    draft_gap: float

    @property
    def near_tie(self) -> bool:
        return min(self.target_gap, self.draft_gap) < NEAR_TIE_LOGIT_GAP


def compare_with_trace(profile: pa.Table, trace: pa.Table) -> list[Disagreement]:
    """Return every greedy round whose recorded accepted count differs from ``greedy_accepted`` on the profile."""
    by_request = {row["request_id"]: row for row in profile.to_pylist()}
    disagreements = []
    for row in trace.select(["request_id", "round", "position", "draft_len", "accepted"]).to_pylist():
        entry = by_request.get(row["request_id"])
        if entry is None:
            raise ProfileError(f"request {row['request_id']} of the trace is missing from the profile; profile it again")
        profiled = greedy_accepted(entry["match"], row["position"], row["draft_len"])
        if profiled != row["accepted"]:
            index = row["position"] + min(profiled, row["accepted"])
            disagreements.append(Disagreement(row["request_id"], row["round"], index, row["accepted"], profiled,
                                              float(entry["target_gap"][index]), float(entry["draft_gap"][index])))
    return disagreements
