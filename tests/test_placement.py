"""The demo's choice of devices (fastgrpo.placement): the rule, and the spec it gives the demo."""

import pytest

from fastgrpo.placement import SHARED_GPU_SERVER_MEMORY, Placement, PlacementError, choose_placement
from fastgrpo.run import demo_spec


def test_no_gpu_runs_both_on_the_cpu_with_bf16_only_where_the_cpu_has_a_unit():
    assert choose_placement([], vllm_cpu_build=True, gpu_bf16=False, cpu_bf16=False) == Placement("cpu", None, False)
    assert choose_placement([], vllm_cpu_build=True, gpu_bf16=False, cpu_bf16=True).bf16 is True


def test_two_or_more_gpus_put_server_and_trainer_on_different_ones():
    for gpus in (["0", "1"], ["4", "5", "6", "7"]):
        p = choose_placement(gpus, vllm_cpu_build=False, gpu_bf16=True, cpu_bf16=False)
        assert (p.server_gpus, p.trainer_device, p.shares_gpu) == (gpus[0], "cuda:1", False)
        assert p.server_gpu_memory_utilization is None  # the server's GPU is its own: its default 0.9
        assert p.bf16 is True


def test_one_gpu_is_shared_with_a_memory_share_for_the_server():
    p = choose_placement(["3"], vllm_cpu_build=False, gpu_bf16=True, cpu_bf16=True)
    assert (p.server_gpus, p.trainer_device, p.shares_gpu) == ("3", "cuda:0", True)
    assert p.server_gpu_memory_utilization == SHARED_GPU_SERVER_MEMORY


def test_bf16_follows_the_gpu_not_the_cpu_when_training_on_a_gpu():
    # A GPU without fast bf16 (a T4, a V100) trains in float32 even if the host CPU has AMX.
    assert choose_placement(["0"], vllm_cpu_build=False, gpu_bf16=False, cpu_bf16=True).bf16 is False


def test_cuda_vllm_without_a_visible_gpu_says_how_to_fix_it():
    with pytest.raises(PlacementError, match="CUDA_VISIBLE_DEVICES.*CPU build"):
        choose_placement([], vllm_cpu_build=False, gpu_bf16=False, cpu_bf16=False)


def test_cpu_vllm_beside_a_gpu_trains_on_the_gpu_and_serves_on_the_cpu():
    p = choose_placement(["0"], vllm_cpu_build=True, gpu_bf16=True, cpu_bf16=False)
    assert (p.server_gpus, p.trainer_device, p.shares_gpu) == (None, "cuda:0", False)


def test_demo_spec_carries_the_placement_to_the_server_and_the_trainer():
    cpu = demo_spec(choose_placement([], True, False, False))
    assert cpu["use_cpu"] is True and cpu["bf16"] is False
    assert cpu["start_server"] == {"max_model_len": 512, "kv_cache_space": 1}

    two = demo_spec(choose_placement(["0", "1"], False, True, False))
    assert two["use_cpu"] is False and two["bf16"] is True
    assert two["start_server"] == {"max_model_len": 512, "devices": "0"}  # no CPU-only flag on a GPU server

    one = demo_spec(choose_placement(["0"], False, True, False))
    assert one["start_server"] == {"max_model_len": 512, "devices": "0", "weight_transfer_backend": "ipc",
                                   "gpu_memory_utilization": SHARED_GPU_SERVER_MEMORY}
