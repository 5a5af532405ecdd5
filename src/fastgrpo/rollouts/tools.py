"""Running the model's tool calls: with a timeout, a size limit, and every failure told to the model.

A tool is the user's Python function, called with the arguments the model wrote. Whatever it
does (raise, hang, return a megabyte, be called with arguments it does not take, not exist)
the episode goes on: the model gets an error result saying what happened and the call counts
as failed in the metrics. A turn's calls run at once: a plain function in a thread of its own,
an `async def` one as a coroutine on the process's one event loop (TRL's way: rollouts.event_loop),
each bounded by the timeout. A coroutine past it is cancelled; Python cannot stop a thread, so a
function that hangs is left behind (a daemon: it does not keep the process alive) and the episode
continues without it. Tools that may hang forever should time out themselves; an async tool that
blocks (time.sleep) holds up the loop's other coroutines.

What counts as a call is TRL's: a tool call the model wrote with a tool name, whether or not it
then fails (unknown tool, bad arguments, raised, and ours: timeout, too_large). Text that does not
parse as a call at all ("parse": invalid JSON, no name, a tag never closed) is not a call in TRL,
whose parser falls back to plain text there: the model is told here, but the call and failure
counts leave it out (it has its own count, `tools/failures/parse`).
"""

from __future__ import annotations

import concurrent.futures
import inspect
import json
import logging
import threading
import time
from dataclasses import dataclass

from fastgrpo.rollouts.event_loop import outcome, submit
from fastgrpo.rollouts.tool_calls import ToolCall, tool_name, tool_schema

logger = logging.getLogger(__name__)

DEFAULT_TOOL_TIMEOUT_S = 10.0
DEFAULT_MAX_TOOL_RESULT_CHARS = 4096
NOT_A_CALL = "parse"  # the one failure that TRL does not count as a call


@dataclass
class ToolResult:
    name: str
    content: str
    failure: str | None = None  # None, or: "parse", "unknown_tool", "bad_arguments", "raised", "timeout", "too_large"

    @property
    def is_call(self) -> bool:
        """Whether TRL counts it as a tool call: everything but text that did not parse as one."""
        return self.failure != NOT_A_CALL


class ToolRunner:
    def __init__(self, tools: list, timeout_s: float = DEFAULT_TOOL_TIMEOUT_S,
                 max_result_chars: int = DEFAULT_MAX_TOOL_RESULT_CHARS):
        if timeout_s <= 0:
            raise ValueError(f"tool timeout {timeout_s}: must be > 0 seconds")
        self.schemas = [tool_schema(t) for t in tools]
        self.functions = {}
        for tool, schema in zip(tools, self.schemas):
            if not callable(tool):
                raise ValueError(f"tool {tool_name(schema)!r} is a schema without a function to run: give the "
                                 "Python function itself")
            if tool_name(schema) in self.functions:
                raise ValueError(f"two tools are named {tool_name(schema)!r}: tool names must be unique")
            self.functions[tool_name(schema)] = tool
        self.timeout_s = timeout_s
        self.max_result_chars = max_result_chars
        self.abandoned = 0  # calls that timed out and may still be running

    def run(self, call: ToolCall) -> ToolResult:
        return self.run_all([call])[0]

    def run_all(self, calls: list[ToolCall]) -> list[ToolResult]:
        """A turn's calls, all at once; each gets `timeout_s` from the start."""
        started = [self._start(call) for call in calls]
        deadline = time.monotonic() + self.timeout_s
        return [s if isinstance(s, ToolResult) else self._finish(call, *s, deadline)
                for call, s in zip(calls, started)]

    def _start(self, call: ToolCall):
        """A ToolResult at once (a call that cannot run), or (the running call's future, whether a coroutine)."""
        if call.error is not None and not call.name:
            return ToolResult(call.name, f"Error: {call.error}.", NOT_A_CALL)
        function = self.functions.get(call.name)
        if function is None:
            known = ", ".join(sorted(self.functions))
            return ToolResult(call.name, f"Error: there is no tool named {call.name!r}; the tools are: {known}.",
                              "unknown_tool")
        if call.error is not None:  # it named a tool, but its arguments are not an object: TRL's call would raise
            return ToolResult(call.name, f"Error: {call.error}.", "bad_arguments")
        try:
            inspect.signature(function).bind(**call.arguments)
        except TypeError as exc:
            return ToolResult(call.name, f"Error: tool {call.name!r} cannot take these arguments: {exc}.",
                              "bad_arguments")
        if inspect.iscoroutinefunction(function):
            return submit(outcome(function(**call.arguments))), True
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()  # a thread cannot be cancelled: its future neither

        def target():
            try:
                value = function(**call.arguments)
                # A callable whose __call__ is async (or a partial of one) gives its coroutine here.
                future.set_result(submit(outcome(value)).result() if inspect.isawaitable(value) else ("value", value))
            except BaseException as exc:  # a tool's SystemExit or KeyboardInterrupt must not end the run either
                future.set_result(("error", exc))

        threading.Thread(target=target, name=f"tool-{call.name}", daemon=True).start()
        return future, False

    def _finish(self, call: ToolCall, future: concurrent.futures.Future, coroutine: bool,
                deadline: float) -> ToolResult:
        try:
            kind, value = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            if coroutine:
                future.cancel()  # it stops at its next await
            else:
                self.abandoned += 1
                logger.warning("tool %r did not return within %.1f s; the episode goes on without it (%d calls "
                               "abandoned so far)", call.name, self.timeout_s, self.abandoned)
            return ToolResult(call.name, f"Error: tool {call.name!r} did not return within {self.timeout_s:g} "
                                         "seconds.", "timeout")
        if kind == "error":
            return ToolResult(call.name, f"Error: tool {call.name!r} raised {type(value).__name__}: {value}", "raised")
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > self.max_result_chars:
            return ToolResult(call.name, f"Error: tool {call.name!r} returned {len(text)} characters, more than the "
                                         f"limit of {self.max_result_chars}.", "too_large")
        return ToolResult(call.name, text)
