import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastgrpo import models


@pytest.mark.parametrize("arch,model_type", [("qwen2", "qwen2"), ("llama", "llama")])
def test_tiny_model_is_small_loadable_and_chat_ready(tmp_path, arch, model_type):
    path = models.build_tiny_model(tmp_path / arch, arch=arch)
    size = sum(f.stat().st_size for f in Path(path).iterdir())
    assert size < 10 * 2**20, f"tiny model is {size / 2**20:.1f} MiB"

    config = json.loads((Path(path) / "config.json").read_text())
    assert config["model_type"] == model_type
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    # The template wraps the turn in ChatML and opens the assistant's turn.
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nWhat is 3 + 4?<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer("What is 12 + 35?")["input_ids"]) == "What is 12 + 35?"
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))


def test_tiny_models_are_deterministic(tmp_path):
    a = models.build_tiny_model(tmp_path / "a", seed=3)
    b = models.build_tiny_model(tmp_path / "b", seed=3)
    wa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_failed_conversion_leaves_nothing_trusted(tmp_path):
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"GGUF but not really")
    target = tmp_path / "cache" / "models" / "broken"
    with pytest.raises(Exception):
        models.convert_gguf(bogus, target)
    assert not target.exists()
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # no staging folder left behind


def test_incomplete_folder_is_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTGRPO_CACHE", str(tmp_path))
    half = tmp_path / "models" / models.DEFAULT_MODEL_NAME
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")  # what an interrupted copy could leave
    assert not models.is_complete(half)


def test_embedded_default_model_converts_once_and_is_reused():
    path = Path(models.default_model_path())
    assert models.is_complete(path)
    marker_mtime = (path / ".fastgrpo-complete").stat().st_mtime_ns
    assert models.default_model_path() == str(path)  # second call: no reconversion
    assert (path / ".fastgrpo-complete").stat().st_mtime_ns == marker_mtime

    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 35?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nWhat is 12 + 35?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


def test_resolve_model_passes_names_and_paths_through(tmp_path):
    assert models.resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)
