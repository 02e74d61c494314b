"""Chat messages to a prompt string, through the tokenizer's chat template (transformers' Jinja).

`AsyncEngine.chat()` and the OpenAI server both call `render_chat`; the engine itself only ever
sees the rendered prompt. Every failure is a `ChatTemplateError` (an `InvalidRequestError`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from chameleon.errors import ChatTemplateError

Message = Mapping[str, Any]


def render_chat(tokenizer: Any | None, messages: Sequence[Message], chat_template: str | None = None) -> str:
    """The prompt text for `messages`, ending with the assistant's generation prompt.

    `chat_template` (a Jinja string) overrides the tokenizer's own. Raises `ChatTemplateError`
    when there is no tokenizer, no template at all, the messages are malformed, or the template
    itself fails to render.
    """
    if tokenizer is None:
        raise ChatTemplateError("this model has no tokenizer, so chat messages cannot be rendered")
    _check_messages(messages)
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if not template:
        raise ChatTemplateError("the tokenizer has no chat template; pass chat_template= (a Jinja string)")
    try:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages], chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:  # jinja2 errors, template-raised exceptions: all the caller's doing
        raise ChatTemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(text, str):
        raise ChatTemplateError(f"the chat template rendered {type(text).__name__}, not text")
    return text


def _check_messages(messages: Sequence[Message]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role', 'content'} mappings")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] must be a mapping with a string 'role'")
        if "content" in message and not isinstance(message["content"], (str, list, type(None))):
            raise ChatTemplateError(f"messages[{i}]['content'] must be a string or a list of parts")
