"""The B1 configuration, side by side: TRL against fastgrpo, transformers generation against the server,
synchronous against asynchronous rounds.

    .venv/bin/python bench/bench_b1.py [--steps 6] [--trl-python /path/to/another/python]
                                       [--runs trl,sync,sync-bf16,async-split]

B1: the embedded SmolLM2-135M-Instruct, 4 two-digit addition prompts x 8 completions a step,
per_device_train_batch_size 32, GA 1, max_completion_length 64, float32, learning_rate 1e-6,
beta 0. Each run trains in its own process; the library is the only import that differs
(`train()` below), and with use_vllm=False the configuration is the same too.

Runs:
- trl: TRL's GRPOTrainer, use_vllm=False (trl==1.16.0 is a test dependency: this environment has it;
  --trl-python runs it in another one with the same torch), both cores;
- fastgrpo-hf: fastgrpo, use_vllm=False, both cores;
- sync: fastgrpo server mode, server and trainer sharing both cores (async: with async_generation=True);
- sync-bf16: sync with the server in bfloat16 (the trainer still trains in float32, and the sampler
  correction accounts for the difference): what a CPU with a bf16 unit buys on generation;
  sync-bf16-compiled: with the server's torch.compile on (--enforce_eager false; the CPU default is eager);
- async-bf16: async_generation=True on shared cores, the server in bfloat16;
- sync-split / async-split: server mode on disjoint cores, the server on core 1 and the trainer on
  core 0 (one thread), as when each has its own device; async-split with async_generation=True
  (async-split-bf16: its server in bfloat16).

Step time is wall-clock between the ends of consecutive steps (the first step is dropped: start-up
and the first push); medians of the rest. The split comes from the trainer's own metrics
(time/generate is what the trainer waited for a round: near 0 when async rounds are ready). Training
FLOP/s counts useful work, the same for every run: 6 x parameters x tokens for the transformer body over
each prompt once and every completion token, and the LM head over completion tokens only; padding and
recomputation (TRL's gradient checkpointing) do not count. Against the peak a float32 matmul reaches on
the trainer's cores (measured here, first, with the bfloat16 peak). The floor of a step is its useful
FLOPs at those peaks: training's at the float32 peak, generation's (2 x parameters per generated token,
each prompt prefilled once) at the peak of the server's dtype, or, where it is longer, the time to read
the weights once per decode step (the round's longest completion) at the measured memory bandwidth: a
decode step of 32 sequences does 64 FLOPs per weight byte in bfloat16, well under what 2 cores reach per
byte of DRAM, so decoding is bound by bandwidth. Each row prints its step as a multiple of its floor and its
completions/s as a multiple of TRL's.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS_DEFAULT = 6
COMPLETIONS = 32
GROUP = 8  # completions per prompt


def addition_dataset(n: int = 256, seed: int = 0):
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]
    prompts = [[{"role": "user", "content": f"What is {a} + {b}? Answer with the number only."}] for a, b in pairs]
    return Dataset.from_dict({"prompt": prompts, "answer": [str(a + b) for a, b in pairs]})


def reward_correct(completions, answer, **kwargs):
    """1 if the last number in the completion is the sum."""
    out = []
    for completion, expected in zip(completions, answer):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        numbers = re.findall(r"-?\d+", text)
        out.append(1.0 if numbers and numbers[-1] == expected else 0.0)
    return out


def train(lib: str, model: str, steps: int, out: str, extra: dict) -> None:
    """One run; writes each step's end time and logged metrics to out/steps.jsonl."""
    from transformers import TrainerCallback

    if lib == "trl":
        from trl import GRPOConfig, GRPOTrainer
    else:
        from fastgrpo import GRPOConfig, GRPOTrainer

    rows = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            rows.append({"t": time.perf_counter()})

        def on_log(self, args, state, control, logs=None, **kwargs):
            rows.append({"t": time.perf_counter(), **(logs or {})})

    config = GRPOConfig(output_dir=out, per_device_train_batch_size=COMPLETIONS, num_generations=8,
                        gradient_accumulation_steps=1, max_completion_length=64, bf16=False, learning_rate=1e-6,
                        beta=0.0, max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                        seed=0, disable_tqdm=True, **extra)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_correct, args=config, train_dataset=addition_dataset(),
                          callbacks=[StepTimes()])
    trainer.train()
    if hasattr(trainer, "close"):
        trainer.close()
    Path(out, "steps.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def matmul_peak(threads: int, dtype: str = "float32") -> float:
    """GFLOP/s of a 2048 x 2048 matmul in `dtype` on `threads` threads (median of 5): this machine's own limit
    (bfloat16 is fast only where the CPU has a bf16 unit: AMX, AVX-512 BF16)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048, dtype=getattr(torch, dtype)), torch.randn(2048, 2048, dtype=getattr(torch, dtype))
    a @ b
    times = []
    for _ in range(5):
        began = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - began)
    torch.set_num_threads(saved)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def memory_bandwidth(threads: int) -> float:
    """GB/s of reading a 1 GiB float32 tensor (a sum) on `threads` threads, median of 5."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.ones(1 << 28)
    x.sum()
    times = []
    for _ in range(5):
        began = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - began)
    torch.set_num_threads(saved)
    return x.numel() * 4 / statistics.median(times) / 1e9


