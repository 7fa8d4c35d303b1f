"""Request defaults from the bundle's ``generation.defaults`` (a checkpoint's generation_config.json).

As vLLM does by default: a sampling field the request leaves out takes the model's default, a field
the request sets (even to the API's own default value) wins. Pydantic's ``model_fields_set`` tells
the two apart. ``do_sample: false`` makes greedy (temperature 0) the default, as in ``transformers``.
``max_new_tokens`` replaces the built-in default length, capped by the room the prompt leaves in
the context (a default never makes a request too long). Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

# generation_config.json key -> request field
_SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                    "repetition_penalty": "repetition_penalty"}

R = TypeVar("R", bound=BaseModel)


@dataclass(frozen=True)
class GenerationDefaults:
    """The defaults a request gets: ``fields`` (request field -> value) and ``max_new_tokens``."""

    fields: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int | None = None

    @classmethod
    def from_bundle(cls, defaults: dict[str, Any]) -> GenerationDefaults:
        """From ``bundle.generation_defaults`` (validated by bundle.format)."""
        fields = {_SAMPLING_FIELDS[k]: v for k, v in defaults.items() if k in _SAMPLING_FIELDS}
        if "temperature" in fields:
            fields["temperature"] = float(fields["temperature"])
        if defaults.get("do_sample") is False:
            fields["temperature"] = 0.0
        max_new = defaults.get("max_new_tokens")
        return cls(fields, int(max_new) if max_new is not None else None)

    def apply(self, req: R) -> R:
        """The request with the defaults in the sampling fields it left out."""
        missing = {k: v for k, v in self.fields.items() if k in type(req).model_fields and k not in req.model_fields_set}
        return req.model_copy(update=missing) if missing else req

    def max_tokens(self, given: int | None, fallback: int, room: int) -> int:
        """The request's max_tokens: as given, else ``max_new_tokens`` within ``room`` (context
        length minus the prompt), else the route's own ``fallback``."""
        if given is not None:
            return given
        if self.max_new_tokens is not None:
            return max(1, min(self.max_new_tokens, room))
        return fallback

    def reported(self) -> dict[str, Any]:
        """What /v1/models shows: request field -> default (``max_tokens`` for max_new_tokens)."""
        out = dict(self.fields)
        if self.max_new_tokens is not None:
            out["max_tokens"] = self.max_new_tokens
        return out
