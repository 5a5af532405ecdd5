"""Forward + backward of one GRPO micro-batch, prompts shared or not (GRPOConfig.share_prompt_prefix).

    .venv/bin/python bench/bench_forward.py [--model PATH] [--repeats 5]

The demo's micro-batch: 8 completions of one chat prompt (the demo's question, 44
tokens with the embedded model's template), bf16 autocast on CPU, the loss being
the sum of the completion logprobs. Rows of completion lengths 8, 32 and 64 (all
rows that long); also 2 prompts of 4 completions each. Then a whole demo step:
4 prompts x 8 completions of ragged lengths (uniform in 8..64), cut into 4
micro-batches the trainer's way: sorted by total length without sharing, kept
by prompt with it (more completion padding, fewer prompt tokens). Medians of
--repeats runs after one warm-up, both ways alternating in one process.
"""

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastgrpo.models import resolve_model
from fastgrpo.tasks.arithmetic import arithmetic_examples
from fastgrpo.trainer.forward import completion_logits
from fastgrpo.trainer.batching import completion_token_cost, pad_rows, split_round
from fastgrpo.trainer.forward import prompt_groups


def step_seconds(model, tensors, share: bool, device_type: str, zero: bool = True) -> float:
    prompt_ids, prompt_mask, completion_ids, completion_mask = tensors
    if zero:
        model.zero_grad(set_to_none=True)
    began = time.perf_counter()
    with torch.autocast(device_type, dtype=torch.bfloat16):
        logits = completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, share)
    logps = torch.log_softmax(logits.float(), dim=-1).gather(2, completion_ids[..., None])[..., 0]
    (logps * completion_mask).sum().backward()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    questions = [row["prompt"] for row in arithmetic_examples(2, seed=0)]
    prompts = [tokenizer.apply_chat_template(q, add_generation_prompt=True, return_dict=True)["input_ids"]
               for q in questions]
    generator = torch.Generator().manual_seed(0)

    print(f"model {args.model}, prompt tokens {[len(p) for p in prompts]}, 8 rows per micro-batch, "
          f"bf16 autocast, median of {args.repeats}\n")
    print("| prompts x completions | completion tokens | plain s | shared s | plain / shared |")
    print("| --- | --- | --- | --- | --- |")
    for groups, length in [(1, 8), (1, 32), (1, 64), (2, 32)]:
        rows = [prompts[i * groups // 8] for i in range(8)]
        width = max(len(p) for p in rows)
        tensors = (
            torch.tensor([[tokenizer.pad_token_id or 0] * (width - len(p)) + p for p in rows]),
            torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows]),
            torch.randint(100, len(tokenizer), (8, length), generator=generator),
            torch.ones(8, length, dtype=torch.long),
        )
        times = {True: [], False: []}
        for repeat in range(args.repeats + 1):
            for share in (False, True):
                seconds = step_seconds(model, tensors, share, "cpu")
                if repeat:  # the first is a warm-up
                    times[share].append(seconds)
        plain, shared = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {groups} x {8 // groups} | {length} | {plain:.3f} | {shared:.3f} | {plain / shared:.2f}x |")

    # A whole step: 32 ragged completions, split into micro-batches as GRPOTrainer does (batching.split_round).
    prompts = [tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=True)
               ["input_ids"] for row in arithmetic_examples(4, seed=1)]
    rows = [prompts[i // 8] for i in range(32)]
    lengths = torch.randint(8, 65, (32,), generator=generator).tolist()
    completions = [torch.randint(100, len(tokenizer), (n,), generator=generator).tolist() for n in lengths]
    pad = tokenizer.pad_token_id or 0
    batch = {"prompt_ids": pad_rows(rows, pad, left=True), "prompt_mask": pad_rows([[1] * len(p) for p in rows], 0, left=True),
             "completion_ids": pad_rows(completions, pad), "completion_attention": pad_rows([[1] * n for n in lengths], 0)}
    batch["completion_mask"] = batch["completion_attention"]
    times = {True: [], False: []}
    for repeat in range(args.repeats + 1):
        for share in (False, True):
            index = prompt_groups(batch["prompt_ids"], batch["prompt_mask"])[1] if share else None
            micro = split_round(batch, 1, 4, index, completion_token_cost(model))[0]
            model.zero_grad(set_to_none=True)
            seconds = sum(step_seconds(model, [m[k] for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                                 "completion_attention")], share, "cpu", zero=False)
                          for m in micro)
            if repeat:
                times[share].append(seconds)
    plain, shared = statistics.median(times[False]), statistics.median(times[True])
    print(f"| 4 x 8, one step in 4 micro-batches | 8..64, mean {sum(lengths) / 32:.0f} | {plain:.3f} | "
          f"{shared:.3f} | {plain / shared:.2f}x |")


if __name__ == "__main__":
    main()
