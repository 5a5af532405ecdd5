"""Reward functions: the contract, running them (sync, async, reward models), and built-ins.

The contract is TRL's. A reward function is called once per batch as

    f(prompts=prompts, completions=completions, completion_ids=completion_ids,
      trainer_state=trainer_state, **dataset_columns) -> list[float | None]

- `prompts` and `completions` are lists of B items, either plain strings, or,
  for conversational data, lists of messages: a prompt like
  `[{"role": "user", "content": "What is 2 + 3?"}]` and a completion like
  `[{"role": "assistant", "content": "5"}]`.
- `completion_ids`: list of B lists of token ids (the sampled tokens, without
  the prompt).
- `trainer_state`: whatever the caller passes (the trainer passes its
  `transformers.TrainerState`; None outside a trainer).
- every other column of the data set, as a list of B values, by its column
  name (e.g. `solution`). The `prompt` column arrives as `prompts`.

Functions should therefore take `**kwargs`. They return one reward per
completion: a real number, or None for "not applicable to this sample", which
becomes NaN in the reward matrix and is skipped when the rewards are weighted
(see `fastgrpo.trainer.loss.weighted_rewards`).

A reward function may also be
- a coroutine function (`async def`, or an object with an `async def __call__`):
  all of them run concurrently in one asyncio event loop;
- a reward model: a `transformers` sequence-classification model given as a
  model object, a hub name or a local path. It scores prompt + completion
  (through the tokenizer's chat template for conversational data) and its
  reward is `logits[:, 0]`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import math
import numbers
import os
import re
import threading
from fractions import Fraction
from typing import Any, Callable, Sequence

import torch

from fastgrpo.rollouts.chat import message_text

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Text of prompts and completions
# ---------------------------------------------------------------------------


def is_conversational(item: Any) -> bool:
    """True for a list of {"role", "content"} messages (TRL's conversational format)."""
    return isinstance(item, (list, tuple)) and len(item) > 0 and isinstance(item[0], dict) and "role" in item[0]


def completion_text(completion: Any) -> str:
    """The plain text of one completion: the string itself, or its messages' contents joined by newlines."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return message_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        return "\n".join(message_text(m.get("content")) if isinstance(m, dict) else str(m) for m in completion)
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


# ---------------------------------------------------------------------------
# Built-in reward functions
# ---------------------------------------------------------------------------

# A decimal number: optional minus, digits with optional thousands commas, optional fraction.
_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?"
_NUMBER_RE = re.compile(rf"(?<![\d.]){_NUMBER}")


def _as_number(text: str) -> Fraction | None:
    try:
        return Fraction(str(text).strip().replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> Fraction | None:
    """The last number written in `text` ("1,234" and "-3.5" included), or None."""
    matches = _NUMBER_RE.findall(text)
    return _as_number(matches[-1]) if matches else None


def number_match_reward(completions: list, solution: list, **kwargs) -> list[float | None]:
    """1.0 when the last number in the completion equals the solution, else 0.0.

    Fast and exact for tasks whose answer is a number ("ends on the right
    number"). None for a sample whose `solution` is not a number.
    """
    rewards: list[float | None] = []
    for completion, gold in zip(completions, solution, strict=True):
        gold_value = _as_number(gold)
        if gold_value is None:
            rewards.append(None)
            continue
        rewards.append(1.0 if last_number(completion_text(completion)) == gold_value else 0.0)
    return rewards


def _math_verify_timeouts() -> dict[str, int | None]:
    # math-verify enforces its timeouts with SIGALRM, which Python allows only in
    # the main thread; elsewhere (a trainer's worker thread, the async-reward
    # thread) run without them rather than fail.
    if threading.current_thread() is threading.main_thread():
        return {"parsing_timeout": 5, "verify_timeout": 5}
    return {"parsing_timeout": None, "verify_timeout": None}


def accuracy_reward(completions: list, solution: list, **kwargs) -> list[float | None]:
    """1.0 when math-verify finds the completion's answer equal to the gold `solution`, else 0.0.

    As in TRL: the gold is parsed first (first match); when it cannot be parsed
    the sample gets None (not applicable) instead of a reward. The completion is
    parsed with math-verify's default extraction (LaTeX, including \\boxed{}, and
    plain expressions/numbers).
    """
    from math_verify import parse, verify

    timeouts = _math_verify_timeouts()
    rewards: list[float | None] = []
    for completion, gold in zip(completions, solution, strict=True):
        gold_parsed = parse(str(gold), extraction_mode="first_match", parsing_timeout=timeouts["parsing_timeout"])
        if len(gold_parsed) == 0:
            rewards.append(None)
            continue
        answer = parse(completion_text(completion), parsing_timeout=timeouts["parsing_timeout"])
        ok = verify(gold_parsed, answer, timeout_seconds=timeouts["verify_timeout"])
        rewards.append(1.0 if ok else 0.0)
    return rewards


# The formats the built-in format rewards check, as anchored regular expressions.
FORMATS: dict[str, re.Pattern] = {
    # The whole reply is one number (a final period allowed): "47" or "47."
    "just_number": re.compile(rf"^\s*{_NUMBER}\s*\.?\s*$"),
    # The reply ends on a number: "... = 47" or "The sum is 47."
    "ends_with_number": re.compile(rf"(?s)^.*(?<![\d.]){_NUMBER}\s*\.?\s*$"),
    # The reply ends with "The answer is 47." (any case, optional colon).
    "answer_is": re.compile(rf"(?is)^.*\bthe answer is:?\s*\$?{_NUMBER}\$?\s*\.?\s*$"),
}
DEFAULT_FORMAT = "just_number"


def make_format_reward(format: str | re.Pattern, name: str | None = None) -> Callable[..., list[float]]:
    """A reward function giving 1.0 to completions that match `format` (a FORMATS key or a regex), else 0.0."""
    pattern = FORMATS[format] if isinstance(format, str) and format in FORMATS else re.compile(format)

    def reward(completions: list, **kwargs) -> list[float]:
        return [1.0 if pattern.match(completion_text(c)) else 0.0 for c in completions]

    reward.__name__ = name or (f"format_{format}" if isinstance(format, str) and format in FORMATS else "format_reward")
    return reward


def env_reward(completions: list, env_reward: list[float], **kwargs) -> list[float]:
    """The environment's reward of each episode: the sum of the rewards its steps returned (environment_factory's
    default reward function)."""
    return [float(r) for r in env_reward]


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 when the completion is just the answer, one number (a final period allowed), else 0.0.

    The format the arithmetic task asks for ("Answer with just the number.").
    Other formats: `make_format_reward("answer_is")`, `think_format_reward`.
    """
    pattern = FORMATS[DEFAULT_FORMAT]
    return [1.0 if pattern.match(completion_text(c)) else 0.0 for c in completions]


