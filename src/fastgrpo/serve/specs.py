"""What a weight push may contain: tensor names, shapes and dtypes, taken from the model itself.

The server reads them once its engines have started (so vLLM has already found
or downloaded the model) from the model's config, by building the transformers
model on the meta device: no weights are read, and any checkpoint format works
(safetensors, `pytorch_model.bin`, a hub cache). That gives the names a trainer's
`named_parameters()` / `state_dict()` holds, tied LM heads included. Where the
checkpoint's safetensors headers are on disk, their names are accepted too (they
are what vLLM's `load_weights` reads, e.g. per-expert names of MoE checkpoints).

With these the server rejects an unknown name or a wrong shape before any
collective starts, keeping its current weights intact.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from fastgrpo.transfer.packing import FLOAT_DTYPES

log = logging.getLogger("fastgrpo.serve")

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


@dataclass
class ModelSpecs:
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # name -> (dtype, shape)
    # What a push must name to replace every weight (tied copies counted once): a push that does
    # makes the engines consistent again after a failed one.
    required: frozenset[str] = frozenset()
    source: str = "none"

    @property
    def known(self) -> bool:
        return bool(self.tensors)


def _meta_model_specs(model: str, revision: str | None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model, revision=revision)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = {name: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in skeleton.state_dict().items()}
    required = frozenset(name for name, _ in skeleton.named_parameters())  # named_parameters dedups tied weights
    return tensors, required


def _local_folder(model: str, revision: str | None) -> Path | None:
    path = Path(model)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        # vLLM has already fetched what it needs; never download here.
        return Path(snapshot_download(model, revision=revision, local_files_only=True,
                                      allow_patterns=["*.safetensors", "*.json"]))
    except Exception:
        return None


def read_header(file: Path) -> dict:
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def _safetensors_specs(folder: Path) -> dict:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name, entry in read_header(file).items():
            tensors[name] = (_SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"].lower()), tuple(entry["shape"]))
    return tensors


def model_specs(model: str, revision: str | None = None) -> ModelSpecs:
    """Every tensor name a push may use. Never raises: without specs the server still serves, but cannot
    refuse a bad push before its collective (it says so in its log)."""
    specs = ModelSpecs()
    try:
        tensors, required = _meta_model_specs(model, revision)
        specs = ModelSpecs(tensors, required, "config")
    except Exception as exc:
        log.warning("could not build %s on the meta device (%s: %s); validating pushes against the checkpoint's "
                    "safetensors headers instead", model, type(exc).__name__, exc)
    folder = _local_folder(model, revision)
    if folder is not None:
        try:
            on_disk = _safetensors_specs(folder)
        except (OSError, ValueError) as exc:
            log.warning("could not read the safetensors headers under %s: %s", folder, exc)
            on_disk = {}
        for name, spec in on_disk.items():
            specs.tensors.setdefault(name, spec)
        if not specs.required and on_disk:
            specs = ModelSpecs(specs.tensors, frozenset(on_disk), "safetensors")
    if not specs.known:
        log.warning("no tensor names known for %s: weight pushes are not validated before they are sent", model)
    return specs


def check_push(specs: ModelSpecs, names: list[str], dtype_names: list[str], shapes: list[list[int]]) -> list[str]:
    """Problems with a proposed push, each naming the tensor and the fix. Empty when fine."""
    problems = []
    seen = set()
    for name, dtype, shape in zip(names, dtype_names, shapes):
        if name in seen:
            problems.append(f"tensor {name!r} appears twice: send each tensor once")
        seen.add(name)
        if not specs.known:
            continue
        if name not in specs.tensors:
            close = [n for n in specs.tensors if n.split(".")[-1] == name.split(".")[-1]][:3]
            hint = f" (names of this kind here: {close})" if close else ""
            problems.append(f"unknown weight name {name!r}: the served model has no such tensor{hint}")
            continue
        want_dtype, want_shape = specs.tensors[name]
        if tuple(shape) != want_shape:
            problems.append(f"tensor {name!r} has shape {list(shape)}, the served model expects {list(want_shape)}")
        if dtype not in FLOAT_DTYPES and dtype != want_dtype:
            problems.append(f"tensor {name!r} has dtype {dtype}; send one of {sorted(FLOAT_DTYPES)} "
                            f"(the model holds {want_dtype})")
    return problems


def covers_all(specs: ModelSpecs, names: list[str]) -> bool:
    """Whether a push replaces every weight (so engines left mixed by a failed push are whole again)."""
    return not specs.required or specs.required <= set(names)
