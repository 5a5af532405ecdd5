"""How often does the untrained embedded model solve each arithmetic task setting?

GRPO learns only from groups whose completions got different rewards. This
samples the embedded SmolLM2-135M-Instruct (or --model) with an in-process vLLM
engine, num_generations completions per prompt, for several task settings
(difficulty x wording), and prints per setting: the mean of each reward and the
fraction of groups whose reward has nonzero std (groups that carry signal).

    python bench/task_difficulty.py                      # the default candidates
    python bench/task_difficulty.py --settings medium/just_number hard/plain easy/just_number/calculator@0.7

A setting is difficulty/wording[/system][@temperature]: a difficulty and a
wording of fastgrpo.tasks.arithmetic, optionally a system prompt named in
SYSTEM_PROMPTS below, optionally a sampling temperature (default --temperature).

Columns:
  number_match  last number in the completion == answer (number_match_reward)
  math_verify   math-verify says the answer is right (accuracy_reward)
  fmt_*         format rewards: just_number (the reply is one number),
                ends_with_number, answer_is ("The answer is N.")
  signal_match  fraction of groups whose number_match rewards are not all equal
  signal_verify the same for math_verify
  signal_total  the same for the demo's total reward (number_match + 0.2 * format)
  len           mean completion length in tokens
"""

import argparse
import statistics
import time

DEFAULT_SETTINGS = ["hard/plain", "medium/plain", "medium/just_number", "easy/just_number", "medium/answer_is"]
SYSTEM_PROMPTS = {
    "none": None,
    "calculator": "You are a calculator. Reply with only the final number.",
}


def group_signal(values: list[float], n: int) -> float:
    groups = [values[i:i + n] for i in range(0, len(values), n)]
    return sum(1 for g in groups if max(g) != min(g)) / len(groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="difficulty/wording pairs")
    parser.add_argument("--num_prompts", type=int, default=32)
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=2, help="sample completions to print per setting")
    args = parser.parse_args()

    from vllm import SamplingParams

    from fastgrpo.engine import make_llm
    from fastgrpo.models import resolve_model
    from fastgrpo.tasks import arithmetic_examples
    from fastgrpo.trainer.rewards import FORMATS, accuracy_reward, completion_text, number_match_reward

    model = resolve_model(args.model)
    start = time.perf_counter()
    llm = make_llm(model, max_model_len=512, seed=args.seed)
    print(f"engine ready in {time.perf_counter() - start:.0f} s ({model})")
    # No per-request seed: vLLM 0.32's CPU build fails on seeded requests ("CPU Generator
    # does not use offset"); the engine's seed makes runs repeatable.
    n = args.num_generations

    rows = []
    for setting in args.settings:
        spec, _, temperature = setting.partition("@")
        difficulty, wording, *system = spec.split("/")
        system_prompt = SYSTEM_PROMPTS[system[0]] if system else None
        examples = arithmetic_examples(args.num_prompts, seed=args.seed, difficulty=difficulty, wording=wording,
                                       system_prompt=system_prompt)
        params = SamplingParams(n=args.num_generations, max_tokens=args.max_tokens,
                                temperature=float(temperature) if temperature else args.temperature)
        start = time.perf_counter()
        outputs = llm.chat([ex["prompt"] for ex in examples], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        completions, solutions, lengths = [], [], []
        for ex, out in zip(examples, outputs):
            for c in out.outputs:
                completions.append([{"role": "assistant", "content": c.text}])
                solutions.append(ex["solution"])
                lengths.append(len(c.token_ids))
        match = number_match_reward(completions, solution=solutions)
        verify = accuracy_reward(completions, solution=solutions)
        fmts = {name: [1.0 if p.match(completion_text(c)) else 0.0 for c in completions] for name, p in FORMATS.items()}
        total = [m + 0.2 * f for m, f in zip(match, fmts["just_number"])]
        rows.append([
            setting,
            f"{statistics.mean(match):.3f}",
            f"{statistics.mean(verify):.3f}",
            *(f"{statistics.mean(v):.3f}" for v in fmts.values()),
            f"{group_signal(match, n):.2f}",
            f"{group_signal(verify, n):.2f}",
            f"{group_signal(total, n):.2f}",
            f"{statistics.mean(lengths):.1f}",
            f"{elapsed:.1f}",
        ])
        print(f"\n### {setting}: {len(completions)} completions in {elapsed:.1f} s")
        for ex, out in list(zip(examples, outputs))[: args.show]:
            for c in out.outputs[:2]:
                print(f"  {ex['question']!r} ({ex['solution']}) -> {' '.join(c.text.split())[:160]!r}")

    header = ["setting", "number_match", "math_verify", *(f"fmt_{k}" for k in FORMATS), "signal_match", "signal_verify",
              "signal_total", "len", "gen_s"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{args.num_prompts} prompts x {n} completions, temperature {args.temperature} unless @T, "
          f"max_tokens {args.max_tokens}, seed {args.seed}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for r in rows:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |")


if __name__ == "__main__":
    main()
