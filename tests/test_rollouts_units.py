"""Multi-turn pieces alone: tool-call parsing, tool running, the tokens of continuations, the episode driver,
the server's recorder, and the trainer's refusals. No server: the driver runs on a scripted generator here
(tests/test_multi_turn.py drives it against the real one)."""

import json
import time

import pytest
from transformers import AutoTokenizer

from fastgrpo import GRPOConfig
from fastgrpo.config import ConfigError
from fastgrpo.rollouts import Environment, StepResult, ToolEnvironment, ToolRunner, Turn, run_episodes
from fastgrpo.rollouts.chat import ChatTokens
from fastgrpo.rollouts.tool_calls import ToolCall, calls_as_text, parse_hermes, tool_schema
from fastgrpo.serve.recordings import Recorder, StreamedReply


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


def fails(x: str) -> str:
    """Always raises.

    Args:
        x: anything
    """
    raise ValueError(f"cannot handle {x}")


def sleeps(seconds: float) -> str:
    """Sleeps.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "woke"


def huge() -> str:
    """Returns a megabyte."""
    return "x" * 2**20


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen2):
    return AutoTokenizer.from_pretrained(tiny_qwen2)


def test_hermes_calls_parse_and_malformed_ones_say_why():
    parsed = parse_hermes('Let me add. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
                          '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}</tool_call>')
    assert parsed.content == "Let me add."
    assert [(c.name, c.arguments, c.error) for c in parsed.calls] == [("add", {"a": 1, "b": 2}, None),
                                                                       ("add", {"a": 3, "b": 4}, None)]
    bad = parse_hermes('<tool_call>{"name": add}</tool_call><tool_call>{"arguments": {}}</tool_call>'
                       '<tool_call>{"name": "add", "arguments": [1]}</tool_call><tool_call>{"name": "add"')
    assert [c.error is not None for c in bad.calls] == [True] * 4
    assert "not valid JSON" in bad.calls[0].error and '"name"' in bad.calls[1].error
    assert "JSON object" in bad.calls[2].error and "not closed" in bad.calls[3].error
    assert parse_hermes("The answer is 7.").calls == []
    # Written back for templates that render content only, it parses to the same call.
    text = calls_as_text([ToolCall("add", {"a": 1, "b": 2}).as_message_call("call_1")])
    assert [(c.name, c.arguments) for c in parse_hermes(text).calls] == [("add", {"a": 1, "b": 2})]


def test_a_tool_that_raises_hangs_or_returns_a_megabyte_gives_an_error_result():
    runner = ToolRunner([add, fails, sleeps, huge], timeout_s=0.3, max_result_chars=1000)
    assert runner.run(ToolCall("add", {"a": 2, "b": 5})).content == "7"
    cases = {"raised": ToolCall("fails", {"x": "y"}), "timeout": ToolCall("sleeps", {"seconds": 5}),
             "too_large": ToolCall("huge", {}), "unknown_tool": ToolCall("nope", {}),
             "bad_arguments": ToolCall("add", {"a": 1}), "parse": ToolCall("", error="not JSON")}
    began = time.perf_counter()
    for kind, call in cases.items():
        result = runner.run(call)
        assert result.failure == kind, (kind, result)
        assert result.content.startswith("Error:") and len(result.content) < 300
    assert time.perf_counter() - began < 4  # the sleeping tool was not waited for
    assert "ValueError: cannot handle y" in runner.run(cases["raised"]).content
    assert "1048576 characters" in runner.run(cases["too_large"]).content
    with pytest.raises(ValueError, match="unique"):
        ToolRunner([add, add])


def test_the_tools_schema_comes_from_the_signature_and_docstring():
    schema = tool_schema(add)
    assert schema["function"]["name"] == "add"
    assert schema["function"]["parameters"]["properties"]["a"] == {"type": "integer", "description": "the first"}

    def undocumented(x):
        return x

    with pytest.raises(ValueError, match="type hint"):
        tool_schema(undocumented)


def test_continuation_tokens_are_what_the_template_writes_after_a_turn(tokenizer):
    """Prompt + the model's turn + continuation equals the template's rendering of the whole conversation,
    tokenized (where the turn's text tokenizes back to the same ids, as here)."""
    chat = ChatTokens(tokenizer, [tool_schema(add)])
    assert not chat.renders_tools  # the tiny template ignores `tools`: they go into a system message
    prompt_messages = [{"role": "user", "content": "What is 2 + 3?"}]
    turn_text = 'call <tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    generated = tokenizer(turn_text, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids(
        "<|im_end|>")]
    replies = [{"role": "tool", "name": "add", "content": "5"}, {"role": "user", "content": "and now?"}]
    ids = chat.prompt(prompt_messages) + generated + chat.continuation(generated, replies)
    conversation = chat.messages_for_template(prompt_messages + [{"role": "assistant", "content": turn_text}]
                                              + replies)
    expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    assert ids == list(expected)
    assert "<tools>" in tokenizer.decode(ids) and '"name": "add"' in tokenizer.decode(ids)
    # A turn cut before its stop token gets the whole end of turn from the template.
    cut = generated[:-1]
    assert chat.continuation(cut, replies)[: len(chat.turn_end)] == chat.turn_end


