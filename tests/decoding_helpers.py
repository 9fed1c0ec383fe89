"""Models and checks shared by the decoding tests: toy and wrapped models, a reference greedy decoder."""

import copy
import warnings

import pyarrow as pa
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

# Float32 logits of the built-in target differ by under 1e-4 between a one-token pass and a
# multi-token pass on CPU (measured on one MT-Bench prompt). A greedy divergence where the
# reference's top-2 logits lie closer than this tolerance is a near-tie flipped by rounding.
TIE_TOLERANCE = 1e-3
SIGNIFICANCE = 1e-3


class NoisyLogits(torch.nn.Module):
    """A model whose logits get seeded Gaussian noise: a draft that agrees with it often, not always."""

    def __init__(self, model: torch.nn.Module, scale: float, seed: int = 0):
        super().__init__()
        self.model = model
        self.config = model.config
        self.scale = scale
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, input_ids, **kwargs):
        output = self.model(input_ids=input_ids, **kwargs)
        noise = torch.randn(output.logits.shape, generator=self.generator)
        output.logits = output.logits + self.scale * noise.to(output.logits.dtype)
        return output


class ForcedToken(torch.nn.Module):
    """A draft that always proposes ``token`` with certainty, whatever the context."""

    def __init__(self, model: torch.nn.Module, token: int):
        super().__init__()
        self.model = model
        self.config = model.config
        self.token = token

    def forward(self, input_ids, **kwargs):
        output = self.model(input_ids=input_ids, **kwargs)
        logits = torch.full_like(output.logits, -30.0)
        logits[..., self.token] = 30.0
        output.logits = logits
        return output


class CountingModel(torch.nn.Module):
    """Count the forward passes of ``model``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config
        self.calls = 0

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, input_ids, **kwargs):
        self.calls += 1
        return self.model(input_ids=input_ids, **kwargs)


def toy_llama(seed: int, vocab: int = 5, logit_scale: float = 0.4) -> LlamaForCausalLM:
    """A one-layer random Llama with a small vocabulary and an output layer scaled to give varied distributions."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, logit_scale)
    return model


def perturbed(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with seeded noise on its output layer: a deterministic draft that agrees often."""
    copied = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = copied.lm_head.weight
        weight.add_(scale * torch.randn(weight.shape, generator=generator, dtype=weight.dtype))
    return copied


@torch.inference_mode()
def reference_greedy(model, prompt: list[int], max_new_tokens: int, eos: tuple[int, ...] = ()):
    """Greedy decoding one token per pass, independent of bpsim; returns tokens and each step's top-2 logit gap."""
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True).logits[0, -1].float()
    tokens, gaps = [], []
    for _ in range(max_new_tokens):
        top2 = logits.topk(2).values
        gaps.append(float(top2[0] - top2[1]))
        token = int(logits.argmax())
        tokens.append(token)
        if token in eos:
            break
        logits = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1].float()
    return tokens, gaps


def check_greedy_match(tokens, reference, gaps, label):
    """Fail on any divergence from the reference unless its first one is a near-tie, which is reported."""
    for position, (token, expected) in enumerate(zip(tokens, reference)):
        if token != expected:
            assert gaps[position] < TIE_TOLERANCE, (
                f"{label}: token {token} at position {position} differs from the target's greedy {expected}, "
                f"whose top-2 logit gap {gaps[position]:.2e} is not a near-tie (< {TIE_TOLERANCE})")
            warnings.warn(f"{label}: near-tie divergence at position {position} (top-2 logit gap "
                          f"{gaps[position]:.2e}); the rest of the output is not compared")
            return
    assert len(tokens) == len(reference), f"{label}: {len(tokens)} tokens, the reference has {len(reference)}"


def rounds_table(rounds) -> pa.Table:
    from dataclasses import asdict

    from bpsim.traces import SCHEMA

    rows = [{"run_id": "test", "request_id": 0, "prompt_id": "p", **asdict(record)} for record in rounds]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    return table.replace_schema_metadata({b"bpsim": b'{"schema_version": 1}'})


def greedy_references_for(pair, prompts: list[list[int]], max_new_tokens: int) -> list:
    """Return ``reference_greedy`` of the pair's target on each prompt, stopping at its EOS ids."""
    from bpsim.decoding import eos_token_ids

    eos = eos_token_ids(pair.tokenizer, pair.target.model)
    return [reference_greedy(pair.target.model, ids, max_new_tokens, eos) for ids in prompts]
