"""`fastgrpo tp-dp --measure`: time every candidate layout on the real generation server.

For each layout this starts `fastgrpo vllm-serve` as a subprocess (its own
process group, torn down whatever happens), waits for GET /health, sends one
warm-up request and then `rounds` generation rounds of the run's real shape:
prompt_batch_size prompts of prompt_length tokens, n = num_generations,
max_tokens = max_completion_length, ignore_eos (every completion full length).
Tokens/s = completion tokens returned / wall time of the round's request.
It prints the measurement beside the performance model's prediction and
recommends from the measurement.

On GPUs the candidates are the layouts of `fastgrpo.parallel` (TP x DP = the
server's GPU count; invalid and non-fitting ones are skipped). On vLLM's CPU
build the "devices" are cores and the candidates are TP=1 with DP = each
divisor of the core count, each replica running its matmuls on cores / DP
OpenMP threads; TP > 1 is not measured there (see `cpu_tp_note`).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field

from fastgrpo.hardware import usable_cores
from fastgrpo.planner import model as parallel
from fastgrpo.serve.launcher import ServerProcess

DEFAULT_MEASURE_TIMEOUT = 300  # seconds for one layout's server to become healthy
MAX_MODEL_LEN_SLACK = 16  # tokens of --max_model_len beyond prompt + completion
ROUND_TIMEOUT = 1800.0  # seconds one generation request may take before we call the server stuck
WARMUP_MAX_TOKENS = 4
DEFAULT_CPU_KV_CACHE_GIB = 1  # fastgrpo vllm-serve's default on CPU


class MeasureError(RuntimeError):
    """A layout's server failed to start or to answer; the message quotes its log."""


# ---------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------


