"""The trainer's multi-turn rounds: tools, environments or a rollout_func instead of one completion per prompt.

Each process runs the episodes of its own rows (their environments stay where the reward
functions run), through its own generator: in server mode every process talks to the server,
whose prefix cache shares each group's prompt. What comes out has the single-turn round's
shape plus a loss mask: completion ids with the tool and environment tokens in place, the mask
on the model's tokens only, the generator's logprobs on those.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from fastgrpo.rollouts.chat import ChatTokens
from fastgrpo.rollouts.environment import MethodToolEnvironment, ToolEnvironment, is_step_environment, owns_reward
from fastgrpo.rollouts.episode import Episode, Turn, run_episodes
from fastgrpo.rollouts.event_loop import outcome, submit
from fastgrpo.rollouts.tool_calls import parser_for
from fastgrpo.rollouts.tools import NOT_A_CALL, ToolRunner

FAILURE_KINDS = ("parse", "unknown_tool", "bad_arguments", "raised", "timeout", "too_large")
# TRL's keys, and ours: `weight_versions` ([first, last] per row, from agents recorded by the server).
ROLLOUT_FUNC_KEYS = ("prompt_ids", "completion_ids", "logprobs", "env_mask", "weight_versions")
# A dict environment_factory: the dataset column that names each example's environment (TRL's).
ENVIRONMENT_COLUMN = "environment"


@dataclass
class RoundRollout:
    """A round's rows after their episodes (or the rollout_func): what the batch and the rewards need."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completion_mask: list[list[int]]  # 1 on the tokens the model generated
    sampling_logps: list[list[float]] | None
    stopped: list[bool]
    weight_version: int | None
    completions: list  # for reward functions: each row's messages (or text for a rollout_func)
    reward_columns: dict[str, list] = field(default_factory=dict)  # env_reward, turn_rewards, environments, ...
    per_row: dict[str, list[float]] = field(default_factory=dict)  # metrics, averaged over every process's rows
    first_versions: list[int] | None = None  # the oldest weight version each episode's turns ran under


