"""The trainer's multi-turn rounds: tools, environments or a rollout_func instead of one completion per prompt.

Each process runs the episodes of its own rows (their environments stay where the reward
functions run), through its own generator: in server mode every process talks to the server,
whose prefix cache shares each group's prompt. What comes out has the single-turn round's
shape plus a loss mask: completion ids with the tool and environment tokens in place, the mask
on the model's tokens only, the generator's logprobs on those.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from fastgrpo.rollouts.chat import ChatTokens
from fastgrpo.rollouts.environment import MethodToolEnvironment, ToolEnvironment, is_step_environment
from fastgrpo.rollouts.episode import Episode, Turn, run_episodes
from fastgrpo.rollouts.tool_calls import parser_for
from fastgrpo.rollouts.tools import ToolRunner

FAILURE_KINDS = ("parse", "unknown_tool", "bad_arguments", "raised", "timeout", "too_large")
# TRL's keys, and ours: `weight_versions` ([first, last] per row, from agents recorded by the server).
ROLLOUT_FUNC_KEYS = ("prompt_ids", "completion_ids", "logprobs", "env_mask", "weight_versions")


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
    """Built once per trainer from GRPOTrainer's tools / environment_factory / rollout_func."""

    def __init__(self, tokenizer, args, tools=None, environment_factory=None, rollout_func=None,
                 tool_call_parser=None):
        given = [n for n, v in (("tools", tools), ("environment_factory", environment_factory),
                                ("rollout_func", rollout_func)) if v]
        if len(given) > 1:
            raise ValueError(f"give one of tools, environment_factory and rollout_func, not {' and '.join(given)} "
                             "(an environment can offer tools itself: its `tools`, or TRL-style tool methods)")
        if environment_factory is not None and not callable(environment_factory):
            raise ValueError("environment_factory must be callable (a class or a function) returning an environment")
        if rollout_func is not None and not callable(rollout_func):
            raise ValueError("rollout_func must be callable: rollout_func(prompts, trainer) -> dict")
        self.tokenizer, self.args = tokenizer, args
        self.environment_factory, self.rollout_func = environment_factory, rollout_func
        self.parser = tool_call_parser or parser_for(tokenizer)
        self.runner = ToolRunner(list(tools), args.tool_timeout, args.max_tool_result_length) if tools else None
        self._chats: dict[tuple, ChatTokens] = {}
        self.uses_tools = bool(tools)

    def with_tokenizer(self, tokenizer) -> "MultiTurn":
        """The same rollouts with another tokenizer (a thread of its own needs one: Rust tokenizers used from two
        threads at once can fail)."""
        other = copy.copy(self)
        other.tokenizer, other._chats = tokenizer, {}
        return other

    def _chat(self, schemas: list[dict]) -> ChatTokens:
        key = tuple(s["function"]["name"] for s in schemas)
        if key not in self._chats:
            self._chats[key] = ChatTokens(self.tokenizer, schemas, self.args.chat_template_kwargs)
        return self._chats[key]

    def _environment(self, row: dict):
        """(the episode's environment as the driver steps it, the object reward functions see, extra messages)."""
        if self.runner is not None:
            env = ToolEnvironment(self.runner, self.parser, self.args.max_tool_calling_iterations)
            return env, env, None
        user_env = self.environment_factory()
        if is_step_environment(user_env):
            env = user_env
        else:  # TRL's style: its public methods are the tools
            env = MethodToolEnvironment(user_env, self.args.tool_timeout, self.args.max_tool_result_length,
                                        self.parser, self.args.max_tool_calling_iterations)
            self.uses_tools = True
        reset = env.reset(**row)
        return env, user_env, reset

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
            if a.max_prompt_length is not None:
                ids = ids[-a.max_prompt_length:]
            envs.append(env)
            user_envs.append(user_env)
            prompt_ids.append(ids)
            chats.append(chat)
        if len({id(c) for c in chats}) > 1:
            raise ValueError("the environments of one round offer different tools; give every environment of a run "
                             "the same tools")
        episodes = run_episodes(prompt_ids, envs, generate, chats[0] if chats else None,
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
            per_row["tools/failures"] = [float(len(e.tool_failures)) for e in episodes]
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
