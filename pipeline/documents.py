"""JSON documents from outside (webhook bodies, SQS messages), bounded before they are parsed.

Python's parser recurses once per nesting level, so ``[`` repeated a few thousand times raises
``RecursionError`` from inside it; and integers of thousands of digits, ``NaN`` and
``Infinity`` are JSON to it but nothing a job request holds. :func:`load_document` refuses all
of these with :class:`~pipeline.errors.BadSpec` (or :class:`~pipeline.errors.TooLarge`), so a
caller handles one error class for every bad document.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import BadSpec, TooLarge

#: A job request is a few hundred bytes and an S3 event notification a few KB.
MAX_DOCUMENT_BYTES = 64 * 1024
#: An S3 event nests five deep (Records, a record, s3, object, a metadata map): room to spare,
#: and far below the parser's recursion.
MAX_DEPTH = 16
#: The characters that open or close a level, or a string (in which brackets do not count).
_STRUCTURE = re.compile(r'[\[\]{}"\\]')
_EXPECTED = 'send {"source": "s3://bucket/key"} or an S3 event notification'


def nesting_depth(text: str, *, limit: int) -> int:
    """How deep ``text``'s arrays and objects nest, counting no further than ``limit + 1``.

    One pass over the structural characters, with no recursion: the bound is checked before
    any parser sees the text."""
    depth = deepest = 0
    in_string = False
    escaped = -1  # the index of the character a backslash in a string escapes
    for match in _STRUCTURE.finditer(text):
        char, at = match.group(), match.start()
        if in_string:
            if at == escaped:
                continue
            if char == "\\":
                escaped = at + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                break
        elif char in "]}":
            depth -= 1
    return deepest


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a request may hold")


def load_document(body: bytes | str, *, max_bytes: int = MAX_DOCUMENT_BYTES) -> Any:
    """The JSON value of ``body``, or :class:`BadSpec` saying why it is not one we accept."""
    raw = body.encode() if isinstance(body, str) else body
    if len(raw) > max_bytes:
        raise TooLarge(f"the document is {len(raw)} bytes, over the {max_bytes}-byte limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadSpec(f"the document is not UTF-8 text; {_EXPECTED}") from None
    if nesting_depth(text, limit=MAX_DEPTH) > MAX_DEPTH:
        raise BadSpec(f"the document nests deeper than {MAX_DEPTH} levels; {_EXPECTED}")
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except ValueError as error:  # JSONDecodeError, too many digits, NaN/Infinity
        reason = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
        raise BadSpec(f"the document is not JSON ({reason[:120]}); {_EXPECTED}") from None