def weight_bytes(model: str, dtype: str) -> float:
    """Bytes of weights a decode step reads: the body's matmuls and the LM head (embedding lookups read rows)."""
    body, head = parameter_counts(model)
    return (body + head) * (2 if dtype == "bfloat16" else 4)


def parameter_counts(model: str) -> tuple[float, float]:
    """(transformer body's matmul parameters, LM head's)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model)
    head = c.vocab_size * c.hidden_size
    per_layer = 4 * c.hidden_size**2 * (1 + c.num_key_value_heads / c.num_attention_heads) / 2 \
        + 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * per_layer, head


def training_flops(model: str, prompt_tokens: float, completion_tokens: float) -> float:
    """6 x (body parameters x all tokens + LM head x completion tokens): forward and backward."""
    body, head = parameter_counts(model)
    return 6 * (body * (prompt_tokens + completion_tokens) + head * completion_tokens)


def generation_flops(model: str, prompt_tokens: float, completion_tokens: float) -> float:
    """2 x (body x (each prompt once, prefilled; its completions share it in the prefix cache) + (body + LM head)
    x every generated token). Attention's own FLOPs (sequences under 110 tokens) are left out: under 2% here."""
    body, head = parameter_counts(model)
    return 2 * (body * prompt_tokens + (body + head) * completion_tokens)


RUNS = {
    # name: (library, extra GRPOConfig fields, server cores (None: no server), trainer cores)
    "trl": ("trl", {"use_vllm": False}, None, None),
    "fastgrpo-hf": ("fastgrpo", {"use_vllm": False}, None, None),
    "sync": ("fastgrpo", {"use_vllm": True, "vllm_mode": "server"}, "shared", None),
    "async": ("fastgrpo", {"use_vllm": True, "vllm_mode": "server", "async_generation": True}, "shared", None),
    "sync-bf16": ("fastgrpo", {"use_vllm": True, "vllm_mode": "server", "server_dtype": "bfloat16"}, "shared", None),
    "sync-bf16-compiled": ("fastgrpo", {"use_vllm": True, "vllm_mode": "server", "server_dtype": "bfloat16",
                                        "server_args": ["--enforce_eager", "false"]}, "shared", None),
    "async-bf16": ("fastgrpo", {"use_vllm": True, "vllm_mode": "server", "async_generation": True,
                                "server_dtype": "bfloat16"}, "shared", None),
    "sync-split": ("fastgrpo", {"use_vllm": True, "vllm_mode": "server"}, [1], [0]),
    "async-split": ("fastgrpo", {"use_vllm": True, "vllm_mode": "server", "async_generation": True}, [1], [0]),
    "async-split-bf16": ("fastgrpo", {"use_vllm": True, "vllm_mode": "server", "async_generation": True,
                                      "server_dtype": "bfloat16"}, [1], [0]),
}


