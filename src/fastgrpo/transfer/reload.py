"""The worker side's reload, for our own worker engines (gloo.py, shm.py): vLLM's layerwise reload, and the
repack of tied CPU heads that it leaves stale."""

import torch


def tied_cpu_heads(model: torch.nn.Module) -> list[list[torch.nn.Module]]:
    """Groups of modules that share one weight and each keep their own packed CPU GEMM (`cpu_linear`)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return []
    sharers: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and hasattr(module, "cpu_linear"):
            sharers.setdefault(id(weight), []).append(module)
    return [modules for modules in sharers.values() if len(modules) > 1]


def refresh_tied_cpu_heads(model: torch.nn.Module, packed_before: dict | None = None) -> None:
    """Re-pack the CPU GEMM of modules that share a tied weight (lm_head = embed_tokens).

    vLLM's CPU build packs each linear/LM-head weight for its GEMM kernels after
    loading (`cpu_linear`). With tied embeddings the checkpoint only carries
    `embed_tokens`, so a reload re-processes that module alone and the LM head
    keeps computing logits from its stale packed copy (measured here: a pushed
    embedding changed the server's logprobs by ~2 nats against transformers).
    With `packed_before` (each module's `cpu_linear` before the reload), only the
    sharers the reload left stale are re-packed, and only if another sharer was
    re-packed; without it, every sharer is (the embedding's repack is a sizeable
    part of a push of a small model, so it is worth not doing twice).
    """
    for modules in tied_cpu_heads(model):
        if packed_before is None:
            stale = modules
        else:
            stale = [m for m in modules if m.cpu_linear is packed_before.get(m)]
            if len(stale) == len(modules):
                continue  # the shared weight was not reloaded
        for module in stale:
            module.quant_method.process_weights_after_loading(module)


class LayerwiseReload:
    """start/finish_weight_update of a vLLM `WeightTransferEngine` (mixed in first): what arrives between them
    goes through `model.load_weights` inside vLLM's layerwise reload, which re-processes each layer once it is
    whole (the CPU build repacks linear weights for oneDNN)."""

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self.packed_before = {m: m.cpu_linear for group in tied_cpu_heads(self.model) for m in group}
        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        refresh_tied_cpu_heads(self.model, getattr(self, "packed_before", None))
