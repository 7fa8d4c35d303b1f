"""The chat template: how ``messages`` become one prompt text.

The model is a plain language model without special chat tokens, so turns are written as a
script, one ``Role: content`` line per message, and the prompt ends with the assistant's cue::

    System: You are a poet.
    User: Write about the sea.
    Assistant:

The model then writes the assistant's turn. Generation stops at whichever comes first: the
request's own stop strings, max_tokens, the end-of-sequence token, or one of ``STOP``, the
start of a next turn (``"\\nUser:"`` ...), which ends the turn the way an end-of-turn token would
(finish_reason ``stop``; the stop string is not part of the output). ``developer`` messages are
rendered as ``System``. A conversation whose last message is the assistant's is continued:
that message is written without a line break and no new cue is added.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
GENERATION_CUE = "Assistant:"
STOP = ("\nUser:", "\nSystem:", "\nAssistant:")


class Message(Protocol):
    role: str

    @property
    def text(self) -> str: ...


def render(messages: Sequence[Message]) -> str:
    """The prompt text of a conversation (see the module docstring)."""
    if not messages:
        raise ValueError("messages must not be empty")
    lines = [f"{ROLE_NAMES[m.role]}: {m.text}" for m in messages]
    if messages[-1].role == "assistant":
        return "\n".join(lines)
    return "\n".join([*lines, GENERATION_CUE])


class ScriptTemplate:
    """The built-in template as a bundle's chat template (the interface service.http.jinja_template's
    ``JinjaChatTemplate`` shares): stop strings end a turn, the prompt starts with bos as any text does."""

    stop: tuple[str, ...] = STOP
    end_of_turn: tuple[int, ...] = ()
    add_special_tokens = True

    def render(self, messages: Sequence[Message], tools: list[dict] | None = None) -> str:
        return render(messages)


SCRIPT = ScriptTemplate()