class Countdown(Environment):
    """Answers every turn with 'again' until `turns` turns, rewarding each turn by its length."""

    def __init__(self, turns):
        self.turns, self.seen = turns, 0

    def step(self, turn):
        self.seen += 1
        return StepResult("again", reward=len(turn), done=self.seen == self.turns)


def scripted(lengths):
    """A generator whose k-th call gives each prompt `lengths[k]` tokens (ids 10, 11, ...), logprob -0.5 each."""
    calls = []

    def generate(prompts, budgets, seeds):
        k = len(calls)
        calls.append((prompts, budgets, seeds))
        return [Turn([10 + j for j in range(lengths[k])], [-0.5] * lengths[k], True, (k, k)) for _ in prompts]

    return generate, calls


def test_episodes_interleave_turns_and_replies_with_a_mask_on_the_models_tokens(tokenizer):
    chat = ChatTokens(tokenizer)
    generate, calls = scripted([3, 2, 4])
    reply = chat.continuation([10, 11, 12], [{"role": "user", "content": "again"}])
    episodes = run_episodes([[1, 2], [3]], [Countdown(3), Countdown(2)], generate, chat,
                            lambda ids: "t" * len(ids), max_completion_length=200, seed_of=lambda i, t: 100 * i + t)
    first, second = episodes
    assert first.completion_ids == [10, 11, 12] + reply + [10, 11] + reply + [10, 11, 12, 13]
    assert first.mask == [1] * 3 + [0] * len(reply) + [1] * 2 + [0] * len(reply) + [1] * 4
    assert first.logprobs == [-0.5 if m else 0.0 for m in first.mask]
    assert second.completion_ids == [10, 11, 12] + reply + [10, 11] and second.turns == 2
    assert first.turn_rewards == [3.0, 2.0, 4.0] and first.env_reward == 9.0 and first.stopped
    # Each turn continues from the exact tokens so far; finished episodes stop generating.
    assert calls[1][0] == [[1, 2] + first.completion_ids[: 3 + len(reply)], [3] + second.completion_ids[: 3 + len(reply)]]
    assert len(calls[2][0]) == 1 and calls[2][2] == [2]  # seed_of(0, turn 2)
    assert calls[1][1] == [200 - 3 - len(reply)] * 2  # each turn may use what is left of the budget
    assert first.weight_versions == (0, 2)


def test_the_budget_cuts_an_episode_and_a_reply_that_does_not_fit_ends_it(tokenizer):
    chat = ChatTokens(tokenizer)
    reply = len(chat.continuation([10], [{"role": "user", "content": "again"}]))
    # A generator that ignores the cap: the driver keeps the first tokens and marks the episode truncated.
    generate, _ = scripted([50])
    (episode,) = run_episodes([[1]], [Countdown(5)], generate, chat, str, max_completion_length=20,
                              seed_of=lambda i, t: 0)
    assert len(episode.completion_ids) == 20 and not episode.stopped and episode.turns == 1
    # A turn that leaves too little room for the reply and one more token ends the episode there.
    generate, _ = scripted([20 - reply, 5])
    (episode,) = run_episodes([[1]], [Countdown(5)], generate, chat, str, max_completion_length=20,
                              seed_of=lambda i, t: 0)
    assert episode.completion_ids == [10 + j for j in range(20 - reply)] and not episode.stopped


