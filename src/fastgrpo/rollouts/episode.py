"""Episodes: a prompt and a completion that interleaves the model's turns with what answers them.

`run_episodes` drives a batch of episodes turn by turn: every unfinished episode generates its
next turn in one batched call (each continuation sent as token ids, so the generator sees
exactly the tokens the trainer will train on), its environment answers, and the answer's
tokens are appended. What the trainer needs comes out directly: the completion's token ids,
a mask that is 1 on the tokens the model generated and 0 on the rest, and the generator's
logprobs on the generated ones.

The whole completion, turns and answers, stays within `max_completion_length` tokens: a turn
may generate at most what is left, and an episode whose next answer would not leave room for
a token of the model ends there, truncated (`stopped` False, as a single turn cut by the
length limit).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

logger = logging.getLogger(__name__)


@dataclass
class Turn:
    """One generation: the sampled tokens, their logprobs (None where the generator gives none), whether it ended
    on a stop condition, and the weight versions it ran under."""

    token_ids: list[int]
    logprobs: list[float] | None
    stopped: bool
    versions: tuple[int, int] | None = None


@dataclass
class Episode:
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)  # 1: a token the model generated
    logprobs: list[float] = field(default_factory=list)  # the generator's; 0.0 where mask is 0
    messages: list[dict] = field(default_factory=list)  # the completion as messages (for reward functions)
    turn_rewards: list[float] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    tool_failures: list[str] = field(default_factory=list)
    stopped: bool = True  # False: cut by the length budget
    versions: list[tuple[int, int]] = field(default_factory=list)
    has_logprobs: bool = True
    step_timed_out: bool = False  # its environment's step did not return in time: the episode ended there

    def add_generated(self, turn: Turn) -> None:
        self.completion_ids += turn.token_ids
        self.mask += [1] * len(turn.token_ids)
        if turn.logprobs is None:
            self.has_logprobs = False
            self.logprobs += [0.0] * len(turn.token_ids)
        else:
            self.logprobs += list(turn.logprobs)
        if turn.versions is not None:
            self.versions.append(tuple(turn.versions))
        self.turns += 1

    def add_context(self, token_ids: list[int]) -> None:
        self.completion_ids += token_ids
        self.mask += [0] * len(token_ids)
        self.logprobs += [0.0] * len(token_ids)

    @property
    def env_reward(self) -> float:
        return float(sum(self.turn_rewards))

    @property
    def generated_tokens(self) -> int:
        return sum(self.mask)

    @property
    def weight_versions(self) -> tuple[int, int] | None:
        """(oldest, newest) weight version any of its turns ran under."""
        if not self.versions:
            return None
        return min(v[0] for v in self.versions), max(v[1] for v in self.versions)


# generate(prompts as token ids, the most tokens each may generate, one seed each) -> one Turn each
Generate = Callable[[list[list[int]], list[int], list[int]], list[Turn]]


DEFAULT_STEP_TIMEOUT_S = 120.0
DEFAULT_CONCURRENCY = 16


def run_episodes(prompt_ids: list[list[int]], environments: list, generate: Generate, chat, decode,
                 max_completion_length: int, seed_of: Callable[[int, int], int],
                 step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S, concurrency: int = DEFAULT_CONCURRENCY
                 ) -> list[Episode]:
    """Run one episode per prompt to its end. environments[i] answers episode i (Environment.step); chat is a
    rollouts.chat.ChatTokens, or a list of one per episode (their environments offer different tools); decode
    turns a turn's ids into the text the environment reads; seed_of(i, turn)
    seeds episode i's turn. Each turn, the episodes' environments step at once (at most `concurrency` at a time,
    each in a thread); a step that does not return within `step_timeout_s` ends its episode (Python cannot stop
    a thread: it is left behind, a daemon) and the others go on."""
    episodes = [Episode(list(p)) for p in prompt_ids]
    chats = list(chat) if isinstance(chat, (list, tuple)) else [chat] * len(episodes)
    active, turn_index = list(range(len(episodes))), 0
    while active:
        budgets = [max_completion_length - len(episodes[i].completion_ids) for i in active]
        turns = generate([episodes[i].prompt_ids + episodes[i].completion_ids for i in active], budgets,
                         [seed_of(i, turn_index) for i in active])
        stepping = []  # (episode index, turn, its text): those whose environment answers this turn
        for i, budget, turn in zip(active, budgets, turns):
            episode = episodes[i]
            if len(turn.token_ids) > budget:  # a generator that cannot cap each prompt: its first tokens are exact
                turn = Turn(turn.token_ids[:budget], None if turn.logprobs is None else turn.logprobs[:budget],
                            False, turn.versions)
            episode.add_generated(turn)
            text = decode(turn.token_ids)
            episode.messages.append({"role": "assistant", "content": text})
            if not turn.stopped:
                episode.stopped = False  # the budget ran out inside the turn
                continue
            stepping.append((i, turn, text))
        answers = step_all([environments[i] for i, _, _ in stepping], [text for _, _, text in stepping],
                           step_timeout_s, concurrency)
        still = []
        for (i, turn, _), answer in zip(stepping, answers):
            episode, environment = episodes[i], environments[i]
            if answer is TIMED_OUT:
                episode.step_timed_out = True
                logger.warning("the environment (%s) did not answer turn %d of episode %d within %g s "
                               "(environment_step_timeout): the episode ends there", type(environment).__name__,
                               turn_index + 1, i, step_timeout_s)
                continue
            if isinstance(answer, BaseException):
                raise RuntimeError(f"the environment ({type(environment).__name__}) failed on turn {turn_index + 1} "
                                   f"of episode {i}: {type(answer).__name__}: {answer}") from answer
            result = answer
            episode.turn_rewards.append(float(result.reward or 0.0))
            episode.tool_calls += result.tool_calls
            episode.tool_failures += result.tool_failures
            if result.done:
                continue
            messages = result.message_list()
            if not messages:
                raise RuntimeError(f"the environment ({type(environment).__name__}) answered turn {turn_index + 1} of "
                                   f"episode {i} with no messages and done=False: return StepResult(messages) to "
                                   "continue, or done=True to end the episode")
            following = chats[i].continuation(turn.token_ids, messages)
            if len(following) >= max_completion_length - len(episode.completion_ids):
                episode.stopped = False  # no room left for the model to answer
                continue
            episode.add_context(following)
            episode.messages += messages
            still.append(i)
        active, turn_index = still, turn_index + 1
    return episodes


TIMED_OUT = object()


def step_all(environments: list, texts: list[str], timeout_s: float, concurrency: int) -> list:
    """Each environment's step(text), at most `concurrency` at once, each bounded by `timeout_s` from its start:
    its StepResult, the exception it raised, or TIMED_OUT. A step given up on frees its place for the next."""
    answers: list = [TIMED_OUT] * len(environments)
    changed = threading.Condition()
    finished, given_up = set(), set()

    def step(k: int) -> None:
        try:
            answer = environments[k].step(texts[k])
        except BaseException as exc:  # an environment's SystemExit must not end the run either
            answer = exc
        with changed:
            if k not in given_up:
                answers[k] = answer
            finished.add(k)
            changed.notify_all()

    running: dict[int, float] = {}  # step -> its deadline
    waiting = list(range(len(environments)))
    with changed:
        while waiting or running:
            now = time.monotonic()
            for k in [k for k, deadline in running.items() if k in finished or deadline <= now]:
                if k not in finished:
                    given_up.add(k)
                del running[k]
            while waiting and len(running) < max(1, concurrency):
                k = waiting.pop(0)
                running[k] = time.monotonic() + timeout_s
                threading.Thread(target=step, args=(k,), name=f"environment-step-{k}", daemon=True).start()
            if running:
                changed.wait(max(0.0, min(running.values()) - time.monotonic()))
    return answers
