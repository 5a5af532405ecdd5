"""Multi-turn tasks: an environment answers each model turn with messages, a reward, and whether it is done.

    class Guess(Environment):
        def reset(self, secret, **row):          # the dataset row's columns
            self.secret = int(secret)
        def step(self, turn):                    # the model's turn, as text
            guess = int(turn.strip() or -1)
            if guess == self.secret:
                return StepResult(reward=1.0, done=True)
            return StepResult("Higher." if guess < self.secret else "Lower.")

GRPOTrainer(environment_factory=Guess) makes one per episode. Rewards may come on any turn;
an episode's environment reward is their sum (reward functions get it as `env_reward`, the
per-turn list as `turn_rewards`). Tools are an environment too (ToolEnvironment): it runs
the turn's tool calls and answers with their results, and is done when a turn calls none.
TRL's environments (a `reset` and public methods, no `step`) have their methods offered to
the model as tools (MethodToolEnvironment). Any environment may own its reward as TRL's do: a
`get_reward()` (sync or async), called once the episode has ended (see trainer.multi_turn).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from fastgrpo.rollouts.tool_calls import parse_hermes
from fastgrpo.rollouts.tools import ToolRunner


@dataclass
class StepResult:
    messages: str | list[dict] | None = None  # the next messages; a string is one user message
    reward: float = 0.0
    done: bool = False
    tool_calls: int = 0  # as TRL counts them (ToolResult.is_call)
    tool_failures: list[str] = field(default_factory=list)  # ToolResult.failure of each failed one, "parse" included

    def message_list(self) -> list[dict]:
        if self.messages is None:
            return []
        if isinstance(self.messages, str):
            return [{"role": "user", "content": self.messages}]
        return list(self.messages)


class Environment(ABC):
    """One episode's state. `reset` gets the dataset row (every column but the prompt) and may return messages
    (a string: one user message) added to the prompt; `step` gets each model turn as text."""

    tools: list = []  # Python functions offered to the model, described to it by the chat template

    def reset(self, **row) -> str | list[dict] | None:
        return None

    @abstractmethod
    def step(self, turn: str) -> StepResult: ...


class ToolEnvironment(Environment):
    """The model calls tools until it answers: each turn's calls are run and their results are the next messages.

    With max_iterations (TRL's max_tool_calling_iterations), a turn that calls tools after that many rounds of
    results ends the episode instead."""

    def __init__(self, runner: ToolRunner, parser=parse_hermes, max_iterations: int | None = None):
        self.runner, self.parser, self.max_iterations = runner, parser, max_iterations
        self.iterations = 0

    @property
    def tools(self):
        return self.runner.schemas

    def step(self, turn: str) -> StepResult:
        calls = self.parser(turn).calls
        if not calls:
            return StepResult(done=True)
        if self.max_iterations is not None and self.iterations >= self.max_iterations:
            return StepResult(done=True)  # its calls are not run, nor counted
        self.iterations += 1
        results = self.runner.run_all(calls)
        messages = [{"role": "tool", "name": r.name, "content": r.content} for r in results]
        return StepResult(messages, tool_calls=sum(r.is_call for r in results),
                          tool_failures=[r.failure for r in results if r.failure])


class MethodToolEnvironment(ToolEnvironment):
    """TRL's environment objects: `reset(**row)` and public methods, which are the episode's tools."""

    def __init__(self, env, timeout_s: float, max_result_chars: int, parser=parse_hermes,
                 max_iterations: int | None = None):
        # No tools is TRL's single-turn environment: reset() writes the prompt, the model answers once.
        super().__init__(ToolRunner(tool_methods(env), timeout_s, max_result_chars), parser, max_iterations)
        self.env = env

    def reset(self, **row):
        return self.env.reset(**row)


# Methods of an environment that are never tools (TRL's list).
NOT_TOOLS = ("reset", "get_reward")


def tool_methods(env) -> list:
    """A TRL-style environment's tools: its public methods but reset and get_reward. Listed on the class, as TRL
    does, so that reading the instance's properties (which may compute) is never needed."""
    return [getattr(env, name) for name, _ in inspect.getmembers(type(env), inspect.isfunction)
            if not name.startswith("_") and name not in NOT_TOOLS]


def is_step_environment(env) -> bool:
    return callable(getattr(env, "step", None))


def owns_reward(env) -> bool:
    """Whether the environment scores its episode itself (TRL's `get_reward`)."""
    return callable(getattr(type(env), "get_reward", None))
