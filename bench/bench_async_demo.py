"""The demo trained synchronously and asynchronously (staleness 1): reward curves in one plot.

    .venv/bin/python bench/bench_async_demo.py [--steps 30] [--cores split|shared] [--plot docs/async-reward.png]

Both runs are `fastgrpo demo`'s job (fastgrpo.run.DEMO_SPEC: the embedded SmolLM2-135M-Instruct on
two-number addition, 32 completions a step, 30 steps), one after the other in their own processes, each
with its own server (the demo's server flags); the second with async_generation=True (and so
vllm_max_weight_staleness=1). --cores split (the default) gives the server core 1 and the trainer core 0,
as when each has its own device; shared leaves both on all cores, where async only adds contention. Prints each run's wall time, median step (the sum of its split; in the
async run time/generate is only what the trainer waited), its split, and the mean reward of its first
and last 5 steps; the plot shows reward per step for both.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(mode: str, steps: int, out: str, server_url: str | None) -> None:
    from fastgrpo.run import DEMO_SPEC, train

    spec = dict(DEMO_SPEC, max_steps=steps, output_dir=out, async_generation=mode == "async")
    if server_url is not None:  # started by the parent, on its own core
        spec.update(start_server=None, vllm_server_base_url=server_url)
    train(spec, log=lambda *a: None)


def run(mode: str, steps: int, cores: str) -> dict:
    from fastgrpo.run import DEMO_SPEC
    from fastgrpo.serve.launcher import ServerProcess

    out = tempfile.mkdtemp(prefix=f"fastgrpo-demo-{mode}-")
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--steps", str(steps), "--out", out]
    env, server = dict(os.environ), None
    if cores == "split":
        flags = ["--model", "default"] + [f for k, v in DEMO_SPEC["start_server"].items() for f in (f"--{k}", str(v))]
        server = ServerProcess(flags, Path(out) / "server.log", cpu_cores=[1])
        server.wait_ready()
        command = ["taskset", "-c", "0", *command, "--server-url", server.base_url]
        env["OMP_NUM_THREADS"] = "1"
    began = time.perf_counter()
    try:
        proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=open(Path(out) / "stderr.log", "w"), env=env)
    finally:
        if server is not None:
            server.stop()
    if proc.returncode != 0:
        sys.exit(f"the {mode} run failed; see {out}/stderr.log")
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward" in r]
    split = ("time/generate", "time/reward", "time/train", "time/weight_sync")
    return {"mode": mode, "wall_s": time.perf_counter() - began, "rewards": [r["reward"] for r in rows],
            "s_per_step": statistics.median(sum(r.get(k, 0.0) for k in split) for r in rows[1:]),
            "split": {k: statistics.median(r.get(k, 0.0) for r in rows[1:]) for k in split},
            "staleness": statistics.mean(r.get("async/staleness_mean", 0.0) for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cores", choices=("split", "shared"), default="split")
    parser.add_argument("--plot", default="docs/async-reward.png")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--server-url", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.out, args.server_url)
        return
    results = [run(mode, args.steps, args.cores) for mode in ("sync", "async")]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        label = "synchronous" if r["mode"] == "sync" else "asynchronous, staleness 1"
        ax.plot(range(1, len(r["rewards"]) + 1), r["rewards"], marker="o", markersize=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean reward (32 completions)")
    ax.set_title("fastgrpo demo: SmolLM2-135M-Instruct on addition")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    where = "server on core 1, trainer on core 0" if args.cores == "split" else "server and trainer on all cores"
    print(f"\nthe demo's job, {args.steps} steps a run, {where}  ({' '.join(sys.argv)})\n")
    print("| run | wall s | median s/step | generate s | train s | push s | mean staleness | reward, first 5 "
          "| reward, last 5 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        s = r["split"]
        print(f"| {r['mode']} | {r['wall_s']:.0f} | {r['s_per_step']:.1f} | {s['time/generate']:.1f} | "
              f"{s['time/train']:.1f} | {s['time/weight_sync']:.1f} | {r['staleness']:.2f} | "
              f"{statistics.mean(r['rewards'][:5]):.3f} | {statistics.mean(r['rewards'][-5:]):.3f} |")
    sync, async_ = results
    print(f"\nasync / sync, median step: {sync['s_per_step'] / async_['s_per_step']:.2f}x; wall: "
          f"{sync['wall_s'] / async_['wall_s']:.2f}x")
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
