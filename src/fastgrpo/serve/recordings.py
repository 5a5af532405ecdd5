"""Agents recorded through the OpenAI chat route: each rollout id's session as exact token sequences.

An agent written against the OpenAI chat API runs unchanged against this server, with its base URL set
to `/rollouts/{rollout_id}/v1`. Each chat call is vLLM's own chat completion (streaming or not, with the
server's tool-call and reasoning parsers), recorded from the engine's tokens: when its messages are the
previous call's messages plus the reply the server gave, plus new ones (tool results, the user's next
message), the prompt is the previous call's exact tokens, the reply's exact tokens and only the new
messages' tokens (rollouts.chat.ChatTokens), never the conversation rendered again. So the session is one
sequence: the first prompt, then the model's tokens (mask 1, with the sampler's logprobs) interleaved with
everything else (mask 0), what the trainer trains on. A call that does not continue the last one (the
agent rewrote its history, or changed its tools) starts a new sequence of the same rollout. A streamed
call is recorded once its stream has ended, as exactly the tokens it sent; one cut short is not recorded.

`GET /rollouts/{id}` returns the sequences, `DELETE /rollouts/{id}` forgets one. The server keeps the
newest `max_rollouts` recordings; older ones are dropped (and a GET says so). The routes are in
serve/routes/recordings.py; this module keeps the recordings.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from fastgrpo.protocol import RecordedSequence, RolloutPolicy
from fastgrpo.rollouts.chat import ChatTokens, message_text
from fastgrpo.serve import DEFAULT_MAX_ROLLOUTS
from fastgrpo.serve.errors import ApiError

ROLLOUT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def is_recorded_chat(path: str) -> bool:
    """Whether `path` is a recorded chat call's: /rollouts/{rollout_id}/v1/chat/completions."""
    return path.startswith("/rollouts/") and path.endswith("/v1/chat/completions")


def normalized(message: dict) -> dict:
    """What identifies a message when a call's history is matched against the recorded one: role, text, the tool
    calls' names and arguments (not their ids, nor fields the OpenAI client adds as None)."""
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", call)
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        calls.append([function.get("name"), json.dumps(arguments, sort_keys=True)])
    return {"role": message.get("role"), "content": message_text(message.get("content")).strip(), "tool_calls": calls,
            "name": message.get("name"), "tool_call_id": message.get("tool_call_id")}


@dataclass
class Sequence:
    prompt_ids: list[int]
    tools: str  # the call's tools, as JSON: other tools start a new sequence
    messages: list[dict] = field(default_factory=list)  # normalized: the history this sequence holds so far
    completion_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    last_generated: list[int] = field(default_factory=list)
    weight_versions: list[int] = field(default_factory=list)
    calls: int = 0

    def as_response(self) -> RecordedSequence:
        return RecordedSequence(prompt_ids=self.prompt_ids, completion_ids=self.completion_ids,
                                completion_mask=self.mask, logprobs=self.logprobs, calls=self.calls,
                                weight_versions=[min(self.weight_versions), max(self.weight_versions)]
                                if self.weight_versions else [])


@dataclass
class Plan:
    """How one call's prompt is built: continuing `sequence` (with `following` after its last reply), or new
    (prompt_ids None: vLLM renders the messages)."""

    prompt_ids: list[int] | None
    sequence: Sequence | None
    following: list[int]
    length: int  # the sequence's length when planned: a call that finished meanwhile makes this one a new sequence


@dataclass
class Recording:
    rollout_id: str
    sequences: list[Sequence] = field(default_factory=list)
    updated: float = field(default_factory=time.time)
    policy: RolloutPolicy | None = None  # set by the trainer that opened it: what every call samples from
    overridden: dict[str, float] = field(default_factory=dict)  # what the agent asked for, where the policy won


