"""The TP/DP calculator: batch arithmetic, memory arithmetic, published results, several nodes, the CLI."""

import json
import re

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
        (["--model", "Qwen2.5-7B", "--nodes", "0", "--gpus_per_node", "8"], "--nodes must be a positive number"),
        (["--model", "Qwen2.5-7B", "--nodes", "2"], "--nodes 2 needs --gpus_per_node"),
        (["--model", "Qwen2.5-7B", "--nodes", "2", "--gpus_per_node", "8", "--num_server_gpus", "12"],
         "--num_server_gpus 12 does not match --nodes 2 x --gpus_per_node 8 = 16"),
        (["--model", "Qwen2.5-7B", "--nodes", "3", "--num_server_gpus", "16"],
         "--num_server_gpus 16 does not split evenly over --nodes 3"),
        (["--model", "Qwen2.5-7B", "--nodes", "2", "--gpus_per_node", "0"], "--gpus_per_node must be at least 1"),
        (["--model", "Qwen2.5-7B", "--num_server_gpus", "16", "--gpus_per_node", "8"], "pass --nodes 2"),
        (["--model", "Qwen2.5-7B", "--num_server_gpus", "8", "--internode_gbs", "100"], "go with --nodes > 1"),
        (["--model", "Qwen2.5-7B", "--nodes", "2", "--gpus_per_node", "8", "--internode_gbs", "0"],
         "--internode_gbs must be a positive bandwidth"),
        (["--model", "Qwen2.5-7B", "--nodes", "2", "--gpus_per_node", "8", "--measure"],
         "measure one node's layouts with --nodes 1"),
    ],
)
def test_cli_errors_exit_2_with_a_message(argv, expected, capsys):
    assert main(["tp-dp", *argv]) == 2
    captured = capsys.readouterr()
    assert expected in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


# --- several nodes ------------------------------------------------------------------------

H100 = parallel.KNOWN_GPUS["H100-80GB"]


def plan_on_nodes(model, nodes=2, gpus_per_node=8, **kwargs):
    """The EXAMPLE batch (64 prompts x 8, 512 + 1024 tokens) on nodes x gpus_per_node H100s."""
    figures = dict(max_completion_length=1024, prompt_length=512, per_device_train_batch_size=8, num_processes=4,
                   gradient_accumulation_steps=16, num_generations=8)
    return parallel.plan_tp_dp(model, None, "H100-80GB", nodes=nodes, gpus_per_node=gpus_per_node,
                               **{**figures, **kwargs})


def test_candidate_layouts_keep_tp_within_a_node_or_whole_nodes():
    # 3 x 8 GPUs: TP=3, 6 and 12 would split a node's GPUs between TP groups.
    assert parallel.candidate_layouts(24, 8) == [(1, 24), (2, 12), (4, 6), (8, 3), (24, 1)]
    assert parallel.candidate_layouts(8) == parallel.candidate_layouts(8, 8) == [(1, 8), (2, 4), (4, 2), (8, 1)]


def test_7b_on_two_nodes_keeps_tp_within_a_node_and_dp_across_both():
    plan = plan_on_nodes("Qwen2.5-7B")
    assert plan.num_server_gpus == 16
    rec = plan.recommended
    assert rec.tensor_parallel_size in {1, 2, 4, 8}
    assert rec.tensor_parallel_size * rec.data_parallel_size == 16
    best = layout(plan, rec.tensor_parallel_size)
    assert best.nodes_per_replica == 1 and best.replicas_per_node == rec.data_parallel_size // 2
    assert best.tp_link in ("none", "intra-node")
    assert (rec.tensor_parallel_size, rec.data_parallel_size) == (1, 16)  # as on one node: it fits on one GPU
    # 14.2 GiB of weights reach each node's link once per push: 15.2e9 bytes / 50 GB/s.
    assert best.weight_push_seconds == pytest.approx(plan.model.weight_bytes / 50e9)
    assert best.weight_push_seconds == pytest.approx(0.305, abs=0.001)


def test_a_layout_that_loses_to_the_network_is_named():
    plan = plan_on_nodes("Qwen2.5-72B")  # TP=16 is valid for its 64 heads, and fits
    spanning = layout(plan, 16)
    assert spanning.usable and spanning.nodes_per_replica == 2 and spanning.tp_link == "inter-node"
    assert spanning.replicas_per_node is None
    assert plan.recommended.tensor_parallel_size in (4, 8)  # TP=1, 2 do not fit: 135 GiB of weights
    reason = plan.recommended.reason
    assert "TP=16 spans 2 nodes: its all-reduces cross the 50 GB/s link" in reason
    best = layout(plan, plan.recommended.tensor_parallel_size)
    assert f"its round takes {spanning.seconds_per_round / best.seconds_per_round:.1f}x as long as {best.label}'s" in reason
    assert spanning.seconds_per_round > 2 * best.seconds_per_round


