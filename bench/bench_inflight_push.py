"""A push landing in the middle of a round: what `--kv_after_push recompute` costs against `keep`.

    .venv/bin/python bench/bench_inflight_push.py [--reps 5] [--delay 1.0]

For each mode a server with the embedded SmolLM2-135M-Instruct (float32) generates B1's round (4 prompts
x 8 completions, 64 tokens, ignore_eos) while, `--delay` s after the round starts, the trainer pushes the
whole model. recompute: the server preempts the paused requests and resets the prefix cache, so their keys
and values are computed again from the new weights; keep: they continue on those computed so far (new
requests are salted by version either way). Also a round with no push. Medians of --reps.
"""

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = [[{"role": "user", "content": f"What is {a} + {b}? Answer with the number only."}]
           for a, b in ((12, 35), (47, 18), (63, 29), (81, 14))]


def measure(mode: str, reps: int, delay: float, model: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastgrpo.client import VLLMClient
    from fastgrpo.serve.launcher import ServerProcess

    tok = AutoTokenizer.from_pretrained(model)
    ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           for p in PROMPTS]
    weights = AutoModelForCausalLM.from_pretrained(model, dtype="float32")
    server = ServerProcess(["--model", model, "--dtype", "float32", "--kv_after_push", mode],
                           Path(tempfile.mkdtemp()) / "server.log")
    server.wait_ready()
    plain, pushed, push_s = [], [], []
    try:
        with VLLMClient(base_url=server.base_url, weight_transfer_timeout=60) as client:
            client.update_weights(weights)

            def round_seconds():
                began = time.perf_counter()
                client.generate(prompt_token_ids=ids, n=8, max_tokens=64, ignore_eos=True, seed=0)
                return time.perf_counter() - began

            round_seconds()  # warm-up
            for _ in range(reps):
                plain.append(round_seconds())
                out = {}
                thread = threading.Thread(target=lambda: out.update(s=round_seconds()))
                thread.start()
                time.sleep(delay)
                began = time.perf_counter()
                client.update_weights(weights)
                push_s.append(time.perf_counter() - began)
                thread.join()
                pushed.append(out["s"])
    finally:
        server.stop()
    return {"mode": mode, "plain": statistics.median(plain), "pushed": statistics.median(pushed),
            "push": statistics.median(push_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--delay", type=float, default=1.0)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    from fastgrpo.models import resolve_model

    model = resolve_model(args.model)
    results = [measure(mode, args.reps, args.delay, model) for mode in ("recompute", "keep")]
    print(f"\nB1's round (4 prompts x 8, 64 tokens), a whole-model push {args.delay:g} s in; medians of "
          f"{args.reps}  ({' '.join(sys.argv)})\n")
    print("| --kv_after_push | round, no push s | round with a push s | its push s | the push's cost to the round s |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['mode']} | {r['plain']:.2f} | {r['pushed']:.2f} | {r['push']:.2f} | "
              f"{r['pushed'] - r['plain']:.2f} |")


if __name__ == "__main__":
    main()
