"""Reward functions: built-ins with the real math-verify, the runner (sync, async, reward models), validation."""

import asyncio
import functools
import math
import threading

import pytest
import torch

from fastgrpo.trainer.rewards import (
    RewardModel,
    accuracy_reward,
    completion_text,
    compute_rewards,
    format_reward,
    last_number,
    make_format_reward,
    number_match_reward,
    prepare_reward_funcs,
    reward_func_name,
    think_format_reward,
)


def conv(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# ---------------------------------------------------------------------------
# Built-ins


def test_accuracy_reward_with_math_verify():
    completions = [
        "12 + 35 = 47",
        "The answer is $\\boxed{47}$.",
        "12 + 35 = 48",
        "I don't know",
        "The answer is 47.",
        "x",
    ]
    solutions = ["47", "47", "47", "47", "47", "\\frac{1}{2}"]
    assert accuracy_reward(completions, solution=solutions) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    # Equivalent forms count: a fraction against its decimal.
    assert accuracy_reward(["So it is 0.5"], solution=["$\\frac{1}{2}$"]) == [1.0]
    # Conversational completions are read through their message content.
    assert accuracy_reward([conv("47"), conv("46")], solution=["47", "47"]) == [1.0, 0.0]


def test_accuracy_reward_none_when_gold_unparsable():
    assert accuracy_reward(["47", "47"], solution=["no answer here", "47"]) == [None, 1.0]


def test_accuracy_reward_outside_main_thread():
    # math-verify's timeouts use SIGALRM (main thread only); off the main thread they are skipped.
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=accuracy_reward(["= 47"], solution=["47"])))
    thread.start()
    thread.join()
    assert result["r"] == [1.0]


def test_number_match_reward():
    completions = ["12 + 35 = 47", "47.", "The answer is 47, not 46", "1,047", "-3", "nothing", conv("so 47")]
    solutions = ["47", "47", "47", "1047", "-3", "47", "47"]
    assert number_match_reward(completions, solution=solutions) == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert number_match_reward(["47"], solution=["forty-seven"]) == [None]
    assert last_number("3.5 and then 2.25.") == pytest.approx(2.25)
    assert last_number("no digits") is None


def test_format_rewards():
    assert format_reward(["47", " 47.\n", "The answer is 47.", "47 apples", conv("47")]) == [1.0, 1.0, 0.0, 0.0, 1.0]
    answer_is = make_format_reward("answer_is")
    assert answer_is.__name__ == "format_answer_is"
    assert answer_is(["Adding: The answer is 47.", "the answer is: 47", "47", "The answer is 47 apples"]) == [
        1.0, 1.0, 0.0, 0.0]
    ends = make_format_reward("ends_with_number")
    assert ends(["12 + 35 = 47", "47 apples", "Sum: 1,047."]) == [1.0, 0.0, 1.0]
    custom = make_format_reward(r"^ok$", name="ok_format")
    assert custom.__name__ == "ok_format" and custom(["ok", "not ok"]) == [1.0, 0.0]


def test_think_format_reward():
    completions = [
        "<think>12 + 35 is 47</think>47",
        "<think>\nreasoning\n</think>\nThe answer is 47.",
        "47",
        "<think>unfinished",
        "<think>a</think>",  # no answer after the block
        "<think>a</think><think>b</think>47",
        "text first <think>a</think>47",
    ]
    assert think_format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_completion_text():
    assert completion_text("abc") == "abc"
    assert completion_text(conv("abc")) == "abc"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "image"}]}]) == "a"


# ---------------------------------------------------------------------------
# compute_rewards


def _batch(n=4):
    prompts = [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(n)]
    completions = [conv(str(i + 1 if i % 2 == 0 else i)) for i in range(n)]
    ids = [[1, 2, 3]] * n
    columns = {"solution": [str(i + 1) for i in range(n)]}
    return prompts, completions, ids, columns


def test_compute_rewards_shape_and_values():
    prompts, completions, ids, columns = _batch()
    out = compute_rewards([number_match_reward, accuracy_reward, format_reward], prompts, completions, ids, columns)
    assert out.dtype == torch.float32 and out.shape == (4, 3)
    assert out[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert out[:, 1].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert out[:, 2].tolist() == [1.0] * 4


def test_compute_rewards_passes_columns_and_ids():
    prompts, completions, ids, columns = _batch(2)
    seen = {}

    def spy(prompts, completions, completion_ids, trainer_state, solution, extra, **kwargs):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, state=trainer_state,
                    solution=solution, extra=extra, rest=kwargs)
        return [0.5, 0.25]

    out = compute_rewards([spy], prompts, completions, ids, {**columns, "extra": ["a", "b"], "prompt": prompts},
                          trainer_state="STATE")
    assert out[:, 0].tolist() == [0.5, 0.25]
    assert seen["prompts"] == prompts and seen["completions"] == completions and seen["ids"] == ids
    assert seen["state"] == "STATE" and seen["solution"] == ["1", "2"] and seen["extra"] == ["a", "b"]
    assert seen["rest"] == {}


