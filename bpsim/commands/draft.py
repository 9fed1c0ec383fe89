"""``bpsim draft build`` and ``bpsim draft eval``: distil a draft from the built-in target and measure it."""

from __future__ import annotations

import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from bpsim.atomic import write_text


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("draft", help="build or evaluate a distilled draft of the built-in target")
    actions = parser.add_subparsers(dest="action", required=True)

    build = actions.add_parser("build", help="distil an N-layer draft (resumable; rerun the same command to resume)")
    build.add_argument("--layers", type=int, default=4, help="number of transformer layers in the draft (default 4)")
    build.add_argument("--init-layers", type=str, default=None,
                       help="comma-separated target layers to copy (default: first half bottom, rest top)")
    build.add_argument("--steps", type=int, default=1500, help="optimizer steps (default 1500)")
    build.add_argument("--prompts", type=int, default=2400, help="instruction prompts the target answers (default 2400)")
    build.add_argument("--answer-tokens", type=int, default=160, help="max tokens per target answer (default 160)")
    build.add_argument("--batch", type=int, default=12, help="answers per optimizer step (default 12)")
    build.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    build.add_argument("--seed", type=int, default=0, help="seed of prompts, sampling and batch order (default 0)")
    build.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    build.add_argument("--work", type=Path, default=None, help="work folder for data and checkpoints (default runs/draftN)")
    build.add_argument("--out", type=Path, default=None,
                       help="draft folder to write (default bpsim/drafts/smollm2-135m-draftN)")
    build.add_argument("--stage", choices=["data", "train", "all"], default="all",
                       help="stop after this stage (default all: data, train, eval, write)")
    build.set_defaults(run=run_build)

    evaluate = actions.add_parser("eval", help="print agreement on MT-Bench answers and the per-token latency ratio")
    evaluate.add_argument("--draft", default="smollm2-135m-draft4", help="draft name (default smollm2-135m-draft4)")
    evaluate.add_argument("--limit", type=int, default=None, help="use only the first N MT-Bench answers")
    evaluate.add_argument("--work", type=Path, default=Path("runs/draft-eval"),
                          help="folder caching the target's MT-Bench answers (default runs/draft-eval)")
    evaluate.set_defaults(run=run_eval)