class Recorder:
    def __init__(self, max_rollouts: int = DEFAULT_MAX_ROLLOUTS):
        self.max_rollouts = max_rollouts
        self.recordings: OrderedDict[str, Recording] = OrderedDict()
        self.dropped: OrderedDict[str, None] = OrderedDict()  # recently dropped ids, to say so on a GET

    @staticmethod
    def check_id(rollout_id: str) -> None:
        if not ROLLOUT_ID.match(rollout_id):
            raise ApiError(400, "invalid_request", f"rollout id {rollout_id[:40]!r}: use 1-128 letters, digits, "
                           "'.', '_', ':' or '-', starting with a letter or digit", "rollout_id")

    def plan(self, rollout_id: str, messages: list[dict], tools: str, chat: Callable[[], ChatTokens]) -> Plan:
        recording = self.recordings.get(rollout_id)
        last = recording.sequences[-1] if recording and recording.sequences else None
        history = [normalized(m) for m in messages]
        if last is not None and last.tools == tools and len(history) > len(last.messages) \
                and history[: len(last.messages)] == last.messages:
            following = chat().continuation(last.last_generated, messages[len(last.messages):])
            return Plan(last.prompt_ids + last.completion_ids + following, last, following, len(last.completion_ids))
        return Plan(None, None, [], 0)

    def open(self, rollout_id: str, policy: RolloutPolicy) -> None:
        """A rollout the trainer runs an agent on: its calls sample from `policy`, whatever the agent asks."""
        self.check_id(rollout_id)
        self._fresh(rollout_id).policy = policy

    def _fresh(self, rollout_id: str) -> Recording:
        recording = self.recordings.get(rollout_id)
        if recording is None:
            recording = self.recordings[rollout_id] = Recording(rollout_id)
            self.dropped.pop(rollout_id, None)
        self.recordings.move_to_end(rollout_id)
        recording.updated = time.time()
        while len(self.recordings) > self.max_rollouts:
            old, _ = self.recordings.popitem(last=False)
            self.dropped[old] = None
            while len(self.dropped) > self.max_rollouts:
                self.dropped.popitem(last=False)
        return recording

    def record(self, rollout_id: str, plan: Plan, messages: list[dict], tools: str, reply: dict,
               token_ids: list[int], logprobs: list[float], versions: list[int], prompt_ids: list[int]) -> None:
        """`prompt_ids`: what the engine generated from (for a new sequence, vLLM's rendering)."""
        recording = self._fresh(rollout_id)
        sequence = plan.sequence
        if sequence is None or sequence is not recording.sequences[-1] or len(sequence.completion_ids) != plan.length:
            sequence = Sequence(list(prompt_ids), tools)  # new, or the one it continued has moved on meanwhile
            recording.sequences.append(sequence)
            following = []
        else:
            following = plan.following
        sequence.completion_ids += following + list(token_ids)
        sequence.mask += [0] * len(following) + [1] * len(token_ids)
        sequence.logprobs += [0.0] * len(following) + list(logprobs)
        sequence.messages = [normalized(m) for m in messages] + [normalized(reply)]
        sequence.last_generated = list(token_ids)
        sequence.weight_versions += list(versions)
        sequence.calls += 1

    def get(self, rollout_id: str) -> Recording:
        recording = self.recordings.get(rollout_id)
        if recording is not None:
            return recording
        if rollout_id in self.dropped:
            raise ApiError(404, "not_found", f"rollout {rollout_id!r} was dropped: the server keeps the newest "
                           f"{self.max_rollouts} recordings (--max_recorded_rollouts); fetch them sooner or raise it")
        raise ApiError(404, "not_found", f"no rollout {rollout_id!r} was recorded: send chat calls to "
                       f"/rollouts/{rollout_id}/v1/chat/completions (or /v1 with the header X-Rollout-Id)")


@dataclass
class StreamedReply:
    """The assistant message of a streamed chat call, put together from its chunks as the `openai` client does."""

    content: str = ""
    calls: dict = field(default_factory=dict)  # index -> {"id", "type", "function": {"name", "arguments"}}
    pending: str = ""  # an event cut between two chunks

    def add(self, chunk: str) -> None:
        self.pending += chunk
        *events, self.pending = self.pending.split("\n\n")
        for event in events:
            for line in event.split("\n"):
                if line.startswith("data: {"):
                    self._add_event(json.loads(line[6:]))

    def _add_event(self, event: dict) -> None:
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            self.content += delta.get("content") or ""
            for part in delta.get("tool_calls") or []:
                call = self.calls.setdefault(part.get("index", 0), {"id": None, "type": "function",
                                                                     "function": {"name": "", "arguments": ""}})
                call["id"] = part.get("id") or call["id"]
                function = part.get("function") or {}
                call["function"]["name"] += function.get("name") or ""
                call["function"]["arguments"] += function.get("arguments") or ""

    def message(self) -> dict:
        message = {"role": "assistant", "content": self.content or None}
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return message