def test_a_tool_environment_runs_calls_until_an_answer_or_the_iteration_limit():
    runner = ToolRunner([add], timeout_s=1.0)
    env = ToolEnvironment(runner, parse_hermes, max_iterations=1)
    call = '<tool_call>{"name": "add", "arguments": {"a": 20, "b": 22}}</tool_call>'
    first = env.step(call)
    assert first.messages == [{"role": "tool", "name": "add", "content": "42"}] and not first.done
    assert first.tool_calls == 1 and first.tool_failures == []
    assert env.step(call).done  # a second round of calls is past max_iterations=1
    assert ToolEnvironment(runner).step("42").done  # no call: the answer


def test_the_recorder_continues_a_session_only_when_the_history_matches(tokenizer):
    chat = ChatTokens(tokenizer)
    recorder = Recorder(max_rollouts=2)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    plan = recorder.plan("r1", messages, "[]", lambda: chat)
    assert plan.prompt_ids is None and plan.sequence is None  # new: vLLM renders it
    first_prompt = chat.prompt(messages)  # what the engine generated from
    reply = {"role": "assistant", "content": "five"}
    recorder.record("r1", plan, messages, "[]", reply, [10, 11, 2], [-0.1, -0.2, -0.3], [0, 0], first_prompt)
    # The agent sends its history back (as the openai client does: None fields, the reply object) plus a message.
    echoed = messages + [{"role": "assistant", "content": "five", "refusal": None, "tool_calls": None},
                         {"role": "user", "content": "sure?"}]
    plan2 = recorder.plan("r1", echoed, "[]", lambda: chat)
    following = chat.continuation([10, 11, 2], echoed[2:])
    assert plan2.prompt_ids == first_prompt + [10, 11, 2] + following
    recorder.record("r1", plan2, echoed, "[]", {"role": "assistant", "content": "yes"}, [12], [-0.4], [1, 1],
                    plan2.prompt_ids)
    (sequence,) = recorder.get("r1").sequences
    assert sequence.prompt_ids == first_prompt
    assert sequence.completion_ids == [10, 11, 2] + following + [12]
    assert sequence.mask == [1, 1, 1] + [0] * len(following) + [1]
    assert sequence.logprobs == [-0.1, -0.2, -0.3] + [0.0] * len(following) + [-0.4]
    assert sequence.as_response().weight_versions == [0, 1]
    # An edited history starts a new sequence.
    edited = [{"role": "user", "content": "What is 2 + 4?"}, *echoed[1:]]
    assert recorder.plan("r1", edited, "[]", lambda: chat).sequence is None
    # The oldest recording goes beyond max_rollouts, and a GET says why it is gone.
    for rid in ("r2", "r3"):
        recorder.record(rid, recorder.plan(rid, messages, "[]", lambda: chat), messages, "[]", reply, [10], [-1.0],
                        [0, 0], first_prompt)
    with pytest.raises(Exception, match="dropped"):
        recorder.get("r1")


def test_a_streamed_reply_is_put_together_as_the_openai_client_does():
    reply = StreamedReply()
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Let me "}}]},
        {"choices": [{"index": 0, "delta": {"content": "look."}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                            "function": {"name": "lookup", "arguments": ""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"key": '}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"a"}'}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]
    stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    for cut in range(0, len(stream), 37):  # chunks cut anywhere, as a network may deliver them
        reply.add(stream[cut:cut + 37])
    assert reply.message() == {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"key": "a"}'}}]}


def test_multi_turn_options_fail_at_construction_naming_the_fix(tiny_qwen2, tmp_path):
    from datasets import Dataset

    from fastgrpo import GRPOTrainer

    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": "hi"}]] * 4})

    def config(**kw):
        return GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, use_cpu=True,
                          bf16=False, report_to=[], **kw)

    def reward(completions, **kw):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match="one of tools, environment_factory and rollout_func"):
        GRPOTrainer(tiny_qwen2, [reward], args=config(), train_dataset=data, tools=[add],
                    environment_factory=lambda: Countdown(1))
    with pytest.raises(ValueError, match="no tools were given"):
        GRPOTrainer(tiny_qwen2, [reward], args=config(max_tool_calling_iterations=2), train_dataset=data)
    for bad, words in ((dict(tool_timeout=0), "tool_timeout"), (dict(max_tool_result_length=0), "max_tool_result"),
                       (dict(max_tool_calling_iterations=-1), "max_tool_calling_iterations")):
        with pytest.raises(ConfigError, match=words):
            config(**bad)


