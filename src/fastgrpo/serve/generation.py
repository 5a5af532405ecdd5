"""Generation for /generate: prompts to token ids, checked against the model, sampled under admission
(serve/admission.py), and the engines' outputs as the wire's PromptResults."""

import re

from fastgrpo.protocol import Completion, GenerateRequest, PromptResult, SamplingFields
from fastgrpo.serve.admission import admit, check_not_mixed, release
from fastgrpo.serve.engines import EngineDead, EngineRejected, PromptOutput
from fastgrpo.serve.errors import ApiError
from fastgrpo.serve.state import ServerState
from fastgrpo.vllm_compat import request_error_types


def sampling_params(fields: SamplingFields, prompt_logprobs: bool = False, seed: int | None = None,
                    max_tokens: int | None = None):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        output_kind=RequestOutputKind.FINAL_ONLY,  # one output holding all n completions
        n=fields.n, temperature=fields.temperature, top_p=fields.top_p,
        top_k=0 if fields.top_k in (-1, 0) else fields.top_k, min_p=fields.min_p,
        repetition_penalty=fields.repetition_penalty, presence_penalty=fields.presence_penalty,
        frequency_penalty=fields.frequency_penalty, max_tokens=max_tokens or fields.max_tokens,
        min_tokens=fields.min_tokens,
        seed=fields.seed if seed is None else seed, stop=fields.stop, stop_token_ids=fields.stop_token_ids,
        ignore_eos=fields.ignore_eos, logprobs=0, prompt_logprobs=0 if prompt_logprobs else None,
    )


def tokenize_prompts(state: ServerState, req: GenerateRequest) -> list[list[int]]:
    tok = state.tokenizer
    if req.prompt_token_ids is not None:
        check_vocabulary(state, req.prompt_token_ids, "prompt_token_ids")
        return req.prompt_token_ids
    if req.messages is not None:
        return [tok.apply_chat_template([m.model_dump() for m in conv], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"] for conv in req.messages]
    return [tok(p, add_special_tokens=False)["input_ids"] for p in req.prompts]


def field_named_in(message: str, fields) -> str | None:
    """The request field an engine's error message is about, when it names one."""
    words = set(re.findall(r"[a-z_]+", message.lower()))
    return next((f for f in fields if f in words), None)


def check_vocabulary(state: ServerState, prompts: list[list[int]], field_name: str) -> None:
    vocab = len(state.tokenizer)
    for i, ids in enumerate(prompts):
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, "invalid_request", f"prompt {i} has token ids outside the vocabulary [0, {vocab}): "
                           f"{bad[:5]}", field_name)


def check_lengths(state: ServerState, prompts: list[list[int]], max_tokens: int | list[int], field_name: str) -> None:
    limit = state.max_model_len
    if limit is None:
        return
    caps = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    for i, (ids, cap) in enumerate(zip(prompts, caps)):
        if len(ids) + cap > limit:
            raise ApiError(
                400, "invalid_request",
                f"prompt {i} has {len(ids)} tokens; with max_tokens={cap} that is "
                f"{len(ids) + cap} > max_model_len={limit}. Shorten the prompt, lower max_tokens, "
                f"or start the server with a larger --max_model_len.", field_name)


async def run_generation(state: ServerState, prompts: list[list[int]], fields: SamplingFields,
                         prompt_logprobs: bool = False, seeds: list[int] | None = None,
                         adapter: str | None = None,
                         max_tokens: list[int] | None = None) -> tuple[list[PromptResult], int]:
    """Generate under the admission lock; `seeds` and `max_tokens` (one per prompt) override the fields'."""
    try:
        if seeds is None and max_tokens is None:
            params = [sampling_params(fields, prompt_logprobs)] * len(prompts)
        else:
            params = [sampling_params(fields, prompt_logprobs, seed, cap) for seed, cap in
                      zip(seeds or [None] * len(prompts), max_tokens or [None] * len(prompts))]
    except request_error_types() as exc:  # vLLM's own limits, where ours let a value through
        raise ApiError(400, "invalid_request", f"vLLM refused the sampling parameters: {exc}",
                       getattr(exc, "parameter", None) or field_named_in(str(exc), SamplingFields.model_fields)) from exc
    ticket, running = await admit(state, adapter, lambda t: state.engine.generate(
        [{"prompt_token_ids": p, "cache_salt": t.salt} for p in prompts], params,
        t.adapter.request if t.adapter is not None else None))
    try:
        outputs = await running
    except EngineDead as exc:
        raise ApiError(503, "engine_dead", str(exc)) from exc
    except EngineRejected as exc:
        raise ApiError(400, "invalid_request", f"the engine refused the request: {exc}",
                       field_named_in(str(exc), SamplingFields.model_fields)) from exc
    finally:
        await release(state, ticket)
    check_not_mixed(ticket)
    return prompt_results(outputs, prompts, ticket.versions, prompt_logprobs), ticket.versions[0]


def prompt_results(outputs: list[PromptOutput], prompts: list[list[int]], versions: list[int],
                   prompt_logprobs: bool) -> list[PromptResult]:
    """The engines' outputs, one per prompt, as the wire's results: each completion with the sampled tokens'
    logprobs, and the prompt's own logprobs when asked for."""
    results = []
    for out, ids in zip(outputs, prompts):
        completions = [
            Completion(
                token_ids=list(c.token_ids),
                logprobs=[lp[t].logprob for lp, t in zip(c.logprobs or [], c.token_ids)],
                text=c.text, finish_reason=c.finish_reason, weight_versions=versions, dp_rank=rank,
            )
            for c, rank in zip(out.completions, out.dp_ranks)
        ]
        plp = None
        if prompt_logprobs and out.prompt_logprobs is not None:
            plp = [None if d is None else d[t].logprob for d, t in zip(out.prompt_logprobs, ids)]
        results.append(PromptResult(prompt_token_ids=ids, prompt_logprobs=plp, completions=completions))
    return results
