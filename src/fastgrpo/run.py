"""Training runs from a spec (`fastgrpo grpo`'s YAML file and flags, or the demo's built-in one).

A spec is a dict (`fastgrpo grpo` reads the same keys from YAML and flags: fastgrpo/train_cli.py):

    model: default                      # or a name / local path
    task: {name: arithmetic, num_examples: 512}   # a built-in task, or:
    dataset: {path: data.jsonl}         # a JSON/JSONL/Parquet/CSV file with a `prompt` column
    rewards: [number_match_reward, format_reward]   # built-in names or "module:function"; default: the task's
    start_server: {data_parallel_size: 1}           # start `fastgrpo vllm-serve` for this run (server mode):
                                                    # its flags, and `devices` (its CUDA_VISIBLE_DEVICES)
    peft: {r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj]}   # train LoRA adapters (peft.LoraConfig)
    tools: ["mymodule:search"]          # multi-turn: functions the model may call (GRPOTrainer's tools), or
    environment: "mymodule:MyEnv"       # an environment factory (a built-in multi-turn task brings its own)
    ...every other key is a GRPOConfig field (output_dir, max_steps, learning_rate, use_vllm, ...)

Everything is checked before any work starts: unknown keys, a bad GRPOConfig, a missing file.
"""

import dataclasses
import importlib
import signal
import statistics
import sys
import time
from pathlib import Path


def _optional(help_text: str):
    return dataclasses.field(default=None, metadata={"help": help_text})


@dataclasses.dataclass
class RunArguments:
    """A spec's keys that are not GRPOConfig fields (also `fastgrpo grpo`'s flags: help texts are theirs)."""

    model: str | None = _optional("model name or local path (default: the embedded SmolLM2-135M-Instruct)")
    task: dict | None = _optional("a built-in task, e.g. {name: arithmetic, num_examples: 512, seed: 0}")
    dataset: dict | None = _optional("a JSON/JSONL/Parquet/CSV file with a `prompt` column: {path: data.jsonl}")
    rewards: list[str] | None = _optional("reward functions: built-in names or module:function (default: the "
                                        "task's); in YAML also {model: path} for a reward model")
    start_server: dict | None = _optional("start `fastgrpo vllm-serve` for the run: its flags, and `devices` (its "
                                        "CUDA_VISIBLE_DEVICES), e.g. {data_parallel_size: 1}")
    peft: dict | None = _optional("train LoRA adapters: peft.LoraConfig's fields, e.g. {r: 16, lora_alpha: 32}")
    tools: list[str] | None = _optional("multi-turn: functions the model may call, as module:function")
    environment: str | None = _optional("multi-turn: an environment factory, as module:Class")


SPEC_KEYS = {f.name for f in dataclasses.fields(RunArguments)}  # the rest are GRPOConfig fields

# `fastgrpo demo --lora`: rank 16 on every attention and MLP projection, at 10x the full fine-tuning rate (adapters
# start at zero and move only a small subspace; 2e-4 is the usual LoRA rate for a model this size).
DEMO_LORA = {"peft": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                      "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
             "learning_rate": 2e-4}

DEMO_SPEC = {
    "model": "default",
    "task": {"name": "arithmetic", "num_examples": 1024, "seed": 0},
    "start_server": {"max_model_len": 512, "kv_cache_space": 1},
    "use_vllm": True,
    "vllm_mode": "server",
    "output_dir": "outputs/demo",
    "max_steps": 30,
    # 32 completions per step (4 prompts x 8) in 4 micro-batches of 8: a quarter of the activations of one
    # batch of 32 (the trainer's peak memory), one generation round per step all the same.
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 4,
    "num_generations": 8,
    "max_prompt_length": 128,
    "max_completion_length": 64,
    "temperature": 1.0,
    "learning_rate": 2e-5,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "beta": 0.0,
    "loss_type": "dapo",
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": [],
    "seed": 0,
    # The CPU machine's devices; demo_spec places it on GPUs where there are some.
    "use_cpu": True,
    # bf16 autocast where the CPU has a bf16 matrix unit (AMX: about 4x its float32 rate), else float32:
    # without one torch emulates bf16, about 100x slower (fastgrpo.hardware). Master weights stay float32.
    "bf16": None,
}


# `fastgrpo demo --task NAME`: what a multi-turn task changes in the demo. feedback: up to 3 answers and 2
# feedback messages share max_completion_length.
DEMO_TASKS = {"arithmetic": {},
              "feedback": {"task": {"name": "feedback", "num_examples": 1024, "seed": 0},
                           "max_completion_length": 128, "output_dir": "outputs/demo-feedback"}}


