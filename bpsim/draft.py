"""The draft recipe: a shallow copy of the target, distilled from the target's own answers.

A draft keeps a few of the target's transformer layers (initialised from them) and shares
the target's token embedding and output layer, which stay frozen and are not saved with the
draft. It is trained to match the target's next-token distribution (KL divergence to the
target's top-k probabilities) on answers that the target generated to instruction prompts
written for this project (``bpsim.distill_prompts``).

The recipe runs in three resumable stages inside one work folder:

1. ``data``: the target answers the prompts in batches (alternately greedy and sampled at
   temperature 0.8) and its top-k log-probabilities at every answer position are stored.
2. ``train``: AdamW on the draft's own layers with a cosine schedule, checkpointed.
3. ``eval``: greedy agreement with the target's greedy MT-Bench answers, and the draft's
   per-token decoding latency as a fraction of the target's, measured side by side.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from bpsim.atomic import atomic_path, write_text
from bpsim.errors import BpsimError

logger = logging.getLogger(__name__)

SHARED_PREFIXES = ("model.embed_tokens.", "lm_head.")
DATA_SETTINGS = ("num_prompts", "answer_tokens", "generation_batch", "top_k", "seed")


class DraftError(BpsimError, ValueError):
    """A draft folder or recipe setting that cannot be used."""


def default_layers(num_layers: int, target_depth: int) -> tuple[int, ...]:
    """Target layers that seed an ``num_layers`` draft: the first half from the bottom, the rest from the top.

    The bottom layers read the embedding and the top layers write into the output layer that
    the draft shares, so keeping both ends lets training start from a working model.
    """
    if not 1 <= num_layers < target_depth:
        raise DraftError(f"a draft needs between 1 and {target_depth - 1} layers, got {num_layers}")
    bottom = math.ceil(num_layers / 2)
    return tuple(range(bottom)) + tuple(range(target_depth - (num_layers - bottom), target_depth))


def share_embeddings(draft: torch.nn.Module, target: torch.nn.Module) -> None:
    """Point the draft's embedding and output layer at the target's frozen tensors."""
    draft.model.embed_tokens.weight = target.model.embed_tokens.weight
    draft.lm_head.weight = target.lm_head.weight
    draft.model.embed_tokens.weight.requires_grad_(False)


def build_draft_model(target: torch.nn.Module, layers: tuple[int, ...]) -> torch.nn.Module:
    """Return a LlamaForCausalLM of ``len(layers)`` layers copied from ``target``."""
    from transformers import LlamaForCausalLM

    depth = target.config.num_hidden_layers
    if not layers or any(not 0 <= index < depth for index in layers):
        raise DraftError(f"layer indices {list(layers)} must lie in 0..{depth - 1}")
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = len(layers)
    draft = LlamaForCausalLM(config).to(dtype=target.dtype)
    for position, index in enumerate(layers):
        draft.model.layers[position].load_state_dict(target.model.layers[index].state_dict())
    draft.model.norm.load_state_dict(target.model.norm.state_dict())
    share_embeddings(draft, target)
    return draft


def draft_state(draft: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The draft's own tensors, in fp16: everything except the shared embedding and output layer."""
    return {name: tensor.detach().to(torch.float16).contiguous()
            for name, tensor in draft.state_dict().items() if not name.startswith(SHARED_PREFIXES)}