_THINK_RE = re.compile(r"(?s)^\s*<think>(.*?)</think>(.*)$")


def think_format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 for `<think>reasoning</think>answer`: one think block at the start, then a non-empty answer.

    TRL's think-format reward, slightly stricter: the answer after `</think>`
    must not be empty, and neither tag may appear again.
    """
    rewards = []
    for c in completions:
        text = completion_text(c)
        m = _THINK_RE.match(text)
        ok = (
            m is not None
            and text.count("<think>") == 1
            and text.count("</think>") == 1
            and m.group(2).strip() != ""
        )
        rewards.append(1.0 if ok else 0.0)
    return rewards


# ---------------------------------------------------------------------------
# Reward models
# ---------------------------------------------------------------------------


class RewardModel:
    """A sequence-classification model used as a reward function: reward = logits[:, 0].

    `model`: a `PreTrainedModel` (e.g. AutoModelForSequenceClassification) or a
    name/path to load with `AutoModelForSequenceClassification.from_pretrained`.
    `tokenizer`: its tokenizer; loaded from the model's name_or_path when None.
    Conversational samples (prompt and completion as message lists) are rendered
    with the tokenizer's chat template; plain ones are scored as prompt + completion.
    Scoring runs under `torch.inference_mode`, `batch_size` samples at a time, on the
    model's device.
    """

    def __init__(self, model, tokenizer=None, batch_size: int = 16, max_length: int | None = None,
                 model_init_kwargs: dict | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(model, (str, os.PathLike)):
            # One label: the reward is logits[:, 0] (TRL loads reward models the same way).
            model = AutoModelForSequenceClassification.from_pretrained(str(model), num_labels=1,
                                                                       **(model_init_kwargs or {}))
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"a reward model must be a transformers model, a name or a path, got {type(model).__name__}")
        model.eval()
        model.requires_grad_(False)
        self.model = model
        if tokenizer is None:
            source = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
            if not source:
                raise ValueError(
                    f"reward model {type(model).__name__} has no name_or_path to load its tokenizer from; "
                    "pass it in reward_processing_classes"
                )
            tokenizer = AutoTokenizer.from_pretrained(source)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # Sequence classification picks the last non-pad token; it needs to know the pad id.
        text_config = model.config.get_text_config()
        if getattr(text_config, "pad_token_id", None) is None:
            text_config.pad_token_id = tokenizer.pad_token_id
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.__name__ = reward_func_name(model)

    def texts(self, prompts: list, completions: list) -> list[str]:
        texts = []
        for prompt, completion in zip(prompts, completions, strict=True):
            if is_conversational(completion):
                messages = (list(prompt) if is_conversational(prompt) else [{"role": "user", "content": str(prompt)}])
                messages += list(completion)
                if getattr(self.tokenizer, "chat_template", None):
                    texts.append(self.tokenizer.apply_chat_template(messages, tokenize=False))
                else:
                    texts.append("\n".join(message_text(m.get("content")) for m in messages))
            else:
                texts.append(str(prompt) + str(completion))
        return texts

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        texts = self.texts(prompts, completions)
        device = next(self.model.parameters()).device
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start:start + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    padding_side="right",
                    truncation=self.max_length is not None,
                    max_length=self.max_length,
                    add_special_tokens=False,  # the chat template already has them
                ).to(device)
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                scores += logits[:, 0].float().cpu().tolist()
        return scores


def _is_reward_model(f: Any) -> bool:
    from transformers import PreTrainedModel

    return isinstance(f, (str, os.PathLike, PreTrainedModel))


def prepare_reward_funcs(reward_funcs: Sequence | Callable | str, reward_processing_classes=None,
                         model_init_kwargs: dict | None = None) -> list:
    """Turn names/paths/model objects into `RewardModel`s; leave callables as they are.

    Call it once (the trainer does, at construction): loading a reward model from
    a path is slow. `reward_processing_classes` lists a tokenizer (or None) per
    reward function, as in TRL; `model_init_kwargs` go to from_pretrained of the reward models given by name.
    """
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if reward_processing_classes is None:
        classes = [None] * len(funcs)
    else:
        classes = list(reward_processing_classes) if isinstance(reward_processing_classes, (list, tuple)) else [reward_processing_classes]
        if len(classes) != len(funcs):
            raise ValueError(
                f"reward_processing_classes has {len(classes)} entries but there are {len(funcs)} reward functions; "
                "give one per reward function (None for plain functions)"
            )
    prepared = []
    for f, cls in zip(funcs, classes):
        if isinstance(f, RewardModel):
            prepared.append(f)
        elif _is_reward_model(f):
            prepared.append(RewardModel(f, tokenizer=cls, model_init_kwargs=model_init_kwargs))
        elif callable(f):
            prepared.append(f)
        else:
            raise TypeError(f"reward function {f!r} is neither callable nor a reward model name, path or object")
    return prepared


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------


def reward_func_name(f: Any) -> str:
    """The name a reward function is logged under (rewards/<name>/mean).

    Functions: their __name__ (through functools.partial). Reward models: the
    basename of their name_or_path (else their class name). Names/paths: the
    basename. Other callables: their class name.
    """
    if isinstance(f, RewardModel):
        return f.__name__
    if isinstance(f, (str, os.PathLike)):
        return os.path.basename(os.path.normpath(str(f))) or str(f)
    if isinstance(f, torch.nn.Module):
        config = getattr(f, "config", None)
        source = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
        return os.path.basename(os.path.normpath(source)) if source else type(f).__name__
    while isinstance(f, functools.partial):
        f = f.func
    name = getattr(f, "__name__", None)
    if isinstance(name, str) and name and name != "<lambda>":
        return name
    if inspect.isfunction(f) or inspect.ismethod(f):
        return name or "reward"
    return type(f).__name__


# ---------------------------------------------------------------------------
# Running them
# ---------------------------------------------------------------------------


def _is_async(f: Any) -> bool:
    if inspect.iscoroutinefunction(f):
        return True
    call = getattr(f, "__call__", None)
    return call is not None and not inspect.isfunction(f) and inspect.iscoroutinefunction(call)


def _check_output(name: str, out: Any, n: int) -> list[float]:
    """The rewards as floats (NaN for None), or a ValueError/TypeError that names the function."""
    if isinstance(out, torch.Tensor) or type(out).__module__ == "numpy":
        out = out.tolist() if getattr(out, "ndim", 1) == 1 else out
    if isinstance(out, (str, bytes, dict)) or not isinstance(out, Sequence):
        raise TypeError(
            f"reward function {name!r} returned {type(out).__name__}; it must return a list of {n} "
            "floats (or None for 'not applicable'), one per completion"
        )
    if len(out) != n:
        raise ValueError(
            f"reward function {name!r} returned {len(out)} rewards for {n} completions; it must return one "
            "per completion (None where it does not apply)"
        )
    values = []
    for i, value in enumerate(out):
        if value is None:
            values.append(math.nan)
        elif isinstance(value, numbers.Real):
            values.append(float(value))
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            values.append(float(value.item()))
        elif type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and value.dtype.kind in "biuf":
            values.append(float(value))  # numpy scalars, np.bool_ included
        else:
            raise TypeError(
                f"reward function {name!r} returned {value!r} ({type(value).__name__}) at position {i}; "
                "rewards must be numbers or None"
            )
    return values


class _AsyncRewards:
    """Runs the async reward functions concurrently in one event loop, on a helper thread.

    A helper thread makes `compute_rewards` work the same whether or not its caller
    is inside a running event loop (a notebook, an async server), and lets the
    async functions (typically waiting on the network) overlap the sync ones,
    which run meanwhile in the caller's thread.
    """

    def __init__(self, calls: list[tuple[str, Callable[[], Any]]]):
        self.names = [name for name, _ in calls]
        self._calls = calls
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gather: asyncio.Future | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fastgrpo-async-rewards")
        self._future = self._pool.submit(asyncio.run, self._main())

    async def _main(self):
        self._loop = asyncio.get_running_loop()

        async def one(call):
            result = call()
            while inspect.isawaitable(result):
                result = await result
            return result

        self._gather = asyncio.gather(*(one(call) for _, call in self._calls))
        self._ready.set()
        return await self._gather

    def results(self) -> list:
        try:
            return self._future.result()
        finally:
            self._pool.shutdown(wait=True)

    def cancel(self) -> None:
        if self._ready.wait(timeout=5) and self._loop is not None and self._gather is not None:
            self._loop.call_soon_threadsafe(self._gather.cancel)
        self._pool.shutdown(wait=True)


def compute_rewards(
    reward_funcs: Sequence,
    prompts: list,
    completions: list,
    completion_ids: list[list[int]] | None,
    columns: dict[str, list] | None = None,
    reward_processing_classes=None,
    trainer_state: Any = None,
    **trainer_kwargs,
) -> torch.Tensor:
    """Run every reward function on a batch of B completions: a float32 tensor [B, F], NaN for None.

    Each function gets `prompts=`, `completions=`, `completion_ids=`,
    `trainer_state=`, the `trainer_kwargs` (the trainer's `log_extra` and
    `log_metric`, and `environments` in a multi-turn run) and every column in `columns` (the data set's columns, each a
    list of B values; `prompt`, `completion` and `completion_ids` are left out, as
    in TRL) as keyword arguments.

    Plain callables run one after another in the calling thread (math-verify's
    timeouts need the main thread). Async callables all run concurrently in one
    asyncio event loop on a helper thread, started first so that they overlap the
    plain ones; this works from sync code and from inside a running event loop
    (the caller's loop is blocked while it waits). Names/paths/model objects are
    loaded as reward models (`RewardModel`); pass prepared functions
    (`prepare_reward_funcs`) to load them only once.
    """
    funcs = prepare_reward_funcs(reward_funcs, reward_processing_classes)
    n = len(prompts)
    if len(completions) != n:
        raise ValueError(f"got {n} prompts but {len(completions)} completions; pass one prompt per completion")
    if completion_ids is not None and len(completion_ids) != n:
        raise ValueError(f"got {n} completions but {len(completion_ids)} completion_ids")
    # As in TRL, the data set's own prompt/completion columns are not passed again.
    columns = {k: v for k, v in (columns or {}).items() if k not in ("prompt", "completion", "completion_ids")}
    for key in ("prompts", "completions", "trainer_state", *trainer_kwargs):
        if key in columns:
            raise ValueError(f"data set column {key!r} clashes with a reward-function argument; rename the column")
    for key, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column {key!r} has {len(values)} values for {n} completions")
    kwargs = dict(prompts=prompts, completions=completions, completion_ids=completion_ids,
                  trainer_state=trainer_state, **trainer_kwargs, **columns)

    names = [reward_func_name(f) for f in funcs]
    rewards = torch.full((n, len(funcs)), math.nan, dtype=torch.float32)
    async_idx = [i for i, f in enumerate(funcs) if _is_async(f)]
    runner = _AsyncRewards([(names[i], functools.partial(funcs[i], **kwargs)) for i in async_idx]) if async_idx else None
    try:
        late: list[tuple[int, Any]] = []  # sync callables that returned an awaitable
        for i, f in enumerate(funcs):
            if i in async_idx:
                continue
            out = f(**kwargs)
            if inspect.isawaitable(out):
                late.append((i, out))
                continue
            rewards[:, i] = torch.tensor(_check_output(names[i], out, n), dtype=torch.float32)
    except BaseException:
        if runner is not None:
            runner.cancel()
        raise
    if runner is not None:
        for i, out in zip(async_idx, runner.results()):
            rewards[:, i] = torch.tensor(_check_output(names[i], out, n), dtype=torch.float32)
    if late:
        results = _AsyncRewards([(names[i], (lambda aw=aw: aw)) for i, aw in late]).results()
        for (i, _), out in zip(late, results):
            rewards[:, i] = torch.tensor(_check_output(names[i], out, n), dtype=torch.float32)

    if funcs and n:
        all_nan = torch.isnan(rewards).all(dim=1)
        if bool(all_nan.any()):  # TRL's words (users grep their logs for them), then how many rows
            row = int(all_nan.nonzero()[0, 0])
            shown = {k: v[row] for k, v in columns.items()}
            shown.update(prompt=prompts[row], completion=completions[row])
            logger.warning(
                "All reward functions returned None for the following kwargs:\n%s\nPlease ensure that at least one "
                "reward function returns a valid reward. (%d of %d completions; they are left out of their group's "
                "baseline and get advantage 0)", shown, int(all_nan.sum()), n)
    return rewards


__all__ = [
    "FORMATS",
    "RewardModel",
    "accuracy_reward",
    "completion_text",
    "compute_rewards",
    "format_reward",
    "is_conversational",
    "last_number",
    "make_format_reward",
    "number_match_reward",
    "prepare_reward_funcs",
    "reward_func_name",
    "think_format_reward",
]
