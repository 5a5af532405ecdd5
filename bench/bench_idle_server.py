"""What an idle server costs a trainer on the same cores.

    .venv/bin/python bench/bench_idle_server.py [--reps 5] [--rows 8]

Times forward + backward of the embedded SmolLM2-135M-Instruct (fp32, `--rows`
completions of 64 tokens after a 40-token prompt) with no server, then next to an
idle `fastgrpo vllm-serve` with torch's gloo device per process group
(FASTGRPO_SHARED_GLOO_DEVICE=0, what vLLM does by itself), with no server again, next
to one with one shared device (fastgrpo's default, see fastgrpo/quiet_gloo.py), next to
that server frozen (SIGSTOP: its memory stays, none of its threads runs), and with
none again. Counts the server's worker wake-ups per second and the trainer's
involuntary context switches from /proc. Medians of --reps.
"""

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def wakeups_per_second(pid: int, seconds: float = 5.0) -> float:
    def total():
        n = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    n += int(line.split()[1])
        return n

    before = total()
    time.sleep(seconds)
    return (total() - before) / seconds


def worker_pids(server_pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(server_pid).children(recursive=True) if "Worker" in p.name()]


def preempted() -> int:
    """This process's involuntary context switches so far, all threads."""
    n = 0
    for task in Path("/proc/self/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("nonvoluntary_ctxt_switches"):
                n += int(line.split()[1])
    return n


def time_steps(model, rows: int, reps: int) -> tuple[float, float]:
    """(median seconds per forward+backward, involuntary context switches of the trainer per second)."""
    ids = torch.randint(0, model.config.vocab_size, (rows, 104))
    times, switches = [], preempted()
    for _ in range(reps + 1):
        began = time.perf_counter()
        logits = model(input_ids=ids).logits[:, 40:]
        logits.float().logsumexp(-1).mean().backward()
        times.append(time.perf_counter() - began)
    return statistics.median(times[1:]), (preempted() - switches) / sum(times)  # the first is warm-up


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=8)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from fastgrpo.models import resolve_model
    from fastgrpo.serve.launcher import ServerProcess

    path = resolve_model(None)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # No server before, between and after the two servers: the machine's own drift shows in these three.
    results = [("no server", *time_steps(model, args.rows, args.reps), None)]
    for label, shared in (("idle server, a gloo device per group (vLLM as is)", "0"),
                          ("idle server, one shared gloo device (fastgrpo)", "1")):
        server = ServerProcess(["--model", path], Path(tempfile.mkdtemp()) / "server.log",
                               env={"FASTGRPO_SHARED_GLOO_DEVICE": shared})
        try:
            server.wait_ready()
            time.sleep(10)  # past the engine's start-up work
            wakes = sum(wakeups_per_second(pid) for pid in worker_pids(server.proc.pid))
            results.append((label, *time_steps(model, args.rows, args.reps), wakes))
            if shared == "1":
                # The same server frozen: no thread of it runs, its memory stays. What this costs is not the
                # server's activity.
                os.killpg(server.proc.pid, signal.SIGSTOP)
                try:
                    results.append(("the same server frozen (SIGSTOP)", *time_steps(model, args.rows, args.reps), 0))
                finally:
                    os.killpg(server.proc.pid, signal.SIGCONT)
        finally:
            server.stop()
        results.append(("no server", *time_steps(model, args.rows, args.reps), None))
    base = statistics.median(r[1] for r in results if r[3] is None)
    print(f"\nforward+backward, {args.rows} rows x 104 tokens, fp32, torch threads {torch.get_num_threads()}, "
          f"median of {args.reps}  ({' '.join(sys.argv)})\n")
    print("| condition | s per forward+backward | vs no server (median of 3) | trainer preempted /s "
          "| server worker wake-ups/s |")
    print("| --- | --- | --- | --- | --- |")
    for label, seconds, switches, wakes in results:
        print(f"| {label} | {seconds:.2f} | {seconds / base:.2f}x | {switches:.0f} | "
              f"{'' if wakes is None else f'{wakes:.0f}'} |")


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    main()
