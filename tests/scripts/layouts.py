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


def compare(whole: Launch, split: Launch, processes: int, first_step: int = 0, first_round: int = 0,
            whole_processes: int = 1) -> dict:
    """Step by step, the split run against the whole one: the largest advantage difference, gradient relative
    difference and loss relative difference (a resumed run starts at `first_step` and `first_round`)."""
    ranks = [torch.load(whole.out / f"advantages_{rank}.pt") for rank in range(whole_processes)]
    adv_whole = [torch.cat([r[i] for r in ranks]) for i in range(len(ranks[0]))]
    adv_split = [torch.load(split.out / f"advantages_{rank}.pt") for rank in range(processes)]
    advantage = max((torch.cat([a[r] for a in adv_split]) - adv_whole[first_round + r]).abs().max().item()
                    for r in range(len(adv_split[0])))
    grads_whole, grads_split = torch.load(whole.out / "gradients.pt"), torch.load(split.out / "gradients.pt")
    gradient = max(relative_difference(g, grads_whole[first_step + i]) for i, g in enumerate(grads_split))
    logs_whole = {h["step"]: h for h in whole.summary()["logs"] if "loss" in h}
    pairs = [(logs_whole[h["step"]], h) for h in split.summary()["logs"] if "loss" in h and h["step"] > first_step]
    # On-policy the loss is about 0 (advantages centre within each group): relative to at least 1e-3.
    loss = max(abs(b["loss"] - a["loss"]) / max(abs(a["loss"]), 1e-3) for a, b in pairs)
    return {"advantage": advantage, "gradient": gradient, "loss": loss,
            "rewards_equal": all(a.get("reward") == b["reward"] for a, b in pairs if "reward" in b)
            and len(pairs) == len(grads_split)}


# The shape: 16 rows per process, groups of 8, completions of 1 to 128 tokens (12 stop ids of the
# tiny vocabulary of 384 at temperature 1.5 end about one token in 30).
RAGGED = dict(per_device=16, num_generations=8, max_completion_length=128, stops=12, temperature=1.5, steps=3, seed=1)


@dataclass
class Layout:
    """One row of the matrix: `spec` on `processes` processes against one process with all their rows."""

    name: str
    processes: int = 2
    fsdp: bool = False
    spec: dict = None
    exact: bool = True  # whether the split run must equal the whole one (False: it must finish)
    lora_server: bool = False
    # The split run resumes from its own checkpoint of this step and is compared with itself uninterrupted
    # (a round that serves several steps deals rows per process: one process would deal them otherwise).
    resume_at: int | None = None
    why_not_exact: str = ""

    def specs(self) -> tuple[dict, dict]:
        """(the whole run's spec, the split run's spec)."""
        split = {**RAGGED, **(self.spec or {})}
        whole = {**split, "per_device": split["per_device"] * self.processes}
        if split.get("eval"):  # the same global eval batch
            whole["eval_per_device"] = split.get("eval_per_device", 4) * self.processes
        return whole, split


MATRIX = [
    Layout("ddp, ragged, seed 1, 6 steps", spec={"steps": 6, "seed": 1}),
    Layout("ddp, ragged, seed 2, 6 steps", spec={"steps": 6, "seed": 2}),
    Layout("ddp x4, ragged", processes=4),
    Layout("ddp, GA 2", spec={"ga": 2, "per_device": 8}),
    Layout("ddp, GA 2, a round serves 2 steps", spec={"ga": 2, "steps_per_generation": 4, "per_device": 8},
           exact=False, why_not_exact="each process deals its own rows to the round's steps"),
    Layout("ddp, multi-turn environment", spec={"rollouts": "environment"}),
    Layout("ddp, LoRA (adapter-only pushes)", spec={"lora": True}, lora_server=True),
    Layout("ddp, eval set every step", spec={"eval": True}),
    Layout("ddp, beta 0.1 (reference model)", spec={"beta": 0.1}),
    Layout("ddp, resume in the middle of a round (vs. uninterrupted)",
           spec={"steps_per_generation": 2, "save_steps": 1, "steps": 3}, resume_at=1),
    Layout("ddp, async rounds", spec={"async_": True}, exact=False,
           why_not_exact="which weights generate a round ahead depends on timing"),
    Layout("ddp, bnpo + entropy mask, GA 2", spec={"loss_type": "bnpo", "top_entropy_quantile": 0.5, "ga": 2,
                                                   "per_device": 8}, exact=False,
           why_not_exact="normalised per micro-batch and process, as in TRL"),
    Layout("fsdp2, ragged", fsdp=True),
    Layout("fsdp2 x4, ragged", processes=4, fsdp=True),
    Layout("fsdp2, beta 0.1 (sharded reference)", fsdp=True, spec={"beta": 0.1}),
    Layout("fsdp2, LoRA (adapter-only pushes)", fsdp=True, spec={"lora": True}, lora_server=True),
    Layout("fsdp2, multi-turn environment", fsdp=True, spec={"rollouts": "environment"}),
    Layout("fsdp2, transformers generation", fsdp=True, exact=False,
           spec={"use_vllm": False, "max_completion_length": 24, "per_device": 8},
           why_not_exact="transformers samples a process's rows with one seed"),
]


def run_layout(layout: Layout, model: str, port: int, folder: Path, limit_s: float = 900) -> dict:
    """Both runs of a layout and their comparison: a row of the matrix."""
    whole_spec, split_spec = layout.specs()
    common = {"model": model, "port": port}
    row = {"layout": layout.name, "processes": layout.processes, "rows_per_process": split_spec["per_device"]}
    whole = None
    if layout.exact and layout.resume_at is None:
        whole = launch({**common, **whole_spec}, 1, folder / "whole", limit_s=limit_s)
    split = launch({**common, **split_spec}, layout.processes, folder / "split", fsdp=layout.fsdp, limit_s=limit_s)
    first_step = first_round = 0
    whole_processes = 1
    if layout.resume_at is not None and split.returncode == 0:
        checkpoint = folder / "split" / f"checkpoint-{layout.resume_at}"
        whole, whole_processes = split, layout.processes
        split = launch({**common, **split_spec, "resume_from": str(checkpoint), "save_steps": None},
                       layout.processes, folder / "resumed", fsdp=layout.fsdp, limit_s=limit_s)
        first_step, first_round = layout.resume_at, 1
    row["seconds"] = split.seconds
    row["hung"] = split.hung
    if split.returncode != 0 or (whole is not None and whole.returncode != 0):
        row["error"] = (split if split.returncode else whole).report()
        row["passed"] = False
        return row
    row["steps"] = split.summary()["global_step"] - first_step
    if whole is None:
        row["passed"] = True
        return row
    row.update(compare(whole, split, layout.processes, first_step, first_round, whole_processes))
    if split_spec.get("eval"):  # evaluated after every step, on the same global eval batches
        evals = [[h["eval_reward"] for h in run.summary()["logs"] if "eval_reward" in h] for run in (whole, split)]
        row["rewards_equal"] &= len(evals[1]) == row["steps"] and evals[0] == evals[1]
    row["passed"] = (row["advantage"] < 1e-6 and row["gradient"] < GRAD_RTOL and row["loss"] < LOSS_RTOL
                     and row["rewards_equal"])
    return row
