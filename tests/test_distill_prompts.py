"""The distillation prompts are distinct, reproducible and disjoint from the evaluation suites."""

import re

from bpsim.distill_prompts import distill_prompts
from bpsim.prompts import humaneval, mt_bench


def _ngrams(text, n=8):
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(words[i: i + n]) for i in range(len(words) - n + 1)}


def test_prompts_are_distinct_and_seeded():
    prompts = distill_prompts(600, seed=5)
    assert len(prompts) == len(set(prompts)) == 600
    assert distill_prompts(600, seed=5) == prompts
    assert distill_prompts(600, seed=6) != prompts


def test_prompts_share_no_8gram_with_eval_suites():
    evaluation = set()
    for suite in (mt_bench(), humaneval()):
        for prompt in suite.prompts:
            evaluation |= _ngrams(prompt.text)
    overlapping = [p for p in distill_prompts() if _ngrams(p) & evaluation]
    assert overlapping == []
