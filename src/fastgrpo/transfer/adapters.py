"""LoRA adapters on the wire: one safetensors payload, the same for the server and colocate mode.

An adapter push carries only the adapter's tensors (peft's names, as `save_pretrained`
writes them) and its config, in one safetensors byte string whose metadata holds the
config and the weight version. The receiver writes it as a peft folder
(adapter_model.safetensors + adapter_config.json), which vLLM's LoRA manager loads.
Safetensors, not pickle: a payload cannot run code on the server.
"""


import json
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

# Modules vLLM's LoRA layers serve in dense decoder models (its column/row-parallel and merged linear layers,
# whose merged forms are qkv_proj and gate_up_proj). An adapter on anything else (embeddings, the LM head, norms)
# is merged into the base and pushed whole instead (fastgrpo.trainer.lora).
VLLM_LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj",
                               "down_proj", "gate_up_proj"})
CONFIG_KEY, VERSION_KEY = "adapter_config", "weight_version"
# The header with which a run names itself when it pushes or deletes an adapter (the server keeps a name for the
# run that first pushed it, see serve/adapters.py).
ADAPTER_OWNER_HEADER = "X-Adapter-Owner"

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM's LoRA kernels take


def rank_limit(rank: int) -> int:
    """The smallest max_lora_rank vLLM takes that serves adapters of `rank`."""
    for limit in LORA_RANKS:
        if limit >= rank:
            return limit
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest, {LORA_RANKS[-1]}")


def pack_adapter(tensors: dict[str, torch.Tensor], config: dict, weight_version: int) -> bytes:
    """The payload of one adapter push (tensors copied to contiguous CPU memory)."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    return save_safetensors(cpu, metadata={CONFIG_KEY: json.dumps(config), VERSION_KEY: str(weight_version)})


def unpack_adapter(payload: bytes) -> tuple[dict[str, torch.Tensor], dict, int]:
    """(tensors, config, weight_version) of a payload; ValueError naming what is wrong."""
    import struct

    if len(payload) < 8:
        raise ValueError("the body is not a safetensors payload (fewer than 8 bytes)")
    (header_len,) = struct.unpack("<Q", payload[:8])
    try:
        header = json.loads(payload[8:8 + header_len])
        tensors = load_safetensors(payload)
    except Exception as exc:
        raise ValueError(f"the body is not a safetensors payload: {exc}") from None
    metadata = header.get("__metadata__") or {}
    if CONFIG_KEY not in metadata or VERSION_KEY not in metadata:
        raise ValueError(f"the payload's metadata needs {CONFIG_KEY!r} (the peft config as JSON) and "
                         f"{VERSION_KEY!r}: build it with fastgrpo.transfer.adapters.pack_adapter")
    try:
        config, version = json.loads(metadata[CONFIG_KEY]), int(metadata[VERSION_KEY])
    except ValueError as exc:
        raise ValueError(f"the payload's metadata is malformed: {exc}") from None
    return tensors, config, version


def target_modules(config: dict) -> set[str]:
    targets = config.get("target_modules") or []
    return {targets} if isinstance(targets, str) else set(targets)


def unsupported_targets(config: dict, extra_trainable: list[str] | None = None) -> list[str]:
    """What in a LoRA config vLLM cannot serve as an adapter (empty: it can)."""
    problems = [f"target module {m!r}" for m in sorted(target_modules(config) - VLLM_LORA_MODULES)]
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {sorted(config['modules_to_save'])} (fully trained modules)")
    if config.get("use_dora"):
        problems.append("use_dora=True")
    if (config.get("peft_type") or "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r}")
    return problems + [f"trainable {p}" for p in (extra_trainable or [])]


def check_adapter_shapes(tensors: dict[str, torch.Tensor], rank: int,
                         base_shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Problems with an adapter's tensors against the base model's weight shapes (empty: none). vLLM's CPU build
    loads a mis-shaped adapter without a word and fails only when a generation uses it."""
    problems = []
    for name, tensor in tensors.items():
        module, sep, part = name.rpartition(".lora_")
        if not sep or part not in ("A.weight", "B.weight"):
            problems.append(f"{name}: not a LoRA tensor (peft names end in .lora_A.weight or .lora_B.weight)")
            continue
        base_name = module.removeprefix("base_model.model.") + ".weight"
        if base_name not in base_shapes:
            problems.append(f"{name}: the model has no weight {base_name}")
            continue
        out_features, in_features = base_shapes[base_name][:2]
        want = (rank, in_features) if part == "A.weight" else (out_features, rank)
        if tuple(tensor.shape) != want:
            problems.append(f"{name}: shape {list(tensor.shape)}, expected {list(want)} (rank {rank})")
    return problems


def write_adapter_dir(folder: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """A peft adapter folder that vLLM loads (written whole before it is used)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder
