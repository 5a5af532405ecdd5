"""Asynchronous GRPO's rules alone: the staleness bound, the producer's order, the look-ahead, the config.

With the real server: pushes during a generation in test_weight_sync.py, async training runs in
test_trainer.py ("Asynchronous rounds").
"""

import threading
import time

import pytest
from test_trainer import base_config

from fastgrpo.config import ConfigError
from fastgrpo.trainer.async_rounds import (RoundProducer, cores_shared_with_server, cpu_cores, first_step, may_start,
                                            staleness, too_stale)
from fastgrpo.trainer.generation import Completions


# --- the bound, and the producer's order (pure) ---------------------------------------------------------


def test_a_round_may_start_once_the_weights_it_will_be_at_most_bound_steps_behind_are_pushed():
    # One optimizer step per round (GA 1), bound 1: round 3 is trained at step 3, starts once step 2 is pushed.
    assert first_step(3, micro_steps_per_round=1, gradient_accumulation_steps=1) == 3
    assert not may_start(3, pushed_version=1, max_staleness=1) and may_start(3, pushed_version=2, max_staleness=1)
    assert not may_start(0, pushed_version=None, max_staleness=5)  # nothing pushed yet: the server's weights are unknown
    # Rounds of 4 micro-steps at GA 2 serve two steps each; rounds of 1 micro-step at GA 2 share one.
    assert [first_step(r, 4, 2) for r in range(3)] == [0, 2, 4]
    assert [first_step(r, 1, 2) for r in range(4)] == [0, 0, 1, 1]
    assert staleness([3, 4, 5], trained_version=5) == [2, 1, 0]
    assert too_stale([3, 4, 5, 6], trained_version=5, max_staleness=1) == [0, 3]  # too old, and from the future


def test_the_cores_a_cpu_server_shares_with_the_trainer():
    assert cpu_cores("0,1,2") == {0, 1, 2} and cpu_cores("0-3") == {0, 1, 2, 3}
    assert cpu_cores("0-1|4-5") == {0, 1, 4, 5} and cpu_cores("") == set()
    health = {"device_type": "cpu", "dp_ranks": [{"devices": "0,1"}, {"devices": "2-3"}]}
    assert cores_shared_with_server(health, {1, 2, 7}) == {1, 2}
    assert cores_shared_with_server(health, {4, 5}) == set()
    # GPU indices are not cores; a server that does not say where it runs shares nothing known.
    assert cores_shared_with_server({**health, "device_type": "gpu"}, {0, 1}) == set()
    assert cores_shared_with_server({"device_type": "cpu", "dp_ranks": [{"devices": None}]}, {0}) == set()


def test_the_producer_generates_each_round_once_in_order_and_only_when_allowed():
    generated, started = [], threading.Event()

    def generate(prompt_ids, index):
        generated.append(index)
        started.set()
        return Completions([[[index]]], [[[0.0]]], 0, [[True]], [[(0, 0)]])

    producer = RoundProducer(inputs_of=lambda r: [[r]], generate=generate, trained_at=lambda r: r, start=2,
                             max_staleness=1)
    try:
        time.sleep(0.2)
        assert generated == []  # nothing pushed: it waits
        producer.pushed(1)  # rounds 2 (trained at 2) may start, not 3
        assert producer.take(2).inputs == [[2]]
        time.sleep(0.2)
        assert generated == [2]
        producer.pushed(2)
        round3 = producer.take(3)
        assert round3.result.token_ids == [[[3]]] and generated == [2, 3]
    finally:
        producer.close()


def test_the_look_ahead_names_the_prompts_the_sampler_gives_epoch_after_epoch():
    from fastgrpo.trainer.sampler import RepeatSampler

    sampler = RepeatSampler(num_rows=10, num_generations=2, prompts_per_batch=3, repeat_count=2, seed=7)
    batches = []
    for epoch in range(3):  # as the Trainer iterates: set_epoch, then the whole epoch
        sampler.set_epoch(epoch)
        order = list(sampler)
        chunk = 3 * 2 * 2  # prompts x generations x repeats
        batches += [order[i : i + chunk : 2][:3] for i in range(0, len(order), chunk)]
    assert len(batches) == 9 and len({tuple(b) for b in batches}) > 1
    assert [sampler.batch_prompts(r) for r in range(9)] == batches


def test_async_generation_fails_at_construction_where_generation_cannot_overlap(tmp_path):
    with pytest.raises(ConfigError, match="async_generation needs a generator on devices of its own"):
        base_config(tmp_path, async_generation=True, use_vllm=True, vllm_mode="colocate")
    with pytest.raises(ConfigError, match="async_generation needs a generator"):
        base_config(tmp_path, async_generation=True, use_vllm=False)
    with pytest.raises(ConfigError, match="vllm_max_weight_staleness=0"):
        base_config(tmp_path, async_generation=True, use_vllm=True, vllm_max_weight_staleness=0)
    assert base_config(tmp_path, async_generation=True, use_vllm=True).vllm_max_weight_staleness == 1
    assert base_config(tmp_path, use_vllm=True).vllm_max_weight_staleness == 0