def save_draft(draft: torch.nn.Module, folder: Path, info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(draft_state(draft), tmp, metadata={"format": "pt"})
    write_text(folder / "config.json", json.dumps({**info, "llama_config": draft.config.to_dict()}, indent=1))


def load_draft(folder: Path, target: torch.nn.Module) -> torch.nn.Module:
    """Load a draft saved by ``save_draft`` and attach the target's embedding and output layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    try:
        info = json.loads((folder / "config.json").read_text())
        state = load_file(folder / "model.safetensors")
    except (OSError, json.JSONDecodeError) as error:
        raise DraftError(f"cannot read draft in {folder}: {error}; rebuild it with bpsim draft build") from error
    config = LlamaConfig.from_dict(info["llama_config"])
    if config.hidden_size != target.config.hidden_size or config.vocab_size != target.config.vocab_size:
        raise DraftError(f"draft in {folder} was built for another target (hidden size {config.hidden_size}, "
                         f"vocabulary {config.vocab_size}); rebuild it for this target")
    draft = LlamaForCausalLM(config).to(dtype=target.dtype)
    missing, unexpected = draft.load_state_dict({k: v.to(target.dtype) for k, v in state.items()}, strict=False)
    own_missing = [name for name in missing if not name.startswith(SHARED_PREFIXES)]
    if own_missing or unexpected:
        raise DraftError(f"draft in {folder} does not match its config (missing {own_missing[:3]}, "
                         f"unexpected {unexpected[:3]}); rebuild it with bpsim draft build")
    share_embeddings(draft, target)
    return draft.eval()


@dataclass(frozen=True)
class RecipeConfig:
    """Settings of one draft build; together with the code version they fix the result."""

    layers: tuple[int, ...] = (0, 1, 28, 29)
    num_prompts: int = 2400
    answer_tokens: int = 160
    generation_batch: int = 48
    top_k: int = 32
    steps: int = 1500
    batch_sequences: int = 12
    learning_rate: float = 3e-4
    warmup_steps: int = 50
    eval_answer_tokens: int = 128
    seed: int = 0

    def __post_init__(self):
        for name in ("num_prompts", "answer_tokens", "generation_batch", "top_k", "steps", "batch_sequences",
                     "eval_answer_tokens"):
            if getattr(self, name) < 1:
                raise DraftError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.learning_rate < 1:
            raise DraftError(f"learning_rate must lie in (0, 1), got {self.learning_rate}")


# ---------------------------------------------------------------------------------------------
# Stage 1: target answers and their top-k distributions


def _chat_ids(tokenizer, text: str) -> list[int]:
    from bpsim.prompts import Prompt, encode_prompt

    return encode_prompt(tokenizer, Prompt("distill", text))


@torch.no_grad()
def generate_answers(target, tokenizer, prompts: list[str], max_new_tokens: int, sample: bool, seed: int,
                     top_k: int | None) -> list[dict]:
    """Answer a batch of prompts with the target; return ids and, if ``top_k``, its top-k log-probs.

    Each answer is cut after its first end-of-sequence token.
    """
    encoded = [_chat_ids(tokenizer, text) for text in prompts]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])  # (batch, width), left padded
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
    torch.manual_seed(seed)
    output = target.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
        do_sample=sample, temperature=0.8 if sample else None, top_k=0 if sample else None, top_p=None,
        output_logits=top_k is not None, return_dict_in_generate=True, pad_token_id=pad,
    )
    answers = output.sequences[:, width:]  # (batch, new_tokens)
    if top_k is not None:
        logprobs = torch.stack(output.logits, dim=1).float().log_softmax(-1)  # (batch, new_tokens, vocab)
        top_values, top_ids = logprobs.topk(top_k, dim=-1)  # (batch, new_tokens, top_k)
    rows = []
    for row, ids in enumerate(encoded):
        answer = answers[row].tolist()
        if tokenizer.eos_token_id in answer:
            answer = answer[: answer.index(tokenizer.eos_token_id) + 1]
        item = {"prompt_ids": ids, "answer_ids": answer}
        if top_k is not None:
            item["top_ids"] = top_ids[row, : len(answer)].to(torch.int32)
            item["top_logprobs"] = top_values[row, : len(answer)].to(torch.float16)
        rows.append(item)
    return rows


def _save_shard(path: Path, rows: list[dict]) -> None:
    """Store variable-length rows as flat tensors plus offsets (safetensors, no pickle)."""
    tensors = {
        "prompt_lengths": torch.tensor([len(r["prompt_ids"]) for r in rows], dtype=torch.int32),
        "answer_lengths": torch.tensor([len(r["answer_ids"]) for r in rows], dtype=torch.int32),
        "prompt_ids": torch.tensor([t for r in rows for t in r["prompt_ids"]], dtype=torch.int32),
        "answer_ids": torch.tensor([t for r in rows for t in r["answer_ids"]], dtype=torch.int32),
        "top_ids": torch.cat([r["top_ids"] for r in rows]),
        "top_logprobs": torch.cat([r["top_logprobs"] for r in rows]),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, tmp)


def _load_shard(path: Path) -> list[dict]:
    tensors = load_file(path)
    rows, prompt_at, answer_at = [], 0, 0
    for prompt_len, answer_len in zip(tensors["prompt_lengths"].tolist(), tensors["answer_lengths"].tolist()):
        rows.append({
            "prompt_ids": tensors["prompt_ids"][prompt_at: prompt_at + prompt_len].long(),
            "answer_ids": tensors["answer_ids"][answer_at: answer_at + answer_len].long(),
            "top_ids": tensors["top_ids"][answer_at: answer_at + answer_len].long(),
            "top_logprobs": tensors["top_logprobs"][answer_at: answer_at + answer_len].float(),
        })
        prompt_at, answer_at = prompt_at + prompt_len, answer_at + answer_len
    return rows


def build_dataset(target, tokenizer, config: RecipeConfig, work: Path) -> list[Path]:
    """Stage 1: write one shard per generation batch into ``work/data``, skipping shards already there."""
    from bpsim.distill_prompts import distill_prompts

    prompts = distill_prompts(config.num_prompts, seed=config.seed)
    batches = [prompts[i: i + config.generation_batch] for i in range(0, len(prompts), config.generation_batch)]
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = [data_dir / f"shard-{index:04d}.safetensors" for index in range(len(batches))]
    todo = [index for index, path in enumerate(paths) if not path.is_file()]
    for index in tqdm(todo, desc="target answers", unit="batch", initial=len(paths) - len(todo), total=len(paths)):
        rows = generate_answers(target, tokenizer, batches[index], config.answer_tokens, sample=index % 2 == 1,
                                seed=config.seed * 100_003 + index, top_k=config.top_k)
        _save_shard(paths[index], rows)
    return paths


# ---------------------------------------------------------------------------------------------
# Stage 2: distillation


def distillation_loss(draft, batch: list[dict]) -> torch.Tensor:
    """KL(target || draft) per answer token, averaged, with the target's top-k renormalised.

    Only answer positions reach the output layer, which is most of a small draft's compute.
    """
    width = max(len(r["prompt_ids"]) + len(r["answer_ids"]) for r in batch)
    device = draft.lm_head.weight.device
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
    rows, cols = [], []
    for i, r in enumerate(batch):
        sequence = torch.cat([r["prompt_ids"], r["answer_ids"]])
        input_ids[i, : len(sequence)] = sequence
        attention_mask[i, : len(sequence)] = 1
        # Hidden state at position t predicts token t + 1: answer token j is predicted at prompt_len + j - 1.
        start = len(r["prompt_ids"]) - 1
        rows += [i] * len(r["answer_ids"])
        cols += list(range(start, start + len(r["answer_ids"])))
    hidden = draft.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).last_hidden_state
    selected = hidden[torch.tensor(rows), torch.tensor(cols)]  # (answer_tokens, hidden)
    draft_logprobs = draft.lm_head(selected).float().log_softmax(-1)  # (answer_tokens, vocab)
    top_ids = torch.cat([r["top_ids"] for r in batch]).to(device)  # (answer_tokens, top_k)
    target_logprobs = torch.cat([r["top_logprobs"] for r in batch]).to(device).log_softmax(-1)
    target_probs = target_logprobs.exp()
    kl = (target_probs * (target_logprobs - draft_logprobs.gather(-1, top_ids))).sum(-1)
    return kl.mean()


def _learning_rate(step: int, config: RecipeConfig) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_draft(draft, shards: list[Path], config: RecipeConfig, work: Path, checkpoint_every: int = 100):
    """Stage 2: train the draft's own layers, resuming from ``work/checkpoint`` when it exists."""
    rows = [row for path in shards for row in _load_shard(path)]
    rows = [row for row in rows if len(row["answer_ids"]) > 0]
    if not rows:
        raise DraftError(f"no answers in {work / 'data'}; delete the folder and rebuild")
    logger.info("distillation set: %d answers, %d answer tokens", len(rows), sum(len(r["answer_ids"]) for r in rows))
    parameters = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.0)
    checkpoint = work / "checkpoint"
    step = 0
    if (checkpoint / "state.json").is_file():
        state = json.loads((checkpoint / "state.json").read_text())
        if state.get("recipe") != recipe_dict(config):
            raise DraftError(f"checkpoint in {checkpoint} was trained with other settings ({state.get('recipe')}); "
                             "use the same options, or delete the checkpoint folder to start training again")
        draft.load_state_dict({k: v.to(draft.dtype) for k, v in load_file(checkpoint / "draft.safetensors").items()},
                              strict=False)
        optimizer_tensors = load_file(checkpoint / "optimizer.safetensors")
        optimizer.load_state_dict(_unflatten_optimizer(optimizer, optimizer_tensors, state["optimizer"]))
        step = state["step"]
        logger.info("resuming distillation at step %d", step)
    epoch_orders: dict[int, list[int]] = {}

    def batch_at(index: int) -> list[dict]:
        # The sample order is a pure function of the seed and step, so a resumed run sees the same batches.
        per_epoch = len(rows) // config.batch_sequences
        epoch, offset = divmod(index, max(1, per_epoch))
        if epoch not in epoch_orders:
            order = list(range(len(rows)))
            random.Random(config.seed * 7919 + epoch).shuffle(order)
            epoch_orders[epoch] = order
        order = epoch_orders[epoch]
        return [rows[i] for i in order[offset * config.batch_sequences: (offset + 1) * config.batch_sequences]]

    draft.train()
    progress = tqdm(range(step, config.steps), desc="distillation", unit="step", initial=step, total=config.steps)
    losses = []
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, config)
        loss = distillation_loss(draft, batch_at(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(kl=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == config.steps:
            _save_checkpoint(draft, optimizer, step + 1, checkpoint, recipe_dict(config))
    draft.eval()
    return {"answers": len(rows), "answer_tokens": sum(len(r["answer_ids"]) for r in rows),
            "final_kl": sum(losses[-50:]) / max(1, len(losses[-50:])) if losses else None}


def _save_checkpoint(draft, optimizer, step: int, folder: Path, recipe: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors, layout = _flatten_optimizer(optimizer)
    with atomic_path(folder / "optimizer.safetensors") as tmp:
        save_file(tensors, tmp)
    with atomic_path(folder / "draft.safetensors") as tmp:
        save_file({k: v.detach().float().contiguous() for k, v in draft.state_dict().items()
                   if not k.startswith(SHARED_PREFIXES)}, tmp)
    # state.json is written last, so a checkpoint without it is ignored on resume.
    write_text(folder / "state.json", json.dumps({"step": step, "recipe": recipe, "optimizer": layout}))


def _flatten_optimizer(optimizer):
    state = optimizer.state_dict()
    tensors, layout = {}, {"param_groups": state["param_groups"], "state": {}}
    for key, values in state["state"].items():
        layout["state"][str(key)] = {}
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{key}.{name}"] = value.contiguous()
                layout["state"][str(key)][name] = "tensor"
            else:
                layout["state"][str(key)][name] = value
    return tensors, layout


def _unflatten_optimizer(optimizer, tensors, layout):
    state = {}
    for key, values in layout["state"].items():
        state[int(key)] = {name: tensors[f"{key}.{name}"] if value == "tensor" else value
                           for name, value in values.items()}
    return {"state": state, "param_groups": layout["param_groups"]}


# ---------------------------------------------------------------------------------------------
# Stage 3: measured figures


def reference_answers(target, tokenizer, work: Path, max_new_tokens: int, batch: int = 16) -> list[dict]:
    """Target greedy answers to the MT-Bench first turns, generated once and cached in ``work``.

    NOTE: answers are generated in left-padded batches; padding can flip an exact near-tie
    relative to one-at-a-time greedy decoding, which does not matter for an agreement figure.
    """
    from bpsim.prompts import mt_bench

    path = work / "mt-bench-answers.json"
    if path.is_file():
        return json.loads(path.read_text())
    suite = mt_bench()
    rows = []
    texts = [p.text for p in suite.prompts]
    for start in tqdm(range(0, len(texts), batch), desc="target greedy MT-Bench answers", unit="batch"):
        for prompt, row in zip(suite.prompts[start: start + batch],
                               generate_answers(target, tokenizer, texts[start: start + batch], max_new_tokens,
                                                sample=False, seed=0, top_k=None)):
            rows.append({"prompt_id": prompt.prompt_id, **row})
    write_text(path, json.dumps(rows))
    return rows


@torch.no_grad()
def greedy_agreement(draft, answers: list[dict]) -> dict:
    """Fraction of answer tokens where the draft's argmax, teacher-forced, equals the target's token."""
    matches = total = 0
    device = draft.lm_head.weight.device
    for row in answers:
        sequence = torch.tensor(row["prompt_ids"] + row["answer_ids"], device=device)[None]  # (1, seq)
        logits = draft(sequence).logits[0]  # (seq, vocab)
        start = len(row["prompt_ids"]) - 1
        predicted = logits[start: start + len(row["answer_ids"])].argmax(-1)
        matches += (predicted == sequence[0, start + 1:]).sum().item()
        total += len(row["answer_ids"])
    return {"agreement": matches / max(1, total), "tokens": total, "answers": len(answers)}


@torch.no_grad()
def per_token_latency(model, prompt_ids: list[int], new_tokens: int = 48) -> float:
    """Median seconds per decoded token at batch size 1 with a KV cache."""
    from transformers import DynamicCache

    device = model.lm_head.weight.device
    cache = DynamicCache()
    output = model(torch.tensor([prompt_ids], device=device), cache=cache, use_cache=True)
    token = output.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(new_tokens):
        start = time.perf_counter()
        output = model(token, cache=cache, use_cache=True)
        token = output.logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def latency_ratio(draft, target, prompt_ids: list[int], repeats: int = 3) -> dict:
    """Draft and target per-token latency, measured alternately in one run."""
    draft_times, target_times = [], []
    for _ in range(repeats):
        draft_times.append(per_token_latency(draft, prompt_ids))
        target_times.append(per_token_latency(target, prompt_ids))
    draft_ms, target_ms = 1000 * min(draft_times), 1000 * min(target_times)
    return {"draft_ms_per_token": draft_ms, "target_ms_per_token": target_ms, "ratio": draft_ms / target_ms}


def machine_description() -> str:
    return f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, torch {torch.__version__}".strip()


def recipe_dict(config: RecipeConfig) -> dict:
    return {**asdict(config), "layers": list(config.layers)}
