"""Server vs in-process vLLM: generation throughput and full weight-push time, side by side.

    .venv/bin/python bench/bench_server.py [--model PATH] [--repeats 3]

(a) 16 prompts x n=8 x 128 tokens (ignore_eos, so every completion is full length)
    through `fastgrpo vllm-serve` + VLLMClient, against `vllm.LLM.generate` in
    process on the same batch with the same engine settings (dtype auto, eager, whole prefills,
    same max_model_len and KV cache). Each side runs alone on the machine.
(b) A full push of the model's weights (VLLMClient.update_weights: HTTP control
    + gloo broadcast + layerwise reload), against loading the same tensors from
    memory in process (layerwise reload + load_weights inside the worker).

Prints medians and ratios. Targets (issue 3): server >= 95% of in-process
throughput; a push < 1 s on CPU and < 2x the in-process load.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NUM_PROMPTS, N, MAX_TOKENS, MAX_MODEL_LEN, KV_GIB = 16, 8, 128, 512, 2


def prompts() -> list[str]:
    return [f"Question {i}: what is {7 * i + 3} plus {11 * i + 5}? Explain step by step." for i in range(NUM_PROMPTS)]


def reload_from_memory(worker, path: str) -> float:
    """Runs inside the vLLM worker: time a full layerwise reload from tensors already in memory."""
    from safetensors.torch import load_file
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    from fastgrpo.transfer.reload import refresh_tied_cpu_heads

    tensors = load_file(str(Path(path) / "model.safetensors"))  # untimed: the data is in memory first
    model = worker.model_runner.get_model()
    start = time.perf_counter()
    initialize_layerwise_reload(model)
    model.load_weights(iter(tensors.items()))
    finalize_layerwise_reload(model, worker.model_runner.model_config)
    refresh_tied_cpu_heads(model)
    return time.perf_counter() - start


def run_in_process(model: str, repeats: int) -> dict:
    """Child process: in-process vLLM.LLM generation and reload timings."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(KV_GIB)
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # to send reload_from_memory to the worker
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="auto", enforce_eager=True, enable_chunked_prefill=False, max_model_len=MAX_MODEL_LEN, seed=0,
              disable_log_stats=True, logprobs_mode="processed_logprobs")
    params = SamplingParams(n=N, temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0, seed=0)
    llm.generate(prompts()[:2], params, use_tqdm=False)  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = llm.generate(prompts(), params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        rates.append(sum(len(c.token_ids) for o in outputs for c in o.outputs) / elapsed)
    from bench_server import reload_from_memory as in_worker  # by module name: __main__ does not pickle

    loads = [llm.collective_rpc(in_worker, args=(model,))[0] for _ in range(repeats + 1)][1:]
    return {"tokens_per_s": rates, "load_s": loads}


def run_server(model: str, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from fastgrpo.client import VLLMClient
    from fastgrpo.serve.launcher import ServerProcess

    server = ServerProcess(["--model", model, "--dtype", "auto", "--max-model-len", str(MAX_MODEL_LEN),
                            "--kv-cache-space", str(KV_GIB), "--log-level", "warning"],
                           Path("/tmp") / "fastgrpo-bench-server.log")
    try:
        server.wait_ready()
        client = VLLMClient(base_url=server.base_url)
        body = {"prompts": prompts(), "n": N, "max_tokens": MAX_TOKENS, "temperature": 1.0, "ignore_eos": True,
                "seed": 0}
        client._request("POST", "/generate", json=dict(body, prompts=prompts()[:2]))  # warm-up
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = client._request("POST", "/generate", json=body)
            elapsed = time.perf_counter() - start
            rates.append(sum(len(c["token_ids"]) for r in result["results"] for c in r["completions"]) / elapsed)
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        start = time.perf_counter()
        client.update_weights(hf)
        first_push = time.perf_counter() - start
        pushes = []
        for _ in range(repeats):
            start = time.perf_counter()
            client.update_weights(hf)
            pushes.append(time.perf_counter() - start)
        nbytes = sum(p.numel() * 2 for p in hf.parameters())  # pushed in the server's bf16
        client.close()
        return {"tokens_per_s": rates, "push_s": pushes, "first_push_s": first_push, "push_bytes": nbytes}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from fastgrpo.models import resolve_model

    model = resolve_model(args.model)
    if args.child:
        print("RESULT " + json.dumps(run_in_process(model, args.repeats)), flush=True)
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--model", model,
                            "--repeats", str(args.repeats)], capture_output=True, text=True, env=env, timeout=1800)
    if child.returncode != 0:
        sys.exit(f"in-process run failed:\n{child.stderr[-3000:]}")
    local = json.loads(next(line for line in child.stdout.splitlines() if line.startswith("RESULT "))[7:])
    served = run_server(model, args.repeats)

    med = statistics.median
    gen_ratio = med(served["tokens_per_s"]) / med(local["tokens_per_s"])
    push_ratio = med(served["push_s"]) / med(local["load_s"])
    print(f"\nmodel: {model}")
    print(f"batch: {NUM_PROMPTS} prompts x n={N} x {MAX_TOKENS} tokens, {args.repeats} repeats, medians\n")
    print("| measure | in-process vLLM | fastgrpo server | server / in-process |")
    print("| --- | --- | --- | --- |")
    print(f"| generation tokens/s | {med(local['tokens_per_s']):.0f} | {med(served['tokens_per_s']):.0f} | "
          f"{gen_ratio:.1%} |")
    print(f"| full weight load, s | {med(local['load_s']):.3f} (from memory) | {med(served['push_s']):.3f} (push) | "
          f"{push_ratio:.2f}x |")
    print(f"\nfirst push (opens the gloo group): {served['first_push_s']:.3f} s; "
          f"push size {served['push_bytes'] / 2**20:.0f} MiB (bf16)")
    print(f"targets: server >= 95% of in-process: {'met' if gen_ratio >= 0.95 else 'NOT met'}; "
          f"push < 1 s: {'met' if med(served['push_s']) < 1 else 'NOT met'}; "
          f"push < 2x in-process load: {'met' if push_ratio < 2 else 'NOT met'}")


if __name__ == "__main__":
    main()
