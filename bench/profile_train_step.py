"""Where the training part of a B1 step goes: torch.profiler over fastgrpo's own micro-step.

    .venv/bin/python bench/profile_train_step.py [--rows 32] [--threads 2] [--top 15] [--shapes] [--padded]

Builds a B1 round (32 rows: 4 prompts of 41 tokens x 8 completions of 8 to 64 random tokens,
seeded), cuts it as the trainer does (GRPOTrainer._split_round) and runs the trainer's forward,
loss and backward and the AdamW step on the embedded SmolLM2-135M-Instruct in float32; one
warm-up, then one profiled step. Prints the operators by self CPU time, the step's phases, and
the achieved GFLOP/s (useful work: each prompt once, real completion tokens) against a float32
matmul on the same threads. With PYTHONPATH pointing at an older checkout's src it profiles that.
"""

import argparse
import statistics
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--shapes", action="store_true", help="also aten::mm by shape, with its GFLOP/s")
    parser.add_argument("--padded", action="store_true", help="padding_free=False: the padded forward, in parts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from datasets import Dataset

    from fastgrpo import GRPOConfig, GRPOTrainer
    from fastgrpo.models import resolve_model

    path = resolve_model(None)
    config = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.rows, num_generations=8,
                        max_completion_length=64, bf16=False, learning_rate=1e-6, beta=0.0, use_vllm=False,
                        use_cpu=True, report_to=[], save_strategy="no", max_steps=1,
                        **({"padding_free": False} if args.padded else {}))
    data = Dataset.from_dict({"prompt": ["What is 1 + 1?"] * 8})
    trainer = GRPOTrainer(path, lambda completions, **k: [0.0] * len(completions), args=config, train_dataset=data)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    model, optimizer = trainer.model, trainer.optimizer
    g = torch.Generator().manual_seed(0)
    prompt_len, width = 41, 64
    prompts = torch.randint(0, 49152, (args.rows // 8, prompt_len), generator=g)
    # Ragged completions as B1's (mean about 40 of at most 64 tokens): 8..64, some at the limit.
    lengths = torch.randint(8, width + 24, (args.rows,), generator=g).clamp(max=width)
    attention = (torch.arange(width)[None, :] < lengths[:, None]).long()
    round_batch = {
        "prompt_ids": prompts.repeat_interleave(8, dim=0),  # each prompt 8 times in a row, as GRPO's groups
        "prompt_mask": torch.ones(args.rows, prompt_len, dtype=torch.long),
        "completion_ids": torch.randint(0, 49152, (args.rows, width), generator=g) * attention,
        "completion_attention": attention,
        "completion_mask": attention.clone(),
        "advantages": torch.randn(args.rows, generator=g),
    }
    (batch,) = trainer._split_round(round_batch, round_index=0)  # the trainer's own cut of the round

    def step(phases: dict | None = None):
        began = time.perf_counter()
        if hasattr(trainer, "_forward_backward"):  # forward and backward, part by part
            trainer._forward_backward(model, batch)
        else:  # fastgrpo before the cut into parts (for the before/after profile)
            trainer.compute_loss(model, batch).backward()
        backward = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = time.perf_counter()
        if phases is not None:
            phases.update({"forward+backward": backward - began, "optimizer": done - backward})

    model.train()
    step()  # warm-up
    phases = {}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        step(phases)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    if args.shapes:
        print_matmuls_by_shape(prof, args.top)
    timed = []
    for _ in range(2):
        p = {}
        step(p)
        timed.append(p)
    phases = {k: statistics.median(t[k] for t in timed) for k in timed[0]}
    total = sum(phases.values())

    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)
    head = c.vocab_size * c.hidden_size
    body = sum(p.numel() for p in model.parameters()) - head
    # Useful work: each prompt once (shared), every real completion token; padding does not count.
    completion_tokens = int(lengths.sum())
    flops = 6 * (body * (args.rows // 8 * prompt_len + completion_tokens) + head * completion_tokens)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    began = time.perf_counter()
    for _ in range(3):
        a @ b
    peak = 3 * 2 * 2048**3 / (time.perf_counter() - began) / 1e9
    print("\nphases (median of 2, s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()) +
          f"; total {total:.2f}")
    print(f"{flops / 1e12:.2f} TFLOP per step: {flops / total / 1e9:.0f} GFLOP/s, "
          f"{100 * flops / total / 1e9 / peak:.0f}% of the {peak:.0f} GFLOP/s float32 matmul peak "
          f"on {args.threads} threads")


def print_matmuls_by_shape(prof, top: int) -> None:
    """aten::mm grouped by operand shapes: where the matmul time goes and how fast each shape runs."""
    rows = []
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key != "aten::mm" or len(event.input_shapes) < 2:
            continue
        (m, k), (_, n) = event.input_shapes[0], event.input_shapes[1]
        seconds = event.self_cpu_time_total / 1e6
        rows.append((seconds, f"[{m}, {k}] x [{k}, {n}]", event.count, 2 * m * k * n * event.count / seconds / 1e9))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"\naten::mm by shape ({total:.2f} s in all)\n| shape | calls | s | share | GFLOP/s |\n| --- | --- | --- | --- | --- |")
    for seconds, shape, count, rate in rows[:top]:
        print(f"| {shape} | {count} | {seconds:.2f} | {100 * seconds / total:.0f}% | {rate:.0f} |")


if __name__ == "__main__":
    main()
