"""OpenAI-compatible `/v1/models`, `/v1/completions`, `/v1/chat/completions` (non-streaming).

So that the same server answers evaluation harnesses and the `openai` client while
training runs; generations go through the same replicas, lock and weight version.
"""

import time
import uuid

from fastapi import FastAPI
from pydantic import Field

from fastgrpo.serve.protocol import (
    ChatMessage,
    MaxTokens,
    NonEmptyStr,
    SamplerFields,
    SamplingFields,
    StopStrings,
    TokenId,
)


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


class ChatCompletionRequest(_OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None


def _usage(prompts, results) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(c.token_ids) for r in results for c in r.completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def add_openai_routes(app: FastAPI, state) -> None:
    from fastgrpo.serve.app import ApiError, check_lengths, check_vocabulary, run_generation

    def served_name(requested: str | None) -> str:
        return requested or state.settings.model

    def adapter_named(model: str | None) -> str | None:
        """`model` names an adapter pushed to this server, or else (any other name, none) the base model."""
        return model if model is not None and model in state.adapters.current else None

    def no_streaming(req) -> None:
        if req.stream:
            raise ApiError(400, "invalid_request", "stream=true is not supported by this server; "
                           "send stream=false (the default)", "stream")

    @app.get("/v1/models")
    async def models():
        adapters = [{"id": name, "object": "model", "created": 0, "owned_by": "fastgrpo",
                     "parent": state.settings.model, "weight_version": a.version}
                    for name, a in state.adapters.current.items()]
        return {"object": "list", "data": [{"id": state.settings.model, "object": "model", "created": 0,
                                            "owned_by": "fastgrpo"}, *adapters]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
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
                                                adapter=adapter_named(req.model))
        choices = [{"index": i * req.n + j, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                   for i, r in enumerate(results) for j, c in enumerate(r.completions)]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": served_name(req.model), "choices": choices, "usage": _usage(prompts, results),
                "system_fingerprint": f"weights-v{version}"}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        no_streaming(req)
        max_tokens = req.max_completion_tokens or req.max_tokens or 256
        ids = state.tokenizer.apply_chat_template([m.model_dump() for m in req.messages],
                                                  add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]
        check_lengths(state, [ids], max_tokens, "messages")
        results, version = await run_generation(state, [ids], req.sampling(max_tokens),
                                                adapter=adapter_named(req.model))
        choices = [{"index": j, "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason, "logprobs": None}
                   for j, c in enumerate(results[0].completions)]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": served_name(req.model), "choices": choices, "usage": _usage([ids], results),
                "system_fingerprint": f"weights-v{version}"}