def test_a_rollout_funcs_result_is_checked_row_by_row(tiny_qwen2, tmp_path):
    from datasets import Dataset

    from fastgrpo import GRPOTrainer

    data = Dataset.from_dict({"prompt": ["hi"] * 4})
    cfg = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, use_cpu=True,
                     bf16=False, report_to=[], max_completion_length=8, max_steps=1, save_strategy="no",
                     disable_tqdm=True)

    def trainer_with(result):
        return GRPOTrainer(tiny_qwen2, [lambda completions, **kw: [0.0] * len(completions)], args=cfg,
                           train_dataset=data, rollout_func=lambda prompts, trainer: result(len(prompts)))

    good = {"prompt_ids": [[1, 2]], "completion_ids": [[5, 6, 7]], "logprobs": [[-1.0, -1.0, -1.0]],
            "env_mask": [[1, 0, 1]]}
    for change, words in ((dict(env_mask=[[1, 0]]), "one entry per completion token"),
                          (dict(completion_ids=[[5] * 9], logprobs=[[0.0] * 9], env_mask=[[1] * 9]),
                           "more than max_completion_length"),
                          (dict(env_mask=[[1, 2, 1]]), "other than 0 and 1")):
        result = {**good, **change}
        with pytest.raises(ValueError, match=words):
            trainer_with(lambda n, r=result: {k: v * n for k, v in r.items()}).train()
    with pytest.raises(ValueError, match="4 prompts"):
        trainer_with(lambda n: good).train()
    with pytest.raises(ValueError, match="lacks"):
        trainer_with(lambda n: {"completion_ids": [[1]] * n}).train()


def test_the_recording_protocol_round_trips():
    from fastgrpo.protocol import RolloutRecording

    body = {"rollout_id": "a", "sequences": [{"prompt_ids": [1], "completion_ids": [2, 3], "completion_mask": [1, 0],
                                              "logprobs": [-1.0, 0.0], "calls": 1, "weight_versions": [0, 0]}],
            "policy": {"model": "run-a", "temperature": 0.7, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
                       "repetition_penalty": 1.0}, "overridden": {"temperature": 0.0}}
    assert RolloutRecording.model_validate(json.loads(json.dumps(body))).model_dump() == body


# Like Qwen3's: the last assistant message gets an (empty) reasoning block, earlier ones do not.
REWRITING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and loop.last %}"
    "{{ '<|im_start|>assistant\\n<think></think>' + message['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_continuations_with_a_template_that_rewrites_the_last_assistant_turn(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = REWRITING_TEMPLATE
    chat = ChatTokens(tok)
    generated = tok("five", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    reply = [{"role": "user", "content": "sure?"}]
    following = chat.continuation(generated, reply)
    # What the template writes after a middle assistant turn, the model's own <|im_end|> left out.
    assert tok.decode(following) == "\n<|im_start|>user\nsure?<|im_end|>\n<|im_start|>assistant\n"
    assert "<think>" not in tok.decode(following)


# --- under load: environments step at once, each bounded; a turn's tool calls run at once, async ones too ------


class Rendezvous:
    """Counts steps in progress; each waits (briefly) for `expected` to be in progress at once."""

    def __init__(self, expected: int, wait_s: float = 2.0):
        self.expected, self.wait_s, self.now, self.most = expected, wait_s, 0, 0
        self.cond = __import__("threading").Condition()

    def __enter__(self):
        with self.cond:
            self.now += 1
            self.most = max(self.most, self.now)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.now >= self.expected, timeout=self.wait_s)

    def __exit__(self, *exc):
        with self.cond:
            self.now -= 1


def one_turn(n: int, environments, timeout_s=5.0, concurrency=16):
    from fastgrpo.rollouts.episode import run_episodes

    chat = type("Chat", (), {"continuation": staticmethod(lambda generated, messages: [9])})()
    return run_episodes([[1]] * n, environments, lambda prompts, budgets, seeds: [Turn([5], [-1.0], True)] * len(prompts),
                        chat, lambda ids: "turn", 16, lambda i, t: i, timeout_s, concurrency)


