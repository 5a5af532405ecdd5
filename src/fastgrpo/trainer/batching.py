"""A generation round cut into optimizer steps and micro-batches: pure functions on tensors.

A round holds the completions of `steps_per_generation` micro-batches. When it serves
several optimizer steps, its rows are dealt to the steps at random (seeded, so a resumed
run deals the same way): a step must see a sample of the round, not its shortest or its
longest completions. Inside a step, rows are ordered to waste little compute on padding;
that order changes nothing but speed where a step's gradient is a sum over its rows. Where
the objective is normalised per micro-batch (bnpo, the entropy quantile), a micro-batch is a
random sample of its step instead, as in TRL, whose batches are shuffled.

Every decision here that changes how many forwards a process runs (the cut of a micro-batch
into parts) is taken from a cost table that all processes agree on first (split_round's
`agree`): processes that ran different numbers of forwards would issue different numbers of
collectives and wait for each other forever.
"""

import torch


def pad_rows(rows: list[list], value, left: bool = False) -> torch.Tensor:
    """Ragged rows as one tensor: padded on the right, or on the left for prompts."""
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([([value] * (width - len(r)) + list(r)) if left else (list(r) + [value] * (width - len(r)))
                         for r in rows])


def completion_token_cost(model) -> float:
    """Cost of a completion position relative to a prompt token: the body, plus the LM head (vocab x hidden
    multiply-adds) that only completion positions pay. About 1.27 for SmolLM2-135M, 1.08 for Qwen2.5-7B."""
    config = getattr(model, "config", None)
    try:
        head = config.vocab_size * config.hidden_size
        body = model.num_parameters(exclude_embeddings=True)
        return 1.0 + head / max(body, 1)
    except (AttributeError, TypeError):
        return 1.0


def round_layout(steps_per_generation: int, gradient_accumulation_steps: int) -> tuple[int, int]:
    """(optimizer steps whose rows a round holds whole, micro-batches per such step).

    A round of 8 micro-batches at GA 2 holds 4 whole steps of 2; a round of 2 at GA 4 is half of
    one step, and its rows stay together (1, 2)."""
    if steps_per_generation % gradient_accumulation_steps == 0:
        return steps_per_generation // gradient_accumulation_steps, gradient_accumulation_steps
    return 1, steps_per_generation


def deal_rows(rows: int, steps: int, generator: torch.Generator | None, shuffle: bool = False) -> list[torch.Tensor]:
    """Row indices of each step: a random permutation cut into equal parts (one step: all, in order, unless
    `shuffle`)."""
    if steps == 1 and not shuffle:
        return [torch.arange(rows)]
    order = torch.randperm(rows, generator=generator)
    size = rows // steps
    return [order[s * size : (s + 1) * size] for s in range(steps)]


def padding_order(prompt_lengths: torch.Tensor, completion_lengths: torch.Tensor, prompt_index: torch.Tensor | None,
                  parts: int, token_cost: float) -> torch.Tensor:
    """An order of the rows that, cut into `parts` micro-batches, pads little.

    Rows sorted by total length pad least; with prompt sharing (prompt_index given), rows kept by
    prompt run each prompt once per micro-batch but pad their completions more. Take whichever
    order costs less, counting a completion position as `token_cost` prompt tokens."""
    order = torch.argsort(prompt_lengths + completion_lengths, stable=True)
    if prompt_index is None or parts == 1:
        return order
    # By prompt length, then prompt, then completion length (stable sorts, last key first).
    by_prompt = torch.argsort(completion_lengths, stable=True)
    by_prompt = by_prompt[torch.argsort(prompt_index[by_prompt], stable=True)]
    by_prompt = by_prompt[torch.argsort(prompt_lengths[by_prompt], stable=True)]
    return min(order, by_prompt, key=lambda o: padded_cost(o, parts, prompt_lengths, completion_lengths,
                                                           prompt_index, token_cost))


