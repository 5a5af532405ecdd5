"""Several training processes (`accelerate launch`, gloo) against one process holding every row.

At the sizes where the hang of issue 21 lived: 16 rows per process (cutting a micro-batch into parts starts at
8), completions of 1 to 128 tokens, 2 and 4 processes, several steps. Each layout compares advantages,
gradients and losses step by step with one process (tests/scripts/layouts.py); each launch runs under a
wall-clock limit and a hung rank dumps its stacks, so a hang fails with where every rank waited. The rest of
the matrix (LoRA, async rounds, beta, FSDP2 x4, FSDP2 LoRA and multi-turn, transformers generation, bnpo)
is bench/multiprocess_matrix.py.
"""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

from layouts import GRAD_RTOL, LOSS_RTOL, MATRIX, RAGGED, compare, launch, run_layout  # noqa: E402

IN_SUITE = [
    "ddp, ragged, seed 1, 6 steps",
    "ddp, ragged, seed 2, 6 steps",
    "ddp x4, ragged",
    "ddp, GA 2",
    "ddp, GA 2, a round serves 2 steps",
    "ddp, multi-turn environment",
    "ddp, resume in the middle of a round (vs. uninterrupted)",
    "ddp, eval set every step",
    "fsdp2, beta 0.1 (sharded reference)",
]


@pytest.fixture(scope="module")
def server(server_factory, tiny_qwen2):
    return server_factory(["--model", tiny_qwen2, "--dtype", "float32", "--max-model-len", "256"])


def port_of(server) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


@pytest.mark.slow
@pytest.mark.parametrize("name", IN_SUITE)
def test_processes_with_a_share_each_equal_one_process_with_all(name, server, tiny_qwen2, tmp_path):
    layout = next(m for m in MATRIX if m.name == name)
    row = run_layout(layout, tiny_qwen2, port_of(server), tmp_path, limit_s=600)
    assert row["passed"], {k: v for k, v in row.items() if k != "error"} | {"error": row.get("error", "")[-6000:]}
    if layout.spec is None or "rollouts" not in layout.spec:
        # The sizes where the hang lived: the main process's rows ran from a few tokens to near the limit.
        summary = json.loads((tmp_path / "split" / "summary.json").read_text())
        lengths = [n for round_lengths in summary["lengths"] for n in round_lengths]
        assert min(lengths) <= 4 and max(lengths) >= 96, lengths


@pytest.mark.slow
def test_a_mismatched_collective_fails_in_bounded_time_and_names_the_rank(server, tiny_qwen2, tmp_path):
    """At step 2 rank 1 alone issues one more all-reduce: the run must end within ddp_timeout (plus start and two
    steps), not hang, and the error must name the rank, the step, what it was doing and what to check."""
    spec = {**RAGGED, "model": tiny_qwen2, "port": port_of(server), "steps": 4, "mismatch_at": 2, "ddp_timeout": 20}
    result = launch(spec, 2, tmp_path, limit_s=300)
    assert result.returncode != 0 and not result.hung, result.report()
    assert result.seconds < 150, result.seconds
    message = re.search(r"CollectiveError: rank (\d) of 2: a collective between the training processes failed "
                        r"during (.+?) \(optimizer step (\d+)\)", result.stderr)
    assert message, result.stderr[-6000:]
    assert int(message.group(3)) == 2
    assert "ddp_timeout=20 s" in result.stderr and "TORCH_DISTRIBUTED_DEBUG=DETAIL" in result.stderr


@pytest.mark.slow
def test_a_rank_killed_during_a_push_ends_the_run_in_seconds_and_a_resume_continues_exactly(server, tiny_qwen2,
                                                                                           tmp_path):
    """Rank 1 dies (SIGKILL) while rank 0 pushes step 2's weights: the launch must end within seconds naming the
    rank, the server must serve no mixed weights, and a resume from the last checkpoint (step 1's: step 2's push
    comes before step 2's checkpoint) must train steps 2 and 3 as the uninterrupted run did."""
    spec = {"model": tiny_qwen2, "port": port_of(server), "steps": 3, "save_steps": 1}
    whole = launch(spec, 2, tmp_path / "whole", limit_s=600)
    assert whole.returncode == 0, whole.report()
    killed = launch({**spec, "kill_in_push": 2}, 2, tmp_path / "killed", limit_s=300)
    assert killed.returncode != 0 and not killed.hung, killed.report()
    assert killed.seconds < 150, killed.seconds
    assert re.search(r"rank\s*:\s*1|local_rank: 1", killed.stderr) and "SIGKILL" in killed.stderr, killed.stderr[-4000:]
    assert not (tmp_path / "killed" / "checkpoint-2").exists()
    resumed = launch({**spec, "resume_from": str(tmp_path / "killed" / "checkpoint-1"), "save_steps": None}, 2,
                     tmp_path / "resumed", limit_s=600)
    assert resumed.returncode == 0, resumed.report()
    numbers = compare(whole, resumed, 2, first_step=1, first_round=1, whole_processes=2)
    assert numbers["gradient"] < GRAD_RTOL and numbers["loss"] < LOSS_RTOL and numbers["rewards_equal"], numbers
    # The killed push left no mixed weights behind: after each resumed step the server holds the trainer's.
    assert max(resumed.summary()["probe_gaps"]) < 2e-3


# --- the pieces, without processes ----------------------------------------------------------------------


