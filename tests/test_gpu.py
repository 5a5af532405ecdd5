"""CUDA paths on a real GPU: `pytest -m gpu` (scripts/gpu/ runs them on a lent machine). Skipped without one.

One GPU is enough: the server shares the trainer's GPU and weights go over CUDA IPC
(NCCL refuses two ranks on one device), and colocate mode runs its engine there too.
Server mode over NCCL on separate GPUs needs two and is not tested here.

Tolerances: both sides compute in float32 unless a test says otherwise; vLLM's GPU
attention and matmul kernels differ from transformers' (and may use TF32), so a
push is exact when the probe's logprobs agree within GPU_TOL, far below what a
training step or the 0.05 perturbation moves them (> 1e-4 and > 0.1).
"""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastgrpo import GRPOConfig, GRPOTrainer
from test_trainer import ProbeCallback, reward_digits, reward_length, tiny_dataset
from test_weight_sync import FailingWeights


def _vllm_on_gpu() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from fastgrpo.engine import on_cpu

        return not on_cpu()
    except ImportError:
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not _vllm_on_gpu(), reason="needs a CUDA GPU and vLLM's CUDA build")]

GPU_TOL = 1e-2
PROBE = "What is 12 + 35? The answer is 47."
KEY = "gpu-tests"  # an IPC server needs an API key: its engines unpickle what a push sends


@pytest.fixture(scope="module")
def ipc_server(server_factory, tiny_qwen2):
    """A server on the trainer's own GPU, taking a small share of its memory."""
    return server_factory(["--model", tiny_qwen2, "--dtype", "float32", "--max-model-len", "256",
                           "--weight-transfer-backend", "ipc", "--gpu-memory-utilization", "0.15", "--api-key", KEY])


@pytest.fixture(scope="module")
def probe_ids(tiny_qwen2):
    return AutoTokenizer.from_pretrained(tiny_qwen2)(PROBE)["input_ids"]