def test_tp_stays_within_a_node_even_where_a_fast_network_would_win():
    # One prompt: sharding wins, and with a network as good as NVLink TP=16 would be a hair faster than TP=8.
    plan = plan_on_nodes("Qwen2.5-72B", per_device_train_batch_size=8, num_processes=1, gradient_accumulation_steps=1,
                         internode_gbs=400, internode_latency_us=20)
    assert layout(plan, 16).seconds_per_round < layout(plan, 8).seconds_per_round
    assert (plan.recommended.tensor_parallel_size, plan.recommended.data_parallel_size) == (8, 2)
    assert "yet its round is predicted" in plan.recommended.reason
    assert "only where the model fits in no node" in plan.recommended.reason


def test_a_model_too_big_for_one_node_gets_tp_across_nodes():
    plan = plan_on_nodes("Llama-3.1-405B")
    # 405.85B parameters x 2 bytes = 756 GiB: 94.5 GiB per GPU at TP=8, more than 0.9 x 79.2.
    assert plan.model.param_count == pytest.approx(405.85e9, rel=0.001)
    assert layout(plan, 8).weights_gib_per_device == pytest.approx(756.0 / 8, rel=0.001)
    for tp in (1, 2, 4, 8):
        assert layout(plan, tp).valid and not layout(plan, tp).fits
    rec = plan.recommended
    assert (rec.tensor_parallel_size, rec.data_parallel_size) == (16, 1)
    est = layout(plan, 16)
    assert est.nodes_per_replica == 2 and est.tp_link == "inter-node"
    ratio = est.decode_step_seconds / parallel.decode_step_seconds(
        plan.model, plan.gpu, 16, est.concurrent_sequences_per_replica, plan.workload.mean_decode_context)
    assert (f"TP=16 spans 2 nodes: its all-reduces cross the 50 GB/s link, {ratio:.1f}x slower per decode step "
            f"than over the 450 GB/s link within a node, which no layout avoids: "
            f"the model fits in no node's 8 GPUs") in rec.reason
    assert est.weight_push_seconds == pytest.approx(405.85e9 * 2 / 50e9, rel=0.001)  # 16.2 s per push


def test_internode_tp_decode_step_is_slower_by_what_the_constants_imply():
    model, gpu = parallel.resolve_model("Llama-3.1-405B"), parallel.resolve_gpu("H100-80GB")
    two_nodes = parallel.Cluster(nodes=2, gpus_per_node=8)
    running, context = 256, 1024.0
    message = running * 16384 * 2  # the hidden states of the running sequences, bf16
    ring = 2 * (16 - 1) / 16 * message
    # One all-reduce of TP=16: if its 16 GPUs shared one node's link, log2(16) latency steps over it; across
    # 2 nodes, log2(8) steps inside each node and log2(2) over the network, and the ring runs at 50 GB/s.
    within = H100["allreduce_latency_us"] * 1e-6 * 4 + ring / (H100["interconnect_gbs"] * 1e9)
    across = (H100["allreduce_latency_us"] * 1e-6 * 3 + 50e-6 * 1) + ring / (50 * 1e9)
    assert parallel.DEFAULT_INTERNODE_GBS == 50 and parallel.DEFAULT_INTERNODE_LATENCY_US == 50
    assert parallel.allreduce_seconds(message, 16, gpu) == pytest.approx(within)
    assert parallel.allreduce_seconds(message, 16, gpu, two_nodes) == pytest.approx(across)
    # Everything else in the step (weights, KV cache, host work) is the same: two all-reduces per layer differ.
    one_domain = parallel.decode_step_seconds(model, gpu, 16, running, context)
    spanning = parallel.decode_step_seconds(model, gpu, 16, running, context, two_nodes)
    assert spanning - one_domain == pytest.approx(2 * 126 * (across - within), rel=1e-9)
    assert spanning / one_domain > 2
    # A TP group inside one node never touches the network.
    assert parallel.decode_step_seconds(model, gpu, 8, running, context, two_nodes) == \
        parallel.decode_step_seconds(model, gpu, 8, running, context)
    # With the network as fast as the GPUs' link (and as quick to start), the spanning step costs the same.
    as_fast = parallel.Cluster(2, 8, internode_gbs=H100["interconnect_gbs"],
                               internode_latency_us=H100["allreduce_latency_us"])
    assert parallel.decode_step_seconds(model, gpu, 16, running, context, as_fast) == pytest.approx(one_domain)
    # Bandwidth-bound (a huge message), the all-reduce is slower by the links' ratio: 450 / 50 = 9.
    big = 1e12
    assert parallel.allreduce_seconds(big, 16, gpu, two_nodes) / parallel.allreduce_seconds(big, 16, gpu) == \
        pytest.approx(H100["interconnect_gbs"] / 50, rel=1e-3)