def ragged_batch(lengths: list[int]) -> dict:
    from fastgrpo.trainer.batching import pad_rows

    rows = len(lengths)
    batch = {"prompt_ids": torch.ones(rows, 5, dtype=torch.long), "prompt_mask": torch.ones(rows, 5, dtype=torch.long),
             "completion_ids": pad_rows([[7] * n for n in lengths], 0),
             "completion_attention": pad_rows([[1] * n for n in lengths], 0),
             "advantages": torch.arange(float(rows))}
    batch["completion_mask"] = batch["completion_attention"].clone()
    return batch


def test_processes_with_different_lengths_agree_on_how_to_cut_each_micro_batch():
    """Two processes' rounds: one ragged (its own best cut is into parts), one uniform (its own best is whole).
    Left to themselves they run different numbers of forwards, the hang of issue 21; with the agreed cost table
    (the maximum over processes, as the trainer gathers it) both cut the same."""
    from fastgrpo.trainer.batching import cut_costs, parts_of, split_round

    ragged = ragged_batch([1, 2, 3, 128, 2, 1, 127, 3, 2, 1, 4, 128, 3, 2, 1, 2])
    uniform = ragged_batch([60] * 16)
    alone = [len(parts_of(split_round(b, 1, 1, max_parts=8)[0][0])) for b in (ragged, uniform)]
    assert alone[0] > 1 and alone[1] == 1  # the local decisions differ

    def costs_of(batch):
        lengths = (batch["prompt_mask"].sum(1), batch["completion_attention"].sum(1))
        return cut_costs(*lengths, None, 1.0, 8)[None]

    table = torch.maximum(costs_of(ragged), costs_of(uniform))
    agreed = [len(parts_of(split_round(b, 1, 1, max_parts=8, agree=lambda _: table)[0][0])) for b in (ragged, uniform)]
    assert agreed[0] == agreed[1]


def test_a_collective_failure_is_recognised_and_explained():
    from fastgrpo.trainer.collectives import CollectiveError, explain, is_collective_failure

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for "
                        "recv operation to complete")
    assert is_collective_failure(gloo)
    try:
        try:
            raise gloo
        except RuntimeError as exc:
            raise ValueError("wrapped") from exc
    except ValueError as wrapped:
        assert is_collective_failure(wrapped)
    assert not is_collective_failure(ValueError("reward function failed"))
    assert not is_collective_failure(RuntimeError("the server timed out"))  # not from torch's backends
    error = explain(gloo, 1, 4, "generation round 3", 5, 3600)
    assert isinstance(error, CollectiveError) and not is_collective_failure(error)
    assert str(error).startswith("rank 1 of 4: a collective between the training processes failed during "
                                 "generation round 3 (optimizer step 5)")
    assert "ddp_timeout=3600 s" in str(error) and "TORCH_DISTRIBUTED_DEBUG=DETAIL" in str(error)


def test_processes_launched_together_that_accelerate_set_up_alone_are_refused(monkeypatch):
    """`accelerate launch --num_processes 2` on a CPU machine without use_cpu: accelerate sets each process up
    alone (seen with the examples), and both would train and push as the main process. Refused, naming
    use_cpu; a process launched alone, or one that accelerate joined to the others, passes."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from fastgrpo.trainer.sharding import check_layout

    def accelerator(processes, kind):
        return SimpleNamespace(num_processes=processes, distributed_type=kind, is_fsdp2=False)

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"one of 2 \(WORLD_SIZE=2\).*use_cpu=True"):
        check_layout(accelerator(1, DistributedType.NO), merged_lora=False, local_multi_turn=False)
    check_layout(accelerator(2, DistributedType.MULTI_CPU), merged_lora=False, local_multi_turn=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_layout(accelerator(1, DistributedType.NO), merged_lora=False, local_multi_turn=False)


def test_sharded_layouts_that_cannot_work_are_refused_naming_the_fix():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from fastgrpo.trainer.sharding import check_layout

    def accelerator(kind, fsdp2=False):
        return SimpleNamespace(distributed_type=kind, is_fsdp2=fsdp2, state=SimpleNamespace(deepspeed_plugin=None))

    with pytest.raises(ValueError, match="FSDP1 is not supported.*fsdp_version 2"):
        check_layout(accelerator(DistributedType.FSDP), merged_lora=False, local_multi_turn=False)
    fsdp2 = accelerator(DistributedType.FSDP, fsdp2=True)
    check_layout(fsdp2, merged_lora=False, local_multi_turn=False)
    with pytest.raises(ValueError, match="merge it into the base, which is sharded"):
        check_layout(fsdp2, merged_lora=True, local_multi_turn=False)
    with pytest.raises(ValueError, match="use_vllm=False are not supported under FSDP2"):
        check_layout(fsdp2, merged_lora=False, local_multi_turn=True)
    check_layout(accelerator(DistributedType.MULTI_CPU), merged_lora=True, local_multi_turn=True)  # DDP: fine
    with pytest.MonkeyPatch.context() as patch:  # `accelerate launch --use_fsdp` on a CPU runs DDP instead
        patch.setenv("ACCELERATE_USE_FSDP", "true")
        with pytest.raises(ValueError, match="launched with FSDP, but it runs MULTI_CPU"):
            check_layout(accelerator(DistributedType.MULTI_CPU), merged_lora=False, local_multi_turn=False)