def padded_cost(order: torch.Tensor, parts: int, prompt_lengths: torch.Tensor, completion_lengths: torch.Tensor,
                prompt_index: torch.Tensor | None, token_cost: float) -> float:
    """Positions a forward computes, padding included, for rows in `order` cut into `parts` batches: each
    batch pads to its longest prompt and completion; with prompt sharing (prompt_index) each of its prompts
    runs once. A completion position counts `token_cost` prompt tokens."""
    size, total = len(order) // parts, 0.0
    for p in range(parts):
        index = order[p * size : (p + 1) * size]
        prompts = len(index) if prompt_index is None else len(prompt_index[index].unique())
        total += (prompts * int(prompt_lengths[index].max())
                  + len(index) * int(completion_lengths[index].max()) * token_cost)
    return total


# A forward and backward pass has costs that do not grow with its rows (reading every weight, launching each
# layer's kernels): counted as this many prompt positions when choosing how finely to cut a micro-batch.
PASS_COST = 64
MIN_PART_ROWS = 4


def cut_candidates(rows: int, max_parts: int) -> list[int]:
    """The part counts a micro-batch of `rows` may be cut into: 1, 2, 4, ... up to max_parts, each dividing
    the rows into parts of at least MIN_PART_ROWS. It depends on the row count and max_parts alone, which
    every process shares: the list is the same on all of them."""
    candidates, parts = [1], 2
    while parts <= max_parts and rows % parts == 0 and rows // parts >= MIN_PART_ROWS:
        candidates.append(parts)
        parts *= 2
    return candidates


def cut_costs(prompt_lengths: torch.Tensor, completion_lengths: torch.Tensor, prompt_index: torch.Tensor | None,
              token_cost: float, max_parts: int) -> torch.Tensor:
    """What each of `cut_candidates` computes for this micro-batch: padded positions plus PASS_COST a part."""
    costs = []
    for parts in cut_candidates(len(completion_lengths), max_parts):
        order = padding_order(prompt_lengths, completion_lengths, prompt_index, parts, token_cost)
        costs.append(padded_cost(order, parts, prompt_lengths, completion_lengths, prompt_index, token_cost)
                     + parts * PASS_COST)
    return torch.tensor(costs, dtype=torch.float64)


def cut_for_padding(prompt_lengths: torch.Tensor, completion_lengths: torch.Tensor,
                    prompt_index: torch.Tensor | None, token_cost: float, max_parts: int) -> tuple[int, torch.Tensor]:
    """(parts, row order): the cut of one micro-batch into equal parts, each padded to its own longest row,
    that computes least, counting PASS_COST per part. A micro-batch of 32 completions of 10 to 64 tokens
    computes 64 positions a row in one part, about 40 in four. The parts' gradients sum to the micro-batch's
    (the caller weighs each part's loss), so the cut changes speed only.

    This is one process's own choice: in a multi-process run the count must be agreed (split_round's
    `agree`), since each part is a forward, a backward and the loss's gathers."""
    costs = cut_costs(prompt_lengths, completion_lengths, prompt_index, token_cost, max_parts)
    parts = cut_candidates(len(completion_lengths), max_parts)[int(costs.argmin())]
    return parts, padding_order(prompt_lengths, completion_lengths, prompt_index, parts, token_cost)


def take_rows(batch: dict, index: torch.Tensor) -> dict:
    rows = batch["prompt_ids"].shape[0]
    return trim({k: (v[index] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows else v)
                 for k, v in batch.items()})


