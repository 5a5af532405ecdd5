"""Reward functions where TRL keeps them: `from fastgrpo.rewards import accuracy_reward` for
`from trl.rewards import accuracy_reward`.

Of TRL 1.16's `trl.rewards`, accuracy_reward and think_format_reward are here (the same arguments and
values); get_cosine_scaled_reward, get_repetition_penalty_reward, get_soft_overlong_punishment and
reasoning_accuracy_reward are not. fastgrpo adds number_match_reward, format_reward and make_format_reward.
"""

from fastgrpo.trainer.rewards import (
    accuracy_reward,
    format_reward,
    make_format_reward,
    number_match_reward,
    think_format_reward,
)

__all__ = ["accuracy_reward", "format_reward", "make_format_reward", "number_match_reward", "think_format_reward"]
