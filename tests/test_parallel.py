"""The TP/DP calculator: batch arithmetic, memory arithmetic, published results, the CLI."""

import json

import pytest

from fastgrpo.planner import model as parallel
from fastgrpo.cli import main

GIB = 1024**3


def plan_h100x8(model, prompt_length, max_completion_length, completions=512, num_generations=8, **kwargs):
    """A plan on 8 x H100 80GB for `completions` per round, spread as 4 training processes."""
    return parallel.plan_tp_dp(
        model,
        8,
        "H100-80GB",
        prompt_length=prompt_length,
        max_completion_length=max_completion_length,
        per_device_train_batch_size=completions // 4,
        num_processes=4,
        gradient_accumulation_steps=1,
        num_generations=num_generations,
        **kwargs,
    )


def layout(plan, tp):
    return next(est for est in plan.layouts if est.tensor_parallel_size == tp)


# --- the prompt batch ----------------------------------------------------------------


def test_documented_example_prompt_batch_size():
    assert parallel.prompt_batch_size(8, 4, 16, 8) == 64


def test_invalid_divisibility_is_explained():
    with pytest.raises(parallel.PlanError) as excinfo:
        parallel.prompt_batch_size(per_device_train_batch_size=3, num_processes=1, gradient_accumulation_steps=1, num_generations=8)
    message = str(excinfo.value)
    assert "3 x 1 x 1 = 3" in message and "num_generations=8" in message
    assert "gradient_accumulation_steps=8" in message  # the fix it suggests does divide
    assert parallel.prompt_batch_size(3, 1, 8, 8) == 3


def test_non_positive_batch_figures_are_rejected():
    with pytest.raises(parallel.PlanError, match="num_processes"):
        parallel.prompt_batch_size(8, 0, 1, 8)


# --- memory arithmetic, checked by hand ---------------------------------------------


def test_qwen25_7b_weights_match_its_parameter_count():
    model = parallel.resolve_model("Qwen/Qwen2.5-7B")
    # Qwen2.5-7B has 7.62B parameters (model card); bf16 is 2 bytes each.
    assert model.param_count == pytest.approx(7.62e9, rel=0.01)
    assert model.weight_bytes == pytest.approx(7.62e9 * 2, rel=0.01)


def test_parameter_counts_of_other_known_models():
    # Published totals (model cards): Qwen2.5-72B 72.7B, Llama-3.1-8B 8.03B, Qwen3-8B 8.19B.
    assert parallel.resolve_model("Qwen2.5-72B").param_count == pytest.approx(72.7e9, rel=0.01)
    assert parallel.resolve_model("Llama-3.1-8B").param_count == pytest.approx(8.03e9, rel=0.01)
    assert parallel.resolve_model("Qwen3-8B").param_count == pytest.approx(8.19e9, rel=0.01)


def test_kv_bytes_per_token_and_replication_beyond_kv_heads():
    model = parallel.resolve_model("Qwen2.5-7B")  # 28 layers, 4 KV heads of 128
    assert model.kv_bytes_per_token(1) == 2 * 28 * 4 * 128 * 2
    assert model.kv_bytes_per_token(2) == 2 * 28 * 2 * 128 * 2
    small = parallel.resolve_model("Qwen2.5-3B")  # 2 KV heads: at TP=4 each device keeps one
    assert small.kv_bytes_per_token(4) == small.kv_bytes_per_token(2) == 2 * 36 * 1 * 128 * 2


def test_kv_cache_of_one_layout_by_hand():
    model = parallel.resolve_model("Qwen2.5-7B")
    gpu = parallel.resolve_gpu("H100-80GB")
    workload = parallel.Workload(prompt_batch_size=64, num_generations=8, prompt_length=512, max_completion_length=1024)
    est = parallel.estimate_layout(model, gpu, workload, tp=2, dp=4, gpu_memory_utilization=0.9)
    # Per device: 0.9 x 79.2 GiB, less half the weights, less the reserve
    # (1.5 GiB fixed + a 16384-token prefill chunk + fp32 logits for 1024 sequences).
    activations = 16384 * (6 * 3584 + 3 * 18944 / 2) * 2 + 1024 * 152064 * 4 * 2
    per_device = 0.9 * 79.2 * GIB - 7.6156e9 * 2 / 2 - 1.5 * GIB - activations
    assert est.kv_cache_gib_per_replica == pytest.approx(2 * per_device / GIB, rel=0.01)
    assert est.kv_cache_tokens_per_replica == pytest.approx(per_device / (2 * 28 * 2 * 128 * 2), rel=0.01)
    assert est.sequences_per_replica == 64 * 8 // 4
    assert est.fits and est.valid


def test_tp_must_divide_attention_heads():
    plan = plan_h100x8("Qwen2.5-7B", 512, 1024)  # 28 heads
    est = layout(plan, 8)
    assert not est.valid and not est.usable
    assert "28 attention heads" in est.reason


# --- agreement with the published 8 x H100 measurements (TRL, vLLM integration docs) ---


