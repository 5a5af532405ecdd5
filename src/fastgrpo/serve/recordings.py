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
newest `max_rollouts` recordings; older ones are dropped (and a GET says so).
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
import inspect
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse as VllmErrorResponse

from fastgrpo.rollouts.chat import ChatTokens, message_text
from fastgrpo.serve import DEFAULT_MAX_ROLLOUTS
from fastgrpo.serve.protocol import ErrorResponse, OkResponse, RecordedSequence, RolloutPolicy, RolloutRecording
from fastgrpo.serve.state import ApiError, ServerState, server_state

ROLLOUT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


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


MAX_TOOL_SETS = 64  # ChatTokens kept per distinct tool set


def chat_tokens(state: ServerState, tools: list[dict], key: str) -> ChatTokens:
    chat = state.chats.get(key)
    if chat is None:
        try:
            kwargs = {"chat_template": state.chat_template} if state.chat_template else None
            chat = ChatTokens(state.tokenizer, tools, kwargs)
        except ValueError as exc:
            raise ApiError(400, "invalid_request", f"this model's chat template cannot serve the request: {exc}",
                           "messages") from exc
        if len(state.chats) >= MAX_TOOL_SETS:
            state.chats.pop(next(iter(state.chats)))
        state.chats[key] = chat
    return chat


def apply_policy(request: ChatCompletionRequest, recording: Recording, state: ServerState) -> None:
    """The trainer's policy and sampling settings, in place of what the agent asked for (noted in `overridden`)."""
    policy = recording.policy
    if policy.model is not None and policy.model not in state.adapters.current:
        raise ApiError(404, "not_found", f"rollout {recording.rollout_id!r} samples from adapter {policy.model!r}, "
                       "which this server no longer has: the run that opened it pushes it again", "model")
    request.model = policy.model or state.settings.model
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        wanted, asked = getattr(policy, name), getattr(request, name)
        if name in request.model_fields_set and asked is not None and asked != wanted:
            recording.overridden[name] = asked
        setattr(request, name, wanted)


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


router = APIRouter(prefix="/rollouts", tags=["recorded rollouts"],
                   responses={code: {"model": ErrorResponse} for code in (400, 404)})
State = Annotated[ServerState, Depends(server_state)]


@router.post("/{rollout_id}/v1/chat/completions", responses={  # vLLM's chat, and its errors' shape
    code: {"model": VllmErrorResponse} for code in (400, 401, 404, 500, 503)})
async def recorded_chat_completions(rollout_id: str, request: ChatCompletionRequest, raw_request: Request,
                                    state: State):
    """vLLM's chat completion, recorded under `rollout_id` (see the module's docstring)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse

    from fastgrpo.serve.vllm_api import TAP

    Recorder.check_id(rollout_id)
    if request.n != 1:
        raise ApiError(400, "invalid_request", f"n={request.n} with a rollout id: a recorded rollout is one "
                       "conversation; send n=1 (and one rollout id per episode)", "n")
    opened = state.recorder.recordings.get(rollout_id)
    if opened is not None and opened.policy is not None:
        apply_policy(request, opened, state)
    messages = [dict(m) for m in request.messages]
    tools = [] if request.tool_choice == "none" else [t.model_dump(exclude_none=True) for t in request.tools or []]
    tools_key = json.dumps(tools, sort_keys=True)  # a call with other tools starts a new recorded sequence
    try:
        plan = state.recorder.plan(rollout_id, messages, tools_key, lambda: chat_tokens(state, tools, tools_key))
    except (ValueError, TypeError) as exc:  # a template that cannot render these messages
        raise ApiError(400, "invalid_request", f"the chat template cannot render these messages: {exc}",
                       "messages") from exc
    tap = TAP.get()
    tap.record, tap.prompt_ids = True, plan.prompt_ids

    def record(reply: dict) -> None:
        if tap.finished:
            state.recorder.record(rollout_id, plan, messages, tools_key, reply, tap.token_ids, tap.logprobs,
                                  tap.versions() or [], tap.used_prompt_ids)

    result = await raw_request.app.state.openai_serving_chat.create_chat_completion(request, raw_request)
    if isinstance(result, ChatCompletionResponse):
        record(result.choices[0].message.model_dump(exclude_none=True))
        return JSONResponse(result.model_dump())
    if not inspect.isasyncgen(result):  # vLLM's ErrorResponse
        return JSONResponse(result.model_dump(), status_code=result.error.code)

    async def recorded_stream():
        reply = StreamedReply()
        async for chunk in result:
            reply.add(chunk)
            yield chunk
        record(reply.message())

    return StreamingResponse(recorded_stream(), media_type="text/event-stream")


@router.get("/{rollout_id}/v1/models", include_in_schema=False)
async def recorded_models(rollout_id: str, raw_request: Request):
    models = await raw_request.app.state.openai_serving_models.show_available_models()
    return JSONResponse(models.model_dump())


@router.put("/{rollout_id}", response_model=OkResponse)
async def open_rollout(rollout_id: str, policy: RolloutPolicy, state: State):
    """Open a rollout for an agent the trainer runs: its calls sample from `policy` (the run's adapter or the base
    model, the run's sampling settings), never from a model the agent names by mistake."""
    if policy.model is not None and policy.model not in state.adapters.current:
        known = ", ".join(sorted(state.adapters.current)) or "none"
        raise ApiError(404, "not_found", f"no adapter named {policy.model!r} on this server (adapters: {known}): "
                       "push it before opening rollouts on it", "model")
    state.recorder.open(rollout_id, policy)
    return OkResponse()


@router.get("/{rollout_id}", response_model=RolloutRecording)
async def get_rollout(rollout_id: str, state: State):
    recording = state.recorder.get(rollout_id)
    if not recording.sequences:
        raise ApiError(404, "not_found", f"rollout {rollout_id!r} was opened but no chat call reached it: the agent "
                       f"must send its calls to /rollouts/{rollout_id}/v1 (the base_url it is given)")
    return RolloutRecording(rollout_id=rollout_id, sequences=[s.as_response() for s in recording.sequences],
                            policy=recording.policy, overridden=recording.overridden)


@router.delete("/{rollout_id}")
async def delete_rollout(rollout_id: str, state: State):
    state.recorder.get(rollout_id)
    del state.recorder.recordings[rollout_id]
    return {"ok": True}