def run_build(args) -> int:
    from bpsim import draft as recipe
    from bpsim.models import BUILTIN_TARGET, DRAFTS_DIR, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    target, tokenizer = load_model(BUILTIN_TARGET, "cpu", "float32")
    target.model.requires_grad_(False)
    depth = target.num_layers
    if args.init_layers:
        layers = tuple(int(x) for x in args.init_layers.split(","))
        if len(layers) != args.layers:
            raise recipe.DraftError(f"--init-layers lists {len(layers)} layers but --layers is {args.layers}")
    else:
        layers = recipe.default_layers(args.layers, depth)
    config = recipe.RecipeConfig(layers=layers, num_prompts=args.prompts, answer_tokens=args.answer_tokens,
                                 steps=args.steps, batch_sequences=args.batch, learning_rate=args.lr, seed=args.seed)
    work = args.work or Path("runs") / f"draft{args.layers}"
    out = args.out or DRAFTS_DIR / f"{BUILTIN_TARGET}-draft{args.layers}"
    work.mkdir(parents=True, exist_ok=True)
    # The data stage depends on these settings only, so training options can change between runs.
    data_settings = {k: recipe.recipe_dict(config)[k] for k in recipe.DATA_SETTINGS}
    saved = work / "data-settings.json"
    if saved.is_file() and json.loads(saved.read_text()) != data_settings:
        raise recipe.DraftError(f"{work} holds data built with other settings ({saved}); "
                                "use another --work or the same --prompts, --answer-tokens and --seed")
    write_text(saved, json.dumps(data_settings, indent=1))

    started = time.time()
    torch.manual_seed(config.seed)
    shards = recipe.build_dataset(target.model, tokenizer, config, work)
    data_seconds = time.time() - started
    if args.stage == "data":
        return 0
    draft = recipe.build_draft_model(target.model, layers)
    started = time.time()
    training = recipe.train_draft(draft, shards, config, work)
    train_seconds = time.time() - started
    if args.stage == "train":
        return 0

    answers = recipe.reference_answers(target.model, tokenizer, work, config.eval_answer_tokens)
    agreement = recipe.greedy_agreement(draft, answers)
    latency = recipe.latency_ratio(draft, target.model, answers[0]["prompt_ids"])
    info = {
        "target": BUILTIN_TARGET, "target_sha256": target.sha256, "layers_from_target": list(layers),
        "recipe": recipe.recipe_dict(config), "command": "bpsim " + shlex.join(sys.argv[1:]),
        "distillation": training, "data_seconds_this_run": round(data_seconds),
        "train_seconds_this_run": round(train_seconds), "machine": recipe.machine_description(),
        "mt_bench_agreement": agreement, "latency": latency,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    recipe.save_draft(draft, out, info)
    write_text(out / "CARD.md", _card(info))
    print(f"wrote {out}: MT-Bench greedy agreement {agreement['agreement']:.3f} on {agreement['tokens']} tokens, "
          f"per-token latency {latency['ratio']:.2f} of the target's")
    return 0


def _card(info: dict) -> str:
    d, lat, agr = info["distillation"], info["latency"], info["mt_bench_agreement"]
    return f"""# Draft {info['target']}-draft{len(info['layers_from_target'])}

A {len(info['layers_from_target'])}-layer LlamaForCausalLM distilled from {info['target']}
(sha256 {info['target_sha256'][:16]}...). Its layers start as copies of target layers
{info['layers_from_target']}; the token embedding and output layer are the target's, frozen and
not stored here (`model.safetensors` holds only the draft's own tensors, fp16).

- Command: `{info['command']}`
- Recipe: {json.dumps(info['recipe'])}
- Distillation set: {d['answers']} target answers, {d['answer_tokens']} answer tokens; final KL {d['final_kl']:.3f}
- Time on this run: data {info['data_seconds_this_run']} s, training {info['train_seconds_this_run']} s
  (a resumed build counts only its own part)
- Machine: {info['machine']}
- Created: {info['created_at']}

## Measured

- Greedy per-token agreement with the target's greedy answers to the {agr['answers']} MT-Bench
  first turns ({agr['tokens']} tokens, teacher-forced): **{agr['agreement']:.3f}**
- Per-token decoding latency, batch 1, measured alternately in one run: draft
  {lat['draft_ms_per_token']:.2f} ms, target {lat['target_ms_per_token']:.2f} ms, ratio **{lat['ratio']:.2f}**

Reproduce the figures with `bpsim draft eval --draft {info['target']}-draft{len(info['layers_from_target'])}`.
"""


def run_eval(args) -> int:
    from bpsim import draft as recipe
    from bpsim.models import load_pair

    pair = load_pair(draft=args.draft, device="cpu", dtype="float32")
    answers = recipe.reference_answers(pair.target.model, pair.tokenizer, args.work, 128)
    if args.limit:
        answers = answers[: args.limit]
    agreement = recipe.greedy_agreement(pair.draft.model, answers)
    latency = recipe.latency_ratio(pair.draft.model, pair.target.model, answers[0]["prompt_ids"])
    print(f"draft {args.draft}: greedy agreement {agreement['agreement']:.3f} on {agreement['tokens']} tokens of "
          f"{agreement['answers']} MT-Bench answers")
    print(f"per-token latency: draft {latency['draft_ms_per_token']:.2f} ms, target "
          f"{latency['target_ms_per_token']:.2f} ms, ratio {latency['ratio']:.2f} "
          f"(batch 1, {recipe.machine_description()})")
    return 0
