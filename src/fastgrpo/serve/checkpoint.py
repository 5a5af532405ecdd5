"""What a weight push may contain: the checkpoint's tensor names, shapes and dtypes.

Read from the safetensors headers of the served model (no tensor data is read),
so the server can reject an unknown name or a wrong shape before any collective
starts, keeping its current weights intact.
"""

import json
from pathlib import Path

FLOAT_DTYPES = {"float32", "bfloat16", "float16"}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _model_folder(model: str, revision: str | None) -> Path:
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    # vLLM has already downloaded it; never fetch here.
    return Path(snapshot_download(model, revision=revision, local_files_only=True,
                                  allow_patterns=["*.safetensors", "*.json"]))


def read_header(file: Path) -> dict:
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def checkpoint_specs(model: str, revision: str | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype name, shape) for every tensor of the checkpoint."""
    folder = _model_folder(model, revision)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}: the server validates pushes against them")
    specs = {}
    for file in files:
        for name, entry in read_header(file).items():
            specs[name] = (_SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"].lower()), tuple(entry["shape"]))
    config_file = folder / "config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text())
        text_config = config.get("text_config", config)
        tied = text_config.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
        # Trainers' state dicts carry the tied head too; vLLM skips it on load.
        for embed in ("model.embed_tokens.weight", "transformer.wte.weight"):
            if tied and embed in specs and "lm_head.weight" not in specs:
                specs["lm_head.weight"] = specs[embed]
    return specs


def check_push(specs: dict, names: list[str], dtype_names: list[str], shapes: list[list[int]]) -> list[str]:
    """Problems with a proposed push, each naming the tensor and the fix. Empty when fine."""
    problems = []
    seen = set()
    for name, dtype, shape in zip(names, dtype_names, shapes):
        if name in seen:
            problems.append(f"tensor {name!r} appears twice: send each tensor once")
        seen.add(name)
        if name not in specs:
            close = [n for n in specs if n.split(".")[-1] == name.split(".")[-1]][:3]
            hint = f" (names of this kind here: {close})" if close else ""
            problems.append(f"unknown weight name {name!r}: the served model has no such tensor{hint}")
            continue
        want_dtype, want_shape = specs[name]
        if tuple(shape) != want_shape:
            problems.append(f"tensor {name!r} has shape {list(shape)}, the served model expects {list(want_shape)}")
        if dtype not in FLOAT_DTYPES and dtype != want_dtype:
            problems.append(
                f"tensor {name!r} has dtype {dtype}; send one of {sorted(FLOAT_DTYPES)} "
                f"(the checkpoint stores {want_dtype})"
            )
    return problems
