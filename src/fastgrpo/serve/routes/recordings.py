"""The recorded-rollout routes: vLLM's chat completion under a rollout id, and the recordings it leaves
(serve/recordings.py says how)."""

import inspect
import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
from vllm.entrypoints.serve.engine.protocol import ErrorResponse as VllmErrorResponse

from fastgrpo.protocol import ErrorResponse, OkResponse, RolloutPolicy, RolloutRecording
from fastgrpo.rollouts.chat import ChatTokens
from fastgrpo.serve.errors import ApiError
from fastgrpo.serve.recordings import Plan, Recorder, Recording, StreamedReply
from fastgrpo.serve.state import ServerState, State
from fastgrpo.serve.vllm_api import TAP

router = APIRouter(prefix="/rollouts", tags=["recorded rollouts"],
                   responses={code: {"model": ErrorResponse} for code in (400, 404)})
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


def plan_call(rollout_id: str, request: ChatCompletionRequest, state: ServerState) -> tuple[Plan, list[dict], str]:
    """How a recorded call's prompt is built (its messages and tools as recorded with it), once the trainer's
    policy has replaced what the agent asked for."""
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
    return plan, messages, tools_key


@router.post("/{rollout_id}/v1/chat/completions", responses={  # vLLM's chat, and its errors' shape
    code: {"model": VllmErrorResponse} for code in (400, 401, 404, 500, 503)})
async def recorded_chat_completions(rollout_id: str, request: ChatCompletionRequest, raw_request: Request,
                                    state: State):
    """vLLM's chat completion, recorded under `rollout_id` (see serve/recordings.py)."""
    plan, messages, tools_key = plan_call(rollout_id, request, state)
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
