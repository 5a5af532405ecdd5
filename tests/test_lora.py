"""LoRA (peft_config) on the real server and in colocate mode, on the tiny model: adapter-only pushes.

Tolerance: trainer and server compute in float32, the adapter travels in float32 and
vLLM's CPU LoRA kernels add B @ A x as peft does: probe logprobs agreed to 5e-7 when this
was built; PROBE_TOL (from test_trainer) is 2e-3, and a LoRA step at lr 5e-3 moves the
probe by more than 1e-3 (asserted), a wrong or missing adapter by far more.
"""

import math
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastgrpo import GRPOTrainer
from fastgrpo.client import ServerError, VLLMClient
from fastgrpo.trainer.lora import adapter_config, adapter_tensors
from test_trainer import PROBE_TOL, ProbeCallback, StopAt, base_config, reward_digits, reward_length, tiny_dataset

pytestmark = pytest.mark.slow
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROBE = "What is 12 + 35? The answer is 47."
# An adapter whose owner pushed nothing this long may be taken over (the server's --adapter_lease; 600 by default).
LEASE_S = 3
COLOCATE_TOL = 0.1  # bf16 engine against float32 trainer (see the colocate test)


def lora_config(**overrides) -> LoraConfig:
    return LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": TARGETS, "lora_dropout": 0.0, **overrides})


@pytest.fixture(scope="module")
def server(server_factory, tiny_qwen2):
    # DP=2: an adapter must reach both of vLLM's DP ranks (served() reads the probe from each).
    return server_factory(["--model", tiny_qwen2, "--dtype", "float32", "--max-model-len", "256", "--enable-lora",
                           "--max-lora-rank", "8", "--data-parallel-size", "2", "--adapter-lease", str(LEASE_S)])


@pytest.fixture(scope="module")
def probe_ids(tiny_qwen2):
    return AutoTokenizer.from_pretrained(tiny_qwen2)(PROBE)["input_ids"]


@pytest.fixture(scope="module")
def base_logprobs(tiny_qwen2, probe_ids):
    return hf_logprobs(AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32), probe_ids)


def hf_logprobs(model, ids) -> list[float]:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def served(client, ids, adapter=None) -> list[float]:
    """The probe's prompt logprobs, read on both DP ranks (two copies go one to each), which must agree."""
    results = client.generate(prompt_token_ids=[ids, ids], max_tokens=1, prompt_logprobs=True,
                              adapter=adapter).results
    assert {r.completions[0].dp_rank for r in results} == {0, 1}
    first, second = (r.prompt_logprobs[1:] for r in results)
    assert gap(first, second) < 1e-5, "the DP ranks serve different weights"
    return first


