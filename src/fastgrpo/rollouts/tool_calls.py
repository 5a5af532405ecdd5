"""Tool calls in the model's text: schemas, the system prompt that describes them, parsing.

The default format is the one Qwen2.5, Qwen3, SmolLM3 and Hermes models are trained on
(their chat templates describe tools this way): one JSON object per call between
`<tool_call>` and `</tool_call>`. A tokenizer with a `response_schema` (transformers'
`parse_response`) is parsed its own way. Templates that ignore `tools` (SmolLM2's, the
test models') get the tools described in a system message in the same format.

Pure functions on strings and dicts; the server and the trainer both use them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
OPEN_TAG = "<tool_call>"


@dataclass
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)
    error: str | None = None  # set when the call could not be parsed: the model is told why

    def as_message_call(self, call_id: str) -> dict:
        """The call as an assistant message's `tool_calls` entry (OpenAI's shape; HF templates take it too)."""
        return {"id": call_id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments)}}


@dataclass
class ParsedTurn:
    content: str  # the text outside the calls
    calls: list[ToolCall]


def tool_schema(tool) -> dict:
    """A tool's JSON schema, OpenAI's shape: from a Python function's signature and docstring (transformers'
    get_json_schema: type hints and a Google-style Args section), or a schema dict given as is."""
    if isinstance(tool, dict):
        return tool if "function" in tool else {"type": "function", "function": tool}
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(tool)
    except Exception as exc:
        raise ValueError(f"tool {getattr(tool, '__name__', tool)!r}: its JSON schema cannot be built from its "
                         f"signature and docstring ({exc}); give every argument a type hint and describe it in a "
                         "Google-style 'Args:' section") from None


def tool_name(schema: dict) -> str:
    return schema["function"]["name"]


def tools_system_prompt(schemas: list[dict]) -> str:
    """How the tools are described to a model whose chat template does not render `tools` itself."""
    lines = "\n".join(json.dumps(s["function"]) for s in schemas)
    return ("You can call the tools below. Each is described by a JSON schema:\n"
            f"<tools>\n{lines}\n</tools>\n"
            "To call a tool, write the call as JSON inside tags, one call per tag pair:\n"
            '<tool_call>\n{"name": "tool name", "arguments": {"argument": "value"}}\n</tool_call>\n'
            "Each result comes back in a message of its own. When you know the answer, reply without a tool call.")


def parse_hermes(text: str) -> ParsedTurn:
    """The `<tool_call>{json}</tool_call>` calls in a turn's text. A call that is not valid JSON, names no tool,
    or is opened and never closed comes back with `error` set (the model is told, the call counts as failed)."""
    calls = []
    for body in TOOL_CALL.findall(text):
        calls.append(_call_from_json(body.strip()))
    content = TOOL_CALL.sub("", text)
    if OPEN_TAG in content:  # opened, never closed: the turn ended inside a call
        content, _, rest = content.partition(OPEN_TAG)
        calls.append(ToolCall("", error=f"the tool call {OPEN_TAG}{rest[:80]!r} is not closed with </tool_call>"))
    return ParsedTurn(content.strip(), calls)


def _call_from_json(body: str) -> ToolCall:
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        return ToolCall("", error=f"the tool call {body[:120]!r} is not valid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return ToolCall("", error=f'the tool call {body[:120]!r} needs a "name" (a string) and "arguments"')
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ToolCall(data["name"], error=f"the arguments of tool {data['name']!r} must be a JSON object, "
                                            f"got {json.dumps(arguments)[:80]}")
    return ToolCall(data["name"], arguments)


def parser_for(tokenizer):
    """The parser for this tokenizer's format: its response_schema where it has one, else the Hermes format."""
    if getattr(tokenizer, "response_schema", None) is None:
        return parse_hermes

    def parse_with_schema(text: str) -> ParsedTurn:
        parsed = tokenizer.parse_response(text)
        calls = []
        for call in parsed.get("tool_calls") or []:
            function = call.get("function", call)
            arguments = function.get("arguments") or {}
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError as exc:
                    calls.append(ToolCall(function.get("name", ""), error=f"arguments are not valid JSON: {exc}"))
                    continue
            calls.append(ToolCall(function.get("name", ""), arguments))
        return ParsedTurn((parsed.get("content") or "").strip(), calls)

    return parse_with_schema


def calls_as_text(calls: list[dict]) -> str:
    """An assistant message's `tool_calls` (OpenAI's shape) written back in the Hermes format, for templates that
    render only `content`."""
    parts = []
    for call in calls:
        function = call.get("function", call)
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        parts.append(f"<tool_call>\n{json.dumps({'name': function.get('name'), 'arguments': arguments})}\n"
                     "</tool_call>")
    return "\n".join(parts)
