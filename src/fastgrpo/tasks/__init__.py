"""Built-in verifiable tasks: data sets generated from a seed, with rewards that check them.

`load_task(name, num_examples, seed, **options)` returns a `datasets.Dataset`
with a conversational `prompt` column and a `solution` column;
`task_reward_funcs(name)` returns the reward functions and weights to train it with.
"""

from __future__ import annotations

from fastgrpo.tasks.arithmetic import (
    DIFFICULTIES,
    WORDINGS,
    arithmetic_dataset,
    arithmetic_examples,
    arithmetic_reward_funcs,
)

TASKS = {"arithmetic": (arithmetic_dataset, arithmetic_reward_funcs)}


def _lookup(name: str):
    if name not in TASKS:
        raise ValueError(f"unknown built-in task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def load_task(name: str, num_examples: int, seed: int = 0, **options):
    """The data set of built-in task `name` (options go to its builder, e.g. difficulty=)."""
    build, _ = _lookup(name)
    return build(num_examples, seed, **options)


def task_reward_funcs(name: str):
    """(reward_funcs, reward_weights) for built-in task `name`."""
    _, rewards = _lookup(name)
    return rewards()


__all__ = [
    "DIFFICULTIES",
    "TASKS",
    "WORDINGS",
    "arithmetic_dataset",
    "arithmetic_examples",
    "arithmetic_reward_funcs",
    "load_task",
    "task_reward_funcs",
]
