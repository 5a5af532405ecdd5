"""Multi-turn rollouts: tools, environments, and the exact tokens of episodes that interleave them."""

from fastgrpo.rollouts.environment import Environment, StepResult, ToolEnvironment
from fastgrpo.rollouts.episode import Episode, Turn, run_episodes
from fastgrpo.rollouts.tool_calls import ToolCall, parse_hermes, tool_schema
from fastgrpo.rollouts.tools import ToolResult, ToolRunner

__all__ = ["Environment", "Episode", "StepResult", "ToolCall", "ToolEnvironment", "ToolResult", "ToolRunner", "Turn",
           "parse_hermes", "run_episodes", "tool_schema"]