class MultiTurn:
    """Built once per trainer from GRPOTrainer's tools / environment_factory / rollout_func.

    environment_factory is TRL's: a callable making one environment, or a dict {name: factory} whose name each
    example picks in its `environment` field (only that environment's tools are in its prompt). One instance of
    each is made here, as TRL does, to check it and read its tools; it then serves the first episode it fits."""

    def __init__(self, tokenizer, args, tools=None, environment_factory=None, rollout_func=None,
                 tool_call_parser=None):
        given = [n for n, v in (("tools", tools), ("environment_factory", environment_factory),
                                ("rollout_func", rollout_func)) if v]
        if len(given) > 1:
            raise ValueError(f"give one of tools, environment_factory and rollout_func, not {' and '.join(given)} "
                             "(an environment can offer tools itself: its `tools`, or TRL-style tool methods)")
        if rollout_func is not None and not callable(rollout_func):
            raise ValueError("rollout_func must be callable: rollout_func(prompts, trainer) -> dict")
        self.tokenizer, self.args = tokenizer, args
        self.rollout_func = rollout_func
        self.factories = _factories(environment_factory)  # {name: factory}; a single callable's name is None
        self.routed = isinstance(environment_factory, dict)  # only then does an example's `environment` matter
        self.parser = tool_call_parser or parser_for(tokenizer)
        self.runner = ToolRunner(list(tools), args.tool_timeout, args.max_tool_result_length) if tools else None
        self._chats: dict[str, ChatTokens] = {}
        self._probes = {name: _probe(factory) for name, factory in self.factories.items()}
        stepped = [self._stepped(p) for p in self._probes.values()]  # one without tools or steps fails now
        # TRL's `if self.tools`: tool metrics on every step of a run where any episode may call tools.
        self.uses_tools = bool(tools) or any(_schemas(env) for env in stepped)
        self.has_step_environments = any(is_step_environment(p) for p in self._probes.values())
        self._reward_types = list(dict.fromkeys(type(p) for p in self._probes.values() if owns_reward(p)))

    def with_tokenizer(self, tokenizer) -> "MultiTurn":
        """The same rollouts with another tokenizer (a thread of its own needs one: Rust tokenizers used from two
        threads at once can fail)."""
        other = copy.copy(self)
        other.tokenizer, other._chats = tokenizer, {}
        return other

    def environment_reward_funcs(self) -> list[tuple[str, Callable]]:
        """TRL's environment-owned rewards: for each environment class with a `get_reward` (once per class, however
        many names map to it), a reward function named after the class, to add with weight 1. It scores the rows
        whose environment is exactly that class (None for the others) with their `get_reward()`."""
        return [(t.__name__, environment_reward_func(t)) for t in self._reward_types]

    def check_dataset(self, dataset, which: str = "training") -> None:
        """With a dict environment_factory every example names its environment: a dataset without the column
        fails at construction rather than at its first round."""
        if not self.routed:
            return
        if dataset is None:
            if which == "training":
                raise ValueError("A `dict` `environment_factory` (multiple environments) requires a `train_dataset` "
                                 "with an `environment` column to route each example to its environment. Provide a "
                                 "dataset, or pass a single environment factory.")
            return
        for part in dataset.values() if isinstance(dataset, dict) else [dataset]:
            columns = getattr(part, "column_names", None)  # None: a streamed dataset that does not know them yet
            if columns is not None and ENVIRONMENT_COLUMN not in columns:
                raise ValueError(f"environment_factory is a dict of environments ({list(self.factories)}): each "
                                 f"example picks one in its `{ENVIRONMENT_COLUMN}` field, but the {which} dataset "
                                 f"has no `{ENVIRONMENT_COLUMN}` column (it has {columns}). Add one naming each "
                                 "example's environment, or pass a single environment factory.")

    def _chat(self, schemas: list[dict]) -> ChatTokens:
        key = json.dumps(schemas, sort_keys=True, default=str)
        if key not in self._chats:
            self._chats[key] = ChatTokens(self.tokenizer, schemas, self.args.chat_template_kwargs)
        return self._chats[key]

    def _stepped(self, user_env):
        """The environment as the episode driver steps it: itself with a `step`, else its methods as tools."""
        if is_step_environment(user_env):
            return user_env
        return MethodToolEnvironment(user_env, self.args.tool_timeout, self.args.max_tool_result_length,
                                     self.parser, self.args.max_tool_calling_iterations)

    def _environment_name(self, row: dict):
        if not self.routed:
            return None
        name = row.get(ENVIRONMENT_COLUMN)
        if name not in self.factories:
            hint = "" if ENVIRONMENT_COLUMN in row else (
                f" This example has no `{ENVIRONMENT_COLUMN}` field: give the dataset an `{ENVIRONMENT_COLUMN}` "
                "column naming each example's environment.")
            raise ValueError(f"Example has `environment={name!r}`, which is not among the environments passed to "
                             f"`environment_factory`. Expected one of: {list(self.factories)}.{hint}")
        return name

    def _environment(self, row: dict):
        """(the episode's environment as the driver steps it, the object reward functions see, extra messages)."""
        if self.runner is not None:
            env = ToolEnvironment(self.runner, self.parser, self.args.max_tool_calling_iterations)
            return env, env, None
        name = self._environment_name(row)
        user_env = self._probes.pop(name, None)  # the probe serves once; a fresh one for every other episode
        if user_env is None:
            user_env = self.factories[name]()
        env = self._stepped(user_env)
        # The `environment` field routes the example; reset gets the rest (TRL's way).
        columns = {k: v for k, v in row.items() if k != ENVIRONMENT_COLUMN} if self.routed else row
        return env, user_env, env.reset(**columns)

    def run(self, trainer, prompts: list, rows: list[dict], generate, seed_of) -> RoundRollout:
        if self.rollout_func is not None:
            return self._from_rollout_func(trainer, prompts, rows)
        if not all(isinstance(p, list) for p in prompts):
            raise ValueError("tools and environments need conversational prompts (lists of messages), so the chat "
                             "template can write each turn; this batch has plain-text prompts")
        a = self.args
        envs, user_envs, prompt_ids, chats = [], [], [], []
        for prompt, row in zip(prompts, rows):
            env, user_env, reset = self._environment(row)
            messages = _with_reset_messages(prompt, reset)
            chat = self._chat(_schemas(env))
            ids = chat.prompt(messages)
            ids = a.check_prompt_length(ids)
            envs.append(env)
            user_envs.append(user_env)
            prompt_ids.append(ids)
            chats.append(chat)
        episodes = run_episodes(prompt_ids, envs, generate, chats,
                                lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
                                a.max_completion_length, seed_of, a.environment_step_timeout,
                                a.environment_concurrency)
        return self._round(episodes, user_envs)

    def _round(self, episodes: list[Episode], user_envs: list) -> RoundRollout:
        firsts = [e.weight_versions[0] for e in episodes if e.weight_versions is not None]
        per_row = {
            "multi_turn/turns": [float(e.turns) for e in episodes],
            "completions/generated_tokens": [float(e.generated_tokens) for e in episodes],
            "completions/env_tokens": [float(len(e.mask) - e.generated_tokens) for e in episodes],
            "multi_turn/step_timeouts": [float(e.step_timed_out) for e in episodes],
        }
        if self.uses_tools:
            per_row["tools/calls"] = [float(e.tool_calls) for e in episodes]
            # TRL's failure count: failed calls, not text that never parsed as one (it has its own count below).
            per_row["tools/failures"] = [float(sum(k != NOT_A_CALL for k in e.tool_failures)) for e in episodes]
            for kind in FAILURE_KINDS:
                per_row[f"tools/failures/{kind}"] = [float(e.tool_failures.count(kind)) for e in episodes]
        return RoundRollout(
            prompt_ids=[e.prompt_ids for e in episodes], completion_ids=[e.completion_ids for e in episodes],
            completion_mask=[e.mask for e in episodes],
            sampling_logps=[e.logprobs for e in episodes] if all(e.has_logprobs for e in episodes) else None,
            stopped=[e.stopped for e in episodes], weight_version=min(firsts) if firsts else None,
            completions=[e.messages for e in episodes],
            reward_columns={"env_reward": [e.env_reward for e in episodes],
                            "turn_rewards": [list(e.turn_rewards) for e in episodes],
                            "environments": user_envs},
            per_row=per_row,
            first_versions=[e.weight_versions[0] for e in episodes] if len(firsts) == len(episodes) else None)

    def _from_rollout_func(self, trainer, prompts: list, rows: list[dict]) -> RoundRollout:
        out = self.rollout_func(prompts, trainer)
        if not isinstance(out, dict):
            raise TypeError(f"rollout_func returned {type(out).__name__}: return a dict with prompt_ids, "
                            "completion_ids, logprobs and optionally env_mask (and columns for the reward functions)")
        missing = [k for k in ("prompt_ids", "completion_ids") if k not in out]
        if missing:
            raise ValueError(f"rollout_func's result lacks {missing}: return prompt_ids and completion_ids (token ids "
                             "per row), logprobs (the generator's, per completion token) and optionally env_mask")
        n, limit = len(prompts), self.args.max_completion_length
        prompt_ids = [list(p) for p in out["prompt_ids"]]
        completion_ids = [list(c) for c in out["completion_ids"]]
        masks = [list(m) for m in out["env_mask"]] if out.get("env_mask") is not None else \
            [[1] * len(c) for c in completion_ids]
        logps = [list(lp) for lp in out["logprobs"]] if out.get("logprobs") is not None else None
        for key, values in (("prompt_ids", prompt_ids), ("completion_ids", completion_ids), ("env_mask", masks),
                            ("logprobs", logps)):
            if values is not None and len(values) != n:
                raise ValueError(f"rollout_func returned {len(values)} rows of {key} for {n} prompts: one per prompt "
                                 "(each prompt comes num_generations times)")
        for i, ids in enumerate(completion_ids):
            if len(ids) > limit:
                raise ValueError(f"rollout_func's completion {i} has {len(ids)} tokens, more than "
                                 f"max_completion_length={limit}: cap the episode's tokens, or raise the limit")
            if len(masks[i]) != len(ids) or (logps is not None and len(logps[i]) != len(ids)):
                raise ValueError(f"rollout_func's row {i}: env_mask and logprobs need one entry per completion token "
                                 f"({len(ids)})")
            if any(m not in (0, 1) for m in masks[i]):
                raise ValueError(f"rollout_func's env_mask row {i} holds values other than 0 and 1")
        if logps is not None:  # the mask's zeros are not the model's: their logprobs are never used
            logps = [[lp if m else 0.0 for lp, m in zip(row, mask)] for row, mask in zip(logps, masks)]
        stopped = list(out.get("stopped") or [len(c) < limit for c in completion_ids])
        versions = out.get("weight_versions")
        if versions is not None and (len(versions) != n or not all(v and len(v) == 2 for v in versions)):
            raise ValueError("rollout_func's weight_versions needs [first, last] weight version per row")
        extra = {k: list(v) for k, v in out.items() if k not in ROLLOUT_FUNC_KEYS + ("stopped",)}
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        conversational = isinstance(prompts[0], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        per_row = {"completions/generated_tokens": [float(sum(m)) for m in masks],
                   "completions/env_tokens": [float(len(m) - sum(m)) for m in masks]}
        return RoundRollout(prompt_ids, completion_ids, masks, logps, stopped, None, completions, extra, per_row,
                            first_versions=[int(v[0]) for v in versions] if versions is not None else None)


def _factories(environment_factory) -> dict:
    """environment_factory as {name: factory}: a dict as it is, a single callable under the name None."""
    if environment_factory is None:
        return {}
    if isinstance(environment_factory, dict):
        if not environment_factory:
            raise ValueError("environment_factory is an empty dict: map at least one environment name to a factory")
        for name, factory in environment_factory.items():
            if not callable(factory):
                raise ValueError(f"environment_factory[{name!r}] is {type(factory).__name__}, not a factory: give a "
                                 "class or a function returning an environment")
        return dict(environment_factory)
    if not callable(environment_factory):
        raise ValueError("environment_factory must be callable (a class or a function) returning an environment, or a "
                         "dict {name: factory} whose names the examples' `environment` field picks; got "
                         f"{type(environment_factory).__name__}")
    return {None: environment_factory}


def _probe(factory):
    instance = factory()
    if not callable(getattr(instance, "reset", None)):
        raise ValueError("Each environment instance returned by `environment_factory` must define a callable "
                         f"`reset`. ({type(instance).__name__} has none.)")
    return instance


def environment_reward_func(env_type: type) -> Callable:
    """A reward function scoring the rows whose environment is exactly `env_type` with their `get_reward()`; None for
    the others (exactly: a subclass registered too is scored by its own function only). An async get_reward runs on
    the rollouts' event loop, where the environment's async tools ran."""
    if inspect.iscoroutinefunction(env_type.get_reward):
        async def reward(environments, **kwargs):
            async def one(e):
                return await e.get_reward() if type(e) is env_type else None

            async def every():  # gathered on the rollouts' loop: its futures must belong there
                return await asyncio.gather(*(outcome(one(e)) for e in environments))

            results = await asyncio.wrap_future(submit(every()))
            for kind, value in results:
                if kind == "error":
                    raise value
            return [value for _, value in results]
    else:
        def reward(environments, **kwargs):
            return [e.get_reward() if type(e) is env_type else None for e in environments]
    reward.__name__ = reward.__qualname__ = env_type.__name__
    return reward


def turn_generator(backend, sampling) -> callable:
    """run_episodes' `generate` on a GenerationBackend: one completion per prompt, each capped to its budget."""

    def generate(prompt_ids: list[list[int]], budgets: list[int], seeds: list[int]) -> list[Turn]:
        comps = backend.generate(prompt_ids, sampling, seeds, max_tokens=budgets)
        turns = []
        for i, ids in enumerate(comps.token_ids):
            versions = comps.weight_versions[i][0] if comps.weight_versions is not None else None
            turns.append(Turn(list(ids[0]), None if comps.logprobs is None else list(comps.logprobs[i][0]),
                              comps.stopped[i][0], versions))
        return turns

    return generate


def _schemas(env) -> list[dict]:
    from fastgrpo.rollouts.tool_calls import tool_schema

    return [tool_schema(t) for t in (getattr(env, "tools", None) or [])]


def _with_reset_messages(prompt: list[dict], reset) -> list[dict]:
    """The prompt with what the environment's reset returned: a string joins the last user message (TRL's
    way: the observation completes the question), messages are appended."""
    messages = [dict(m) for m in prompt]
    if reset is None:
        return messages
    if isinstance(reset, str):
        if messages and messages[-1]["role"] == "user":
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{reset}" if messages[-1]["content"] else reset
        else:
            messages.append({"role": "user", "content": reset})
        return messages
    return messages + list(reset)
