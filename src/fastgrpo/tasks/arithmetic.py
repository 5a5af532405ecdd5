"""A verifiable arithmetic task: "What is a + b?", answered by a number.

The data set is generated, not downloaded, and is a pure function of
(num_examples, seed, difficulty, wording, system_prompt): the same arguments
give the same rows on every machine.

Columns:
  prompt    conversational: [{"role": "user", "content": ...}] (a system
            message first when `system_prompt` is set)
  solution  the answer as a string ("47"), what `accuracy_reward` and
            `number_match_reward` compare against
  question  the user message alone (handy for logs)
  a, b      the operands

Why the defaults (measured with bench/task_difficulty.py, table in
docs/task.md): the embedded SmolLM2-135M-Instruct, sampled at temperature 1.0
with 64 new tokens, ends on the right number in under 5% of its completions for
two-digit sums ("hard") and even for one-digit + two-digit ones ("medium"), so
most groups of 8 completions carry no signal for GRPO. For one-digit + one-digit
sums asked as "What is a + b? Answer with just the number." ("easy",
"just_number") it is right about 25% of the time, 80-90% of the groups of 8 mix
right and wrong answers, and it rarely answers with just the number (about 5%):
signal in most groups and plenty of room to learn. The cost: only 81 distinct
questions, so longer runs see each question several times.
"""

from __future__ import annotations

import random

# Operand ranges (inclusive) per difficulty. For mixed widths the order of the
# two operands is drawn at random, so the short one is not always first.
DIFFICULTIES: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "easy": ((1, 9), (1, 9)),  # one digit + one digit
    "medium": ((1, 9), (10, 99)),  # one digit + two digits (either order)
    "hard": ((10, 99), (10, 99)),  # two digits + two digits
}
DIFFICULTY_ALIASES = {"1d+1d": "easy", "1d+2d": "medium", "2d+2d": "hard"}

# The user message, per wording. {a} and {b} are the operands.
WORDINGS: dict[str, str] = {
    "plain": "What is {a} + {b}?",
    "just_number": "What is {a} + {b}? Answer with just the number.",
    "answer_is": 'What is {a} + {b}? End your reply with "The answer is N." where N is the number.',
}

DEFAULT_DIFFICULTY = "easy"
DEFAULT_WORDING = "just_number"
# None: no system message of our own (SmolLM2's chat template then adds its default one).
DEFAULT_SYSTEM_PROMPT: str | None = None


def _resolve_difficulty(difficulty: str) -> tuple[str, tuple[tuple[int, int], tuple[int, int]]]:
    name = DIFFICULTY_ALIASES.get(difficulty, difficulty)
    if name not in DIFFICULTIES:
        known = ", ".join(list(DIFFICULTIES) + list(DIFFICULTY_ALIASES))
        raise ValueError(f"unknown arithmetic difficulty {difficulty!r}; choose one of: {known}")
    return name, DIFFICULTIES[name]


def _pair_space(ranges: tuple[tuple[int, int], tuple[int, int]]) -> list[tuple[int, int]]:
    """Every distinct ordered pair (a, b) the difficulty can ask, in a fixed order."""
    (lo1, hi1), (lo2, hi2) = ranges
    pairs = {(a, b) for a in range(lo1, hi1 + 1) for b in range(lo2, hi2 + 1)}
    if ranges[0] != ranges[1]:  # mixed widths: both orders
        pairs |= {(b, a) for a, b in pairs}
    return sorted(pairs)


def arithmetic_examples(
    num_examples: int,
    seed: int = 0,
    difficulty: str = DEFAULT_DIFFICULTY,
    wording: str = DEFAULT_WORDING,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> list[dict]:
    """The rows of `arithmetic_dataset` as plain dicts (no `datasets` import)."""
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    if wording not in WORDINGS:
        raise ValueError(f"unknown arithmetic wording {wording!r}; choose one of: {', '.join(WORDINGS)}")
    _, ranges = _resolve_difficulty(difficulty)
    space = _pair_space(ranges)
    rng = random.Random(seed)
    if num_examples <= len(space):
        pairs = rng.sample(space, num_examples)  # no duplicates
    else:
        # More questions than distinct pairs: every pair once per full pass, shuffled.
        pairs = []
        while len(pairs) < num_examples:
            pairs += rng.sample(space, min(len(space), num_examples - len(pairs)))
    template = WORDINGS[wording]
    rows = []
    for a, b in pairs:
        question = template.format(a=a, b=b)
        prompt = [{"role": "user", "content": question}]
        if system_prompt:
            prompt.insert(0, {"role": "system", "content": system_prompt})
        rows.append({"prompt": prompt, "solution": str(a + b), "question": question, "a": a, "b": b})
    return rows


def arithmetic_dataset(
    num_examples: int,
    seed: int = 0,
    difficulty: str = DEFAULT_DIFFICULTY,
    wording: str = DEFAULT_WORDING,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
):
    """A `datasets.Dataset` of `num_examples` addition questions, deterministic in `seed`.

    difficulty: "easy" (1-digit + 1-digit), "medium" (1-digit + 2-digit, either
    order) or "hard" (2-digit + 2-digit); also spelled "1d+1d", "1d+2d", "2d+2d".
    Questions are distinct while the difficulty has enough of them (81 easy,
    1620 medium, 8100 hard); beyond that every question appears once per pass.
    wording: a key of WORDINGS. system_prompt: an optional system message.
    """
    from datasets import Dataset

    return Dataset.from_list(arithmetic_examples(num_examples, seed, difficulty, wording, system_prompt))


def arithmetic_reward_funcs():
    """The reward functions (and weights) the demo trains with on this task."""
    from fastgrpo.trainer.rewards import format_reward, number_match_reward

    return [number_match_reward, format_reward], [1.0, 0.2]