def split_round(batch: dict, steps: int, micro_per_step: int, prompt_index: torch.Tensor | None = None,
                token_cost: float = 1.0, generator: torch.Generator | None = None, max_parts: int = 1,
                agree=None, order_for_padding: bool = True) -> list[list[dict]]:
    """The round's micro-batches, step by step: `steps` lists of `micro_per_step` row dicts.

    Rows are dealt to steps at random. With `order_for_padding`, a step's rows are ordered to pad little
    across its micro-batches (prompt_index, each row's prompt when prompts are shared in the forward, lets a
    micro-batch keep a prompt's rows together where that computes less); without it, each micro-batch is a
    random sample of the step, as TRL's shuffled batches are: for objectives normalised per micro-batch
    (bnpo, the entropy quantile), whose value depends on which rows share a micro-batch.

    With max_parts > 1 a micro-batch whose rows differ in length is cut further into up to max_parts equal
    parts (`cut_for_padding`), listed under "parts". `agree`, in a multi-process run, maps this process's
    cost table (micro-batches x cut_candidates) to one every process holds (the trainer takes the maximum over
    processes: a step waits for its slowest process), so that every process cuts each micro-batch into the
    same number of parts and so runs the same forwards, backwards and gathers."""
    rows = batch["prompt_ids"].shape[0]
    if rows % (steps * micro_per_step):
        raise ValueError(f"{rows} rows do not split into {steps} steps of {micro_per_step} micro-batches")
    prompt_lengths = batch["prompt_mask"].sum(1)
    completion_lengths = batch["completion_attention"].sum(1)
    size = rows // (steps * micro_per_step)

    def lengths(index):
        return (prompt_lengths[index], completion_lengths[index],
                None if prompt_index is None else prompt_index[index])

    micro_rows = []  # each micro-batch's row indices, step by step
    for step_rows in deal_rows(rows, steps, generator, shuffle=not order_for_padding):
        if order_for_padding:
            step_rows = step_rows[padding_order(*lengths(step_rows), micro_per_step, token_cost)]
        micro_rows.append([step_rows[m * size : (m + 1) * size] for m in range(micro_per_step)])
    candidates = cut_candidates(size, max_parts)  # the same on every process
    cuts = iter([1] * (steps * micro_per_step))
    if len(candidates) > 1:
        costs = torch.stack([cut_costs(*lengths(r), token_cost, max_parts) for step in micro_rows for r in step])
        if agree is not None:
            costs = agree(costs)
        cuts = iter(candidates[i] for i in costs.argmin(1).tolist())
    out = []
    for step in micro_rows:
        micro = []
        for rows_m in step:
            parts = next(cuts)
            if parts == 1:
                micro.append(take_rows(batch, rows_m))
                continue
            rows_m, part_size = rows_m[padding_order(*lengths(rows_m), parts, token_cost)], size // parts
            micro.append({"parts": [take_rows(batch, rows_m[p * part_size : (p + 1) * part_size])
                                    for p in range(parts)]})
        out.append(micro)
    return out


def parts_of(micro_batch: dict) -> list[dict]:
    """The row batches a micro-batch runs as: its parts, or itself whole."""
    return micro_batch.get("parts", [micro_batch])


def trim(m: dict) -> dict:
    """Drop columns that are padding in every row (left of prompts, right of completions)."""
    prompt_keep = m["prompt_mask"].any(0)
    first = int(prompt_keep.float().argmax()) if prompt_keep.any() else 0
    completion_keep = m["completion_attention"].any(0)
    last = int(completion_keep.nonzero().max()) + 1 if completion_keep.any() else 1
    out = dict(m)
    for key in ("prompt_ids", "prompt_mask"):
        out[key] = m[key][:, first:]
    for key in ("completion_ids", "completion_attention", "completion_mask", "sampling_logps", "old_logps"):
        if key in m:
            out[key] = m[key][:, :last]
    return out


def pad_to_multiple(m: dict, multiple: int | None, pad_id: int) -> dict:
    """TRL's pad_to_multiple_of: widen prompts (on the left) and completions (on the right) to a multiple of
    `multiple` columns, with masks 0 there. Compilers that specialise on shapes (Neuron) then see few of them;
    no number changes."""
    if not multiple:
        return m
    out = dict(m)

    def widen(key, value, left):
        tensor = m[key]
        extra = -tensor.shape[1] % multiple
        if extra:
            filler = tensor.new_full((tensor.shape[0], extra), value)
            out[key] = torch.cat([filler, tensor] if left else [tensor, filler], dim=1)

    widen("prompt_ids", pad_id, True)
    widen("prompt_mask", 0, True)
    widen("completion_ids", pad_id, False)
    for key in ("completion_attention", "completion_mask", "sampling_logps", "old_logps"):
        if key in m:
            widen(key, 0, False)
    return out
