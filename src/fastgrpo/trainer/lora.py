"""LoRA runs (`GRPOTrainer(peft_config=...)`): what each push sends to the generator.

Adapter-only where vLLM's LoRA layers can serve the adapter: after each optimizer
step only the adapter's tensors travel (transfer/adapters.py), and the generator
samples with them under the run's adapter name. Where they cannot (targets outside
attention and MLP projections, DoRA, modules_to_save), the adapter is merged into
the base for the push and unmerged after (peft's merge), and the whole model
travels as in full fine-tuning; the trainer says so at start, never silently.
"""

import contextlib
import hashlib
import json
import logging
import re
import socket
from pathlib import Path

from fastgrpo.transfer.adapters import unsupported_targets

logger = logging.getLogger(__name__)


def adapter_config(peft_model, adapter: str = "default") -> dict:
    """The adapter's peft config as JSON data (what adapter_config.json holds)."""
    config = peft_model.peft_config[adapter].to_dict()
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def adapter_tensors(peft_model, adapter: str = "default") -> dict:
    """The adapter's tensors under the names peft saves them with (vLLM reads those)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, adapter_name=adapter)


def run_identity(output_dir: str) -> str:
    """What tells one run from another on a shared server: this machine and the run's whole output path. A run
    resumed in the same folder is the same run."""
    return hashlib.sha256(f"{socket.gethostname()}:{Path(output_dir).resolve()}".encode()).hexdigest()


def default_adapter_name(output_dir: str) -> str:
    """A run's adapter name on a shared server: its output folder's name, in the characters the server takes, and
    a digest of the whole path, so that `a/out` and `b/out` do not collide."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", Path(output_dir).resolve().name).lstrip("._-")
    return f"{(name or 'run')[:55]}-{run_identity(output_dir)[:8]}"


class LoraSync:
    """How a LoRA run pushes: `adapter_only` (the adapter's tensors) or merged (the whole model)."""

    def __init__(self, peft_model, name: str):
        self.name = name
        config = adapter_config(peft_model)
        self.problems = unsupported_targets(config)
        self.adapter_only = not self.problems
        if not self.adapter_only:
            logger.warning("LoRA: vLLM's LoRA layers cannot serve %s, so each weight push merges the adapter into "
                           "the base and sends the whole model (as full fine-tuning does) instead of the adapter "
                           "alone. Target attention and MLP projections (q/k/v/o_proj, gate/up/down_proj) without "
                           "DoRA or modules_to_save to push only the adapter.", ", ".join(self.problems))
        else:
            logger.info("LoRA: pushing only adapter %r (rank %s, targets %s) after each step", name, config["r"],
                        config.get("target_modules"))

    @staticmethod
    @contextlib.contextmanager
    def merged(peft_model):
        """The base model's tensors with the adapter merged in, under the base model's names."""
        from fastgrpo.transfer import NamedWeights

        peft_model.merge_adapter()
        try:
            pairs = []
            for name, param in peft_model.get_base_model().named_parameters():
                if "lora_" in name or ".original_module." in name:
                    continue
                name = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
                pairs.append((name, param.detach()))
            yield NamedWeights(pairs)
        finally:
            peft_model.unmerge_adapter()
