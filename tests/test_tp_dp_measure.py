"""`fastgrpo tp-dp --measure`: the real server in DP=1 and DP=2 on this CPU machine, with a tiny model."""

import json

import pytest

from fastgrpo.cli import main
from fastgrpo.hardware import usable_cores

pytestmark = pytest.mark.slow


@pytest.mark.skipif(len(usable_cores()) < 2, reason="DP=2 on CPU needs two cores")
def test_measure_dp1_and_dp2_on_cpu(tiny_llama, capsys, tmp_path):
    plot = tmp_path / "measure.png"
    # 8 x 1 x 1 / 2 = 4 prompts of 16 tokens, 2 completions each of 16 tokens.
    code = main([
        "tp-dp", "--model", tiny_llama, "--measure", "--json", "--num_server_gpus", "2",
        "--per_device_train_batch_size", "8", "--num_processes", "1", "--gradient_accumulation_steps", "1",
        "--num_generations", "2", "--max_completion_length", "16", "--prompt_length", "16",
        "--measure_timeout", "240", "--plot", str(plot),
    ])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    result = json.loads(out.out)
    assert result["measured"] is True and result["device_kind"] == "cpu"
    assert result["prompt_batch_size"] == 4

    measured = {(e["tensor_parallel_size"], e["data_parallel_size"]): e
                for e in result["layouts"] if e["measurement"] == "measured"}
    assert set(measured) == {(1, 1), (1, 2)}
    for (tp, dp), entry in measured.items():
        assert entry["devices_per_replica"] == 2 // dp and entry["device_unit"] == "core"
        assert entry["measured_tokens_per_second"] > 0
        assert entry["measured_seconds_per_round"] > 0
        # ignore_eos: every completion is full length.
        assert entry["completion_tokens_per_round"] == 4 * 2 * 16 == entry["expected_completion_tokens_per_round"]
        assert entry["predicted_tokens_per_second"] > 0 and entry["predicted_seconds_per_round"] > 0
        assert entry["tokens_per_second"] == entry["predicted_tokens_per_second"]
        assert entry["measured_over_predicted"] > 0
        assert entry["engine_start_seconds"] > 0
    # With DP=2 both replicas got prompts.
    assert measured[(1, 2)]["replicas_used"] == [0, 1]

    # TP=2 on CPU is listed with its prediction but not measured, and the output says why.
    skipped = [e for e in result["layouts"] if e["measurement"] == "skipped"]
    assert [(e["tensor_parallel_size"], e["data_parallel_size"]) for e in skipped] == [(2, 1)]
    assert any("TP>1" in note and "not measured" in note for note in result["notes"])

    # The recommendation comes from the measurement: the layout with the most measured tokens/s
    # (or, within the tie tolerance, the smaller TP; both measured layouts have TP=1 here).
    rec = result["recommended"]
    assert rec["source"] == "measured"
    best = max(measured.values(), key=lambda e: e["measured_tokens_per_second"])
    fastest = best["measured_tokens_per_second"]
    chosen = measured[(rec["tensor_parallel_size"], rec["data_parallel_size"])]
    assert chosen["measured_tokens_per_second"] * 1.05 >= fastest
    assert "measured" in rec["reason"] and f"{chosen['measured_tokens_per_second']:,.0f}" in rec["reason"]
    assert result["predicted_recommended"] is not None
    assert plot.stat().st_size > 0


def test_measure_start_failure_quotes_the_server_log(tmp_path, capsys):
    """A layout whose server cannot start is reported with the tail of its log, and exits 1.

    A folder with a config.json but no weights: vllm-serve fails while loading, fast."""
    model = tmp_path / "broken"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64, vocab_size=384,
        max_position_embeddings=1024, torch_dtype="float32")))
    code = main([
        "tp-dp", "--model", str(model), "--measure", "--num_server_gpus", "1",
        "--per_device_train_batch_size", "2", "--num_generations", "2",
        "--max_completion_length", "8", "--prompt_length", "8", "--measure_timeout", "120",
        "--measure_log_dir", str(tmp_path / "logs"),
    ])
    out = capsys.readouterr()
    assert code == 1
    assert "TP=1, DP=1 failed" in out.out and "Last lines of its log" in out.out
    assert (tmp_path / "logs" / "server-tp1-dp1.log").is_file()
