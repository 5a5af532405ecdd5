"""LoRA's pure parts: the adapter payload, the checks a push gets, names, and the run spec's `peft` section."""

import re

import pytest
import torch

from fastgrpo.run import SpecError, build_peft_config, server_flags
from fastgrpo.trainer.lora import default_adapter_name, run_identity
from fastgrpo.transfer.adapters import (check_adapter_shapes, pack_adapter, rank_limit, unpack_adapter,
                                        unsupported_targets)

CONFIG = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}


def test_a_payload_round_trips_its_tensors_config_and_version_exactly():
    tensors = {"base_model.model.x.q_proj.lora_A.weight": torch.randn(8, 16),
               "base_model.model.x.q_proj.lora_B.weight": torch.randn(32, 8).to(torch.bfloat16)}
    back, config, version = unpack_adapter(pack_adapter(tensors, CONFIG, 7))
    assert config == CONFIG and version == 7
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("payload, message", [(b"", "fewer than 8 bytes"), (b"\x08" + b"\x00" * 7 + b"garbage!",
                                                                         "not a safetensors payload")])
def test_a_body_that_is_not_a_payload_is_named_as_such(payload, message):
    with pytest.raises(ValueError, match=message):
        unpack_adapter(payload)


def test_a_safetensors_file_without_the_config_says_how_to_build_a_payload():
    from safetensors.torch import save

    with pytest.raises(ValueError, match="pack_adapter"):
        unpack_adapter(save({"a": torch.zeros(1)}))


def test_what_vllm_cannot_serve_is_listed_and_projections_pass():
    assert unsupported_targets(CONFIG) == []
    assert unsupported_targets({**CONFIG, "target_modules": ["q_proj", "embed_tokens", "lm_head"]}) == [
        "target module 'embed_tokens'", "target module 'lm_head'"]
    assert unsupported_targets({**CONFIG, "use_dora": True, "modules_to_save": ["score"]}) == [
        "modules_to_save ['score'] (fully trained modules)", "use_dora=True"]


def test_adapter_shapes_are_checked_against_the_base_weights():
    base = {"model.layers.0.self_attn.q_proj.weight": (64, 32)}
    good = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 32),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 8)}
    assert check_adapter_shapes(good, 8, base) == []
    bad = {**good, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4),
           "base_model.model.model.layers.9.mlp.up_proj.lora_A.weight": torch.zeros(8, 32), "stray": torch.zeros(1)}
    problems = check_adapter_shapes(bad, 8, base)
    assert any("lora_B.weight: shape [64, 4], expected [64, 8]" in p for p in problems)
    assert any("has no weight model.layers.9.mlp.up_proj.weight" in p for p in problems)
    assert any(p.startswith("stray: not a LoRA tensor") for p in problems) and len(problems) == 3


def test_rank_limits_and_adapter_names():
    assert [rank_limit(r) for r in (1, 2, 8, 9, 16, 17)] == [1, 8, 8, 16, 16, 32]
    with pytest.raises(ValueError, match="above vLLM's largest"):
        rank_limit(1024)
    # The folder's name in the characters the server takes, then 8 hex digits of the whole path's digest.
    assert re.fullmatch(r"exp-3--lr-2e-4--[0-9a-f]{8}", default_adapter_name("/runs/exp 3 (lr=2e-4)/"))
    assert len(default_adapter_name("x" * 100)) == 64
    # Two runs whose folders share a name do not share an adapter; a run resumed in its folder keeps its own.
    assert default_adapter_name("/runs/a/out") != default_adapter_name("/runs/b/out")
    assert default_adapter_name("/runs/a/out") == default_adapter_name("/runs/a/out/")
    assert run_identity("/runs/a/out") != run_identity("/runs/b/out")


def test_the_specs_peft_section_is_a_lora_config_and_its_server_serves_adapters():
    spec = {"peft": {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj"]}, "start_server": {"devices": "1"}}
    assert build_peft_config(spec).r == 16
    assert server_flags(spec) == ({"enable_lora": True, "max_lora_rank": 16}, "1")
    assert server_flags({"start_server": {"max_model_len": 512}}) == ({"max_model_len": 512}, None)
    with pytest.raises(SpecError, match="peft: .*rank.*LoraConfig's fields"):
        build_peft_config({"peft": {"rank": 8}})


def test_cpu_lora_ops_compute_vllms_per_token_products_with_one_matmul_per_adapter():
    from fastgrpo import cpu_lora

    torch.manual_seed(0)
    tokens, loras, rank, hidden = 7, 3, 4, 16
    a = torch.randn(loras, 1, rank, hidden)  # vLLM's layout: [loras, 1, out, in]
    x = torch.randn(tokens, hidden)
    for indices in (torch.tensor([1] * tokens), torch.tensor([0, 2, 2, -1, 0, 1, -1])):
        reference = torch.einsum("bi, boi -> bo", x, a[indices].squeeze(1))  # vLLM's formula
        shrunk = torch.zeros(tokens, rank)
        cpu_lora.bgmv_shrink(x, a, shrunk, indices, scaling=0.5)
        assert torch.allclose(shrunk, 0.5 * reference, atol=1e-5)
        b = torch.randn(loras, 1, hidden, rank)
        out = torch.ones(tokens, hidden + 3)
        cpu_lora.bgmv_expand_slice(shrunk, b, out, indices, 3, hidden, add_inputs=True)
        expected = torch.einsum("bi, boi -> bo", shrunk, b[indices].squeeze(1))
        assert torch.allclose(out[:, 3:], 1 + expected, atol=1e-5) and torch.equal(out[:, :3], torch.ones(tokens, 3))
