"""The policy's logits over completion tokens, with each group's prompt run through the model once.

A GRPO micro-batch holds several completions of the same prompt. A plain forward
runs every row's prompt again; here each unique prompt goes through the model once
(with its keys and values cached, gradients attached), the cache is indexed out to
every row, and only the completion tokens run per row. Same tokens at the same
positions under the same causal mask, so the logits and gradients are those of
the plain forward (to float rounding), over fewer tokens: on the demo's shapes
(44 prompt tokens, 8 completions per prompt) a forward and backward is 1.2-1.6x
faster on CPU, the shorter the completions the more (bench/bench_forward.py).
"""

import torch


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique rows of ids and mask side by side, each row's index into them): rows with the same prompt
    share an index. The mask is part of a row's identity, since a pad id may also be a real token."""
    return torch.unique(torch.cat([prompt_ids, prompt_mask], dim=1), dim=0, return_inverse=True)


def completion_logits(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                      completion_attention: torch.Tensor, share_prompts: bool = True) -> torch.Tensor:
    """Logits (rows, completion width, vocab) predicting each completion token.

    Prompts are left-padded and completions right-padded (masks mark real tokens).
    `share_prompts` runs each unique prompt once (a forward over the prompts, then one
    over the completions); it needs a model whose cache can be indexed by row
    (transformers' Cache).
    """
    width = completion_ids.shape[1]
    attention = torch.cat([prompt_mask, completion_attention], dim=1)
    if share_prompts:
        # Two forwards whether or not this micro-batch repeats a prompt: a decision from the rows would let
        # processes run different numbers of forwards, and under DDP or FSDP each forward is a collective
        # (buffer broadcast, parameter all-gather). With every prompt unique the two cost what one does.
        unique, inverse = prompt_groups(prompt_ids, prompt_mask)
        prompt_width = prompt_ids.shape[1]
        out = model(input_ids=unique[:, :prompt_width], attention_mask=unique[:, prompt_width:],
                    logits_to_keep=1, use_cache=True)
        cache = out.past_key_values
        unsupported = unindexable_cache(cache)
        if unsupported:
            raise PromptSharingUnsupported(
                f"{type(model).__name__}'s cache cannot be indexed by row ({unsupported}), so each completion "
                "runs its prompt again (the plain forward: same logprobs, more tokens)")
        cache.batch_select_indices(inverse)  # one cache row per completion, gradients flow back to `out`
        rest = model(input_ids=completion_ids, attention_mask=attention, past_key_values=cache,
                     logits_to_keep=width, use_cache=True).logits
        # The last prompt position predicts the first completion token (prompts are left-padded).
        return torch.cat([out.logits[inverse], rest[:, :-1]], dim=1)
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    return model(input_ids=ids, attention_mask=attention, logits_to_keep=width + 1, use_cache=False).logits[:, :-1]


def unindexable_cache(cache) -> str | None:
    """Why a cache cannot be indexed out to rows, or None when it can. Hybrid and linear-attention models
    (NemotronH, Qwen3-Next, ...) keep recurrent state in cache layers that have no batch_select_indices."""
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return f"got {type(cache).__name__}"
    missing = {type(layer).__name__ for layer in getattr(cache, "layers", ()) if not hasattr(layer, "batch_select_indices")}
    return f"its {', '.join(sorted(missing))} have no batch_select_indices" if missing else None


class PromptSharingUnsupported(RuntimeError):
    pass