@dataclass
class Candidate:
    """One layout: what the model predicts and what the server measured."""

    tensor_parallel_size: int
    data_parallel_size: int
    devices_per_replica: int  # GPUs (= TP) or CPU cores (OpenMP threads of one replica)
    device_unit: str  # "GPU" or "core"
    estimate: parallel.LayoutEstimate
    device: parallel.GPUSpec  # the figures the prediction used, per device
    status: str = "pending"  # "measured", "skipped" or "failed"
    reason: str = ""  # why skipped or failed
    engine_start_seconds: float | None = None
    warmup_seconds: float | None = None
    round_seconds: list[float] = field(default_factory=list)
    completion_tokens: int | None = None  # per round
    expected_completion_tokens: int | None = None
    replicas_used: list[int] = field(default_factory=list)
    served_dtype: str | None = None
    log_path: str | None = None
    load_average: float | None = None  # 1-minute load average of the machine after the last round

    @property
    def label(self) -> str:
        return f"TP={self.tensor_parallel_size}, DP={self.data_parallel_size}"

    @property
    def per_replica(self) -> str:
        n = self.devices_per_replica
        return f"{n} {self.device_unit}{'s' if n != 1 else ''}"

    @property
    def measured_seconds_per_round(self) -> float | None:
        if not self.round_seconds:
            return None
        ordered = sorted(self.round_seconds)
        return ordered[len(ordered) // 2]  # the median round

    @property
    def measured_tokens_per_second(self) -> float | None:
        seconds = self.measured_seconds_per_round
        if seconds is None or not self.completion_tokens:
            return None
        return self.completion_tokens / seconds

    @property
    def measured_over_predicted(self) -> float | None:
        measured = self.measured_tokens_per_second
        predicted = self.estimate.tokens_per_second if self.estimate.usable else 0.0
        return measured / predicted if measured and predicted else None


def cpu_tp_note(cores: int, skipped: list[str]) -> str:
    return (
        f"{' and '.join(skipped)} not measured: on vLLM's CPU build one TP=1 replica already spreads its "
        f"matmuls over all of its cores with OpenMP threads, so TP>1 (which works there) only splits the same "
        f"cores into ranks that add two shared-memory all-reduces per layer; the one-replica layout measured is "
        f"TP=1, DP=1 over all {cores} cores. Its prediction (cores as devices) is listed for reference."
    )


def cpu_candidates(plan: parallel.TPDPPlan, cores: int, kv_cache_gib: float) -> tuple[list[Candidate], list[str]]:
    """TP=1 with DP = each divisor of `cores` (cores / DP threads per replica), and TP>1 predicted only."""
    workload, model = plan.workload, plan.model
    candidates, skipped = [], []
    for dp in sorted((d for d in range(1, cores + 1) if cores % d == 0)):
        device = parallel.cpu_device(cores // dp, kv_cache_gib)
        est = parallel.estimate_layout(model, device, workload, 1, dp, plan.gpu_memory_utilization, plan.max_num_seqs)
        candidates.append(Candidate(1, dp, cores // dp, "core", est, device))
    per_core = parallel.cpu_device(1, kv_cache_gib)
    for tp, dp in parallel.candidate_layouts(cores):
        if tp == 1:
            continue
        est = parallel.estimate_layout(model, per_core, workload, tp, dp, plan.gpu_memory_utilization, plan.max_num_seqs)
        cand = Candidate(tp, dp, tp, "core", est, per_core, status="skipped")
        cand.reason = "TP>1 on CPU: not measured (see notes)"
        if not est.valid:
            cand.reason += f"; {est.reason}"
        candidates.append(cand)
        skipped.append(cand.label)
    notes = [cpu_tp_note(cores, skipped)] if skipped else []
    return candidates, notes


def gpu_candidates(plan: parallel.TPDPPlan) -> list[Candidate]:
    candidates = []
    for est in plan.layouts:
        cand = Candidate(est.tensor_parallel_size, est.data_parallel_size, est.tensor_parallel_size, "GPU",
                         est, plan.gpu)
        if not est.usable:
            cand.status = "skipped"
            cand.reason = f"{'invalid' if not est.valid else 'predicted not to fit'}: {est.reason}"
        candidates.append(cand)
    return candidates


# ---------------------------------------------------------------------------
# One layout on the real server
# ---------------------------------------------------------------------------


def start_layout_server(model: str, tp: int, dp: int, log_path: str, *, max_model_len: int,
                        kv_cache_space: int | None = None, gpu_memory_utilization: float | None = None,
                        max_num_seqs: int | None = None, cpu_cores: list[int] | None = None) -> ServerProcess:
    """`fastgrpo vllm-serve` in one layout, as a subprocess in its own process group."""
    args = ["--model", model, "--tensor-parallel-size", str(tp), "--data-parallel-size", str(dp),
            "--max-model-len", str(max_model_len)]
    for flag, value in (("--kv-cache-space", kv_cache_space), ("--gpu-memory-utilization", gpu_memory_utilization),
                        ("--max-num-seqs", max_num_seqs)):
        if value is not None:
            args += [flag, str(value)]
    return ServerProcess(args, log_path, cpu_cores=cpu_cores)


def wait_ready(server: ServerProcess, timeout: float, label: str) -> dict:
    try:
        return server.wait_ready(timeout)
    except (RuntimeError, TimeoutError) as exc:
        reason = str(exc).split(";")[0]  # "exited with status N" or "not ready within T s"
        raise MeasureError(f"{label} failed: {reason} (--measure_timeout {timeout:g} s). Last lines of its log "
                           f"({server.log_path}):\n{server.tail(2500)}") from None


def make_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """`count` distinct prompts of `length` token ids from the middle of the vocabulary
    (clear of special tokens, which sit at either end in the common tokenizers)."""
    rng = random.Random(seed)
    low, high = vocab // 8, max(vocab // 8 + 1, vocab * 7 // 8)
    return [[rng.randrange(low, high) for _ in range(length)] for _ in range(count)]


def post_generate(base_url: str, payload: dict, label: str, server: ServerProcess) -> tuple[dict, float]:
    """POST /generate (JSON, so ignore_eos is sent whatever the client supports); body and wall seconds."""
    import httpx

    start = time.perf_counter()
    try:
        r = httpx.post(base_url + "/generate", json=payload, timeout=httpx.Timeout(ROUND_TIMEOUT, connect=10.0))
    except httpx.TimeoutException:
        raise MeasureError(
            f"{label}: no answer to /generate within {ROUND_TIMEOUT:g} s. Last lines of the server log "
            f"({server.log_path}):\n{server.tail()}"
        ) from None
    except httpx.HTTPError as e:
        raise MeasureError(f"{label}: /generate failed ({e}). Last lines of the server log:\n{server.tail()}") from None
    seconds = time.perf_counter() - start
    if r.status_code != 200:
        raise MeasureError(f"{label}: /generate answered {r.status_code}: {r.text[:500]}")
    return r.json(), seconds


def measure_candidate(cand: Candidate, model: str, workload: parallel.Workload, vocab: int, *, log_dir: str,
                      timeout: float, rounds: int, kv_cache_space: int | None, gpu_memory_utilization: float | None,
                      max_num_seqs: int | None, cpu_cores: list[int] | None, progress=None) -> None:
    """Start the server in this layout, warm it up, time `rounds` rounds; fills in `cand`. Raises MeasureError."""
    label = cand.label
    cand.log_path = os.path.join(log_dir, f"server-tp{cand.tensor_parallel_size}-dp{cand.data_parallel_size}.log")
    started = time.perf_counter()
    server = start_layout_server(
        model, cand.tensor_parallel_size, cand.data_parallel_size, cand.log_path,
        max_model_len=workload.context_length + MAX_MODEL_LEN_SLACK, kv_cache_space=kv_cache_space,
        gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs, cpu_cores=cpu_cores,
    )
    try:
        health = wait_ready(server, timeout, label)
        cand.engine_start_seconds = time.perf_counter() - started
        cand.served_dtype = health.get("dtype")
        if progress:
            progress(f"{label}: server ready in {cand.engine_start_seconds:.0f} s; warming up")
        # Warm-up: other prompts than the round's (no prefix-cache hits), enough for every replica.
        warm = make_prompts(max(workload.prompt_batch_size, cand.data_parallel_size), workload.prompt_length, vocab, seed=1)
        _, cand.warmup_seconds = post_generate(server.base_url, dict(
            prompt_token_ids=warm, n=1, max_tokens=WARMUP_MAX_TOKENS, ignore_eos=True), label, server)
        cand.expected_completion_tokens = workload.sequences * workload.max_completion_length
        for i in range(rounds):
            prompts = make_prompts(workload.prompt_batch_size, workload.prompt_length, vocab, seed=100 + i)
            body, seconds = post_generate(server.base_url, dict(
                prompt_token_ids=prompts, n=workload.num_generations, max_tokens=workload.max_completion_length,
                temperature=1.0, ignore_eos=True), label, server)
            tokens = sum(len(c["token_ids"]) for result in body["results"] for c in result["completions"])
            cand.replicas_used = sorted({c["dp_rank"] for result in body["results"] for c in result["completions"]})
            cand.round_seconds.append(seconds)
            cand.completion_tokens = tokens
            cand.load_average = os.getloadavg()[0]
            if progress:
                progress(f"{label}: round {i + 1}/{rounds}: {tokens} tokens in {seconds:.1f} s ({tokens / seconds:,.0f} tokens/s)")
        cand.status = "measured"
    finally:
        server.stop()


# ---------------------------------------------------------------------------
# The whole measurement
# ---------------------------------------------------------------------------


@dataclass
class MeasuredRecommendation:
    tensor_parallel_size: int
    data_parallel_size: int
    reason: str
    source: str = "measured"


@dataclass
class Measurement:
    plan: parallel.TPDPPlan  # the prediction (on CPU: over the measured layouts and the skipped TP>1 ones)
    candidates: list[Candidate]
    on_cpu: bool
    num_devices: int
    rounds: int
    recommended: MeasuredRecommendation | None
    notes: list[str]

    @property
    def failed(self) -> list[Candidate]:
        return [c for c in self.candidates if c.status == "failed"]

    def to_dict(self) -> dict:
        out = self.plan.to_dict()
        layouts = []
        for cand, entry in zip(self.candidates, out["layouts"]):
            assert entry["tensor_parallel_size"] == cand.tensor_parallel_size
            entry.update(
                devices_per_replica=cand.devices_per_replica,
                device_unit=cand.device_unit,
                predicted_seconds_per_round=entry["seconds_per_round"],
                predicted_tokens_per_second=entry["tokens_per_second"],
                measurement=cand.status,
                measurement_note=cand.reason,
                measured_seconds_per_round=cand.measured_seconds_per_round,
                measured_tokens_per_second=cand.measured_tokens_per_second,
                measured_over_predicted=cand.measured_over_predicted,
                measured_round_seconds=list(cand.round_seconds),
                completion_tokens_per_round=cand.completion_tokens,
                expected_completion_tokens_per_round=cand.expected_completion_tokens,
                replicas_used=list(cand.replicas_used),
                engine_start_seconds=cand.engine_start_seconds,
                warmup_seconds=cand.warmup_seconds,
                served_dtype=cand.served_dtype,
                load_average=cand.load_average,
            )
            layouts.append(entry)
        out["layouts"] = layouts
        out["predicted_recommended"] = out["recommended"]
        out["recommended"] = asdict(self.recommended) if self.recommended else None
        out["measured"] = True
        out["device_kind"] = "cpu" if self.on_cpu else "gpu"
        out["measure_rounds"] = self.rounds
        out["notes"] = list(self.notes)
        return out


def recommend_measured(candidates: list[Candidate], predicted: parallel.Recommendation | None) -> MeasuredRecommendation | None:
    """The layout with the highest measured tokens/s; within the tie tolerance, the smaller TP."""
    measured = [c for c in candidates if c.status == "measured" and c.measured_tokens_per_second]
    if not measured:
        return None
    tol = parallel.TIE_TOLERANCE
    fastest = max(measured, key=lambda c: c.measured_tokens_per_second)
    tied = [c for c in measured if c.measured_tokens_per_second * (1 + tol) >= fastest.measured_tokens_per_second]
    best = min(tied, key=lambda c: (c.tensor_parallel_size, -c.measured_tokens_per_second))
    others = sorted((c for c in measured if c is not best), key=lambda c: -c.measured_tokens_per_second)
    if others:
        nxt = others[0]
        ratio = best.measured_tokens_per_second / nxt.measured_tokens_per_second
        if ratio >= 1 + tol:
            versus = f"{ratio:.2f}x the next best ({nxt.label}, {nxt.measured_tokens_per_second:,.0f} tokens/s)"
        else:
            versus = f"a tie with {nxt.label} (within {tol:.0%}; rerun with --measure_rounds 3 to separate them)"
    else:
        versus = "the only layout measured"
    if predicted is None:
        agreement = "the model predicted no layout to fit"
    elif (predicted.tensor_parallel_size, predicted.data_parallel_size) == (best.tensor_parallel_size, best.data_parallel_size):
        agreement = "the model predicted the same layout"
    else:
        agreement = (f"the model predicted TP={predicted.tensor_parallel_size}, "
                     f"DP={predicted.data_parallel_size}; trust the measurement")
    reason = (f"{best.label}: highest measured throughput ({best.measured_tokens_per_second:,.0f} completion tokens/s, "
              f"{best.measured_seconds_per_round:.1f} s per round), {versus}; {agreement}.")
    return MeasuredRecommendation(best.tensor_parallel_size, best.data_parallel_size, reason)


def detect_devices(on_cpu: bool) -> int:
    if on_cpu:
        return len(usable_cores())
    import torch

    return torch.cuda.device_count()


def measure(plan: parallel.TPDPPlan, model: str, *, on_cpu: bool, timeout: float = DEFAULT_MEASURE_TIMEOUT,
            rounds: int = 1, kv_cache_space: int | None = None, gpu_memory_utilization: float | None = None,
            max_num_seqs: int | None = None, log_dir: str | None = None, progress=None) -> Measurement:
    """Measure every candidate layout of `plan` (its num_server_gpus devices) on the real server.

    `model` is what vllm-serve gets (a local folder or a name it can load).
    On CPU `plan` should carry the per-core CPU row (`parallel.cpu_device(1)`);
    the prediction is redone per replica there. A layout that fails is
    recorded as failed (its reason quotes the server log) and the others go on.
    """
    if rounds < 1:
        raise parallel.PlanError(f"--measure_rounds must be at least 1, got {rounds}")
    num_devices = plan.num_server_gpus
    available = detect_devices(on_cpu)
    unit = "CPU cores" if on_cpu else "GPUs"
    if num_devices > available:
        raise parallel.PlanError(
            f"--num_server_gpus {num_devices}: this machine gives this process only {available} {unit}; "
            f"measure with at most {available}"
        )
    notes = []
    cpu_cores = None
    if on_cpu:
        kv = kv_cache_space or DEFAULT_CPU_KV_CACHE_GIB
        candidates, notes = cpu_candidates(plan, num_devices, kv)
        cpu_cores = usable_cores()[:num_devices]
        plan = parallel.TPDPPlan(
            plan.model, parallel.cpu_device(1, kv), plan.workload, num_devices, plan.gpu_memory_utilization,
            plan.max_num_seqs, [c.estimate for c in candidates],
            parallel.recommend([c.estimate for c in candidates], plan.workload.prompt_batch_size),
            [f"{c.label}: {w}" for c in candidates if c.status != "skipped" for w in c.estimate.warnings],
        )
        kv_cache_space = kv
        notes.append(
            f"Predictions use the CPU row of the GPU table (per core {plan.gpu.bf16_tflops * 1000:g} GFLOP/s bf16, "
            f"{plan.gpu.bandwidth_gbs:g} GB/s), times the cores of each replica; the model was calibrated on GPUs "
            f"and leaves out most of the engine's per-step CPU work, which on a CPU competes with the matmuls "
            f"for the same cores: expect it to be optimistic (docs/tp-dp.md, Measuring)."
        )
        if usable_cores() != cpu_cores:
            notes.append(f"Servers ran on cores {','.join(map(str, cpu_cores))} of the {available} this process may use.")
    else:
        candidates = gpu_candidates(plan)
    keep_logs = log_dir is not None
    log_dir = log_dir or tempfile.mkdtemp(prefix="fastgrpo-tp-dp-measure-")
    os.makedirs(log_dir, exist_ok=True)
    for cand in candidates:
        if cand.status == "skipped":
            continue
        if progress:
            progress(f"{cand.label}: starting fastgrpo vllm-serve ({cand.per_replica} per replica)")
        try:
            measure_candidate(cand, model, plan.workload, plan.model.vocab, log_dir=log_dir, timeout=timeout,
                              rounds=rounds, kv_cache_space=kv_cache_space if on_cpu else None,
                              gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
                              cpu_cores=cpu_cores, progress=progress)
        except MeasureError as e:
            cand.status = "failed"
            cand.reason = str(e)
            keep_logs = True
            if progress:
                progress(f"{cand.label}: FAILED: {e}")
        if cand.status == "measured" and cand.completion_tokens != cand.expected_completion_tokens:
            notes.append(f"{cand.label}: the server returned {cand.completion_tokens} completion tokens per round, "
                         f"not {cand.expected_completion_tokens}: tokens/s counts what came back")
    loads = [c.load_average for c in candidates if c.load_average is not None]
    if on_cpu and loads and max(loads) > available + 0.5:
        notes.append(
            f"The machine was busy: 1-minute load average up to {max(loads):.1f} on {available} cores while "
            f"measuring. Other processes took CPU time from the servers, so the measured figures are low and "
            f"noisy; a replica whose OpenMP threads span several cores is likely hit hardest (its threads wait "
            f"for one another at every matmul). Measure on an idle machine before trusting the ranking."
        )
    if keep_logs:
        notes.append(f"Server logs kept in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    recommended = recommend_measured(candidates, plan.recommended)
    return Measurement(plan, candidates, on_cpu, num_devices, rounds, recommended, notes)


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def format_measurement(result: Measurement, inputs: dict) -> str:
    plan = result.plan
    w, m = plan.workload, plan.model
    if result.on_cpu:
        server = (f"{result.num_devices} CPU cores (vLLM's CPU build), KV cache "
                  f"{plan.gpu.kv_cache_gib:g} GiB per replica; devices are cores")
    else:
        g = plan.gpu
        server = (f"{result.num_devices} x {g.name} ({g.memory_gib:g} GiB, {g.bandwidth_gbs:g} GB/s, "
                  f"{g.bf16_tflops:g} TFLOPS bf16), gpu_memory_utilization {plan.gpu_memory_utilization:g}")
    lines = [
        f"Prompt batch size: {inputs['per_device_train_batch_size']} x {inputs['num_processes']} x "
        f"{inputs['gradient_accumulation_steps']} / {w.num_generations} = {w.prompt_batch_size} prompts per round "
        f"({w.sequences} completions of {w.max_completion_length} tokens, prompts of {w.prompt_length})",
        f"Model: {m.name} ({m.param_count / 1e9:.2f}B parameters, {m.weight_bytes / parallel.GIB:.2f} GiB of weights)",
        f"Server: {server}",
        f"Measured: a fresh `fastgrpo vllm-serve` per layout, one warm-up request, then {result.rounds} "
        f"round{'s' if result.rounds != 1 else ''} of the real shape with ignore_eos (every completion full length); "
        f"tokens/s = completion tokens / wall time of the round{' (median round)' if result.rounds > 1 else ''}; "
        f"load = the machine's 1-minute load average after it",
        "",
    ]
    header = ["layout", "per replica", "predicted s", "predicted tok/s", "measured s", "measured tok/s",
              "measured/predicted", "start s", "load", "note"]
    rows = [header]
    for c in result.candidates:
        est = c.estimate
        predicted_s = est.seconds_per_round if est.usable else None
        predicted_tps = est.tokens_per_second if est.usable else None
        note = c.reason if c.status != "failed" else "FAILED to measure (below)"
        if c.status == "measured":
            note = "; ".join(est.warnings)
        if not est.usable and c.status != "skipped":
            note = est.reason
        rows.append([
            c.label, c.per_replica, _fmt(predicted_s, ".1f"), _fmt(predicted_tps, ",.0f"),
            _fmt(c.measured_seconds_per_round, ".1f"), _fmt(c.measured_tokens_per_second, ",.0f"),
            _fmt(c.measured_over_predicted, ".2f"), _fmt(c.engine_start_seconds, ".0f"),
            _fmt(c.load_average, ".1f"), note,
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        lines.append("  ".join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]).rstrip())
    lines.append("")
    if result.recommended:
        rec = result.recommended
        lines.append(f"Recommended (measured): --tensor_parallel_size {rec.tensor_parallel_size} "
                     f"--data_parallel_size {rec.data_parallel_size}")
        lines.append(f"  {rec.reason}")
    else:
        lines.append("Recommended: none; no layout could be measured.")
    if plan.recommended:
        lines.append(f"Predicted best: TP={plan.recommended.tensor_parallel_size}, "
                     f"DP={plan.recommended.data_parallel_size}")
    if result.notes:  # (the prediction's warnings are in the table's note column)
        lines.append("Notes:")
        lines.extend(f"  - {note}" for note in result.notes)
    for c in result.failed:
        lines.append("")
        lines.append(f"{c.label} failed: {c.reason}")
    return "\n".join(lines)


def plot_measurement(result: Measurement, path: str) -> None:
    """Predicted tokens/s per layout against prompt batch size, with the measured points on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    plan = result.plan
    current = plan.workload.prompt_batch_size
    top = max(64, 8 * current)
    batch_sizes = [2**k for k in range(0, top.bit_length()) if 2**k <= top]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for i, cand in enumerate(c for c in result.candidates if c.status != "skipped"):
        color = f"C{i}"
        xs, ys = [], []
        for batch in batch_sizes:
            workload = parallel.Workload(batch, plan.workload.num_generations, plan.workload.prompt_length,
                                         plan.workload.max_completion_length)
            est = parallel.estimate_layout(plan.model, cand.device, workload, cand.tensor_parallel_size,
                                           cand.data_parallel_size, plan.gpu_memory_utilization, plan.max_num_seqs)
            if est.usable:
                xs.append(batch)
                ys.append(est.tokens_per_second)
        name = f"{cand.label} ({cand.per_replica} per replica)"
        if xs:
            ax.plot(xs, ys, color=color, linestyle="--", linewidth=1, marker="o", markersize=2,
                    label=f"{name}, predicted")
        if cand.measured_tokens_per_second:
            ax.plot([current], [cand.measured_tokens_per_second], color=color, marker="*", markersize=12,
                    linestyle="none", label=f"{name}, measured")
    ax.axvline(current, color="gray", linestyle=":", linewidth=1, label=f"your batch ({current})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_xlabel("prompt batch size (prompts per round)")
    ax.set_ylabel("completion tokens/s")
    where = f"{result.num_devices} CPU cores" if result.on_cpu else f"{result.num_devices} x {plan.gpu.name}"
    ax.set_title(
        f"{os.path.basename(plan.model.name.rstrip('/')) or plan.model.name} on {where}, "
        f"{plan.workload.prompt_length}+{plan.workload.max_completion_length} tokens, "
        f"{plan.workload.num_generations} per prompt\npredicted (lines) and measured (stars)",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
