"""Built-in verifiable tasks: data sets generated from a seed, with rewards that check them.

`load_task(name, num_examples, seed, **options)` returns a `datasets.Dataset`
with a conversational `prompt` column and a `solution` column;
`task_reward_funcs(name)` returns the reward functions and weights to train it with;
`task_environment(name)` the environment factory of a multi-turn task (None for single-turn ones).
"""

from __future__ import annotations

from fastgrpo.tasks.arithmetic import (
    DIFFICULTIES,
    WORDINGS,
    arithmetic_dataset,
    arithmetic_examples,
    arithmetic_reward_funcs,
)

from fastgrpo.tasks.feedback import ArithmeticFeedback, feedback_dataset, feedback_reward_funcs

# name -> (dataset builder, reward functions, environment factory or None)
TASKS = {"arithmetic": (arithmetic_dataset, arithmetic_reward_funcs, None),
         "feedback": (feedback_dataset, feedback_reward_funcs, ArithmeticFeedback)}


def _lookup(name: str):
    if name not in TASKS:
        raise ValueError(f"unknown built-in task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def load_task(name: str, num_examples: int, seed: int = 0, **options):
    """The data set of built-in task `name` (options go to its builder, e.g. difficulty=)."""
    build, _, _ = _lookup(name)
    return build(num_examples, seed, **options)


def task_reward_funcs(name: str):
    """(reward_funcs, reward_weights) for built-in task `name`."""
    _, rewards, _ = _lookup(name)
    return rewards()


def task_environment(name: str):
    """The environment factory of built-in task `name`, or None for a single-turn task."""
    return _lookup(name)[2]


__all__ = [
    "DIFFICULTIES",
    "TASKS",
    "WORDINGS",
    "arithmetic_dataset",
    "arithmetic_examples",
    "arithmetic_reward_funcs",
    "load_task",
    "task_environment",
    "task_reward_funcs",
]
