"""A multi-turn task: arithmetic with feedback. The model answers; when it is wrong it is told
whether its number is too high or too low and tries again, up to MAX_ATTEMPTS times.

The reward is the environment's: 1 for a right first answer, 1/2 for a right second, 1/4 for a
right third, 0 otherwise. The questions are the arithmetic task's ("What is a + b? Answer with
just the number.", one-digit operands), which the embedded SmolLM2-135M-Instruct answers right
about a quarter of the time on its first try: the untrained model succeeds sometimes, and a
model that answers shortly and uses the feedback earns more. `fastgrpo demo --task feedback`.
"""

from __future__ import annotations

from fastgrpo.rollouts.environment import Environment, StepResult
from fastgrpo.tasks.arithmetic import arithmetic_dataset

MAX_ATTEMPTS = 3


class ArithmeticFeedback(Environment):
    def reset(self, solution: str, **row) -> None:
        self.solution, self.attempt = int(solution), 0

    def step(self, turn: str) -> StepResult:
        from fastgrpo.trainer.rewards import last_number

        self.attempt += 1
        answer = last_number(turn)
        if answer == self.solution:
            return StepResult(reward=0.5 ** (self.attempt - 1), done=True)
        if self.attempt == MAX_ATTEMPTS:
            return StepResult(done=True)
        if answer is None:
            hint = "That is not a number."
        else:
            hint = f"{answer} is too {'high' if answer > self.solution else 'low'}."
        return StepResult(f"{hint} Try again: answer with just the number.")


def feedback_dataset(num_examples: int, seed: int = 0, **options):
    """The arithmetic task's rows (its options: difficulty, wording, system_prompt)."""
    return arithmetic_dataset(num_examples, seed, **options)


def feedback_reward_funcs():
    from fastgrpo.trainer.rewards import env_reward

    return [env_reward], [1.0]
