"""A model's own Jinja chat template, rendered as ``transformers``' ``apply_chat_template`` does.

Imported Hugging Face bundles carry the checkpoint's template (``chat_template.jinja``). It is
untrusted code from a model repository, so it runs in Jinja's immutable sandbox with exactly the
environment ``transformers`` gives it: ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension (``{% break %}``), a ``{% generation %}`` block that renders its body, a ``tojson`` filter
that does not escape HTML (``json.dumps`` with ``ensure_ascii=False``), ``raise_exception``,
``strftime_now``, and a ``namespace`` that refuses underscore names. The variables are
``messages`` (dicts without None-valued keys), ``tools``, ``documents``, ``add_generation_prompt``
and the tokenizer's ``bos_token``, ``eos_token``, ``unk_token`` and ``pad_token``.

A conversation that ends with the assistant's message is continued (as ``continue_final_message``
does): the template renders that message and the prompt stops where its content ends. OpenAI's
``developer`` role is passed as ``system``, the role every template knows.

Any error while rendering (``raise_exception`` in the template, a role it refuses, an undefined
value used as an object) is the request's fault as far as the client can act on it: a 400 naming
the problem (service/http/errors.py kind ``chat_template``). A template that does not compile is the
bundle's fault: refused at start-up.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from service.http.chat_template import Message
from service.http.errors import ApiError

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for where a continued message ends
_SENTINEL = "\u2063END_OF_TURN_PROBE\u2063"  # content no template alters: finds the end-of-turn text


class TemplateCompileError(ValueError):
    """The template is not valid Jinja (the message names the line)."""


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks assistant text with it; rendering
    needs only its body."""

    tags = {"generation"}  # noqa: RUF012 (Jinja reads this class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace without underscore-prefixed attributes (no route to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any):  # Jinja's own signature trick: namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace cannot hold underscore-prefixed names ({name!r})")


class _Dict:
    """``dict(...)`` and ``dict.fromkeys`` in a template, and nothing else of the type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_template(source: str) -> jinja2.Template:
    """The template compiled in the sandbox; TemplateCompileError naming the line if it is not Jinja."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TemplateCompileError(f"line {e.lineno}: {e.message}") from None


@dataclass(frozen=True)
class JinjaChatTemplate:
    """A bundle's Jinja template with the tokenizer's special token texts.

    Args:
        source: the template text.
        special_tokens: ``bos_token``, ``eos_token``, ... as the template reads them (None: left out).
        end_of_turn: token ids that may end an assistant turn besides the end-of-sequence ids (see
            ``turn_end_text``); chat requests stop at them.
    """

    source: str
    special_tokens: dict[str, str | None] = field(default_factory=dict)
    end_of_turn: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # the end of a turn is a token here, never a stop string
    add_special_tokens: bool = False  # the template writes bos_token itself where the model wants it

    @cached_property
    def _template(self) -> jinja2.Template:
        return compile_template(self.source)

    def render(self, messages: Sequence[Message], tools: list[dict] | None = None) -> str:
        """The prompt text; ApiError ``chat_template`` (400) when the template refuses the conversation."""
        chat = [_message(m) for m in messages]
        continue_final = bool(chat) and chat[-1]["role"] == "assistant"
        if continue_final:
            final = chat[-1]["content"]
            chat[-1]["content"] = final + _CONTINUE_TAG
        try:
            text = self.render_raw(chat, tools, add_generation_prompt=not continue_final)
        except jinja2.exceptions.TemplateError as e:
            raise ApiError("chat_template", f"messages: the model's chat template refused them: {e}", "messages") \
                from None
        except Exception as e:  # a template is a program: a type error in it is still about these messages
            raise ApiError(
                "chat_template", f"messages: the model's chat template failed on them: {type(e).__name__}: {e}",
                "messages",
            ) from None
        if continue_final:
            if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
                raise ApiError(
                    "chat_template",
                    "messages: the model's chat template does not write the final assistant message as given, "
                    "so it cannot be continued",
                    "messages",
                )
            at = text.rindex(_CONTINUE_TAG.strip())
            text = text[:at] if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
        return text

    def render_raw(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
        kwargs = {k: v for k, v in self.special_tokens.items() if v is not None}
        return self._template.render(messages=messages, tools=tools, documents=None,
                                     add_generation_prompt=add_generation_prompt, **kwargs)

    def turn_end_text(self) -> str:
        """What the template writes right after an assistant message's content ("<|im_end|>\\n",
        "<|eot_id|>", "</s>"...): the first token of it ends a turn. Empty when it cannot tell."""
        chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
        try:
            text = self.render_raw(chat, None, add_generation_prompt=False)
        except Exception:  # a template that needs more (a system message...): no end-of-turn probe
            return ""
        at = text.rfind(_SENTINEL)
        return text[at + len(_SENTINEL):] if at >= 0 else ""


def _message(m: Message) -> dict[str, Any]:
    """What the template sees of one message: a plain dict, as transformers passes it."""
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text}
    name = getattr(m, "name", None)
    if name is not None:
        out["name"] = name
    return out


def load_chat_template(bundle: Any, tokenizer: Any) -> Any:
    """The bundle's chat template: its Jinja file, or the built-in script template (ScriptTemplate).

    Raises BundleError when the file is not UTF-8 or not Jinja (naming the file and line).
    """
    from bundle.format import BundleError
    from service.http.chat_template import SCRIPT

    path = bundle.chat_template_path
    if path is None:
        return SCRIPT
    try:
        source = path.read_text(encoding="utf-8")
        compile_template(source)
    except (UnicodeDecodeError, TemplateCompileError) as e:
        raise BundleError(f"{path} is not a valid Jinja chat template: {e}") from None

    def text(i: int) -> str | None:
        return tokenizer.id_to_piece(i) or None if i >= 0 else None

    special = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
               "unk_token": text(tokenizer.unk_id), "pad_token": text(tokenizer.pad_id)}
    template = JinjaChatTemplate(source, special)
    end = tokenizer.encode(template.turn_end_text())[:1]
    end_ids = tuple(i for i in end if i in tokenizer.special_ids and i not in tokenizer.eos_ids)
    return JinjaChatTemplate(source, special, end_ids)
