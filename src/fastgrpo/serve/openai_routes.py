"""OpenAI-compatible `/v1/models`, `/v1/completions`, `/v1/chat/completions` (non-streaming).

So that the same server answers evaluation harnesses and agents written against the `openai`
client while training runs; generations go through the same engine, lock and weight version.
Chat takes OpenAI's `tools` (described by the model's chat template, or in a system message
where the template has no tool support) and answers with parsed `tool_calls`. With a rollout
id (base URL `/rollouts/{id}/v1`, or the `X-Rollout-Id` header) each chat call is recorded
as exact tokens (serve/recordings.py).
"""

import json
import time
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header
from pydantic import BaseModel, Field

from fastgrpo.rollouts.chat import ChatTokens
from fastgrpo.rollouts.tool_calls import parser_for
from fastgrpo.serve.protocol import (
    ErrorResponse,
    MaxTokens,
    NonEmptyStr,
    SamplerFields,
    SamplingFields,
    StopStrings,
    TokenId,
)
from fastgrpo.serve.state import ApiError, ServerState, server_state

router = APIRouter(tags=["OpenAI-compatible"], responses={code: {"model": ErrorResponse} for code in (400, 404, 503)})
State = Annotated[ServerState, Depends(server_state)]
MAX_TOOL_SETS = 64  # ChatTokens kept per distinct tool set


class _OpenAIBase(SamplerFields):
    model: str | None = None
    stop: NonEmptyStr | StopStrings | None = None
    stream: bool = False
    user: str | None = None

    def sampling(self, max_tokens: int) -> SamplingFields:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return SamplingFields(**self.model_dump(include=set(SamplerFields.model_fields)), max_tokens=max_tokens,
                              stop=stop)


class CompletionRequest(_OpenAIBase):
    prompt: NonEmptyStr | list[NonEmptyStr] | list[TokenId] | list[list[TokenId]]
    max_tokens: MaxTokens = 16


class OpenAIChatMessage(BaseModel):
    """A chat message as the `openai` client sends it: content may be None (a turn that only calls tools) or a list
    of parts; the fields it adds as None (refusal, audio, annotations) are ignored."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None

    def as_dict(self) -> dict:
        out = self.model_dump(exclude_none=True)
        if out["role"] == "developer":  # OpenAI's newer name for the system role
            out["role"] = "system"
        out.setdefault("content", None)
        return out


class ChatCompletionRequest(_OpenAIBase):
    messages: list[OpenAIChatMessage] = Field(min_length=1)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    rollout_id: str | None = Field(None, description="record this call under a rollout id (or the X-Rollout-Id "
                                   "header, or the base URL /rollouts/{id}/v1)")

    def tool_schemas(self) -> list[dict]:
        """The tools the model is told about: none with tool_choice 'none'. Forcing a call is not supported."""
        choice = self.tool_choice
        if isinstance(choice, dict) or choice not in (None, "auto", "none"):
            raise ApiError(400, "invalid_request", f"tool_choice={json.dumps(choice)} is not supported: this server "
                           "cannot force a tool call; send 'auto' (or leave it out), or 'none'", "tool_choice")
        if not self.tools or choice == "none":
            return []
        for i, tool in enumerate(self.tools):
            if tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict) \
                    or not tool["function"].get("name"):
                raise ApiError(400, "invalid_request", f"tools[{i}] must be {{'type': 'function', 'function': "
                               "{'name': ..., 'parameters': {...}}}", "tools")
        return [{"type": "function", "function": t["function"]} for t in self.tools]


def _usage(prompts, results) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(c.token_ids) for r in results for c in r.completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def served_name(state: ServerState, requested: str | None) -> str:
    return requested or state.settings.model


def adapter_named(state: ServerState, model: str | None) -> str | None:
    """`model` names an adapter pushed to this server, or else (any other name, none) the base model."""
    return model if model is not None and model in state.adapters.current else None


def no_streaming(req) -> None:
    if req.stream:
        raise ApiError(400, "invalid_request", "stream=true is not supported by this server; "
                       "send stream=false (the default)", "stream")


def chat_tokens(state: ServerState, tools: list[dict], key: str) -> ChatTokens:
    chat = state.chats.get(key)
    if chat is None:
        try:
            chat = ChatTokens(state.tokenizer, tools)
        except ValueError as exc:
            raise ApiError(400, "invalid_request", f"this model's chat template cannot serve the request: {exc}",
                           "messages") from exc
        if len(state.chats) >= MAX_TOOL_SETS:
            state.chats.pop(next(iter(state.chats)))
        state.chats[key] = chat
    return chat


def reply_message(text: str, tools: list[dict], tokenizer) -> tuple[dict, bool]:
    """The assistant message for a generated text, and whether it calls tools (OpenAI's `tool_calls`)."""
    if not tools:
        return {"role": "assistant", "content": text}, False
    parsed = parser_for(tokenizer)(text)
    calls = [c.as_message_call(f"call_{uuid.uuid4().hex[:24]}") for c in parsed.calls if c.error is None]
    if not calls:
        return {"role": "assistant", "content": text}, False
    return {"role": "assistant", "content": parsed.content or None, "tool_calls": calls}, True


@router.get("/v1/models")
@router.get("/rollouts/{rollout_id}/v1/models", include_in_schema=False)
async def models(state: State):
    adapters = [{"id": name, "object": "model", "created": 0, "owned_by": "fastgrpo",
                 "parent": state.settings.model, "weight_version": a.version}
                for name, a in state.adapters.current.items()]
    return {"object": "list", "data": [{"id": state.settings.model, "object": "model", "created": 0,
                                        "owned_by": "fastgrpo"}, *adapters]}


@router.post("/v1/completions")
async def completions(req: CompletionRequest, state: State):
    from fastgrpo.serve.app import check_lengths, check_vocabulary, run_generation

    no_streaming(req)
    tok = state.tokenizer
    p = req.prompt
    if isinstance(p, str):
        prompts = [tok(p, add_special_tokens=False)["input_ids"]]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    elif p and all(isinstance(x, str) for x in p):
        prompts = [tok(x, add_special_tokens=False)["input_ids"] for x in p]
    elif p and all(isinstance(x, list) and x for x in p):
        prompts = [list(x) for x in p]
    else:
        raise ApiError(400, "invalid_request", "prompt must be a string, a list of strings, a list of "
                       "token ids or a list of such lists, and not empty", "prompt")
    check_vocabulary(state, prompts, "prompt")
    check_lengths(state, prompts, req.max_tokens, "prompt")
    results, version = await run_generation(state, prompts, req.sampling(req.max_tokens),
                                            adapter=adapter_named(state, req.model))
    choices = [{"index": i * req.n + j, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
               for i, r in enumerate(results) for j, c in enumerate(r.completions)]
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": served_name(state, req.model), "choices": choices, "usage": _usage(prompts, results),
            "system_fingerprint": f"weights-v{version}"}


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, state: State,
                           x_rollout_id: Annotated[str | None, Header()] = None):
    if x_rollout_id is not None and req.rollout_id is not None and x_rollout_id != req.rollout_id:
        raise ApiError(400, "invalid_request", f"the X-Rollout-Id header ({x_rollout_id!r}) and the body's rollout_id "
                       f"({req.rollout_id!r}) differ: send one", "rollout_id")
    return await _chat(req, state, x_rollout_id or req.rollout_id)