@pytest.mark.parametrize("model", ["Qwen2.5-3B", "Qwen2.5-7B", "Qwen2.5-14B"])
@pytest.mark.parametrize("prompt_length,max_completion_length", [(512, 1024), (512, 2048), (1024, 3072)])
@pytest.mark.parametrize("completions", [512, 1024])
def test_small_models_short_contexts_are_fastest_at_tp1_dp8(model, prompt_length, max_completion_length, completions):
    plan = plan_h100x8(model, prompt_length, max_completion_length, completions)
    assert (plan.recommended.tensor_parallel_size, plan.recommended.data_parallel_size) == (1, 8), plan.recommended.reason


@pytest.mark.parametrize("prompt_length,max_completion_length", [(8192, 1024), (12288, 1024), (6144, 3072)])
@pytest.mark.parametrize("completions", [512, 1024])
def test_qwen25_32b_long_contexts_are_fastest_at_tp2_dp4(prompt_length, max_completion_length, completions):
    # Contexts over 8k tokens. See docs/tp-dp.md: with most of the context in
    # the completion (1k prompt + 8k+ completion) the model prefers TP=4.
    plan = plan_h100x8("Qwen2.5-32B", prompt_length, max_completion_length, completions)
    assert (plan.recommended.tensor_parallel_size, plan.recommended.data_parallel_size) == (2, 4), plan.recommended.reason
    assert not layout(plan, 1).fits or layout(plan, 1).seconds_per_round > layout(plan, 2).seconds_per_round


@pytest.mark.parametrize("prompt_length,max_completion_length", [(256, 256), (512, 1024), (1024, 8192)])
def test_qwen25_72b_does_not_fit_at_tp1_or_tp2_on_h100(prompt_length, max_completion_length):
    plan = plan_h100x8("Qwen2.5-72B", prompt_length, max_completion_length)
    assert not layout(plan, 1).fits
    assert not layout(plan, 2).fits
    assert layout(plan, 4).fits and layout(plan, 8).fits
    assert plan.recommended.tensor_parallel_size in (4, 8)
    assert any("TP=2, DP=4: the model does not fit" in w for w in plan.warnings)


# --- the model behaves sanely -------------------------------------------------------


def test_throughput_grows_with_batch_then_saturates():
    model, gpu = parallel.resolve_model("Qwen2.5-7B"), parallel.resolve_gpu("H100-80GB")
    rates = []
    for prompts in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]:
        workload = parallel.Workload(prompts, 8, 512, 1024)
        rates.append(parallel.estimate_layout(model, gpu, workload, tp=1, dp=8).tokens_per_second)
    assert all(later >= earlier for earlier, later in zip(rates, rates[1:]))
    assert rates[1] / rates[0] > 1.9  # idle replicas: doubling the batch doubles the rate
    assert rates[-1] / rates[-2] < 1.1  # saturated


def test_no_layout_fits_is_reported():
    plan = parallel.plan_tp_dp("Qwen2.5-72B", 1, "A100-40GB")
    assert plan.recommended is None
    assert any("no layout fits" in w for w in plan.warnings)


# --- warnings where DP does not pay off ----------------------------------------------


def test_warns_when_replicas_would_sit_idle():
    plan = parallel.plan_tp_dp("Qwen2.5-7B", 8, "H100-80GB", per_device_train_batch_size=8, num_generations=8)
    assert plan.workload.prompt_batch_size == 1
    assert any("replicas sit idle" in w for w in layout(plan, 1).warnings)
    assert plan.recommended.tensor_parallel_size > 1  # one prompt: sharding beats idle replicas


def test_warns_when_too_few_sequences_per_replica():
    plan = parallel.plan_tp_dp("Qwen2.5-7B", 8, "H100-80GB", per_device_train_batch_size=16, num_generations=2)
    est = layout(plan, 1)  # 8 prompts x 2 over 8 replicas: 2 sequences each
    assert est.concurrent_sequences_per_replica == 2
    assert any("too few to fill a batch" in w for w in est.warnings)


# --- models by name or path -----------------------------------------------------------


def test_names_are_forgiving():
    for name in ["Qwen/Qwen2.5-7B", "qwen2.5-7b", "Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct"]:
        assert parallel.resolve_model(name).name == "Qwen/Qwen2.5-7B"
    assert parallel.resolve_gpu("h100").name == "H100-80GB"


def test_unknown_model_error_lists_names_and_suggests_a_path():
    with pytest.raises(parallel.PlanError) as excinfo:
        parallel.resolve_model("NotAModel-9B")
    assert "Qwen2.5-7B" in str(excinfo.value) and "local folder" in str(excinfo.value)


def test_unknown_gpu_error_lists_names_and_custom():
    with pytest.raises(parallel.PlanError, match="H100-80GB.*--gpu custom"):
        parallel.resolve_gpu("Z9000")