def test_none_becomes_nan():
    prompts, completions, ids, columns = _batch(3)

    def partial_reward(completions, **kwargs):
        return [1.0, None, 0]

    out = compute_rewards([partial_reward], prompts, completions, ids, columns)
    assert out[0, 0] == 1.0 and math.isnan(out[1, 0]) and out[2, 0] == 0.0


def test_wrong_length_names_the_function():
    prompts, completions, ids, columns = _batch(3)

    def too_short(completions, **kwargs):
        return [1.0, 0.0]

    with pytest.raises(ValueError, match="too_short.*2 rewards for 3 completions"):
        compute_rewards([number_match_reward, too_short], prompts, completions, ids, columns)


@pytest.mark.parametrize("bad, message", [
    ("1.0", "returned str"),
    (None, "returned NoneType"),
    ([1.0, "x", 0.0], "returned 'x' \\(str\\) at position 1"),
])
def test_wrong_type_names_the_function(bad, message):
    prompts, completions, ids, columns = _batch(3)

    def broken(completions, **kwargs):
        return bad

    with pytest.raises(TypeError, match=f"broken.*{message}"):
        compute_rewards([broken], prompts, completions, ids, columns)


def test_numpy_and_tensor_outputs_accepted():
    import numpy as np

    prompts, completions, ids, columns = _batch(2)
    out = compute_rewards(
        [lambda **kw: np.array([1.0, 2.0]), lambda **kw: torch.tensor([3.0, 4.0]), lambda **kw: [np.bool_(True), np.float32(0.5)]],
        prompts, completions, ids, columns,
    )
    assert out.tolist() == [[1.0, 3.0, 1.0], [2.0, 4.0, 0.5]]


def test_mismatched_inputs_rejected():
    prompts, completions, ids, columns = _batch(3)
    with pytest.raises(ValueError, match="3 prompts but 2 completions"):
        compute_rewards([format_reward], prompts, completions[:2], ids, columns)
    with pytest.raises(ValueError, match="column 'solution' has 2 values"):
        compute_rewards([format_reward], prompts, completions, ids, {"solution": ["1", "2"]})


def _two_waiting_async_funcs():
    """Two async reward functions, each waiting for an event only the other one sets.

    Run one after the other, the first would wait forever (bounded here by a
    timeout that turns the deadlock into a failure); run concurrently, both finish.
    """
    state = {}

    def events():
        # Created lazily, inside the event loop that runs the functions.
        if "a" not in state:
            state["a"], state["b"] = asyncio.Event(), asyncio.Event()
        return state["a"], state["b"]

    async def reward_a(completions, **kwargs):
        a, b = events()
        a.set()
        await asyncio.wait_for(b.wait(), timeout=10)
        return [1.0] * len(completions)

    async def reward_b(completions, **kwargs):
        a, b = events()
        await asyncio.wait_for(a.wait(), timeout=10)
        b.set()
        return [2.0] * len(completions)

    return reward_a, reward_b


def test_async_reward_funcs_run_concurrently():
    prompts, completions, ids, columns = _batch(2)
    reward_a, reward_b = _two_waiting_async_funcs()
    out = compute_rewards([reward_b, format_reward, reward_a], prompts, completions, ids, columns)
    assert out.tolist() == [[2.0, 1.0, 1.0], [2.0, 1.0, 1.0]]


def test_async_reward_funcs_from_inside_a_running_loop():
    prompts, completions, ids, columns = _batch(2)
    reward_a, reward_b = _two_waiting_async_funcs()

    async def caller():
        return compute_rewards([reward_a, reward_b], prompts, completions, ids, columns)

    assert asyncio.run(caller()).tolist() == [[1.0, 2.0], [1.0, 2.0]]


def test_async_callable_object_and_validation():
    prompts, completions, ids, columns = _batch(2)

    class Judge:
        async def __call__(self, completions, **kwargs):
            await asyncio.sleep(0)
            return [0.5, None]

    async def bad_async(completions, **kwargs):
        return [1.0]

    out = compute_rewards([Judge()], prompts, completions, ids, columns)
    assert out[0, 0] == 0.5 and math.isnan(out[1, 0])
    with pytest.raises(ValueError, match="bad_async.*1 rewards for 2 completions"):
        compute_rewards([bad_async], prompts, completions, ids, columns)


