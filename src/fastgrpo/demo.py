"""`fastgrpo demo`: sample the embedded default model with a real vLLM engine.

Until the GRPO trainer lands, the demo shows the generation half of the job:
the embedded SmolLM2-135M-Instruct loaded into vLLM (CPU build here, CUDA on
GPUs), several completions per arithmetic question, and the tokens/s it reached.
"""

import argparse
import random
import time

from fastgrpo.cliutil import add_flag


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="sample the embedded default model with vLLM and report tokens/s",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flag(parser, "--model", default=None, help="model name or path (default: embedded SmolLM2-135M-Instruct)")
    add_flag(parser, "--num_questions", type=int, default=4, help="arithmetic questions to ask (default 4)")
    add_flag(parser, "--num_generations", type=int, default=4, help="completions per question (default 4)")
    add_flag(parser, "--max_completion_length", type=int, default=64, help="new tokens per completion (default 64)")
    add_flag(parser, "--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    add_flag(parser, "--seed", type=int, default=0, help="seed for questions and sampling (default 0)")
    parser.set_defaults(func=run)


def arithmetic_questions(count: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    pairs = [(rng.randint(1, 9), rng.randint(10, 99)) for _ in range(count)]
    return [(f"What is {a} + {b}? Answer with the number.", a + b) for a, b in pairs]


def run(args: argparse.Namespace) -> int:
    from fastgrpo.engine import make_llm
    from fastgrpo.models import resolve_model

    model = resolve_model(args.model)
    print(f"model: {model}")
    llm = make_llm(model, max_model_len=512, seed=args.seed)

    from vllm import SamplingParams

    questions = arithmetic_questions(args.num_questions, args.seed)
    conversations = [[{"role": "user", "content": q}] for q, _ in questions]
    params = SamplingParams(
        n=args.num_generations,
        temperature=args.temperature,
        max_tokens=args.max_completion_length,
        seed=args.seed,
    )
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    elapsed = time.perf_counter() - start

    generated = 0
    for (question, answer), output in zip(questions, outputs):
        print(f"\n### {question}   (expected {answer})")
        for i, completion in enumerate(output.outputs):
            generated += len(completion.token_ids)
            text = " ".join(completion.text.split())
            print(f"  [{i}] {text}")
    completions = args.num_questions * args.num_generations
    print(
        f"\n{completions} completions, {generated} tokens in {elapsed:.2f} s: "
        f"{generated / elapsed:.0f} tokens/s (vLLM, {llm.llm_engine.vllm_config.device_config.device_type})"
    )
    return 0
