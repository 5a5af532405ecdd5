"""The built-in arithmetic task: deterministic, correct, well formed, and rewarded as intended."""

import re

import pytest
import torch

from fastgrpo.tasks import TASKS, arithmetic_dataset, load_task, task_reward_funcs
from fastgrpo.tasks.arithmetic import DEFAULT_DIFFICULTY, DEFAULT_WORDING, DIFFICULTIES, WORDINGS, arithmetic_examples
from fastgrpo.trainer.rewards import accuracy_reward, compute_rewards, format_reward, number_match_reward

QUESTION_RE = re.compile(r"^What is (\d+) \+ (\d+)\?")


def test_deterministic_per_seed():
    a = arithmetic_dataset(64, seed=3)
    b = arithmetic_dataset(64, seed=3)
    c = arithmetic_dataset(64, seed=4)
    assert a.to_list() == b.to_list()
    assert list(a["solution"]) != list(c["solution"])
    assert a.column_names[:2] == ["prompt", "solution"]


@pytest.mark.parametrize("difficulty", list(DIFFICULTIES))
def test_answers_and_ranges(difficulty):
    rows = arithmetic_examples(200, seed=0, difficulty=difficulty)
    (lo1, hi1), (lo2, hi2) = DIFFICULTIES[difficulty]
    orders = set()
    for row in rows:
        a, b = map(int, QUESTION_RE.match(row["prompt"][-1]["content"]).groups())
        assert (a, b) == (row["a"], row["b"])
        assert row["solution"] == str(a + b)
        assert (lo1 <= a <= hi1 and lo2 <= b <= hi2) or (lo2 <= a <= hi2 and lo1 <= b <= hi1)
        orders.add(a <= 9)
    if difficulty == "medium":
        assert orders == {True, False}  # the one-digit operand comes first and second


def test_prompt_format():
    ds = arithmetic_dataset(5, seed=0)
    for row in ds:
        assert row["prompt"] == [{"role": "user", "content": row["question"]}]
        assert row["question"] == WORDINGS[DEFAULT_WORDING].format(a=row["a"], b=row["b"])
    with_system = arithmetic_dataset(2, seed=0, system_prompt="Be brief.")
    assert with_system[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert with_system[0]["prompt"][1]["role"] == "user"


def test_no_duplicates_when_possible():
    for difficulty, size in [("easy", 81), ("medium", 1620)]:
        rows = arithmetic_examples(size, seed=1, difficulty=difficulty)
        assert len({(r["a"], r["b"]) for r in rows}) == size
    # More rows than distinct questions: every question once per pass.
    rows = arithmetic_examples(100, seed=1, difficulty="easy")
    first = {(r["a"], r["b"]) for r in rows[:81]}
    assert len(rows) == 100 and len(first) == 81


def test_bad_arguments():
    with pytest.raises(ValueError, match="difficulty"):
        arithmetic_examples(3, difficulty="impossible")
    with pytest.raises(ValueError, match="wording"):
        arithmetic_examples(3, wording="nope")
    assert arithmetic_examples(3, difficulty="1d+2d") == arithmetic_examples(3, difficulty="medium")


def test_registry():
    assert "arithmetic" in TASKS
    assert load_task("arithmetic", 4, seed=2).to_list() == arithmetic_dataset(4, seed=2).to_list()
    with pytest.raises(ValueError, match="known tasks"):
        load_task("chess", 4)


def test_rewards_on_the_default_task():
    ds = arithmetic_dataset(4, seed=0).to_dict()  # column name -> list
    assert (DEFAULT_DIFFICULTY, DEFAULT_WORDING) == ("easy", "just_number")
    solutions = ds["solution"]
    right = [[{"role": "assistant", "content": s}] for s in solutions]
    worked = [[{"role": "assistant", "content": f"{a} + {b} = {s}"}] for a, b, s in zip(ds["a"], ds["b"], solutions)]
    wrong = [[{"role": "assistant", "content": str(int(s) + 1)}] for s in solutions]
    wrong_then_right = [[{"role": "assistant", "content": f"{s}, or maybe {int(s) + 10}"}] for s in solutions]
    for completions, expected in [(right, 1.0), (worked, 1.0), (wrong, 0.0), (wrong_then_right, 0.0)]:
        assert number_match_reward(completions, solution=solutions) == [expected] * 4
        assert accuracy_reward(completions, solution=solutions) == [expected] * 4
    assert format_reward(right) == [1.0] * 4
    assert format_reward(worked) == [0.0] * 4

    funcs, weights = task_reward_funcs("arithmetic")
    assert len(funcs) == len(weights)
    columns = {k: v for k, v in ds.items() if k != "prompt"}
    r = compute_rewards(funcs, ds["prompt"] * 2, right + wrong, None, {k: v * 2 for k, v in columns.items()})
    total = (r * torch.tensor(weights)).sum(dim=1)
    assert total[:4].tolist() == pytest.approx([1.0 + weights[1]] * 4)
    assert total[4:].tolist() == pytest.approx([weights[1]] * 4)


@pytest.mark.parametrize("text, solution, match, fmt", [
    # Replies the untrained embedded model gave in bench/task_difficulty.py.
    ("6 + 9 = 15", "15", 1.0, 0.0),
    ("The answer is 11.", "11", 1.0, 0.0),
    ("11", "11", 1.0, 1.0),
    ("15.", "15", 1.0, 1.0),
    ("10 This is a classic math problem that requires a simple method.", "11", 0.0, 0.0),
    ("Aye, six is 17 with just the number.", "15", 0.0, 0.0),
    ("6 + 5 = 11 Game controller: 6 + 5 = 11", "11", 1.0, 0.0),
    ("14", "15", 0.0, 1.0),
])
def test_default_rewards_on_model_replies(text, solution, match, fmt):
    completion = [[{"role": "assistant", "content": text}]]
    assert number_match_reward(completion, solution=[solution]) == [match]
    assert format_reward(completion) == [fmt]


def test_the_feedback_task_tells_high_or_low_and_halves_the_reward_per_attempt():
    from fastgrpo.tasks import load_task, task_environment

    row = load_task("feedback", 1, seed=3)[0]
    target = int(row["solution"])
    env = task_environment("feedback")()
    assert env.reset(**{k: v for k, v in row.items() if k != "prompt"}) is None
    first = env.step(f"It is {target + 2}.")
    assert (first.reward, first.done) == (0.0, False) and first.messages.startswith(f"{target + 2} is too high.")
    second = env.step("no idea")
    assert (second.reward, second.done) == (0.0, False) and second.messages.startswith("That is not a number.")
    third = env.step(str(target))
    assert (third.reward, third.done) == (0.25, True)
    env.reset(solution=row["solution"])
    assert env.step(str(target - 1)).messages.startswith(f"{target - 1} is too low.")
    assert env.step(str(target)).reward == 0.5
    env.reset(solution=row["solution"])
    assert [env.step("0").done for _ in range(3)] == [False, False, True]  # three wrong answers end it, reward 0
