"""Shared fixtures: the real target with its draft, loaded once per test session."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bpsim.models import BUILTIN_TARGET, DRAFTS_DIR, SHIPPED_DRAFT, LoadedModel, ModelPair  # noqa: E402

UNTRAINED_DRAFT_LAYERS = (0, 1, 28, 29)


@pytest.fixture(scope="session")
def real_pair() -> ModelPair:
    """The built-in target on CPU in float32 with the shipped draft.

    Until the shipped draft is trained, the draft is an untrained copy of four target
    layers, which the target almost never agrees with.
    """
    from bpsim.draft import build_draft_model
    from bpsim.models import load_model, load_pair

    if (DRAFTS_DIR / SHIPPED_DRAFT / "model.safetensors").is_file():
        return load_pair(BUILTIN_TARGET, SHIPPED_DRAFT, "cpu", "float32")
    target, tokenizer = load_model(BUILTIN_TARGET, "cpu", "float32")
    draft_model = build_draft_model(target.model, UNTRAINED_DRAFT_LAYERS).eval()
    draft = LoadedModel("untrained-draft4", draft_model, "untrained", len(UNTRAINED_DRAFT_LAYERS),
                        draft_model.config.vocab_size)
    return ModelPair(target, draft, tokenizer, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def mt_bench_prompts(real_pair) -> list[list[int]]:
    """The first two MT-Bench prompts, encoded for the built-in target."""
    from bpsim.prompts import encode_prompt, load_suite

    suite = load_suite("mt-bench", limit=2)
    return [encode_prompt(real_pair.tokenizer, prompt) for prompt in suite.prompts]
