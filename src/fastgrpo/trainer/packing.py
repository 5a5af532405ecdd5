"""A micro-batch as one padding-free sequence: each unique prompt once, then every completion's tokens.

The padded forward (forward.py) pads every completion to the micro-batch's longest, and every prompt to
its longest. Here the model's projections and MLPs run over real tokens only, which is where almost all
of a forward's FLOPs go. Attention keeps the padded forward's structure, inside one forward: in every
layer, each prompt attends causally to itself, and each completion to its prompt's keys and values and
causally to its own. Positions are each token's position in its own prompt + completion sequence, as
vLLM saw it. Same tokens, same masks, same positions: the logits and gradients are the padded forward's
to float rounding. Logits are computed only where a completion token is predicted.

B1's training part (SmolLM2-135M, 32 completions of 8-64 tokens over 4 prompts of 41, float32, 2
cores): forward and backward 7.37 s padded, 5.97 s packed (bench/profile_train_step.py).

The attention runs through transformers' attention interface ("fastgrpo_packed"), switched on for the
packed forward only. It is used for model families whose attention is plain causal attention over the
projections (PACKABLE_MODEL_TYPES) and without a sliding window; others keep the padded forward. Not
with gradient checkpointing: a checkpointed layer runs its forward again during backward, outside the
switch.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from fastgrpo.trainer.forward import prompt_groups

ATTENTION = "fastgrpo_packed"
LAYOUT_KWARG = "fastgrpo_layout"  # how the layout reaches the attention function: a forward kwarg
# Families whose attention modules take (query, key, value, scaling) from the attention interface and
# nothing else that depends on the sequence's layout: no sliding window (checked separately), no
# soft-capping, no attention sinks, positions from position_ids alone.
PACKABLE_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mistral", "mixtral",
                                  "olmo2", "granite", "phi3"})


def packing_unsupported(model) -> str | None:
    """Why `model` cannot run the packed forward, or None when it can. From its config alone, so every
    process decides alike."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PACKABLE_MODEL_TYPES:
        return f"model type {model_type!r} is not one whose attention fastgrpo packs ({', '.join(sorted(PACKABLE_MODEL_TYPES))})"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return f"{model_type} with a sliding window ({config.sliding_window}) attends differently"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return f"{model_type} has layers other than full attention ({sorted(set(config.layer_types))})"
    if getattr(config, "attention_dropout", 0.0):
        return f"attention_dropout is {config.attention_dropout}"
    return None


@dataclass
class PackedLayout:
    """Where each token of a micro-batch sits in the packed sequence, and what it attends to.

    The sequence: every unique prompt's real tokens, prompt after prompt, then every row's completion
    tokens, row after row (the row-major order of `completion_attention`)."""

    input_ids: torch.Tensor  # [tokens]
    position_ids: torch.Tensor  # [tokens]
    prompt_index: torch.Tensor  # [prompts, longest prompt]: sequence index of each prompt token (pads: 0)
    prompt_mask: torch.Tensor  # [prompts, 1, longest, longest] bool: causal over real tokens
    completion_index: torch.Tensor  # [rows, longest completion]
    keys_index: torch.Tensor  # [rows, longest prompt + longest completion]: the row's prompt, then itself
    completion_mask: torch.Tensor  # [rows, 1, longest completion, longest prompt + longest completion] bool
    real_positions: torch.Tensor  # [tokens]: each token's place among the prompts' then the rows' padded positions
    predicted_by: torch.Tensor  # [completion tokens]: the sequence index whose logits predict each token


