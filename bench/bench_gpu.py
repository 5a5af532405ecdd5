"""GPU benchmark (one GPU): generation, weight push and GRPO step time, for two models.

    python bench/bench_gpu.py [--models embedded,qwen0.5b] [--steps 5] [--eager]

Models: the embedded SmolLM2-135M-Instruct, and a Qwen2.5-0.5B-shaped model with
random weights (fastgrpo.models.QWEN25_05B_SHAPE: its 24 layers of 896, 14 heads,
2 KV heads, MLP 4864; the test tokenizer's vocabulary). For each, every part runs
in its own process (each gets the whole GPU):

- generation: 64 prompts of 32 random tokens x n=4, 256 new tokens each (ignore_eos),
  on `fastgrpo vllm-serve` and with transformers `generate` (bf16, sampling, the same
  prompts and lengths) on the same GPU: tokens/s, medians of 3 rounds after a warm-up;
- push: `VLLMClient.update_weights` of the float32 model into the bf16 server over
  CUDA IPC (the trainer shares the server's GPU): median of 5 after a first push;
- GRPO step: the demo's task and trainer settings, 128 completions a step (16
  prompts x 8) of at most 128 tokens, bf16, in server mode (the server on the same
  GPU, IPC), colocate mode (sleep mode on) and use_vllm=False: median s/step over
  steps 2..N.

--eager skips CUDA graphs and torch.compile in the engines (engine start in
seconds instead of a minute or more: what a short lease affords); the table says
which it ran.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPTS, N, NEW_TOKENS, PROMPT_LEN = 64, 4, 256, 32
RESULT = "RESULT "


def model_path(name: str, workdir: str) -> str:
    from fastgrpo.models import QWEN25_05B_SHAPE, build_tiny_model, resolve_model

    if name == "embedded":
        return resolve_model("default")
    if name == "qwen0.5b":
        path = os.path.join(workdir, "qwen2.5-0.5b-shaped")
        return path if os.path.exists(os.path.join(path, "config.json")) else \
            build_tiny_model(path, "qwen2", **QWEN25_05B_SHAPE)
    raise SystemExit(f"unknown model {name!r}: use embedded or qwen0.5b")


def random_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(PROMPT_LEN)] for _ in range(PROMPTS)]


def server_flags(model: str, eager: bool, memory: float) -> list[str]:
    flags = ["--model", model, "--dtype", "bfloat16", "--max_model_len", "1024", "--weight_transfer_backend", "ipc",
             "--gpu_memory_utilization", str(memory)]
    return flags + (["--enforce_eager"] if eager else [])


def part_server(model: str, eager: bool, out: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastgrpo.client import VLLMClient
    from fastgrpo.serve.launcher import ServerProcess

    prompts = random_prompts(len(AutoTokenizer.from_pretrained(model)))
    with ServerProcess(server_flags(model, eager, 0.5), os.path.join(out, "server.log")) as server:
        server.wait_ready(900)
        client = VLLMClient(base_url=server.base_url, weight_transfer_timeout=120)
        rates = []
        for _ in range(4):
            began = time.perf_counter()
            client.generate(prompt_token_ids=prompts, n=N, max_tokens=NEW_TOKENS, ignore_eos=True, temperature=1.0)
            rates.append(PROMPTS * N * NEW_TOKENS / (time.perf_counter() - began))
        trained = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).cuda()
        pushes = []
        for _ in range(6):
            began = time.perf_counter()
            client.update_weights(trained)
            pushes.append(time.perf_counter() - began)
        nbytes = sum(p.numel() * 2 for p in trained.parameters())  # bf16 on the wire
        client.close()
    return {"server_tokens_per_s": statistics.median(rates[1:]), "push_s": statistics.median(pushes[1:]),
            "push_mib": nbytes / 2**20}


def part_hf_generate(model: str, eager: bool, out: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).cuda()
    ids = torch.tensor([p for p in random_prompts(len(tokenizer)) for _ in range(N)], device="cuda")
    rates = []
    for _ in range(4):
        torch.cuda.synchronize()
        began = time.perf_counter()
        lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                    max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id)
        torch.cuda.synchronize()
        rates.append(ids.shape[0] * NEW_TOKENS / (time.perf_counter() - began))
    return {"hf_tokens_per_s": statistics.median(rates[1:])}


def part_grpo(mode: str, model: str, eager: bool, steps: int, out: str) -> dict:
    from fastgrpo.placement import detect_placement, use_trainer_device
    from fastgrpo.run import demo_spec, train
    from fastgrpo.trainer.reporting import read_metrics

    placement = detect_placement()
    use_trainer_device(placement)
    spec = dict(demo_spec(placement), model=model, output_dir=out, max_steps=steps,
                per_device_train_batch_size=32, gradient_accumulation_steps=4, num_generations=8,
                max_completion_length=128, bf16=True, use_cpu=False)
    if mode == "server":
        spec["start_server"] = dict(spec["start_server"], **({"enforce_eager": "true"} if eager else {}))
    else:
        spec.pop("start_server")
        spec["use_vllm"] = mode == "colocate"
        if mode == "colocate":
            spec.update(vllm_mode="colocate", vllm_enable_sleep_mode=True, vllm_gpu_memory_utilization=0.3,
                        vllm_max_model_len=512)
    train(spec, log=lambda *a: None)
    rows = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "reward" in r][1:]
    parts = {k: statistics.median(r.get(f"time/{k}", 0.0) for r in rows) for k in ("generate", "train", "weight_sync")}
    return {f"{mode}_s_per_step": sum(parts.values()), **{f"{mode}_{k}_s": v for k, v in parts.items()}}


def run_part(part: str, model_name: str, args, workdir: str) -> dict:
    out = tempfile.mkdtemp(prefix=f"{model_name}-{part}-", dir=workdir)
    command = [sys.executable, __file__, "--child", part, "--models", model_name, "--steps", str(args.steps),
               "--workdir", workdir, "--out", out] + (["--eager"] if args.eager else [])
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.part_timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        print(f"{model_name} {part}: failed (status {done.returncode}); its output ends:\n{done.stderr[-3000:]}",
              file=sys.stderr)
        return {}
    print(f"  {model_name} {part}: {time.perf_counter() - began:.0f} s", file=sys.stderr)
    return json.loads(lines[-1][len(RESULT):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="embedded,qwen0.5b")
    parser.add_argument("--parts", default="server,hf_generate,grpo_server,grpo_colocate,grpo_hf")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--part_timeout", type=float, default=600)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-gpu-")
    if args.child:
        model = model_path(args.models, workdir)
        if args.child.startswith("grpo_"):
            result = part_grpo(args.child.removeprefix("grpo_"), model, args.eager, args.steps, args.out)
        else:
            result = {"server": part_server, "hf_generate": part_hf_generate}[args.child](model, args.eager, args.out)
        print(RESULT + json.dumps(result), flush=True)
        return
    import torch

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"vllm {__import__('vllm').__version__}, engines {'eager' if args.eager else 'compiled + CUDA graphs'}")
    rows = {}
    for name in args.models.split(","):
        model_path(name, workdir)  # build once, before the parts
        rows[name] = {}
        for part in args.parts.split(","):
            rows[name].update(run_part(part, name, args, workdir))
    columns = [("server gen tok/s", "server_tokens_per_s", "{:.0f}"), ("HF generate tok/s", "hf_tokens_per_s", "{:.0f}"),
               ("push s", "push_s", "{:.3f}"), ("push MiB", "push_mib", "{:.0f}"),
               ("server s/step", "server_s_per_step", "{:.2f}"), ("colocate s/step", "colocate_s_per_step", "{:.2f}"),
               ("use_vllm=False s/step", "hf_s_per_step", "{:.2f}")]
    print("| model | " + " | ".join(c[0] for c in columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(fmt.format(row[key]) if key in row else "failed" for _, key, fmt in columns)
              + " |")
    print("\nsplit per step (generate / train / weight_sync, s):")
    for name, row in rows.items():
        for mode in ("server", "colocate", "hf"):
            if f"{mode}_s_per_step" in row:
                print(f"  {name} {mode}: " + " / ".join(f"{row[f'{mode}_{k}_s']:.2f}"
                                                        for k in ("generate", "train", "weight_sync")))
    print(json.dumps(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
