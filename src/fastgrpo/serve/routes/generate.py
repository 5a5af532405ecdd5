"""POST /generate: completions with their tokens and logprobs, for the trainer (serve/generation.py)."""

from fastapi import APIRouter

from fastgrpo.protocol import GenerateRequest, GenerateResponse
from fastgrpo.serve.generation import check_lengths, check_vocabulary, run_generation, tokenize_prompts
from fastgrpo.serve.state import State

router = APIRouter()


@router.post("/generate", response_model=GenerateResponse)
async def generate(req: GenerateRequest, state: State):
    field_name = "prompts" if req.prompts is not None else (
        "prompt_token_ids" if req.prompt_token_ids is not None else "messages")
    prompts = tokenize_prompts(state, req)
    caps = req.max_tokens_of(len(prompts))
    check_lengths(state, prompts, caps, field_name)
    if req.stop_token_ids:
        check_vocabulary(state, [req.stop_token_ids], "stop_token_ids")
    results, version = await run_generation(state, prompts, req, req.prompt_logprobs, req.seeds, req.adapter,
                                            max_tokens=req.max_tokens_per_prompt)
    return GenerateResponse(results=results, weight_version=version, instance=state.instance)
