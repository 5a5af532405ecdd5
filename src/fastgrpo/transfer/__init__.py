"""Weight transfer from the trainer to vLLM workers: one send path, one receive path, a backend per file.

    packing.py   the bucket and part plans both sides derive from the same metadata (pure)
    bucketed.py  the pipelined send loop and receive loop over any broadcast
    base.py      the sender interface and the backend registry
    gloo.py      CPU tensors: sender, vLLM worker engine, vLLM trainer engine
    nccl.py      CUDA tensors: sender for vLLM's NCCL worker engine
    ipc.py       CUDA tensors on the engine's own GPU: parts in one buffer, for vLLM's packed IPC engine
    shm.py       CPU tensors on the server's machine: parts in one /dev/shm file, sender and worker engine
    reload.py    our worker engines' reload (vLLM's layerwise reload; tied CPU heads)
    weights.py   what is sent: a model's parameters, gathered one at a time from shards
    push.py      open a group; push = announce, send while the workers receive (or part by part), confirm
    plugin.py    registers the gloo and shm engines with vLLM in every process
"""

from fastgrpo.transfer.base import DEFAULT_BUCKET_BYTES, DEFAULT_TIMEOUT_S, sender_class
from fastgrpo.transfer.push import WeightControl, WeightTransferError, open_sender, push_weights
from fastgrpo.transfer.weights import ModelWeights, NamedWeights, Weights, as_weights

__all__ = ["DEFAULT_BUCKET_BYTES", "DEFAULT_TIMEOUT_S", "ModelWeights", "NamedWeights", "WeightControl",
           "WeightTransferError", "Weights", "as_weights", "open_sender", "push_weights",
           "sender_class"]
