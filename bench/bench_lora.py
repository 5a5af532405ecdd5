"""LoRA against full fine-tuning on the demo configuration: what a push moves, step time, memory.

    .venv/bin/python bench/bench_lora.py [--steps 6] [--memory-interval 1.0]

Both runs are `fastgrpo demo`'s job (fastgrpo.run.DEMO_SPEC: the embedded SmolLM2-135M-Instruct
on arithmetic, 32 completions per step, server mode), one after the other, each in its own
process; LoRA adds fastgrpo.run.DEMO_LORA (rank 16 on q/k/v/o and gate/up/down projections,
adapter-only pushes). Per run: bytes pushed per step and push seconds (the trainer's
client, measured around each push), seconds per step and its split (medians, the first step
dropped), and the peak memory (PSS, sampled every --memory-interval s) of the trainer
process alone and of the server's process tree (server and engine) alone.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trainer import SPLIT, tree_memory  # noqa: E402


def child(mode: str, steps: int, out: str) -> None:
    import torch

    from fastgrpo.client import VLLMClient
    from fastgrpo.run import DEMO_LORA, DEMO_SPEC, train
    from fastgrpo.transfer import as_weights

    pushes = []  # (bytes, seconds) of each push
    update, push_adapter = VLLMClient.update_weights, VLLMClient.push_adapter

    def timed_update(self, weights, weight_version=None):
        began = time.perf_counter()
        version = update(self, weights, weight_version)
        metas = as_weights(weights).metas(getattr(torch, self.info["dtype"]))
        pushes.append((sum(m.nbytes for m in metas), time.perf_counter() - began))
        return version

    def timed_adapter(self, name, tensors, config, weight_version):
        began = time.perf_counter()
        info = push_adapter(self, name, tensors, config, weight_version)
        pushes.append((info["bytes"], time.perf_counter() - began))
        return info

    VLLMClient.update_weights, VLLMClient.push_adapter = timed_update, timed_adapter
    spec = dict(DEMO_SPEC, max_steps=steps, output_dir=out, **(DEMO_LORA if mode == "lora" else {}))
    train(spec, log=lambda *a: None)
    (Path(out) / "pushes.json").write_text(json.dumps(pushes))


def run_mode(mode: str, steps: int, memory_interval: float) -> dict:
    import psutil

    out = tempfile.mkdtemp(prefix=f"fastgrpo-bench-lora-{mode}-")
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--steps", str(steps), "--out", out]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(Path(out) / "stderr.log", "w"))
    peak = {"trainer": 0, "server": 0}

    def sample():
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                servers = [c for c in root.children() if "vllm-serve" in " ".join(c.cmdline())]
                trainer = root.memory_full_info().pss
            except psutil.Error:
                break
            server = sum(tree_memory(s.pid)[0] for s in servers)
            peak["trainer"], peak["server"] = max(peak["trainer"], trainer), max(peak["server"], server)
            time.sleep(memory_interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    proc.wait()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed; see {out}/stderr.log")
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward" in r][1:]
    pushes = json.loads((Path(out) / "pushes.json").read_text())[2:]  # the first two: start and step 1
    return {
        "mode": mode, "s_per_step": statistics.median(sum(r.get(k, 0.0) for k in SPLIT) for r in rows),
        "split": {k: statistics.median(r.get(k, 0.0) for r in rows) for k in SPLIT},
        "push_mib": statistics.median(b for b, _ in pushes) / 2**20,
        "push_s": statistics.median(s for _, s in pushes),
        "trainer_gib": peak["trainer"] / 2**30, "server_gib": peak["server"] / 2**30,
        "reward_first": rows[0]["reward"], "reward_last": rows[-1]["reward"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--memory-interval", type=float, default=1.0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.out)
        return
    results = [run_mode(mode, args.steps, args.memory_interval) for mode in ("full", "lora")]
    print(f"\ndemo config, {args.steps} steps per run (first dropped), medians; memory: peak PSS every "
          f"{args.memory_interval:g} s\n")
    print("| run | pushed per step MiB | push s | s/step | generate s | reward s | weight sync s | train s "
          "| trainer peak GiB | server peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        s = r["split"]
        print(f"| {r['mode']} | {r['push_mib']:.1f} | {r['push_s']:.3f} | {r['s_per_step']:.2f} | "
              f"{s['time/generate']:.2f} | {s['time/reward']:.3f} | {s['time/weight_sync']:.3f} | "
              f"{s['time/train']:.2f} | {r['trainer_gib']:.2f} | {r['server_gib']:.2f} |")
    full, lora = results
    print(f"\nLoRA / full: {lora['push_mib'] / full['push_mib']:.3f}x the bytes per push, "
          f"{lora['push_s'] / full['push_s']:.2f}x the push time, {lora['s_per_step'] / full['s_per_step']:.2f}x "
          f"the step time")


if __name__ == "__main__":
    main()