def run(name: str, steps: int, model: str, trl_python: str | None) -> dict:
    from fastgrpo.serve.launcher import ServerProcess

    lib, extra, server_cores, trainer_cores = RUNS[name]
    extra = dict(extra)
    server_dtype = extra.pop("server_dtype", "float32")  # the trainer trains in float32 either way
    server_args = extra.pop("server_args", [])
    out = tempfile.mkdtemp(prefix=f"fastgrpo-b1-{name}-")
    server = None
    if server_cores is not None:
        server = ServerProcess(["--model", model, "--dtype", server_dtype, *server_args], Path(out) / "server.log",
                               cpu_cores=None if server_cores == "shared" else server_cores)
        server.wait_ready()
        extra = {**extra, "vllm_server_base_url": server.base_url}
    python = (trl_python or sys.executable) if lib == "trl" else sys.executable
    command = [python, str(Path(__file__).resolve()), "--child", lib, "--model", model, "--steps", str(steps),
               "--out", out, "--extra", json.dumps(extra)]
    env = dict(os.environ)
    if trainer_cores is not None:
        command = ["taskset", "-c", ",".join(map(str, trainer_cores)), *command]
        env["OMP_NUM_THREADS"] = str(len(trainer_cores))
    try:
        began = time.perf_counter()
        proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=open(Path(out) / "stderr.log", "w"), env=env)
        wall = time.perf_counter() - began
    finally:
        if server is not None:
            server.stop()
    if proc.returncode != 0:
        sys.exit(f"{name} failed; see {out}/stderr.log")
    rows = [json.loads(line) for line in Path(out, "steps.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "loss" in r]
    ends = [rows[0]["t"]] + [r["t"] for r in steps_rows]
    step_s = [b - a for a, b in zip(ends, ends[1:])][1:]  # drop the first step
    later = steps_rows[1:]

    def median(key):
        values = [r[key] for r in later if key in r]
        return statistics.median(values) if values else None

    tokens = [b["num_tokens"] - a["num_tokens"] for a, b in zip(steps_rows, steps_rows[1:])]
    completion_tokens = median("completions/mean_length") * COMPLETIONS
    prompt_tokens = (statistics.median(tokens) - completion_tokens) / GROUP  # useful work: each prompt once
    return {"name": name, "s_per_step": statistics.median(step_s), "step_s": step_s,
            "completions_per_s": COMPLETIONS / statistics.median(step_s), "generate": median("time/generate"),
            "train": median("time/train"), "push": median("time/weight_sync"),
            "staleness": median("async/staleness_mean"), "reward": statistics.mean(r["reward"] for r in steps_rows),
            "flops": training_flops(model, prompt_tokens, completion_tokens),
            "generation_flops": generation_flops(model, prompt_tokens, completion_tokens),
            "decode_steps": median("completions/max_length"),
            "server_dtype": server_dtype if server is not None else "float32", "wall_s": wall,
            "cores": "2 shared" if trainer_cores is None else f"trainer {trainer_cores}, server {server_cores}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=STEPS_DEFAULT)
    parser.add_argument("--runs", default="trl,sync,sync-bf16,async-split")
    parser.add_argument("--trl-python", default=None, help="python of a virtual environment with trl==1.16.0 "
                        "(default: this one, where trl is a test dependency)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        train(args.child, args.model, args.steps, args.out, json.loads(args.extra))
        return
    from fastgrpo.models import resolve_model

    model = resolve_model(args.model)
    names = args.runs.split(",")
    if "trl" in names and not args.trl_python:
        try:
            import trl  # noqa: F401
        except ImportError:
            sys.exit("the trl run needs trl==1.16.0 here (make test installs it) or --trl-python")
    peak = {(t, d): matmul_peak(t, d) for t in (1, 2) for d in ("float32", "bfloat16")}
    bandwidth = {t: memory_bandwidth(t) for t in (1, 2)}
    results = [run(name, args.steps, model, args.trl_python) for name in names]
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"\nB1: {COMPLETIONS} completions a step (4 prompts x 8), max_completion_length 64, float32 training, lr 1e-6, "
          f"beta 0; {args.steps} steps a run, the first dropped, medians. {cpu}, 2 cores. Matmul peaks (GFLOP/s): "
          f"float32 {peak[1, 'float32']:.0f} on 1 core, {peak[2, 'float32']:.0f} on 2; bfloat16 "
          f"{peak[1, 'bfloat16']:.0f} on 1, {peak[2, 'bfloat16']:.0f} on 2. Memory read: {bandwidth[1]:.1f} GB/s on 1 "
          f"core, {bandwidth[2]:.1f} on 2.  ({' '.join(sys.argv)})\n")
    print("The floor: the step's useful FLOPs at the peak of the cores each part runs on (training: float32; "
          "generation: the server's dtype, or the weights read once per decode step at the memory bandwidth where "
          "that is longer), generation and training one after the other (async: the longer of the two).\n")
    print("| run | cores | server dtype | s/step | completions/s | generate s | train s | push s | staleness | "
          "train GFLOP/s (% of peak) | floor s (gen + train) | x floor | x TRL completions/s | mean reward |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    by_name = {r["name"]: r for r in results}
    trl_rate = by_name["trl"]["completions_per_s"] if "trl" in by_name else None
    for r in results:
        cores = 1 if r["cores"].startswith("trainer") else 2
        train_s = r["train"] if r["train"] is not None else r["s_per_step"]
        gflops = r["flops"] / train_s / 1e9
        train_floor = r["flops"] / (peak[cores, "float32"] * 1e9)
        generation_floor = r["generation_flops"] / (peak[cores, r["server_dtype"]] * 1e9)
        if r["decode_steps"]:
            generation_floor = max(generation_floor, r["decode_steps"] * weight_bytes(model, r["server_dtype"])
                                   / (bandwidth[cores] * 1e9))
        floor = max(train_floor, generation_floor) if "async" in r["name"] else train_floor + generation_floor
        fmt = lambda v, f=".2f": "—" if v is None else format(v, f)  # noqa: E731
        versus_trl = "—" if trl_rate is None else f"{r['completions_per_s'] / trl_rate:.2f}"
        print(f"| {r['name']} | {r['cores']} | {r['server_dtype'] if r['name'] != 'trl' else '—'} | "
              f"{r['s_per_step']:.1f} | {r['completions_per_s']:.2f} | "
              f"{fmt(r['generate'])} | {fmt(r['train'])} | {fmt(r['push'])} | {fmt(r['staleness'], '.1f')} | "
              f"{gflops:.0f}{'' if r['train'] is not None else ' (whole step)'} "
              f"({100 * gflops / peak[cores, 'float32']:.0f}%) | {generation_floor:.2f} + {train_floor:.2f} | "
              f"{r['s_per_step'] / floor:.1f} | {versus_trl} | {r['reward']:.3f} |")
    print()
    if "trl" in by_name and "sync" in by_name:
        print(f"sync server mode / TRL use_vllm=False: "
              f"{by_name['sync']['completions_per_s'] / by_name['trl']['completions_per_s']:.2f}x completions/s")
    if "sync-split" in by_name and "async-split" in by_name:
        print(f"async / sync on disjoint cores: "
              f"{by_name['async-split']['completions_per_s'] / by_name['sync-split']['completions_per_s']:.2f}x "
              "completions/s")


if __name__ == "__main__":
    main()