def test_server_cluster_from_the_flags():
    assert parallel.server_cluster(16, nodes=2) == parallel.Cluster(2, 8)
    assert parallel.server_cluster(None, nodes=2, gpus_per_node=4).num_gpus == 8
    assert parallel.server_cluster(None, nodes=1, gpus_per_node=8) == parallel.Cluster(1, 8)
    assert parallel.server_cluster(4, nodes=1, gpus_per_node=8) == parallel.Cluster(1, 4)  # the trainer has the rest


EXAMPLE_TABLE_ON_ONE_NODE = """\
Prompt batch size: 8 x 4 x 16 / 8 = 64 prompts per round (512 completions of up to 1024 tokens, prompts of 512)
Model: Qwen/Qwen2.5-7B (7.62B parameters, 14.2 GiB of weights)
Server: 8 x H100-80GB (79.2 GiB, 3350 GB/s, 989 TFLOPS bf16, 450 GB/s link), gpu_memory_utilization 0.9, max_num_seqs 1024

layout      fits     weights/GPU GiB  KV/replica GiB  seqs/replica (at once)  round s  tokens/s  note
TP=1, DP=8  yes      14.2             52.0            64 (64)                 10.6     49,536
TP=2, DP=4  yes      7.1              120.0           128 (128)               12.8     40,960
TP=4, DP=2  yes      3.5              255.9           256 (256)               18.1     28,985
TP=8, DP=1  invalid                                                                              TP=8 does not divide the 28 attention heads

Recommended: --tensor_parallel_size 1 --data_parallel_size 8
  TP=1, DP=8: fastest predicted round (10.6 s), 1.21x faster than the next best (TP=2, DP=4); the model fits on one GPU, so independent replicas beat sharding it.
"""


@pytest.mark.parametrize("node_flags", [[], ["--nodes", "1"], ["--nodes", "1", "--gpus_per_node", "8"]])
def test_cli_output_on_one_node_is_unchanged(node_flags, capsys):
    assert main(EXAMPLE + node_flags) == 0
    assert capsys.readouterr().out == EXAMPLE_TABLE_ON_ONE_NODE
    assert main(EXAMPLE + node_flags + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "nodes" not in result and "internode_gbs" not in result
    assert not set(parallel.NODE_FIELDS) & set(result["layouts"][0])


def test_cli_table_on_two_nodes(capsys):
    argv = ["tp-dp", "--model", "Qwen2.5-72B", "--nodes", "2", "--gpus-per-node", "8", "--gpu", "H100-80GB",
            "--per_device_train_batch_size", "8", "--num_processes", "4", "--gradient_accumulation_steps", "16",
            "--num_generations", "8", "--max_completion_length", "1024", "--prompt_length", "512"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Server: 2 nodes x 8 x H100-80GB" in out and "50 GB/s and 50 us between nodes" in out
    header = next(line for line in out.splitlines() if line.startswith("layout"))
    assert re.match(r"layout +replica spans +TP link +fits .* tokens/s +push s +note$", header), header
    row16 = next(line for line in out.splitlines() if line.startswith("TP=16, DP=1"))
    assert "2 nodes" in row16 and "across nodes (50 GB/s)" in row16 and "2.91" in row16  # 135.4 GiB / 50 GB/s
    row4 = next(line for line in out.splitlines() if line.startswith("TP=4, DP=4"))
    assert "1 node" in row4 and "in node (450 GB/s)" in row4
    assert "Recommended: --tensor_parallel_size 4 --data_parallel_size 4 (2 per node: vLLM's --data-parallel-size-local 2)" in out
    # A faster network makes the spanning layout lose less.
    assert main(argv + ["--internode_gbs", "400", "--json"]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert fast["internode_gbs"] == 400 and fast["nodes"] == 2 and fast["gpus_per_node"] == 8
    spanning = next(e for e in fast["layouts"] if e["tensor_parallel_size"] == 16)
    assert spanning["tp_link"] == "inter-node" and spanning["nodes_per_replica"] == 2
    assert spanning["seconds_per_round"] < layout(plan_on_nodes("Qwen2.5-72B"), 16).seconds_per_round


def test_cli_nodes_infer_gpus_per_node_from_num_server_gpus(capsys):
    assert main(EXAMPLE[:3] + ["--num_server_gpus", "16", "--nodes", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["nodes"], result["gpus_per_node"], result["num_server_gpus"]) == (2, 8, 16)
