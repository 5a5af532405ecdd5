"""Data-parallel generation, side by side: vLLM's DP with our token-aware routing, vLLM's DP with vLLM's own
balancing, and (optionally) another checkout's server, e.g. the home-made replica pool it replaced.

    .venv/bin/python bench/bench_dp.py [--model default] [--repeats 3] [--baseline-src /path/to/old/src]

Rounds (ignore_eos, so every completion is full length; the embedded SmolLM2-135M, float32 on CPUs
without a bf16 unit):
- B1: 4 prompts x n=8 x 64 tokens, the B1 training step's round;
- skewed: the same, but one prompt asks for 10x the tokens (640), as one long-answer prompt does.

Every server has DP=2 (one core per rank on a 2-core machine); all are up at once and take turns, round by
round, so drift on the machine falls on all alike. Prints the median seconds and completion tokens per
second of each round per server, and each server's ratio to the first (above 1: faster).
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROUNDS = {  # name -> max_tokens of each of the 4 prompts (n=8 each)
    "B1": [64, 64, 64, 64],
    "skewed": [640, 64, 64, 64],
}
N = 8


def prompts() -> list[str]:
    return [f"What is {12 + 7 * i} + {35 + 11 * i}? Answer with the number." for i in range(4)]


def generate(client, **fields) -> float:
    """One round through raw HTTP (the baseline's response has another shape than ours); its seconds."""
    began = time.perf_counter()
    response = client.post("/generate", json={"prompts": prompts(), "n": N, "ignore_eos": True, **fields})
    response.raise_for_status()
    return time.perf_counter() - began


def measure(servers: list[tuple[str, list[str], dict | None]], repeats: dict, log_dir: Path) -> dict:
    """Start every server, then run each round on each in turn, repeat after repeat: drift on the machine
    (another tenant, a thermal limit) then falls on all of them alike. An idle server costs almost nothing
    (README, 'Idle means idle')."""
    import httpx

    from fastgrpo.serve.launcher import ServerProcess

    procs = [ServerProcess(flags, log_dir / f"{label.split(' (')[0].replace(' ', '-').replace(',', '')}.log", env=env)
             for label, flags, env in servers]
    try:
        clients = []
        for proc in procs:
            proc.wait_ready(timeout=600)
            clients.append(httpx.Client(base_url=proc.base_url, timeout=600))
        for client in clients:
            generate(client, max_tokens=8)  # warm-up: every rank's first steps
        seconds = {(label, r): [] for label, _, _ in servers for r in ROUNDS}
        for name, caps in ROUNDS.items():
            for r in range(repeats[name]):
                for (label, _, _), client in zip(servers, clients):
                    seconds[label, name].append(generate(client, max_tokens_per_prompt=caps, seed=r, temperature=1.0))
                print(f"  {name} run {r + 1}: " + ", ".join(f"{label.split(' (')[0]} {seconds[label, name][-1]:.2f} s"
                                                           for label, _, _ in servers), flush=True)
        return seconds
    finally:
        for proc in procs:
            proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--repeats", type=int, default=7, help="runs of B1's round (the skewed one: half)")
    parser.add_argument("--baseline-src", default=None,
                        help="the src/ folder of another fastgrpo checkout, served as 'baseline' (e.g. a git worktree "
                             "of the commit before vLLM's DP: the replica pool)")
    parser.add_argument("--log-dir", default="/tmp/fastgrpo-bench-dp")
    args = parser.parse_args()
    from fastgrpo.models import resolve_model

    model = resolve_model(args.model)
    common = ["--model", model, "--data-parallel-size", "2", "--max-model-len", "1024", "--kv-cache-space", "1"]
    servers = [("vLLM DP, tokens routing", [*common, "--load-balance", "tokens"], None),
               ("vLLM DP, vLLM balancing", [*common, "--load-balance", "vllm"], None)]
    if args.baseline_src:
        path = os.pathsep.join([str(Path(args.baseline_src).resolve()), os.environ.get("PYTHONPATH", "")])
        servers.insert(0, ("baseline (" + Path(args.baseline_src).resolve().parent.name + ")", common,
                           {"PYTHONPATH": path}))
    log_dir = Path(args.log_dir)
    repeats = {"B1": args.repeats, "skewed": max(1, args.repeats // 2)}
    print(f"model {model}, DP=2, {os.cpu_count()} cores; runs per round {repeats}, interleaved; logs in {log_dir}")
    seconds = measure(servers, repeats, log_dir)
    first = servers[0][0]
    print(f"\n| server | {' | '.join(f'{r}: median s | tok/s | vs first' for r in ROUNDS)} |")
    print("|---|" + "---|---|---|" * len(ROUNDS))
    for label, _, _ in servers:
        cells = []
        for r, caps in ROUNDS.items():
            median = statistics.median(seconds[label, r])
            cells += [f"{median:.2f}", f"{N * sum(caps) / median:.0f}",
                      f"{statistics.median(seconds[first, r]) / median:.2f}x"]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\n$ {' '.join([Path(sys.executable).name, *sys.argv])}")


if __name__ == "__main__":
    main()