def test_a_rounds_environments_step_at_once_within_the_bound_and_a_hung_step_ends_only_its_episode():
    import threading

    class Busy(Environment):
        def __init__(self, meeting, hang=False):
            self.meeting, self.hang = meeting, hang

        def step(self, turn):
            if self.hang:
                threading.Event().wait(30)  # a step that never returns in time
            with self.meeting:
                return StepResult(reward=1.0, done=True)

    meeting = Rendezvous(expected=4)
    episodes = one_turn(4, [Busy(meeting) for _ in range(4)])
    assert meeting.most == 4 and [e.turn_rewards for e in episodes] == [[1.0]] * 4
    bounded = Rendezvous(expected=3, wait_s=0.3)  # 3 never meet: each waits 0.3 s
    one_turn(6, [Busy(bounded) for _ in range(6)], concurrency=2)
    assert bounded.most == 2  # never more than environment_concurrency at once
    began = time.monotonic()
    episodes = one_turn(3, [Busy(Rendezvous(1)), Busy(None, hang=True), Busy(Rendezvous(1))], timeout_s=0.5)
    assert time.monotonic() - began < 5
    assert [e.step_timed_out for e in episodes] == [False, True, False]
    assert [e.turn_rewards for e in episodes] == [[1.0], [], [1.0]]


def test_a_turns_tool_calls_run_at_once_and_async_tools_run_as_coroutines():
    import asyncio

    meeting = Rendezvous(expected=3)

    def lookup(key: str) -> str:
        """Look a key up.

        Args:
            key: the key
        """
        with meeting:
            return key.upper()

    async def fetch(key: str) -> str:
        """Fetch a key.

        Args:
            key: the key
        """
        await asyncio.sleep(0.01)
        return f"fetched {key}"

    runner = ToolRunner([lookup, fetch], timeout_s=5.0)
    calls = [ToolCall("lookup", {"key": k}) for k in "abc"] + [ToolCall("fetch", {"key": "d"})]
    results = runner.run_all(calls)
    assert meeting.most == 3 and [r.content for r in results] == ["A", "B", "C", "fetched d"]
    assert all(r.failure is None for r in results)


def test_async_tools_of_one_turn_run_at_once_on_one_loop_and_past_the_timeout_are_cancelled():
    import asyncio

    seen = {"loops": set(), "cancelled": 0}

    async def nap(seconds: float) -> str:
        """Sleeps.

        Args:
            seconds: how long
        """
        seen["loops"].add(id(asyncio.get_running_loop()))
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            seen["cancelled"] += 1
            raise
        return "rested"

    async def doze(seconds: float) -> str:
        """Sleeps too.

        Args:
            seconds: how long
        """
        return await nap(seconds)

    runner = ToolRunner([nap, doze], timeout_s=2.0)
    began = time.perf_counter()
    results = runner.run_all([ToolCall("nap", {"seconds": 0.5}), ToolCall("doze", {"seconds": 0.5})])
    assert time.perf_counter() - began < 0.8  # together, not one after the other (1 s)
    assert [r.content for r in results] == ["rested", "rested"]
    runner.run_all([ToolCall("nap", {"seconds": 0.0})])
    assert len(seen["loops"]) == 1  # every call on one loop (TRL's way): what one call makes serves the next
    short = ToolRunner([nap], timeout_s=0.2)
    (late,) = short.run_all([ToolCall("nap", {"seconds": 30})])
    assert late.failure == "timeout" and short.abandoned == 0
    deadline = time.monotonic() + 2
    while not seen["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen["cancelled"] == 1  # a coroutine past the timeout is stopped, not left running


MALFORMED_TURN = ('<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'  # a call
                  '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'  # a call to no tool: failed
                  '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'  # bad arguments: failed
                  '<tool_call>{"name": "fails", "arguments": {"x": "y"}}</tool_call>'  # raises: failed
                  '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>'  # arguments not an object: failed
                  '<tool_call>{"name": add}</tool_call>'  # not JSON: no call at all (TRL's parser gives text)
                  '<tool_call>{"name": "add"')  # never closed: no call either


def test_malformed_tool_calls_are_counted_as_trl_counts_them():
    step = ToolEnvironment(ToolRunner([add, fails], timeout_s=2.0)).step(MALFORMED_TURN)
    assert step.tool_calls == 5
    assert step.tool_failures == ["unknown_tool", "bad_arguments", "raised", "bad_arguments", "parse", "parse"]
    assert [m["content"].startswith("Error:") for m in step.messages] == [False] + [True] * 6  # all are told


def multi_turn_of(tokenizer, tmp_path, **kw):
    from fastgrpo.trainer.multi_turn import MultiTurn

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, use_cpu=True,
                      bf16=False, report_to=[], max_completion_length=2048, tool_timeout=2.0)
    return MultiTurn(tokenizer, args, **kw)


