"""Is a weight push exact at every bucket size, and how long does it take? Anyone can run it:

    .venv/bin/python bench/bench_weight_sync.py [--model PATH] [--buckets-mib 1 4 32 256] [--repeats 5]
                                                [--backends gloo shm]

Starts `fastgrpo vllm-serve` on the model (default: the embedded SmolLM2-135M-Instruct, served in
bfloat16), perturbs a copy of the weights and rounds it to bfloat16 (what the server stores), then,
for each bucket size: pushes it with `VLLMClient(bucket_bytes=...)` (the first push of each size opens
the group and is not timed; then `--repeats` timed pushes, median), and compares the server's prompt
logprobs on two probes with a float32 transformers forward of the same weights.

The server computes in bfloat16, so it never equals the float32 forward: "vs transformers" is that
arithmetic gap (the same at every size when the push is exact). "vs largest bucket" compares the
server with itself after pushing the same weights with the largest bucket: exact pushes leave the
same engine, so it is 0 to the last bit. At 4 MiB a decoder layer of this model spans buckets.

`--backends gloo shm` runs the sweep once per server backend (one server each, one after the other): gloo
broadcasts buckets over TCP; shm packs parts of a bucket, or the largest tensor where that is larger (here
the 54 MiB embedding), into one /dev/shm file that the workers read. "vs largest bucket" is then against the
first backend's largest bucket, and the last column is each push's time over gloo's at the same size.
"""

import argparse
import statistics
import time
from pathlib import Path

PROBES = ["What is 12 + 35? Answer with just the number. The answer is 47.",
          "<|im_start|>user\nName a prime number larger than ten.<|im_end|>\n<|im_start|>assistant\n13"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--buckets-mib", type=float, nargs="+", default=[1, 4, 32, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--noise", type=float, default=0.02, help="std of the perturbation (relative to 1)")
    parser.add_argument("--backends", nargs="+", default=["gloo"], choices=["gloo", "shm"],
                        help="the server's --weight_transfer_backend (gloo is auto on the CPU build)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastgrpo.models import resolve_model

    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    probes = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROBES]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * args.noise * param.abs().mean())
            param.copy_(param.to(torch.bfloat16).float())  # what a bf16 server stores, exactly
        expected = []
        for ids in probes:
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
            expected.append([logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)])
    layer_mib = sum(p.numel() * 2 for n, p in model.named_parameters() if ".layers.0." in n) / 2**20
    largest_mib = max(p.numel() * 2 for p in model.parameters()) / 2**20
    total_mib = sum(p.numel() * 2 for p in model.parameters()) / 2**20

    rows = []
    for backend in args.backends:
        rows += sweep(model_path, model, probes, backend, sorted(args.buckets_mib), args.repeats)

    reference = [r for r in rows if r[0] == args.backends[0]][-1][4]
    gloo_times = {mib: median for backend, mib, median, _, _ in rows if backend == "gloo"}

    def gap(a, b):
        return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))

    print(f"\nmodel: {model_path}  ({total_mib:.0f} MiB in bf16; a decoder layer {layer_mib:.1f} MiB; "
          f"largest tensor {largest_mib:.1f} MiB)")
    print(f"{args.repeats} timed pushes per size after one that opens the group; probes: {len(probes)} prompts, "
          f"{sum(len(p) - 1 for p in probes)} scored tokens\n")
    print("| backend | bucket | push time, median (min) | max abs logprob diff vs transformers fp32 | "
          "vs largest bucket | time / gloo's |")
    print("| --- | --- | --- | --- | --- | --- |")
    for backend, mib, median, fastest, served in rows:
        ratio = f"{median / gloo_times[mib]:.2f}" if mib in gloo_times else "-"
        print(f"| {backend} | {mib:g} MiB | {median:.3f} s ({fastest:.3f}) | {gap(served, expected):.3f} nats | "
              f"{gap(served, reference):.1e} | {ratio} |")


def sweep(model_path, model, probes, backend: str, buckets_mib: list[float], repeats: int) -> list[tuple]:
    """One server with this backend: (backend, MiB, median, min, served logprobs) per bucket size."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastgrpo.client import VLLMClient
    from fastgrpo.serve.launcher import ServerProcess

    server = ServerProcess(["--model", model_path, "--dtype", "auto", "--max-model-len", "512",
                            "--kv-cache-space", "1", "--log-level", "warning",
                            "--weight-transfer-backend", "auto" if backend == "gloo" else backend],
                           Path("/tmp") / f"fastgrpo-bench-sync-{backend}.log")
    rows = []
    try:
        server.wait_ready()
        for mib in buckets_mib:
            bucket_bytes = int(mib * 2**20) // 64 * 64
            with VLLMClient(base_url=server.base_url, bucket_bytes=bucket_bytes) as client:
                client.update_weights(model)  # opens the group
                times = []
                for _ in range(repeats):
                    began = time.perf_counter()
                    client.update_weights(model)
                    times.append(time.perf_counter() - began)
                # One probe per request: in bfloat16 a logit's last bit (about 0.13 nats near 20) can depend on how a
                # batch is laid out, which would hide whether the weights are the same.
                served = [client.generate(prompt_token_ids=[ids], max_tokens=1, prompt_logprobs=True)
                          .results[0].prompt_logprobs[1:] for ids in probes]
            rows.append((backend, mib, statistics.median(times), min(times), served))
            # Put the original weights back in between, so every size really changes the engine.
            with VLLMClient(base_url=server.base_url) as client:
                client.update_weights(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32))
    finally:
        server.stop()
    return rows


if __name__ == "__main__":
    main()
