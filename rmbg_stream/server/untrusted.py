"""What the server does with text from clients before trusting it: JSON with a bounded depth, and error text that is
safe to send back.

`loads_json` is the one JSON parser for everything a client sends (`POST /offer`, WebSocket controls, data channel
controls). Python's parser recurses once per level of nesting: `[[[[...` 1000 deep raises `RecursionError` (not a
`ValueError`), which turned into a 500, a dropped socket and a killed session; a few hundred deep parses, but the
reply that echoes it may not encode. So nesting is counted first, without recursion, and refused past `MAX_DEPTH`.

`error_text` is an exception's message without object reprs (`<_io.BytesIO object at 0x7f...>`): those say nothing
to a client and show it the server's memory layout.
"""

from __future__ import annotations

import json
import re

import numpy as np

MAX_DEPTH = 32  # controls and offers are one or two levels deep
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)  # unrolled, so it never backtracks
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


class TooDeep(ValueError):
    pass


def nesting(text: str) -> int:
    """How deep the arrays and objects in `text` go, brackets inside strings not counted; linear, no recursion."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii")
    steps = np.frombuffer(brackets, np.uint8)
    return int(np.cumsum(np.where((steps == ord("[")) | (steps == ord("{")), 1, -1)).max(initial=0))


def loads_json(text: str | bytes, max_depth: int = MAX_DEPTH):
    """json.loads for client input; ValueError (TooDeep past `max_depth` levels) for anything it cannot take."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")  # UnicodeDecodeError is a ValueError
    # Most messages have fewer brackets than the limit, and then cannot nest past it: no scan needed.
    if text.count("[") + text.count("{") > max_depth and nesting(text) > max_depth:
        raise TooDeep(f"JSON nested more than {max_depth} levels deep")
    try:
        return json.loads(text)
    except RecursionError:  # cannot happen after the check; kept so that it never becomes a 500
        raise TooDeep(f"JSON nested more than {max_depth} levels deep") from None


def error_text(exc: BaseException) -> str:
    """The exception's message for a client: object reprs cut out, the exception's name when nothing is left."""
    return _REPR.sub("", str(exc)).strip() or type(exc).__name__
