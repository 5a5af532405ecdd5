"""GRPO step time on the demo config: vLLM server mode against transformers generation (use_vllm=False).

    .venv/bin/python bench/bench_trainer.py [--steps 6] [--model PATH]

Both modes train the embedded SmolLM2-135M-Instruct on the demo's arithmetic task
(32 completions per step, max_completion_length 64, bf16 autocast on CPU), one
mode after the other, each in its own process (server mode starts its own
`fastgrpo vllm-serve`). The first step is dropped (warm-up, first weight push);
medians over the rest. Peak memory is the largest sum over the whole process
tree (trainer, server, its engine processes), sampled every --memory-interval s, of each
process's PSS (proportional set size: a page shared by k processes counts 1/k in
each, so shared libraries count once) and, for comparison, of RSS (counts them
once per process: an upper bound). Reading PSS walks each process's page tables:
about 50 ms of CPU for the server's tree, which at 5 samples a second took a
quarter of a core from training on a 2-core machine; hence 1 s by default, and the
sampler's own CPU time is printed.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SPLIT = ["time/generate", "time/reward", "time/weight_sync", "time/train"]


def child(mode: str, steps: int, model: str | None, out: str) -> None:
    from fastgrpo.run import DEMO_SPEC, train

    spec = dict(DEMO_SPEC, max_steps=steps, output_dir=out)
    if model:
        spec["model"] = model
    if mode == "transformers":
        spec.update(use_vllm=False)
        spec.pop("start_server")
    train(spec, log=lambda *a: None)


def tree_memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) summed over a process and its descendants, in bytes."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    pss = rss = 0
    for p in procs:
        try:
            info = p.memory_full_info()
            pss, rss = pss + info.pss, rss + info.rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pss, rss


def run_mode(mode: str, steps: int, model: str | None, memory_interval: float) -> dict:
    out = tempfile.mkdtemp(prefix=f"fastgrpo-bench-{mode}-")
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--steps", str(steps), "--out", out]
    if model:
        command += ["--model", model]
    began = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(Path(out) / "stderr.log", "w"))
    peak = [0, 0]  # PSS, RSS
    sampler_cpu_s = [0.0]

    def sample():
        while proc.poll() is None:
            peak[:] = [max(a, b) for a, b in zip(peak, tree_memory(proc.pid))]
            sampler_cpu_s[0] = time.thread_time()
            time.sleep(memory_interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    proc.wait()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed; see {out}/stderr.log")
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward" in r][1:]  # drop the warm-up step
    step_s = [sum(r.get(k, 0.0) for k in SPLIT) for r in rows]
    completions = 32
    return {
        "mode": mode, "steps": len(rows), "wall_s": time.perf_counter() - began,
        "s_per_step": statistics.median(step_s),
        "completions_per_s": completions / statistics.median(step_s),
        "split": {k: statistics.median(r.get(k, 0.0) for r in rows) for k in SPLIT},
        "gen_tokens_per_s": statistics.median(r["generate/tokens_per_second"] for r in rows),
        "peak_gib": peak[0] / 2**30, "peak_rss_gib": peak[1] / 2**30, "sampler_cpu_s": sampler_cpu_s[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--model", default=None)
    parser.add_argument("--memory-interval", type=float, default=1.0, help="seconds between memory samples")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.model, args.out)
        return
    results = [run_mode(mode, args.steps, args.model, args.memory_interval) for mode in ("server", "transformers")]
    server, hf = results
    print(f"\ndemo config: 32 completions per step (4 prompts x 8), max_completion_length 64, "
          f"{args.steps} steps per mode, first dropped, medians; memory sampled every {args.memory_interval:g} s\n")
    print("| mode | s/step | completions/s | generate s | reward s | weight sync s | train s | gen tokens/s "
          "| peak PSS GiB | peak RSS GiB | wall s | sampler CPU s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        s = r["split"]
        print(f"| {r['mode']} | {r['s_per_step']:.2f} | {r['completions_per_s']:.2f} | {s['time/generate']:.2f} | "
              f"{s['time/reward']:.3f} | {s['time/weight_sync']:.2f} | {s['time/train']:.2f} | "
              f"{r['gen_tokens_per_s']:.0f} | {r['peak_gib']:.2f} | {r['peak_rss_gib']:.2f} | "
              f"{r['wall_s']:.0f} | {r['sampler_cpu_s']:.1f} |")
    ratio = server["completions_per_s"] / hf["completions_per_s"]
    print(f"\nserver mode / transformers: {ratio:.2f}x completions/s (target >= 3x: "
          f"{'met' if ratio >= 3 else 'NOT met'}); server-mode peak memory, trainer + server: "
          f"{server['peak_gib']:.2f} GiB PSS (target < 8 GiB: {'met' if server['peak_gib'] < 8 else 'NOT met'})")


if __name__ == "__main__":
    main()