def demo_spec(placement) -> dict:
    """The demo's spec on a `fastgrpo.placement.Placement`: where its server and trainer run."""
    server = {"max_model_len": DEMO_SPEC["start_server"]["max_model_len"]}
    if placement.server_gpus is None:
        server["kv_cache_space"] = DEMO_SPEC["start_server"]["kv_cache_space"]
    else:
        server["devices"] = placement.server_gpus
    if placement.shares_gpu:  # NCCL refuses two ranks on one GPU: weights go over CUDA IPC
        server.update(gpu_memory_utilization=placement.server_gpu_memory_utilization, weight_transfer_backend="ipc")
    return dict(DEMO_SPEC, start_server=server, use_cpu=placement.use_cpu, bf16=placement.bf16)


class SpecError(ValueError):
    pass


DEFAULT_OUTPUT_DIR = "outputs/grpo"


def unknown_keys(keys) -> SpecError:
    return SpecError(f"unknown keys {sorted(keys)}: use {sorted(SPEC_KEYS)} or GRPOConfig fields "
                     "(see `fastgrpo grpo --help`)")


def _config_fields() -> set[str]:
    from fastgrpo.config import GRPOConfig

    return {f.name for f in dataclasses.fields(GRPOConfig)}


def build_config(spec: dict):
    from fastgrpo.config import GRPOConfig

    unknown = set(spec) - SPEC_KEYS - _config_fields()
    if unknown:
        raise unknown_keys(unknown)
    fields = {k: v for k, v in spec.items() if k not in SPEC_KEYS}
    fields.setdefault("output_dir", DEFAULT_OUTPUT_DIR)
    return GRPOConfig(**fields)


def build_dataset(spec: dict):
    from datasets import load_dataset

    from fastgrpo.tasks import load_task

    if "task" in spec and "dataset" in spec:
        raise SpecError("give either 'task' (a built-in task) or 'dataset' (a file), not both")
    if "task" in spec:
        task = dict(spec["task"])
        name = task.pop("name", "arithmetic")
        return load_task(name, task.pop("num_examples", 512), task.pop("seed", 0), **task)
    if "dataset" in spec:
        path = Path(spec["dataset"]["path"])
        if not path.exists():
            raise SpecError(f"dataset file {path} does not exist")
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if kind is None:
            raise SpecError(f"dataset file {path}: use .jsonl, .json, .parquet or .csv")
        data = load_dataset(kind, data_files=str(path), split="train")
        if "prompt" not in data.column_names:
            raise SpecError(f"dataset {path} has no 'prompt' column (it has {data.column_names})")
        return data
    raise SpecError("give 'task' (e.g. {name: arithmetic}) or 'dataset' ({path: data.jsonl})")


def resolve_rewards(spec: dict):
    from fastgrpo.tasks import task_reward_funcs
    from fastgrpo.trainer import rewards as builtin

    names = spec.get("rewards")
    if names is None:
        if "task" not in spec:
            raise SpecError("give 'rewards' (built-in names or 'module:function') for a dataset file")
        return task_reward_funcs(spec["task"].get("name", "arithmetic"))
    funcs = []
    for name in names:
        if isinstance(name, dict) and "model" in name:
            funcs.append(name["model"])  # a reward model by name or path
        elif ":" in str(name):
            module, attr = name.split(":", 1)
            funcs.append(getattr(importlib.import_module(module), attr))
        elif hasattr(builtin, name):
            funcs.append(getattr(builtin, name))
        else:
            raise SpecError(f"unknown reward {name!r}: a built-in (accuracy_reward, number_match_reward, "
                            "format_reward, think_format_reward), 'module:function', or {model: path}")
    return funcs, spec.get("reward_weights")


def _resolve(name: str, what: str):
    if not isinstance(name, str) or ":" not in name:
        raise SpecError(f"{what} {name!r}: give it as 'module:attribute' (an importable module)")
    module, attr = name.split(":", 1)
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise SpecError(f"{what} {name!r} cannot be imported: {exc}") from None


def multi_turn_args(spec: dict) -> dict:
    """GRPOTrainer's tools / environment_factory from the spec (a built-in task's environment unless it names one)."""
    from fastgrpo.tasks import task_environment

    out = {}
    if spec.get("tools"):
        out["tools"] = [_resolve(t, "tool") for t in spec["tools"]]
    if spec.get("environment"):
        out["environment_factory"] = _resolve(spec["environment"], "environment")
    elif "task" in spec and task_environment(spec["task"].get("name", "arithmetic")) is not None:
        out["environment_factory"] = task_environment(spec["task"].get("name", "arithmetic"))
    return out