def writes(tokenizer, scripts):
    """A generator whose episode i writes scripts[i][k] as its k-th turn (ending on <|im_end|>); run it with
    seed_of=SEED_OF, which tells it the episode and turn."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def generate(prompts, budgets, seeds):
        turns = []
        for seed in seeds:
            ids = tokenizer(scripts[seed // 100][seed % 100], add_special_tokens=False)["input_ids"] + [end]
            turns.append(Turn(ids, [-0.5] * len(ids), True))
        return turns

    return generate


def SEED_OF(i, turn):
    return 100 * i + turn


def question(n):
    return [[{"role": "user", "content": "Go."}] for _ in range(n)]


def trainer_metrics(rollout) -> dict:
    """What the trainer logs of a round's per-row metrics (its own function, on one process)."""
    import torch

    from fastgrpo.trainer.rounds import episode_metrics

    return episode_metrics({k: torch.tensor(v, dtype=torch.float32) for k, v in rollout.per_row.items()})


def test_tool_metrics_are_trls_and_there_on_a_round_where_no_episode_called_a_tool(tokenizer, tmp_path):
    multi_turn = multi_turn_of(tokenizer, tmp_path, tools=[add, fails])
    rollout = multi_turn.run(None, question(2), [{}, {}], writes(tokenizer, [[MALFORMED_TURN, "7"], ["5"]]), SEED_OF)
    assert rollout.per_row["tools/calls"] == [5.0, 0.0] and rollout.per_row["tools/failures"] == [4.0, 0.0]
    metrics = trainer_metrics(rollout)
    assert metrics["tools/call_frequency"] == 2.5  # calls per episode
    assert metrics["tools/failure_frequency"] == pytest.approx(0.8)  # failed calls / calls: 4 / 5
    assert metrics["tools/failures/parse"] == 1.0 and metrics["tools/failures/bad_arguments"] == 1.0  # per episode
    quiet = multi_turn.run(None, question(2), [{}, {}], writes(tokenizer, [["5"], ["6"]]), SEED_OF)
    metrics = trainer_metrics(quiet)
    assert metrics["tools/call_frequency"] == 0.0 and metrics["tools/failure_frequency"] == 0.0


class Calculator:
    """TRL's style: a reset, tool methods, and the reward its state gives."""

    made = 0

    def __init__(self):
        Calculator.made += 1
        self.total = 0

    def reset(self, **row):
        self.row, self.total = row, 0

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: the first
            b: the second
        """
        self.total += a + b
        return a + b

    def get_reward(self) -> float:
        return float(self.total)

    @property
    def expensive(self):  # never read to find the tools
        raise AssertionError("a property was evaluated")


class Speller:
    def reset(self, word, **row):
        self.word, self.spelled = word, ""
        return f"Spell {word}."

    async def spell(self, letters: str) -> str:
        """Spell a word.

        Args:
            letters: the word's letters
        """
        self.spelled = letters
        return "-".join(letters)

    async def get_reward(self) -> float:
        return 1.0 if self.spelled == self.word else 0.0


class Pays(Environment):
    """A step environment with no get_reward: its steps' rewards are its reward (env_reward)."""

    def step(self, turn):
        return StepResult(reward=2.0, done=True)


