"""What a push sends: names and full shapes up front, then the tensors one at a time.

`ModelWeights` streams a model's parameters, gathering each from its shards only
when the sender pulls it (DeepSpeed ZeRO-3: `GatheredParameters`; FSDP2:
`DTensor.full_tensor()`) and releasing it when the sender pulls the next. No rank
ever holds a full copy of the model: a 7B model in float32 is 28 GB, one of its
layers a few hundred MB. Gathering is a collective, so every rank iterates, in
the same order; only the sending rank keeps what it gets.
"""

from collections.abc import Iterable, Iterator

import torch

from fastgrpo.transfer.packing import TensorMeta, wire_meta

# Wrappers whose prefixes never reach the served model's names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module.", "_orig_mod.")


def clean_name(name: str) -> str:
    for wrapper in _WRAPPER_PREFIXES:
        name = name.replace(wrapper, "")
    return name


def _is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id") and hasattr(param, "ds_shape")


class Weights:
    """Names, full shapes, dtypes and device, known without gathering; iterating yields the tensors."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[torch.dtype]
    device: torch.device

    def metas(self, wire_dtype: torch.dtype) -> list[TensorMeta]:
        return [wire_meta(n, s, d, wire_dtype) for n, s, d in zip(self.names, self.shapes, self.dtypes)]

    def __iter__(self) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.names)

    def drain(self) -> None:
        """Finish what an iteration owes the other ranks (gathers, see ModelWeights); whole tensors owe nothing."""


class ModelWeights(Weights):
    """A module's parameters (tied weights once), streamed and gathered one at a time."""

    def __init__(self, model: torch.nn.Module):
        self.params = list(model.named_parameters())  # deduplicates tied weights
        self._active: Iterator[torch.Tensor] | None = None
        self.names = [clean_name(n) for n, _ in self.params]
        self.shapes = [tuple(p.ds_shape) if _is_zero3(p) else tuple(p.shape) for _, p in self.params]
        self.dtypes = [p.dtype for _, p in self.params]
        self.device = self.params[0][1].device if self.params else torch.device("cpu")

    def __iter__(self):
        self._active = self._gather()
        return self._active

    def drain(self) -> None:
        """Run the gathers an iteration still owes (all of them if none started): every rank must run each
        one, also after a failed push, or the other ranks wait in a collective forever."""
        remaining, self._active = self._active if self._active is not None else self._gather(), None
        for tensor in remaining:
            del tensor  # released before the next gather

    def _gather(self) -> Iterator[torch.Tensor]:
        for _, param in self.params:
            if _is_zero3(param):
                import deepspeed

                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    yield param.data  # valid until the next pull, when the context releases it
            elif hasattr(param, "full_tensor"):  # FSDP2 DTensor: an all-gather, freed once dropped
                yield param.full_tensor().detach()
            else:
                yield param.detach()


class NamedWeights(Weights):
    """Tensors given as a dict or (name, tensor) pairs, already whole."""

    def __init__(self, pairs: Iterable[tuple[str, torch.Tensor]]):
        pairs = list(pairs)
        self.names = [n for n, _ in pairs]
        self.tensors = [t for _, t in pairs]
        self.shapes = [tuple(t.shape) for t in self.tensors]
        self.dtypes = [t.dtype for t in self.tensors]
        self.device = self.tensors[0].device if self.tensors else torch.device("cpu")

    def __iter__(self):
        for tensor in self.tensors:
            yield tensor.detach()


def as_weights(weights) -> Weights:
    """A module, a dict of tensors, (name, tensor) pairs, or a `Weights`."""
    if isinstance(weights, Weights):
        return weights
    if isinstance(weights, torch.nn.Module):
        return ModelWeights(weights)
    if isinstance(weights, dict):
        return NamedWeights(weights.items())
    if isinstance(weights, Iterable):
        return NamedWeights(weights)
    raise TypeError(f"weights must be a torch module, a dict or (name, tensor) pairs, not {type(weights).__name__}")