def build_peft_config(spec: dict):
    """The spec's `peft` section as a peft.LoraConfig (None without one)."""
    if spec.get("peft") is None:
        return None
    from peft import LoraConfig

    try:
        return LoraConfig(**spec["peft"])
    except (TypeError, ValueError) as exc:
        raise SpecError(f"peft: {exc} (the section takes peft.LoraConfig's fields: r, lora_alpha, target_modules, "
                        "lora_dropout, ...)") from None


def server_flags(spec: dict) -> tuple[dict, str | None]:
    """The started server's flags, and its CUDA_VISIBLE_DEVICES; a LoRA run's server serves its adapter."""
    flags = dict(spec["start_server"] or {})
    devices = flags.pop("devices", None)
    peft = build_peft_config(spec)
    if peft is not None:
        from fastgrpo.transfer.adapters import rank_limit

        flags.setdefault("enable_lora", True)
        flags.setdefault("max_lora_rank", rank_limit(peft.r))
    return flags, devices


def rewards_and_config(spec: dict, config=None):
    """The reward functions and the GRPOConfig of a spec (or `config`, built already); a task's own reward weights
    unless the spec or config sets them."""
    funcs, weights = resolve_rewards(spec)
    if config is None:
        if weights is not None and "reward_weights" not in spec:
            spec = dict(spec, reward_weights=weights)
        return funcs, build_config(spec)
    if weights is not None and config.reward_weights is None:
        config.reward_weights = weights
    return funcs, config


def train(spec: dict, log=print, config=None) -> dict:
    """Run a whole training job; returns a summary with the output paths and reward figures. `config`: the run's
    GRPOConfig when the caller built it (then the spec holds RunArguments' keys only)."""
    from fastgrpo.models import resolve_model
    from fastgrpo.trainer.grpo_trainer import GRPOTrainer
    from fastgrpo.trainer.reporting import MetricsFileCallback, plot_metrics, read_metrics

    spec = dict(spec)
    funcs, config = rewards_and_config(spec, config)
    peft_config = build_peft_config(spec)
    multi_turn = multi_turn_args(spec)
    dataset = build_dataset(spec)
    model = resolve_model(spec.get("model"))
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)

    server = None
    began = time.perf_counter()
    # SIGTERM (a `kill`, a scheduler) must still run the finally below, or the server would outlive us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if spec.get("start_server") is not None and config.use_vllm and config.vllm_mode == "server":
            from fastgrpo.serve.launcher import ServerProcess

            extra, devices = server_flags(spec)
            flags = ["--model", model]
            for key, value in extra.items():
                flags += [f"--{key}"] if value is True else [f"--{key}", str(value)]
            env = {"CUDA_VISIBLE_DEVICES": str(devices)} if devices is not None else None
            server = ServerProcess(flags, out / "server.log", env=env)
            log(f"starting `fastgrpo vllm-serve` on port {server.port} (log: {out / 'server.log'}) ...")
            server.wait_ready()
            config.vllm_server_host, config.vllm_server_port, config.vllm_server_base_url = "127.0.0.1", server.port, None
        trainer = GRPOTrainer(model, funcs, args=config, train_dataset=dataset,
                              callbacks=[MetricsFileCallback(metrics_path)], peft_config=peft_config, **multi_turn)
        trainer.train()
        trainer.save_model(str(out / "model"))
        trainer.close()
    finally:
        if server is not None:
            server.stop()
    rows = [r for r in read_metrics(metrics_path) if "reward" in r]
    plot = plot_metrics(metrics_path, out / "reward.png", title=f"GRPO on {Path(model).name}")
    rewards = [r["reward"] for r in rows]
    return {
        "output_dir": str(out), "metrics": str(metrics_path), "plot": str(plot), "model": str(out / "model"),
        "steps": len(rows), "seconds": round(time.perf_counter() - began, 1),
        "reward_first5": statistics.mean(rewards[:5]) if rewards else None,
        "reward_last5": statistics.mean(rewards[-5:]) if rewards else None,
        "seconds_per_step": statistics.median([r["time/generate"] + r.get("time/reward", 0) + r.get("time/train", 0)
                                               + r.get("time/weight_sync", 0) for r in rows]) if rows else None,
    }


def print_summary(summary: dict, log=print) -> None:
    log(f"\ntrained {summary['steps']} steps in {summary['seconds']} s "
        f"(median {summary['seconds_per_step']:.1f} s per step)")
    log(f"mean reward, first 5 steps: {summary['reward_first5']:.3f}   last 5 steps: {summary['reward_last5']:.3f}")
    log(f"metrics: {summary['metrics']}\nplot:    {summary['plot']}\nmodel:   {summary['model']}")