def call(name, **arguments):
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_a_dict_of_environments_routes_each_example_to_its_environment_tools_and_reward(tokenizer, tmp_path):
    import math

    from fastgrpo.trainer.rewards import compute_rewards, env_reward

    Calculator.made = 0
    multi_turn = multi_turn_of(tokenizer, tmp_path, environment_factory={"calc": Calculator, "spell": Speller,
                                                                          "pay": Pays})
    assert Calculator.made == 1  # probed once at construction, as TRL does
    assert multi_turn.uses_tools and multi_turn.has_step_environments
    rows = [{"environment": "calc", "word": None}, {"environment": "calc", "word": None},
            {"environment": "spell", "word": "cat"}, {"environment": "pay", "word": None}]
    scripts = [[call("add", a=2, b=3) + call("add", a=1, b=1), "7"],
               [call("spell", letters="x"), "no"],  # not a tool of this example's environment
               [call("spell", letters="cat"), "done"],
               ["hi"]]
    rollout = multi_turn.run(None, question(4), rows, writes(tokenizer, scripts), SEED_OF)
    assert Calculator.made == 2  # the probe served the first calc episode
    prompts = [tokenizer.decode(ids) for ids in rollout.prompt_ids]
    assert '"name": "add"' in prompts[0] and '"spell"' not in prompts[0]
    assert '"name": "spell"' in prompts[2] and '"add"' not in prompts[2] and "Spell cat." in prompts[2]
    assert "<tools>" not in prompts[3]
    assert "get_reward" not in prompts[0] + prompts[2] and "reset" not in prompts[0]
    environments = rollout.reward_columns["environments"]
    assert environments[0].row == {"word": None}  # the routing field is not reset's
    assert rollout.per_row["tools/calls"] == [2.0, 1.0, 1.0, 0.0]
    assert rollout.per_row["tools/failures/unknown_tool"] == [0.0, 1.0, 0.0, 0.0]
    # The trainer's reward functions: env_reward (a step environment is there) and one per get_reward class.
    named = multi_turn.environment_reward_funcs()
    assert [name for name, _ in named] == ["Calculator", "Speller"]
    funcs = [env_reward] + [f for _, f in named]
    rewards = compute_rewards(funcs, question(4), rollout.completions, rollout.completion_ids,
                              rollout.reward_columns).tolist()
    as_lists = [[None if math.isnan(v) else v for v in row] for row in rewards]
    assert as_lists == [[0.0, 7.0, None], [0.0, 0.0, None], [0.0, None, 1.0], [2.0, None, None]]


def test_environment_rewards_go_by_exact_class_once_per_class():
    from fastgrpo.trainer.multi_turn import environment_reward_func

    class Sub(Calculator):
        def get_reward(self):
            return -1.0

    base, sub = Calculator(), Sub()
    base.total = 3
    assert environment_reward_func(Calculator)([base, sub, Pays()]) == [3.0, None, None]
    assert environment_reward_func(Sub)([base, sub]) == [None, -1.0]
    assert environment_reward_func(Speller).__name__ == "Speller"


def test_a_dict_of_environments_names_each_mistake(tokenizer, tmp_path):
    from datasets import Dataset

    multi_turn = multi_turn_of(tokenizer, tmp_path, environment_factory={"calc": Calculator, "again": Calculator})
    assert [name for name, _ in multi_turn.environment_reward_funcs()] == ["Calculator"]  # one per class
    assert not multi_turn.has_step_environments
    generate = writes(tokenizer, [["7"]])
    with pytest.raises(ValueError, match=r"Example has `environment='chess'`, which is not among the environments "
                                         r"passed to `environment_factory`. Expected one of: \['calc', 'again'\]"):
        multi_turn.run(None, question(1), [{"environment": "chess"}], generate, SEED_OF)
    with pytest.raises(ValueError, match="no `environment` field: give the dataset an `environment` column"):
        multi_turn.run(None, question(1), [{"word": "x"}], generate, SEED_OF)
    with pytest.raises(ValueError, match="the training dataset has no `environment` column"):
        multi_turn.check_dataset(Dataset.from_dict({"prompt": question(1)}))
    multi_turn.check_dataset(Dataset.from_dict({"prompt": question(1), "environment": ["calc"]}))
    with pytest.raises(ValueError, match="requires a `train_dataset` with an `environment` column"):
        multi_turn.check_dataset(None)
    multi_turn_of(tokenizer, tmp_path, environment_factory=Calculator).check_dataset(None)  # a single one: no routing

    class NoReset:
        def add(self, a: int) -> int:
            """Echo.

            Args:
                a: a number
            """
            return a

    with pytest.raises(ValueError, match="Each environment instance returned by `environment_factory` must define "
                                         "a callable `reset`."):
        multi_turn_of(tokenizer, tmp_path, environment_factory={"calc": Calculator, "bad": NoReset})
    with pytest.raises(ValueError, match=r"or a dict \{name: factory\}"):  # TRL 1.16 takes no list either
        multi_turn_of(tokenizer, tmp_path, environment_factory=[Calculator])