def gap(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def random_adapter(path: str, seed: int):
    """A peft model whose adapter is random (B is zero at init, which would change nothing)."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), lora_config())
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    return model


def lora_config_for_run(tmp_path, server, **overrides):
    port = int(server.base_url.rsplit(":", 1)[1])
    return base_config(tmp_path, use_vllm=True, vllm_server_port=port, vllm_server_host="127.0.0.1", **overrides)


def test_three_lora_steps_push_only_the_adapter_and_the_server_samples_with_it(server, tiny_qwen2, probe_ids,
                                                                              base_logprobs, tmp_path):
    config = lora_config_for_run(tmp_path, server, vllm_lora_name="run-main", beta=0.04)
    trainer = GRPOTrainer(tiny_qwen2, [reward_digits, reward_length], args=config, train_dataset=tiny_dataset(),
                          peft_config=lora_config())
    assert trainer.lora.adapter_only
    observer = VLLMClient(base_url=server.base_url)
    base_version = observer.health()["weight_version"]
    probe_cb = ProbeCallback(trainer, probe_ids, lambda ids: served(observer, ids, "run-main"))
    trainer.add_callback(probe_cb)
    try:
        trainer.train()
    finally:
        trainer.close()
    assert trainer.state.global_step == 3
    assert len(probe_cb.gaps) == 3 and max(probe_cb.gaps) < PROBE_TOL, probe_cb.gaps
    assert min(probe_cb.changes) > 1e-3  # each step moved the adapter
    # The reference (beta > 0) is the base with the adapter off: the same as the policy at step 1 (B starts at
    # zero), apart from it later. A reference that kept the adapter on would give a KL of 0 throughout.
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert len(kls) == 3 and kls[0] < 1e-7 < kls[-1], kls
    # Only the adapter travelled: the base is untouched, as the server's base logprobs show.
    assert observer.health()["weight_version"] == base_version
    assert gap(served(observer, probe_ids), base_logprobs) < PROBE_TOL
    (info,) = [a for a in observer.adapters() if a["name"] == "run-main"]
    model_bytes = sum(p.numel() * 4 for p in trainer.model.get_base_model().parameters())
    assert info["weight_version"] == 3 and info["bytes"] < model_bytes / 4


def test_two_runs_interleave_pushes_and_generations_and_neither_sees_the_others_adapter(server, tiny_qwen2,
                                                                                        probe_ids, base_logprobs):
    a1, b1, a2 = (random_adapter(tiny_qwen2, seed) for seed in (1, 2, 3))
    expected = {name: hf_logprobs(m, probe_ids) for name, m in (("a1", a1), ("b1", b1), ("a2", a2))}
    assert gap(expected["a1"], expected["b1"]) > 0.05 and gap(expected["a1"], expected["a2"]) > 0.05
    with VLLMClient(base_url=server.base_url) as run_a, VLLMClient(base_url=server.base_url) as run_b:
        run_a.push_adapter("run-a", adapter_tensors(a1), adapter_config(a1), 1)
        run_b.push_adapter("run-b", adapter_tensors(b1), adapter_config(b1), 1)
        assert gap(served(run_a, probe_ids, "run-a"), expected["a1"]) < PROBE_TOL
        run_a.push_adapter("run-a", adapter_tensors(a2), adapter_config(a2), 2)  # a's step: b must not see it
        assert gap(served(run_b, probe_ids, "run-b"), expected["b1"]) < PROBE_TOL
        assert gap(served(run_a, probe_ids, "run-a"), expected["a2"]) < PROBE_TOL
        assert gap(served(run_b, probe_ids), base_logprobs) < PROBE_TOL  # and the base is nobody's
        versions = {a["name"]: a["weight_version"] for a in run_a.adapters()}
        assert versions["run-a"] == 2 and versions["run-b"] == 1
        completion = run_b.generate(prompt_token_ids=[probe_ids], max_tokens=4, adapter="run-b")
        assert completion.weight_version == 1 and completion.results[0].completions[0].weight_versions == [1, 1]
        # An evaluation harness scores a run's current adapter through the OpenAI routes (model = its name).
        text = run_a.http.post("/v1/completions", json={"model": "run-a", "prompt": probe_ids, "max_tokens": 6,
                                                        "temperature": 0}).json()["choices"][0]["text"]
        native = run_a.generate(prompt_token_ids=[probe_ids], max_tokens=6, temperature=0, adapter="run-a")
        assert text == native.results[0].completions[0].text
        assert {"run-a", "run-b"} <= {m["id"] for m in run_a.http.get("/v1/models").json()["data"]}
        # An agent of run a, whatever model it names, samples from run a's adapter (the trainer opens its rollout).
        run_a.open_rollout("agent-a", "run-a", temperature=1.0)
        chat = {"model": "policy", "messages": [{"role": "user", "content": "What is 12 + 35?"}], "max_tokens": 6,
                "seed": 3}
        assert run_a.http.post(run_a.rollout_url("agent-a").removeprefix(run_a.base_url) + "/chat/completions",
                               json=chat).status_code == 200
        (sequence,) = run_a.rollout("agent-a").sequences
        for adapter in ("run-a", None):
            direct = run_a.generate(prompt_token_ids=[sequence.prompt_ids], max_tokens=6, seed=3, temperature=1.0,
                                    adapter=adapter).results[0].completions[0]
            same = direct.token_ids == sequence.completion_ids and \
                max(abs(a - b) for a, b in zip(direct.logprobs, sequence.logprobs)) < 1e-5
            assert same == (adapter == "run-a")  # the adapter's tokens and logprobs, not the base model's
        assert sequence.weight_versions == [2, 2]  # the adapter's version
        run_a.delete_adapter("run-a")
        with pytest.raises(ServerError, match="no adapter named 'run-a'") as excinfo:
            served(run_a, probe_ids, "run-a")
        assert excinfo.value.status == 404


def test_an_adapter_name_belongs_to_the_run_that_pushed_it_until_that_run_is_gone(server, tiny_qwen2, probe_ids):
    a, b = (random_adapter(tiny_qwen2, seed) for seed in (4, 5))
    with VLLMClient(base_url=server.base_url) as client:
        client.push_adapter("shared", adapter_tensors(a), adapter_config(a), 1, owner="run-a")
        with pytest.raises(ServerError, match="belongs to another run") as error:
            client.push_adapter("shared", adapter_tensors(b), adapter_config(b), 1, owner="run-b")
        assert error.value.status == 409 and "vllm_lora_name" in str(error.value)
        with pytest.raises(ServerError, match="belongs to another run"):
            client.delete_adapter("shared", owner="run-b")
        assert gap(served(client, probe_ids, "shared"), hf_logprobs(a, probe_ids)) < PROBE_TOL  # a's, untouched
        client.push_adapter("shared", adapter_tensors(a), adapter_config(a), 2, owner="run-a")  # the owner goes on
        time.sleep(LEASE_S + 0.5)  # run-a pushes nothing more: it is gone, and its name can be taken over
        client.push_adapter("shared", adapter_tensors(b), adapter_config(b), 1, owner="run-b")
        assert gap(served(client, probe_ids, "shared"), hf_logprobs(b, probe_ids)) < PROBE_TOL
        with pytest.raises(ServerError, match="belongs to another run"):  # and now run-a is the stranger
            client.push_adapter("shared", adapter_tensors(a), adapter_config(a), 3, owner="run-a")
        client.delete_adapter("shared", owner="run-b")


def test_an_adapter_the_server_cannot_serve_is_refused_with_the_reason(server, tiny_qwen2):
    model = random_adapter(tiny_qwen2, 4)
    config = adapter_config(model)
    with VLLMClient(base_url=server.base_url) as client:
        with pytest.raises(ServerError, match=r"r=16.*--max_lora_rank") as excinfo:
            client.push_adapter("too-big", adapter_tensors(model), {**config, "r": 16}, 1)
        assert excinfo.value.status == 400
        with pytest.raises(ServerError, match="target module 'embed_tokens'"):
            client.push_adapter("embeds", adapter_tensors(model), {**config, "target_modules": ["embed_tokens"]}, 1)
        broken = {name: t[:, :-1] if "lora_A" in name else t for name, t in adapter_tensors(model).items()}
        with pytest.raises(ServerError, match=r"does not fit this model: .*lora_A.weight: shape \[8, 127\], expected "
                                              r"\[8, 128\]"):
            client.push_adapter("broken", broken, config, 1)
        assert client.health()["status"] == "ok"  # and the server goes on serving
        assert "broken" not in {a["name"] for a in client.adapters()}


def test_an_adapter_vllm_cannot_serve_falls_back_to_merged_pushes_and_says_so(server, tiny_qwen2, probe_ids,
                                                                              tmp_path, caplog):
    from fastgrpo.transfer.adapters import unsupported_targets

    peft_config = lora_config(use_dora=True)  # DoRA: vLLM's LoRA layers do not serve it
    config = lora_config_for_run(tmp_path, server, max_steps=2)
    with caplog.at_level("WARNING", logger="fastgrpo.trainer.lora"):
        trainer = GRPOTrainer(tiny_qwen2, [reward_digits, reward_length], args=config, train_dataset=tiny_dataset(),
                              peft_config=peft_config)
    assert not trainer.lora.adapter_only and unsupported_targets(adapter_config(trainer.model)) == ["use_dora=True"]
    assert "cannot serve use_dora=True" in caplog.text and "sends the whole model" in caplog.text
    observer = VLLMClient(base_url=server.base_url)
    probe_cb = ProbeCallback(trainer, probe_ids, lambda ids: served(observer, ids))  # the base: merged weights
    trainer.add_callback(probe_cb)
    try:
        trainer.train()
    finally:
        trainer.close()
    assert max(probe_cb.gaps) < PROBE_TOL and min(probe_cb.changes) > 1e-4, (probe_cb.gaps, probe_cb.changes)
    # The merge is undone after each push: the trainer's base weights are the original ones.
    original = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    base = dict(trainer.model.get_base_model().named_parameters())
    weight = base["model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert torch.allclose(weight, original.model.layers[0].self_attn.q_proj.weight, atol=1e-6)


def test_resume_from_a_lora_checkpoint_equals_the_uninterrupted_run(server, tiny_qwen2, tmp_path):
    def run(out, stop_at=None, resume=False):
        config = lora_config_for_run(tmp_path, server, output_dir=str(out), max_steps=3, save_strategy="steps",
                                     save_steps=1, vllm_lora_name="resumed" if resume or stop_at else "full")
        trainer = GRPOTrainer(tiny_qwen2, [reward_digits, reward_length], args=config, train_dataset=tiny_dataset(),
                              peft_config=lora_config())
        if stop_at:
            trainer.add_callback(StopAt(stop_at))
        trainer.train(resume_from_checkpoint=resume or None)
        trainer.close()
        tensors = {k: v.clone() for k, v in adapter_tensors(trainer.model).items()}
        return {h["step"]: h for h in trainer.state.log_history if "loss" in h}, tensors

    # The interrupted run first: the first LoRA run on a fresh server sampled differently at step 2 once (loss
    # -0.308 against -0.294, every later run -0.294), which this test is not about.
    run(tmp_path / "split", stop_at=1)
    full, full_adapter = run(tmp_path / "full")
    assert (tmp_path / "split" / "checkpoint-1" / "adapter_model.safetensors").exists()  # adapters only
    resumed, resumed_adapter = run(tmp_path / "split", resume=True)
    assert sorted(resumed) == [1, 2, 3]
    for step in (2, 3):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-4, abs=1e-7), step
    worst = max((resumed_adapter[k] - full_adapter[k]).abs().max().item() for k in full_adapter)
    assert worst < 1e-5 and not math.isnan(worst)


def test_colocate_lora_serves_the_adapter_from_the_in_process_engine(tiny_qwen2, probe_ids, base_logprobs, tmp_path):
    from vllm import SamplingParams

    config = base_config(tmp_path, use_vllm=True, vllm_mode="colocate", vllm_max_model_len=256,
                         model_init_kwargs={"dtype": torch.float32})
    trainer = GRPOTrainer(tiny_qwen2, [reward_digits, reward_length], args=config, train_dataset=tiny_dataset(),
                          peft_config=lora_config())

    def engine_logprobs(ids, lora=True):
        out = trainer.backend.llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                           use_tqdm=False,
                                           lora_request=trainer.backend.lora_request if lora else None)[0]
        return [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])]

    probe_cb = ProbeCallback(trainer, probe_ids, engine_logprobs)
    trainer.add_callback(probe_cb)
    try:
        trainer.train()
        with_adapter, without = engine_logprobs(probe_ids), engine_logprobs(probe_ids, lora=False)
    finally:
        trainer.close()
    assert trainer.state.global_step == 3
    # The colocated engine computes in bfloat16 (vLLM's CPU default for this float32 checkpoint; GRPOTrainer
    # does not choose the colocated engine's dtype), so its logprobs match the float32 trainer within bf16's
    # rounding, as test_trainer's colocate test allows; the base (adapter off) is untouched within the same.
    assert max(probe_cb.gaps) < COLOCATE_TOL, probe_cb.gaps
    assert gap(without, base_logprobs) < COLOCATE_TOL
    assert min(probe_cb.changes) > 1e-3
    # And the adapter is really applied there: with and without it the same engine differs.
    assert gap(with_adapter, without) > 1e-2
