"""Token ids of conversations that grow turn by turn, without ever re-tokenizing a model's turn.

A multi-turn episode is one token sequence: the prompt, the model's first turn exactly as
the generator sampled it, the tokens of the messages that answer it (tool results, the
environment's reply), the model's next turn, and so on. Rendering the whole conversation
again and tokenizing its text would not give the same tokens: a turn's text can tokenize
differently from how it was sampled, and templates rewrite earlier turns (Qwen3 drops their
reasoning). So only the *new* messages are rendered: the template writes a fixed assistant
message followed by them, and what comes after that message's content is kept, less the
part of the end of turn that the model generated itself (ChatML: the `<|im_end|>` it
stopped on is the model's, the newline after it and the next messages are not).
"""

from __future__ import annotations

from fastgrpo.rollouts.tool_calls import calls_as_text, tools_system_prompt

# A fixed conversation that new messages are rendered after (its own tokens are cut off again).
_BASE = [{"role": "user", "content": "fastgrpo-base-question"}]
_PROBE = "fastgrpo-base-answer"


def message_text(content) -> str:
    """A message's content as text: a string, None (an assistant turn that only calls tools), or a list of parts
    (OpenAI's and transformers' {"type": "text", "text": ...}; other parts, images say, have no text)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        return "".join(part.get("text", "") for part in content
                       if isinstance(part, dict) and part.get("type", "text") == "text")
    return str(content)


class ChatTokens:
    """Prompts and continuations as token ids, for one tokenizer, tool set and template kwargs."""

    def __init__(self, tokenizer, tools: list[dict] | None = None, template_kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.tools = list(tools or [])
        self.kwargs = dict(template_kwargs or {})
        self.renders_tools = bool(self.tools) and _renders_tools(tokenizer, self.kwargs)
        reply = self._render(_BASE + [{"role": "assistant", "content": _PROBE}], generation_prompt=False)
        if reply.count(_PROBE) != 1:
            raise ValueError("the chat template does not write an assistant message's content verbatim, so the "
                             "tokens of a multi-turn episode cannot be kept exact with it; use a template that does")
        # What the template writes after an assistant turn's content (ChatML: "<|im_end|>\n"), and the special
        # tokens in it: a turn that ended on one of them generated the end of turn up to there itself.
        self.turn_end = self._tokenize(reply[reply.index(_PROBE) + len(_PROBE):])
        self.turn_end_specials = set(self.turn_end) & set(tokenizer.all_special_ids)

    # --- rendering ----------------------------------------------------------------------

    def messages_for_template(self, messages: list[dict]) -> list[dict]:
        """Messages as this template takes them: tools described in a system message where the template does not
        render `tools`, tool calls written into the content where it renders content only."""
        out = []
        for m in messages:
            m = dict(m)
            if not self.renders_tools:
                text = message_text(m.get("content"))
                if m.get("tool_calls"):
                    text = "\n".join(t for t in (text, calls_as_text(m["tool_calls"])) if t)
                m = {"role": m["role"], "content": text}
            elif m.get("content") is None or not isinstance(m.get("content"), str):
                m["content"] = message_text(m.get("content"))
            out.append(m)
        if self.tools and not self.renders_tools:
            description = tools_system_prompt(self.tools)
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{description}"}
            else:
                out.insert(0, {"role": "system", "content": description})
        return out

    def _render(self, messages, generation_prompt: bool) -> str:
        kwargs = dict(self.kwargs)
        if self.renders_tools:
            kwargs["tools"] = self.tools
        return self.tokenizer.apply_chat_template(self.messages_for_template(messages),
                                                  add_generation_prompt=generation_prompt, tokenize=False, **kwargs)

    def _tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # --- the two things episodes need -----------------------------------------------------

    def prompt(self, messages: list[dict]) -> list[int]:
        """The first prompt of an episode: the conversation so far, with the assistant's turn opened."""
        return self._tokenize(self._render(messages, generation_prompt=True))

    def continuation(self, generated: list[int], new_messages: list[dict]) -> list[int]:
        """The tokens that follow the model's turn `generated` when `new_messages` answer it, up to the opened next
        assistant turn: what the template writes after an assistant message's content when these messages follow
        it (the content stands apart from the template's own tokens around it, and no template here renders a
        message differently for what the previous one said), less the part of its end of turn that the model
        generated itself (up to its stop token)."""
        text = self._render(_BASE + [{"role": "assistant", "content": _PROBE}] + list(new_messages),
                            generation_prompt=True)
        # The last occurrence: a template may write earlier messages again (the system block), never after.
        following = self._tokenize(text[text.rindex(_PROBE) + len(_PROBE):])
        last = generated[-1] if generated else None
        if last in self.turn_end_specials and last in following[: len(self.turn_end)]:
            following = following[following.index(last) + 1:]
        return following


def _renders_tools(tokenizer, kwargs: dict) -> bool:
    """Whether the template writes the `tools` it is given (otherwise the tools go into a system message)."""
    probe = {"type": "function", "function": {"name": "fastgrpo_probe_tool", "description": "probe",
                                              "parameters": {"type": "object", "properties": {}}}}
    messages = [{"role": "user", "content": "x"}]
    try:
        with_tools = tokenizer.apply_chat_template(messages, tools=[probe], tokenize=False, **kwargs)
    except Exception:
        return False
    return "fastgrpo_probe_tool" in with_tools