def write_config(folder, **overrides):
    config = {
        "model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 3584, "num_attention_heads": 28,
        "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    config.update(overrides)
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_local_config_json_matches_the_table(tmp_path):
    local = parallel.resolve_model(str(write_config(tmp_path / "qwen7b")))
    known = parallel.resolve_model("Qwen2.5-7B")
    assert local.param_count == known.param_count
    assert local.kv_bytes_per_token(1) == known.kv_bytes_per_token(1)
    assert local.head_dim == 128  # hidden / heads when the config has no head_dim


def test_local_config_with_explicit_head_dim_and_fp32(tmp_path):
    folder = write_config(tmp_path / "m", model_type="qwen3", head_dim=64, torch_dtype="float32", num_key_value_heads=2)
    model = parallel.resolve_model(str(folder))
    assert model.head_dim == 64 and model.bytes_per_param == 4 and model.qk_norm and not model.qkv_bias
    assert model.kv_bytes_per_token(1) == 2 * 28 * 2 * 64 * 4


def test_folder_without_config_is_an_error(tmp_path):
    with pytest.raises(parallel.PlanError, match="config.json"):
        parallel.resolve_model(str(tmp_path))


# --- the CLI ----------------------------------------------------------------------------

EXAMPLE = [
    "tp-dp", "--model", "Qwen2.5-7B", "--num_server_gpus", "8", "--gpu", "H100-80GB",
    "--per_device_train_batch_size", "8", "--num_processes", "4", "--gradient_accumulation_steps", "16",
    "--num_generations", "8", "--max_completion_length", "1024", "--prompt_length", "512",
]


def test_cli_table(capsys):
    assert main(EXAMPLE) == 0
    out = capsys.readouterr().out
    assert "8 x 4 x 16 / 8 = 64 prompts per round" in out
    assert "TP=2, DP=4" in out and "does not divide the 28 attention heads" in out
    assert "Recommended: --tensor_parallel_size 1 --data_parallel_size 8" in out


def test_cli_json_matches_the_python_function(capsys):
    assert main(EXAMPLE + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt_batch_size"] == 64
    assert result["recommended"]["tensor_parallel_size"] == 1
    assert result["recommended"]["data_parallel_size"] == 8
    assert result["recommended"]["reason"]
    assert [(e["tensor_parallel_size"], e["data_parallel_size"]) for e in result["layouts"]] == [(1, 8), (2, 4), (4, 2), (8, 1)]
    for entry in result["layouts"]:
        assert {"fits", "seconds_per_round", "tokens_per_second", "kv_cache_gib_per_replica"} <= entry.keys()
    direct = parallel.plan_tp_dp(
        "Qwen2.5-7B", 8, "H100-80GB", max_completion_length=1024, prompt_length=512,
        per_device_train_batch_size=8, num_processes=4, gradient_accumulation_steps=16, num_generations=8,
    )
    assert json.loads(json.dumps(direct.to_dict())) == result


def test_cli_dash_spelling(capsys):
    argv = [arg.replace("_", "-") if arg.startswith("--") else arg for arg in EXAMPLE] + ["--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["prompt_batch_size"] == 64


def test_cli_plot_writes_a_png(tmp_path, capsys):
    path = tmp_path / "out.png"
    assert main(EXAMPLE + ["--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Plot saved" in capsys.readouterr().out


def test_cli_reads_a_training_config_and_flags_override_it(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        "model_name_or_path: Qwen/Qwen2.5-3B\nper_device_train_batch_size: 8\ngradient_accumulation_steps: 16\n"
        "num_generations: 8\nmax_completion_length: 2048\nmax_prompt_length: 256\nnum_processes: 4\n"
        "learning_rate: 1.0e-6\n"
    )
    assert main(["tp-dp", "--config", str(config), "--num-server-gpus", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt_batch_size"] == 64
    assert result["model"]["name"] == "Qwen/Qwen2.5-3B"
    assert (result["prompt_length"], result["max_completion_length"]) == (256, 2048)
    assert main(["tp-dp", "--config", str(config), "--num-server-gpus", "4", "--num-processes", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_batch_size"] == 32


def test_cli_custom_gpu(capsys):
    argv = ["tp-dp", "--model", "Qwen2.5-7B", "--num_server_gpus", "2", "--gpu", "custom", "--gpu_memory_gib", "94",
            "--gpu_bandwidth_gbs", "3900", "--gpu_bf16_tflops", "835", "--interconnect_gbs", "300", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["gpu"]["memory_gib"] == 94 and result["gpu"]["name"] == "custom"


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--model", "Qwen2.5-7B", "--num_server_gpus", "8", "--per_device_train_batch_size", "3"], "not a multiple of num_generations"),
        (["--model", "Qwen2.5-7B", "--num_server_gpus", "8", "--gpu", "Z9000"], "unknown GPU"),
        (["--model", "NotAModel-9B", "--num_server_gpus", "8"], "unknown model"),
        (["--model", "Qwen2.5-7B"], "--num_server_gpus"),
        (["--model", "Qwen2.5-7B", "--num_server_gpus", "2", "--gpu", "custom"], "--gpu custom needs"),
        (["--num_server_gpus", "2"], "no model"),
        (["--config", "/nonexistent/run.yaml", "--num_server_gpus", "2"], "cannot read --config"),
    ],
)
def test_cli_errors_exit_2_with_a_message(argv, expected, capsys):
    assert main(["tp-dp", *argv]) == 2
    captured = capsys.readouterr()
    assert expected in captured.err
    assert "Traceback" not in captured.err and captured.out == ""