def test_sync_error_cancels_async_and_propagates():
    prompts, completions, ids, columns = _batch(2)

    async def waits_forever(completions, **kwargs):
        await asyncio.Event().wait()

    def fails(**kwargs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        compute_rewards([waits_forever, fails], prompts, completions, ids, columns)


def test_reward_func_names():
    def my_reward(**kwargs):
        return []

    class Scorer:
        def __call__(self, **kwargs):
            return []

    assert reward_func_name(accuracy_reward) == "accuracy_reward"
    assert reward_func_name(functools.partial(my_reward, x=1)) == "my_reward"
    assert reward_func_name(Scorer()) == "Scorer"
    assert reward_func_name("org/some-reward-model") == "some-reward-model"
    assert reward_func_name("/models/rm/") == "rm"


# ---------------------------------------------------------------------------
# Reward models


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from fastgrpo.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, num_labels=1,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(config).eval()
    path = tmp_path_factory.mktemp("tiny-rm") / "tiny-rm"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer, path


def _reference_scores(model, tokenizer, texts):
    """Each text scored alone (no padding): the logit at its last token."""
    scores = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            scores.append(model(input_ids=ids).logits[0, 0].item())
    return scores


def test_reward_model_by_path_conversational(tiny_reward_model):
    model, tokenizer, path = tiny_reward_model
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "What is 10 + 7?"}]]
    completions = [conv("5"), conv("The answer is 17, I think so.")]
    out = compute_rewards([str(path)], prompts, completions, [[1], [1]], {})
    # The reference uses the tokenizer as loaded from the folder: for a qwen2 config
    # transformers loads Qwen2Tokenizer, which splits digits unlike the in-memory one.
    from transformers import AutoTokenizer

    loaded_tokenizer = AutoTokenizer.from_pretrained(path)
    texts = [loaded_tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
    assert texts[0].startswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n5")
    expected = _reference_scores(model, loaded_tokenizer, texts)
    # Batched with right padding vs. alone: the same up to float noise.
    assert out[:, 0].tolist() == pytest.approx(expected, abs=1e-5)
    assert out[0, 0] != out[1, 0]
    assert reward_func_name(prepare_reward_funcs([str(path)])[0]) == "tiny-rm"


def test_reward_model_by_object_plain_text(tiny_reward_model):
    model, tokenizer, path = tiny_reward_model
    prompts = ["What is 2 + 3? ", "What is 10 + 7? "]
    completions = ["5", "It is 17."]
    rm = RewardModel(model, tokenizer=tokenizer, batch_size=1)
    out = compute_rewards([rm, number_match_reward], prompts, completions, [[1], [1]], {"solution": ["5", "17"]})
    expected = _reference_scores(model, tokenizer, [p + c for p, c in zip(prompts, completions)])
    assert out[:, 0].tolist() == pytest.approx(expected, abs=1e-5)
    assert out[:, 1].tolist() == [1.0, 1.0]
    # A model object given directly, with its tokenizer in reward_processing_classes.
    out2 = compute_rewards([model], prompts, completions, None, {}, reward_processing_classes=[tokenizer])
    assert out2[:, 0].tolist() == pytest.approx(expected, abs=1e-5)


def test_reward_model_object_without_tokenizer_source():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from fastgrpo.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_labels=1)
    model = LlamaForSequenceClassification(config)
    with pytest.raises(ValueError, match="reward_processing_classes"):
        prepare_reward_funcs([model])
    # With a tokenizer: the pad id is set on the config so the last real token is found.
    rm = prepare_reward_funcs([model], [tokenizer])[0]
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert len(rm(prompts=["a"], completions=["b"])) == 1


def test_processing_classes_length_checked():
    with pytest.raises(ValueError, match="one per reward function"):
        prepare_reward_funcs([format_reward, accuracy_reward], [None])


def test_the_rewards_trl_has_give_trls_values_from_fastgrpo_rewards():
    """`from fastgrpo.rewards import ...` for `from trl.rewards import ...`: the same functions, the same values
    as TRL 1.16's on conversational completions (TRL's own shape), right, wrong and unparsable."""
    import fastgrpo.rewards as ours
    import trl.rewards as theirs

    completions = [[{"role": "assistant", "content": c}] for c in
                   ["The answer is $\\frac{1}{2}$", "It is 0.3", "<think>\nhm\n</think>\nyes", "no tags", "\\boxed{4}"]]
    solutions = ["$\\frac{1}{2}$", "$\\frac{1}{2}$", "$2$", "$2$", "$4$"]
    assert ours.accuracy_reward(completions, solution=solutions) == theirs.accuracy_reward(completions,
                                                                                         solution=solutions)
    assert ours.think_format_reward(completions) == theirs.think_format_reward(completions)
    assert sorted(set(ours.__all__) & set(dir(theirs))) == ["accuracy_reward", "think_format_reward"]