def perturbed_on_gpu(path: str, seed: int) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def hf_logprobs(model, ids) -> list[float]:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids], device="cuda")).logits[0].float(), dim=-1)
    return [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def server_logprobs(client, ids) -> list[float]:
    return client.generate(prompt_token_ids=[ids], max_tokens=1, prompt_logprobs=True).results[0].prompt_logprobs[1:]


def gap(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def gpu_config(tmp_path, **overrides) -> GRPOConfig:
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                    num_generations=4, max_completion_length=16, max_prompt_length=64, learning_rate=5e-3,
                    max_steps=3, logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=False,
                    bf16=False, dataloader_num_workers=0, disable_tqdm=True, temperature=1.0, use_vllm=True)
    settings.update(overrides)
    return GRPOConfig(**settings)


def test_an_ipc_push_to_a_server_on_the_trainers_gpu_is_exact_in_any_order(ipc_server, tiny_qwen2, probe_ids):
    from fastgrpo.client import VLLMClient
    from fastgrpo.transfer import WeightTransferError

    with VLLMClient(base_url=ipc_server.base_url, weight_transfer_timeout=60, api_key=KEY) as client:
        assert client.health()["weight_transfer_backend"] == "ipc"
        for seed in (1, 2):
            model = perturbed_on_gpu(tiny_qwen2, seed)
            expected = hf_logprobs(model, probe_ids)
            named = [(n, p.detach()) for n, p in model.named_parameters()]
            random.Random(seed).shuffle(named)
            client.update_weights(named)
            assert gap(server_logprobs(client, probe_ids), expected) < GPU_TOL, seed
        # The whole model is one part (32 MiB bucket): a push whose tensors break half-way fails while packing it,
        # before the server sees any, and the next one lands whole.
        with pytest.raises(WeightTransferError, match="first part .*broke half-way"):
            client.update_weights(FailingWeights(named, fail_after=3))
        model = perturbed_on_gpu(tiny_qwen2, 3)
        client.update_weights(model)
        assert gap(server_logprobs(client, probe_ids), hf_logprobs(model, probe_ids)) < GPU_TOL


def test_an_ipc_push_in_parts_is_exact_and_the_trainer_holds_one_buffer_not_a_copy_of_the_model(
        ipc_server, tiny_qwen2, probe_ids):
    """48 KiB buckets: parts of the largest tensor (the embedding, 196 kB in float32) in a model of 1.4 MB. The
    trainer's extra GPU memory during the push is that one buffer (before parts it was a copy of every tensor)."""
    from fastgrpo.client import VLLMClient
    from fastgrpo.transfer import NamedWeights, WeightTransferError
    from fastgrpo.transfer.packing import part_capacity, plan_parts

    with VLLMClient(base_url=ipc_server.base_url, weight_transfer_timeout=60, api_key=KEY,
                    bucket_bytes=48 << 10) as client:
        model = perturbed_on_gpu(tiny_qwen2, 4)
        named = [(n, p.detach()) for n, p in model.named_parameters()]
        metas = NamedWeights(named).metas(torch.float32)
        assert len(plan_parts(metas, 48 << 10)) > 5
        client.update_weights({"model.norm.weight": model.model.norm.weight.detach()})  # opens the group
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        client.update_weights(named)
        extra = torch.cuda.max_memory_allocated() - before
        capacity, model_bytes = part_capacity(metas, 48 << 10), sum(m.nbytes for m in metas)
        assert extra <= capacity + (64 << 10) and extra < model_bytes / 4, (extra, capacity, model_bytes)
        assert gap(server_logprobs(client, probe_ids), hf_logprobs(model, probe_ids)) < GPU_TOL
        # Broken after some parts loaded: generation is refused until a whole push lands, which is exact.
        with pytest.raises(WeightTransferError, match=r"part \d+ of \d+ of the push failed .*broke half-way"):
            client.update_weights(FailingWeights(named, fail_after=len(named) // 2))
        assert client.health()["weights_consistent"] is False
        model = perturbed_on_gpu(tiny_qwen2, 5)
        client.update_weights(model)
        assert gap(server_logprobs(client, probe_ids), hf_logprobs(model, probe_ids)) < GPU_TOL


def test_server_mode_on_one_gpu_trains_and_keeps_the_servers_weights_equal(ipc_server, tiny_qwen2, tmp_path,
                                                                           probe_ids):
    from fastgrpo.client import VLLMClient

    port = int(ipc_server.base_url.rsplit(":", 1)[1])
    config = gpu_config(tmp_path, vllm_mode="server", vllm_server_host="127.0.0.1", vllm_server_port=port,
                        vllm_server_api_key=KEY,
                        model_init_kwargs={"dtype": torch.float32})
    trainer = GRPOTrainer(tiny_qwen2, [reward_digits, reward_length], args=config, train_dataset=tiny_dataset())
    assert trainer.accelerator.device.type == "cuda"
    observer = VLLMClient(base_url=ipc_server.base_url, api_key=KEY)
    probe_cb = ProbeCallback(trainer, probe_ids, lambda ids: server_logprobs(observer, ids))
    trainer.add_callback(probe_cb)
    try:
        trainer.train()
    finally:
        trainer.close()
    assert trainer.state.global_step == 3
    assert len(probe_cb.gaps) == 3 and max(probe_cb.gaps) < GPU_TOL, probe_cb.gaps
    assert min(probe_cb.changes) > 1e-4  # the model really moved each step


def test_colocate_on_a_gpu_pushes_over_ipc_and_sleeps_while_training(tiny_qwen2, tmp_path, probe_ids):
    config = gpu_config(tmp_path, vllm_mode="colocate", vllm_max_model_len=256, vllm_gpu_memory_utilization=0.15,
                        vllm_enable_sleep_mode=True, model_init_kwargs={"dtype": torch.float32})
    trainer = GRPOTrainer(tiny_qwen2, [reward_digits, reward_length], args=config, train_dataset=tiny_dataset())
    assert trainer.backend.sender.backend == "ipc"

    def engine_logprobs(ids):
        from vllm import SamplingParams

        trainer.backend._wake("weights", "kv_cache")
        out = trainer.backend.llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                           use_tqdm=False)[0]
        return [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])]

    free_while_asleep = []
    real_generate = trainer.backend.generate

    def generate_then_measure(*args, **kwargs):
        result = real_generate(*args, **kwargs)
        free_while_asleep.append(torch.cuda.mem_get_info()[0])
        return result

    trainer.backend.generate = generate_then_measure
    probe_cb = ProbeCallback(trainer, probe_ids, engine_logprobs)
    trainer.add_callback(probe_cb)
    free_before = torch.cuda.mem_get_info()[0]
    try:
        trainer.train()
    finally:
        trainer.close()
    assert trainer.state.global_step == 3
    assert max(probe_cb.gaps) < GPU_TOL, probe_cb.gaps
    assert min(probe_cb.changes) > 1e-4
    # Asleep, the engine gives back (most of) the KV cache it took: 15% of the GPU.
    total = torch.cuda.mem_get_info()[1]
    assert min(free_while_asleep) > free_before + 0.05 * total, (free_before, free_while_asleep, total)


def test_bf16_training_on_a_gpu_pushes_bf16_weights_that_match_within_their_rounding(tiny_qwen2, tmp_path,
                                                                                    server_factory, probe_ids):
    from fastgrpo.client import VLLMClient

    server = server_factory(["--model", tiny_qwen2, "--dtype", "bfloat16", "--max-model-len", "256",
                             "--weight-transfer-backend", "ipc", "--gpu-memory-utilization", "0.15", "--api-key", KEY])
    port = int(server.base_url.rsplit(":", 1)[1])
    config = gpu_config(tmp_path, bf16=True, vllm_mode="server", vllm_server_host="127.0.0.1", vllm_server_port=port,
                        vllm_server_api_key=KEY)
    trainer = GRPOTrainer(tiny_qwen2, [reward_digits, reward_length], args=config, train_dataset=tiny_dataset())
    assert trainer.args.bf16 and next(trainer.model.parameters()).dtype == torch.float32  # master weights
    observer = VLLMClient(base_url=server.base_url, api_key=KEY)
    assert observer.health()["dtype"] == "bfloat16"
    probe_cb = ProbeCallback(trainer, probe_ids, lambda ids: server_logprobs(observer, ids))
    trainer.add_callback(probe_cb)
    try:
        trainer.train()
    finally:
        trainer.close()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    # The server holds the float32 weights rounded to bf16 (a relative 2^-8 per weight): on the tiny model the
    # probe moves by a few hundredths at most, well under a step's change at this learning rate.
    assert max(probe_cb.gaps) < 0.1, probe_cb.gaps
    assert min(probe_cb.changes) > 1e-4