@router.post("/rollouts/{rollout_id}/v1/chat/completions")
async def recorded_chat_completions(rollout_id: str, req: ChatCompletionRequest, state: State):
    if req.rollout_id not in (None, rollout_id):
        raise ApiError(400, "invalid_request", f"the URL's rollout id ({rollout_id!r}) and the body's rollout_id "
                       f"({req.rollout_id!r}) differ", "rollout_id")
    return await _chat(req, state, rollout_id)


async def _chat(req: ChatCompletionRequest, state: ServerState, rollout_id: str | None):
    from fastgrpo.serve.app import check_lengths, run_generation

    no_streaming(req)
    if req.top_logprobs:
        raise ApiError(400, "invalid_request", "top_logprobs is not supported: send logprobs=true alone for the "
                       "sampled tokens' logprobs", "top_logprobs")
    max_tokens = req.max_completion_tokens or req.max_tokens or 256
    tools = req.tool_schemas()
    tools_key = json.dumps(tools, sort_keys=True)  # a call with other tools starts a new recorded sequence
    messages = [m.as_dict() for m in req.messages]
    chat = chat_tokens(state, tools, tools_key)
    plan = None
    try:
        if rollout_id is not None:
            state.recorder.check_id(rollout_id)
            if req.n != 1:
                raise ApiError(400, "invalid_request", f"n={req.n} with a rollout id: a recorded rollout is one "
                               "conversation; send n=1 (and one rollout id per episode)", "n")
            plan = state.recorder.plan(rollout_id, messages, tools_key, chat)
            ids = plan.prompt_ids
        else:
            ids = chat.prompt(messages)
    except (ValueError, TypeError) as exc:  # a template that cannot render these messages
        raise ApiError(400, "invalid_request", f"the chat template cannot render these messages: {exc}",
                       "messages") from exc
    check_lengths(state, [ids], max_tokens, "messages")
    results, version = await run_generation(state, [ids], req.sampling(max_tokens),
                                            adapter=adapter_named(state, req.model))
    choices = []
    for j, c in enumerate(results[0].completions):
        message, calls = reply_message(c.text, tools, state.tokenizer)
        logprobs = None
        if req.logprobs:
            tokens = state.tokenizer.convert_ids_to_tokens(c.token_ids)
            logprobs = {"content": [{"token": t, "logprob": lp, "bytes": None, "top_logprobs": []}
                                    for t, lp in zip(tokens, c.logprobs)]}
        choices.append({"index": j, "message": message, "logprobs": logprobs,
                        "finish_reason": "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason})
        if plan is not None:
            state.recorder.record(rollout_id, plan, messages, tools_key, message,
                                  c.token_ids, c.logprobs, c.weight_versions)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": served_name(state, req.model), "choices": choices, "usage": _usage([ids], results),
            "system_fingerprint": f"weights-v{version}"}
