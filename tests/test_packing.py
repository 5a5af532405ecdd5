"""The packed forward (trainer/packing.py) against a row-by-row reference and against the padded trainer.

The reference is test_forward.py's: each row alone, unpadded, no masks or caches. Tolerances are that
file's (float32: the two differ by kernel rounding, about 1e-6 here; a token attending to one wrong key
moves its logprob by 1e-2 or more on these tiny models).
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fastgrpo.trainer.packing import pack, packed_completion_logits, packing_unsupported, unpack
from test_forward import PAD, batch, logps_and_grads, ragged_micro_batch, reference


def packed_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    layout = pack(prompt_ids, prompt_mask, completion_ids, completion_mask)
    logits = packed_completion_logits(model, model.config, layout)
    real = completion_mask.bool()
    logp = torch.log_softmax(logits.float(), dim=-1).gather(1, completion_ids[real][:, None])[:, 0]
    return unpack(logp, completion_mask)


@pytest.mark.parametrize("arch", ["tiny_qwen2", "tiny_llama"])
def test_packed_logprobs_and_gradients_match_a_row_by_row_forward(arch, request):
    """Three prompts (7, 3 and 5 tokens, left-padded), seven completions of 1 to 9 tokens; two heads share
    one key head (grouped-query attention)."""
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(arch), dtype=torch.float32)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    rows, tensors = batch()
    assert packing_unsupported(model) is None
    got, got_grads = logps_and_grads(model, lambda: packed_logps(model, *tensors))
    want, want_grads = logps_and_grads(model, lambda: reference(model, rows, tensors[2].shape[1]))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)
    assert model.config._attn_implementation != "fastgrpo_packed"  # switched back


def test_one_row_and_a_one_token_prompt_and_completion(tiny_qwen2):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    rows = [([17], [23]), ([17], [40, 41, 42])]
    for chosen in ([rows[0]], rows):
        prompt_ids = torch.tensor([p for p, _ in chosen])
        width = max(len(c) for _, c in chosen)
        completion_ids = torch.tensor([c + [PAD] * (width - len(c)) for _, c in chosen])
        completion_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for _, c in chosen])
        with torch.no_grad():
            got = packed_logps(model, prompt_ids, torch.ones_like(prompt_ids), completion_ids, completion_mask)
            want = reference(model, chosen, width)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_the_layout_puts_each_prompt_once_and_each_token_at_its_own_position():
    prompt_ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1]])
    completion_ids = torch.tensor([[10, 11], [12, 0], [13, 14]])
    completion_mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    layout = pack(prompt_ids, prompt_mask, completion_ids, completion_mask)
    # torch.unique sorts rows: the prompt [0, 5, 6] (mask 0 1 1) comes first.
    assert layout.input_ids.tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert layout.position_ids.tolist() == [0, 1, 0, 1, 2, 2, 3, 3, 2, 3]
    # Each completion's first token is predicted by its prompt's last token, later ones by the token before.
    assert layout.predicted_by.tolist() == [1, 5, 4, 1, 8]


def test_a_completion_mask_with_a_hole_is_refused():
    with pytest.raises(ValueError, match="prefix"):
        pack(torch.tensor([[5]]), torch.tensor([[1]]), torch.tensor([[1, 2, 3]]), torch.tensor([[1, 0, 1]]))


def test_models_whose_attention_is_not_plain_keep_the_padded_forward(tiny_qwen2):
    config = AutoConfig.from_pretrained(tiny_qwen2)
    model = type("M", (), {"config": config})()
    assert packing_unsupported(model) is None
    config.use_sliding_window, config.sliding_window = True, 16
    assert "sliding window" in packing_unsupported(model)
    config.use_sliding_window, config.attention_dropout = False, 0.1
    assert "attention_dropout" in packing_unsupported(model)
    config.model_type = "gemma2"
    assert "'gemma2'" in packing_unsupported(model)


@pytest.mark.parametrize("settings", [dict(loss_type="dapo"), dict(loss_type="grpo", temperature=0.7,
                                                                      top_entropy_quantile=0.5, entropy_coef=0.1)])
def test_the_trainer_trains_the_same_packed_as_padded(tiny_qwen2, tmp_path, settings):
    """The trainer's own forward and backward of a ragged micro-batch (16 rows over 4 prompts): padding_free
    on (one packed forward) and off (the padded forward, cut into parts), same loss gradient. The second
    case runs the temperature, the entropy mask and the entropy bonus through the packed logits."""
    from datasets import Dataset

    from fastgrpo import GRPOConfig, GRPOTrainer
    from fastgrpo.trainer.batching import parts_of, split_round
    from fastgrpo.trainer.forward import prompt_groups

    round_batch, lengths = ragged_micro_batch()
    grads = {}
    for padding_free in (True, False):
        config = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=16, num_generations=4,
                            max_completion_length=64, use_vllm=False, use_cpu=True, report_to=[],
                            padding_free=padding_free, **settings)
        trainer = GRPOTrainer(tiny_qwen2, lambda completions, **k: [0.0] * len(completions), args=config,
                              train_dataset=Dataset.from_dict({"prompt": ["a"] * 4}))
        assert trainer._pack is padding_free
        index = prompt_groups(round_batch["prompt_ids"], round_batch["prompt_mask"])[1]
        (micro,) = split_round(dict(round_batch), 1, 1, index, 1.27, max_parts=trainer._max_parts())[0]
        assert len(parts_of(micro)) == 1 or not padding_free  # padded: cut in parts where the loss allows
        micro["num_items_in_batch"] = torch.tensor(float(sum(lengths)))
        trainer.model.zero_grad(set_to_none=True)
        trainer._forward_backward(trainer.model, micro)
        grads[padding_free] = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    assert grads[True].norm() > 0
    assert (grads[True] - grads[False]).norm() / grads[False].norm() < 1e-5


def test_gradient_checkpointing_runs_padded(tiny_qwen2, tmp_path):
    """A checkpointed layer runs its forward again in backward, outside the packed attention's switch."""
    from datasets import Dataset

    from fastgrpo import GRPOConfig, GRPOTrainer

    config = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                        use_vllm=False, use_cpu=True, report_to=[], gradient_checkpointing=True)
    trainer = GRPOTrainer(tiny_qwen2, lambda completions, **k: [0.0] * len(completions), args=config,
                          train_dataset=Dataset.from_dict({"prompt": ["a"] * 4}))
    assert not trainer._pack
