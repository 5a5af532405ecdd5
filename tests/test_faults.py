"""Faults injected into real runs: the server killed in the middle of an async round, the server frozen
(SIGSTOP) past the timeouts, the disk filling up during a checkpoint. Each must end the run within seconds with a message naming the cause, never a hang
and never training on wrong weights; a run resumed afterwards goes on from its checkpoint.

Elsewhere: a push with another trainer's group id (test_server_hardening.py), an agent call naming a model the
server does not serve (test_vllm_api.py), a push that breaks half-way (test_trainer.py, test_weight_sync.py).
"""

import os
import signal
import subprocess
import time

import pytest
from test_trainer import LOSS_RTOL, base_config, reward_digits, tiny_dataset
from transformers import TrainerCallback

from fastgrpo import GRPOTrainer
from fastgrpo.serve.launcher import ServerProcess

pytestmark = pytest.mark.slow


class AtStepEnd(TrainerCallback):
    def __init__(self, step: int, action):
        self.step, self.action = step, action

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.action()


def server_args(tiny_qwen2) -> list[str]:
    return ["--model", tiny_qwen2, "--dtype", "float32", "--max-model-len", "256"]


def run(tmp_path, tiny_qwen2, port, out, callback=None, resume=False, **overrides):
    config = base_config(tmp_path, use_vllm=True, vllm_server_host="127.0.0.1", vllm_server_port=port,
                         output_dir=str(out), max_steps=4, save_strategy="steps", save_steps=1, **overrides)
    trainer = GRPOTrainer(tiny_qwen2, reward_digits, args=config, train_dataset=tiny_dataset(3))
    if callback is not None:
        trainer.add_callback(callback)
    try:
        trainer.train(resume_from_checkpoint=resume or None)
    finally:
        trainer.close()
    return {h["step"]: h for h in trainer.state.log_history if "loss" in h}


def test_a_server_killed_mid_async_round_ends_the_run_naming_it_and_a_resume_continues_exactly(
        transient_server_factory, tiny_qwen2, tmp_path):
    server = transient_server_factory(server_args(tiny_qwen2))
    port = server.port
    # Async rounds: after step 2 the producer is generating round 3 (or about to) when the server dies.
    killed = {}

    def kill():
        os.killpg(server.proc.pid, signal.SIGKILL)
        killed["at"] = time.monotonic()

    with pytest.raises(Exception) as error:
        run(tmp_path, tiny_qwen2, port, tmp_path / "split", AtStepEnd(2, kill), async_generation=True,
            vllm_server_timeout=5)
    waited = time.monotonic() - killed["at"]
    message = str(error.value) + str(error.value.__cause__)
    assert f"127.0.0.1:{port}" in message and ("not ready within 5 s" in message or "cannot connect" in message)
    assert waited < 45, waited  # the retries' waits (5 s each), not a hang
    # A new server on the same port: the resumed run pushes its checkpoint's weights and trains steps 3 and 4 on
    # rounds of those weights (an async run's staleness depends on timing, so exactness against an uninterrupted
    # run is tested in sync mode: test_trainer.py's resume test).
    server.stop()
    with ServerProcess(server_args(tiny_qwen2), tmp_path / "second.log", port=port) as second:
        second.wait_ready()
        resumed = run(tmp_path, tiny_qwen2, port, tmp_path / "split", resume=True, async_generation=True)
        assert second.wait_ready()["weight_version"] == 4  # the trainer's last weights reached the new server
    assert sorted(resumed) == [1, 2, 3, 4]
    assert resumed[3]["async/staleness_max"] == 0  # the first round after the resume: the checkpoint's weights
    assert resumed[4]["async/staleness_max"] <= 1 and resumed[4]["loss"] == resumed[4]["loss"]


def test_a_frozen_server_fails_the_run_after_the_timeouts_naming_them(transient_server_factory, tiny_qwen2,
                                                                      tmp_path):
    server = transient_server_factory(server_args(tiny_qwen2))
    frozen = {}

    def freeze():
        os.killpg(server.proc.pid, signal.SIGSTOP)
        frozen["at"] = time.monotonic()

    try:
        with pytest.raises(Exception) as error:
            run(tmp_path, tiny_qwen2, server.port, tmp_path / "out", AtStepEnd(1, freeze), vllm_generation_timeout=3)
        waited = time.monotonic() - frozen["at"]
    finally:
        os.killpg(server.proc.pid, signal.SIGCONT)
    message = str(error.value) + str(error.value.__cause__)
    # Step 2 begins with its push: each attempt's request gets no answer within vllm_generation_timeout.
    assert "no answer within 3 s" in message and "vllm_generation_timeout" in message, message
    assert waited < 60, waited


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs (a real full disk: ENOSPC), where this machine lets the tests mount one."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}): the full-disk test needs one")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_disk_that_fills_during_a_checkpoint_fails_naming_it_and_a_resume_continues_exactly(
        server_factory, tiny_qwen2, tmp_path, small_disk):
    server = server_factory(server_args(tiny_qwen2))
    filler = small_disk / "filler"

    def fill_the_disk():  # after checkpoint-1: what is left of the disk goes, so checkpoint-2 cannot be written
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
            except OSError:
                pass

    class AfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 1:
                fill_the_disk()

    began = time.monotonic()
    with pytest.raises(Exception, match="No space left on device") as error:
        run(tmp_path, tiny_qwen2, server.port, small_disk / "split", AfterSave())
    assert "checkpoint-2" in str(error.value) and "checkpoint-1" in str(error.value)
    assert time.monotonic() - began < 120
    assert sorted(p.name for p in small_disk.joinpath("split").glob("checkpoint-*")) == ["checkpoint-1"]
    filler.unlink()  # space again: the resume starts from checkpoint-1 and trains as the uninterrupted run
    resumed = run(tmp_path, tiny_qwen2, server.port, small_disk / "split", resume=True)
    full = run(tmp_path, tiny_qwen2, server.port, tmp_path / "full")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (2, 3, 4):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=LOSS_RTOL, abs=1e-7), step
        assert resumed[step]["grad_norm"] == pytest.approx(full[step]["grad_norm"], rel=LOSS_RTOL), step
