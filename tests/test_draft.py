"""The draft recipe: layer choice, save/load, resumable training, and the shipped draft's agreement."""

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bpsim import draft as recipe  # noqa: E402
from bpsim.models import BUILTIN_TARGET, DRAFTS_DIR, SHIPPED_DRAFT, load_model, load_pair  # noqa: E402

ANSWERS = Path(__file__).parent / "data" / "mt_bench_answers.json"
# The shipped draft agrees on 0.29 of these 737 tokens; an untrained 4-layer draft on about 0.003.
AGREEMENT_FLOOR = 0.25


@pytest.fixture(scope="module")
def target():
    loaded, tokenizer = load_model(BUILTIN_TARGET, "cpu", "float32")
    loaded.model.requires_grad_(False)
    return loaded, tokenizer


@pytest.mark.parametrize("layers, depth, expected", [
    (1, 30, (0,)), (2, 30, (0, 29)), (4, 30, (0, 1, 28, 29)), (6, 30, (0, 1, 2, 27, 28, 29)),
])
def test_default_layers(layers, depth, expected):
    assert recipe.default_layers(layers, depth) == expected


def test_default_layers_rejects_depth():
    with pytest.raises(recipe.DraftError, match="between 1 and 29"):
        recipe.default_layers(30, 30)


def test_save_and_load_keep_only_own_tensors(target, tmp_path):
    loaded, _ = target
    draft = recipe.build_draft_model(loaded.model, (0, 29))
    recipe.save_draft(draft, tmp_path, {"note": "test"})
    from safetensors.torch import load_file

    names = set(load_file(tmp_path / "model.safetensors"))
    assert not any(name.startswith(recipe.SHARED_PREFIXES) for name in names)
    assert all(t.dtype == torch.float16 for t in load_file(tmp_path / "model.safetensors").values())
    again = recipe.load_draft(tmp_path, loaded.model)
    for name, tensor in recipe.draft_state(draft).items():
        assert torch.equal(recipe.draft_state(again)[name], tensor), name
    assert again.lm_head.weight.data_ptr() == loaded.model.lm_head.weight.data_ptr()


def test_load_draft_rejects_corrupt_folder(target, tmp_path):
    loaded, _ = target
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(recipe.DraftError, match="rebuild it"):
        recipe.load_draft(tmp_path, loaded.model)


def _tiny_config(steps):
    return recipe.RecipeConfig(layers=(0, 29), num_prompts=4, answer_tokens=8, generation_batch=4, top_k=8,
                               steps=steps, batch_sequences=2, warmup_steps=1, seed=3)


def test_training_lowers_kl_and_resumes_identically(target, tmp_path, monkeypatch):
    loaded, tokenizer = target
    torch.set_num_threads(1)
    config = _tiny_config(steps=6)
    shards = recipe.build_dataset(loaded.model, tokenizer, config, tmp_path / "a")
    batch = recipe._load_shard(shards[0])

    straight = recipe.build_draft_model(loaded.model, config.layers)
    with torch.no_grad():
        before = recipe.distillation_loss(straight, batch).item()
    recipe.train_draft(straight, shards, config, tmp_path / "a", checkpoint_every=3)
    with torch.no_grad():
        after = recipe.distillation_loss(straight, batch).item()
    assert after < before

    # Interrupt a second run after its first checkpoint, then resume it from the same data.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "data").symlink_to(tmp_path / "a" / "data")
    calls = {"count": 0}
    real_loss = recipe.distillation_loss

    def interrupted_loss(draft, rows):
        calls["count"] += 1
        if calls["count"] == 5:
            raise KeyboardInterrupt
        return real_loss(draft, rows)

    monkeypatch.setattr(recipe, "distillation_loss", interrupted_loss)
    first = recipe.build_draft_model(loaded.model, config.layers)
    with pytest.raises(KeyboardInterrupt):
        recipe.train_draft(first, shards, config, tmp_path / "b", checkpoint_every=3)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 3
    monkeypatch.setattr(recipe, "distillation_loss", real_loss)
    resumed = recipe.build_draft_model(loaded.model, config.layers)
    recipe.train_draft(resumed, shards, config, tmp_path / "b", checkpoint_every=3)
    for name, tensor in recipe.draft_state(straight).items():
        torch.testing.assert_close(recipe.draft_state(resumed)[name], tensor, atol=1e-3, rtol=0)


def test_checkpoint_with_other_settings_is_rejected(target, tmp_path):
    loaded, tokenizer = target
    config = _tiny_config(steps=2)
    shards = recipe.build_dataset(loaded.model, tokenizer, config, tmp_path)
    recipe.train_draft(recipe.build_draft_model(loaded.model, config.layers), shards, config, tmp_path)
    other = _tiny_config(steps=3)
    with pytest.raises(recipe.DraftError, match="other settings"):
        recipe.train_draft(recipe.build_draft_model(loaded.model, other.layers), shards, other, tmp_path)


@pytest.mark.skipif(not (DRAFTS_DIR / SHIPPED_DRAFT / "model.safetensors").is_file(),
                    reason="the shipped draft is not built in this checkout")
def test_shipped_draft_agreement_floor():
    pair = load_pair(device="cpu", dtype="float32")
    answers = json.loads(ANSWERS.read_text())
    result = recipe.greedy_agreement(pair.draft.model, answers)
    assert result["tokens"] >= 500
    assert result["agreement"] >= AGREEMENT_FLOOR, result
