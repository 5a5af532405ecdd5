"""Launch train_layout.py as one process or N (accelerate launch, gloo), and compare their records.

Used by tests/test_multiprocess.py and bench/multiprocess_matrix.py. A launch runs under a wall-clock
limit; a rank that waits too long dumps its threads' stacks first (train_layout.py), so a hang comes back
as a failure that says which rank waited where.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("train_layout.py")

# The trainer computes in float32. Two layouts of the same rows pad and sum in another order, which moves
# logits by about 1e-6 relative; gradients are compared by the norm of their difference against this share
# of their norm, losses relative to their size. The bugs guarded against are factors or other samples.
GRAD_RTOL = 1e-4
LOSS_RTOL = 1e-4


@dataclass
class Launch:
    returncode: int
    seconds: float
    stderr: str
    out: Path

    @property
    def hung(self) -> bool:
        return self.returncode in (-signal.SIGKILL, 124) or bool(self.stacks())

    def stacks(self) -> str:
        """Where each rank waited, if it dumped its stacks (a hang): the innermost frames of each thread."""
        parts = []
        for path in sorted(self.out.glob("stacks_*.txt")):
            text = path.read_text().strip()
            if text:
                parts.append(f"--- rank {path.stem.split('_')[1]} ---\n{text[:3000]}")
        return "\n".join(parts)

    def report(self) -> str:
        return f"exit {self.returncode} after {self.seconds:.0f} s\n{self.stacks()}\n{self.stderr[-4000:]}"

    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict, processes: int, out: Path, fsdp: bool = False, limit_s: float = 900) -> Launch:
    """Run train_layout.py with `spec` on `processes` processes (FSDP2 with `fsdp`); wait at most limit_s."""
    out.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "out": str(out), "hang_after": spec.get("hang_after", limit_s - 30)}
    argv = [str(SCRIPT), json.dumps(spec)]
    if processes > 1 or fsdp:
        flags = ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no", "--main_process_port", str(free_port())]
        if fsdp:
            flags += ["--use_fsdp", "--fsdp_version", "2", "--fsdp_reshard_after_forward", "true",
                      "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]
        else:
            flags += ["--multi_gpu"]  # torchrun-style; use_cpu=True in the config makes it gloo
        argv = ["-m", "accelerate.commands.launch", *flags, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    began = time.perf_counter()
    process = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=limit_s)
        code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        code = 124
    return Launch(code, time.perf_counter() - began, stderr, out)


def relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    diff = sum((a[k] - b[k]).double().pow(2).sum() for k in a).sqrt()
    return (diff / sum(b[k].double().pow(2).sum() for k in b).sqrt()).item()


def compare(whole: Launch, split: Launch, processes: int, first_step: int = 0, first_round: int = 0) -> dict:
    """Step by step, the split run against the whole one: the largest advantage difference, gradient relative
    difference and loss relative difference (a resumed run starts at `first_step` and `first_round`)."""
    adv_whole = torch.load(whole.out / "advantages_0.pt")
    adv_split = [torch.load(split.out / f"advantages_{rank}.pt") for rank in range(processes)]
    advantage = max((torch.cat([a[r] for a in adv_split]) - adv_whole[first_round + r]).abs().max().item()
                    for r in range(len(adv_split[0])))
    grads_whole, grads_split = torch.load(whole.out / "gradients.pt"), torch.load(split.out / "gradients.pt")
    gradient = max(relative_difference(g, grads_whole[first_step + i]) for i, g in enumerate(grads_split))
    logs_whole = [h for h in whole.summary()["logs"] if "loss" in h][first_step:]
    logs_split = [h for h in split.summary()["logs"] if "loss" in h]
    loss = max(abs(b["loss"] - a["loss"]) / max(abs(a["loss"]), 1e-3) for a, b in zip(logs_whole, logs_split))
    return {"steps": len(grads_split), "advantage": advantage, "gradient": gradient, "loss": loss,
            "rewards_equal": all(a["reward"] == b["reward"] for a, b in zip(logs_whole, logs_split))}