def pack(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
         completion_attention: torch.Tensor) -> PackedLayout:
    """The layout of a micro-batch: prompts left-padded, completions right-padded (masks mark real tokens)."""
    device = completion_ids.device
    real = completion_attention.bool()
    lengths = real.sum(1)
    width = completion_ids.shape[1]
    steps = torch.arange(width, device=device)
    if not torch.equal(real, steps[None] < lengths[:, None]):
        raise ValueError("completion_attention must mark a prefix of each row (completions are right-padded)")
    unique, inverse = prompt_groups(prompt_ids, prompt_mask)
    prompt_width = prompt_ids.shape[1]
    unique_real = unique[:, prompt_width:].bool()
    prompt_lengths = unique_real.sum(1)
    longest_prompt, longest = int(prompt_lengths.max()), int(lengths.max())
    prompt_steps, completion_steps = (torch.arange(n, device=device) for n in (longest_prompt, longest))
    prompt_starts = torch.cumsum(prompt_lengths, 0) - prompt_lengths
    completion_starts = int(prompt_lengths.sum()) + torch.cumsum(lengths, 0) - lengths

    prompt_real = prompt_steps[None] < prompt_lengths[:, None]
    completion_real = real[:, :longest]
    prompt_index = (prompt_starts[:, None] + prompt_steps[None]).where(prompt_real, 0)
    completion_index = (completion_starts[:, None] + completion_steps[None]).where(completion_real, 0)
    causal_prompt = prompt_steps[None, :] <= prompt_steps[:, None]
    causal_completion = completion_steps[None, :] <= completion_steps[:, None]
    # Pad queries attend to themselves: a row with no key would give NaN, which reaches gradients as 0 * NaN.
    eye = torch.eye(longest_prompt, dtype=torch.bool, device=device)
    rows = len(lengths)
    return PackedLayout(
        input_ids=torch.cat([unique[:, :prompt_width][unique_real], completion_ids[real]]),
        position_ids=torch.cat([prompt_steps[None].expand_as(prompt_real)[prompt_real],
                                (prompt_lengths[inverse][:, None] + steps[None])[real]]),
        prompt_index=prompt_index,
        prompt_mask=((causal_prompt[None] & prompt_real[:, None, :]) | eye[None])[:, None],
        completion_index=completion_index,
        keys_index=torch.cat([prompt_index[inverse], completion_index], 1),
        completion_mask=torch.cat([prompt_real[inverse][:, None, :].expand(rows, longest, longest_prompt),
                                   causal_completion[None] & completion_real[:, None, :]], 2)[:, None],
        real_positions=torch.cat([prompt_real.flatten(), completion_real.flatten()]).nonzero().squeeze(1),
        # A completion's first token is predicted by its prompt's last; each later one by the token before it.
        predicted_by=torch.where(completion_steps[None] == 0, (prompt_starts + prompt_lengths - 1)[inverse][:, None],
                                 completion_starts[:, None] + completion_steps[None] - 1)[completion_real],
    )


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface over a packed sequence (batch 1): the prompts attend as one padded
    batch, the completions as another whose keys are their prompt's and their own. Returns [1, tokens, heads,
    head_dim], as the interface's other functions do."""
    layout: PackedLayout = kwargs[LAYOUT_KWARG]
    query, key, value = query[0], key[0], value[0]  # [heads, tokens, head_dim]
    if key.shape[0] != query.shape[0]:  # grouped-query attention: each key head serves several query heads
        key = key.repeat_interleave(query.shape[0] // key.shape[0], 0)
        value = value.repeat_interleave(query.shape[0] // value.shape[0], 0)

    def rows(x, index):  # [heads, tokens, d] -> [rows, heads, width, d]; index_select: its backward adds
        return x.index_select(1, index.flatten()).view(x.shape[0], *index.shape, x.shape[-1]).transpose(0, 1)

    prompts = F.scaled_dot_product_attention(rows(query, layout.prompt_index), rows(key, layout.prompt_index),
                                             rows(value, layout.prompt_index), attn_mask=layout.prompt_mask,
                                             scale=scaling)
    completions = F.scaled_dot_product_attention(
        rows(query, layout.completion_index), rows(key, layout.keys_index), rows(value, layout.keys_index),
        attn_mask=layout.completion_mask, scale=scaling)
    # Every padded position, prompts' then completions', as [positions, heads, d]; the real ones in sequence order.
    padded = torch.cat([prompts.transpose(1, 2).flatten(0, 1), completions.transpose(1, 2).flatten(0, 1)])
    return padded.index_select(0, layout.real_positions).unsqueeze(0), None


AttentionInterface.register(ATTENTION, packed_attention)
AttentionMaskInterface.register(ATTENTION, lambda *args, **kwargs: None)  # the layout is the mask


@contextmanager
def attention_switched(config):
    """The model's attention runs `packed_attention` inside, its own implementation again after."""
    saved = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = saved


def packed_completion_logits(model, config, layout: PackedLayout) -> torch.Tensor:
    """Logits [completion tokens, vocab] predicting each real completion token, row-major. `config` is the
    unwrapped model's (DDP and peft wrap it)."""
    with attention_switched(config):
        out = model(input_ids=layout.input_ids[None], position_ids=layout.position_ids[None],
                    logits_to_keep=layout.predicted_by, use_cache=False, **{LAYOUT_KWARG: layout})
    return out.logits.view(-1, out.logits.shape[-1])  # a view: indexing [0] would copy in backward (zeros + copy)


def unpack(values: torch.Tensor, completion_attention: torch.Tensor) -> torch.Tensor:
    """Per-token values of the real completion tokens (row-major) as [rows, width], zero at padding."""
    return values.new_zeros(completion_attention.shape).masked_scatter(completion_attention.bool(), values)
