"""grpo_loss called the way the reference tests read: the spec's fields and the tensors as keywords of one call."""

import dataclasses

from fastgrpo.trainer.loss import LossSpec, grpo_loss

SPEC_FIELDS = {f.name for f in dataclasses.fields(LossSpec)}


def loss_with(per_token_logps, old_per_token_logps, advantages, completion_mask, **kwargs):
    spec = LossSpec(**{k: kwargs.pop(k) for k in list(kwargs) if k in SPEC_FIELDS})
    return grpo_loss(spec, per_token_logps, old_per_token_logps, advantages, completion_mask, **kwargs)
