"""Reading back what a job record and its outputs hold, which another version of hlsvault
may have written: the one rule for it.

During a rolling deploy, workers of two versions run the same jobs: a newer worker's probe
writes the plan an older worker's segment stage reads, and the other way round. A field a
version adds has a default (so an older record reads in a newer worker), and a version that
does not know a field leaves it out when it reads (so a newer record reads in an older
worker): :func:`from_known`. The job spec is the exception
(:meth:`pipeline.jobs.JobSpec.from_dict`): an option a worker does not know would be silently
ignored, so it is refused instead.

What no version writes (a value that is not an object, a field missing, a field of the wrong
kind: a damaged or hand-edited record) is :class:`~pipeline.errors.CorruptRecord`, naming the
record, never an ``AttributeError`` or ``TypeError`` from deep inside a stage.
"""

from __future__ import annotations

import functools
import json
import types
import typing
from collections.abc import KeysView, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import CorruptRecord

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

#: What a JSON value of each field type may be (an int where a float goes: JSON writes 2.0 as
#: 2 in other languages); a type not here (a nested record, a tuple of pairs) is not checked.
_KINDS: dict[Any, tuple[type, ...]] = {
    str: (str,), int: (int,), float: (int, float), bool: (bool,), tuple: (list, tuple),
}


@functools.cache  # a few record classes; read once per segment of every record
def _shape(cls: type[DataclassInstance]) -> tuple[dict[str, tuple[type, ...] | None],
                                                  frozenset[str]]:
    """Each field's JSON kinds (None: not checked), and the fields without a default."""
    hints = typing.get_type_hints(cls)
    kinds = {field.name: _kinds(hints[field.name]) for field in fields(cls)}
    required = frozenset(
        field.name for field in fields(cls)
        if field.default is MISSING and field.default_factory is MISSING
    )
    return kinds, required


def known_fields(cls: type[DataclassInstance]) -> KeysView[str]:
    """The names of the fields of the record ``cls``: what this version knows of it."""
    return _shape(cls)[0].keys()


def _kinds(hint: Any) -> tuple[type, ...] | None:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    found: list[type] = []
    for option in options:
        if option is type(None):
            found.append(type(None))
            continue
        kinds = _KINDS.get(typing.get_origin(option) or option)
        if kinds is None:
            return None
        found += kinds
    return tuple(found)


def _wrong_kind(value: Any, kinds: tuple[type, ...]) -> bool:
    # bool is an int to isinstance, never to JSON
    return not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)


@dataclass(frozen=True)
class Kept:
    """Where a kind of record is kept: what a damaged one is called, and what mends it."""

    #: Whose record it is, before its class's name: "the job's".
    whose: str
    mend: str


#: A job's record or output (the default): a new job makes it again.
IN_A_JOB = Kept("the job's", "resubmit the job")
#: A published version's description (the vault's, read by key servers and workers): a new
#: package of the asset writes it again. A class says it is one with ``KEPT_IN``.
IN_A_DESCRIPTION = Kept("the version description's", "package the asset again")


def unreadable(cls: type, what: str) -> CorruptRecord:
    """The error of a ``cls`` record that cannot be read, ``what`` saying why, and what to do
    about it where such a record is kept (its class's ``KEPT_IN``; a job's by default)."""
    kept: Kept = getattr(cls, "KEPT_IN", IN_A_JOB)
    return CorruptRecord(
        f"{kept.whose} {cls.__name__} record is unreadable ({what}): it was damaged or "
        f"written by hand, not by hlsvault; {kept.mend}"
    )


def parsed_json(cls: type, raw: str | bytes, what: str) -> Any:
    """``raw``, the stored text of ``what`` in a ``cls`` record, parsed as JSON; text that is
    not JSON (or nests past the parser's depth) is :func:`unreadable`, never a bug's error."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise unreadable(cls, f"{what} is not JSON") from None


def an_object(cls: type, data: Any) -> Mapping[str, Any]:
    """``data``, which must be an object (a JSON dict) to be a ``cls`` record."""
    if not isinstance(data, Mapping):
        raise unreadable(cls, f"a {type(data).__name__}, not an object")
    return data


def required(cls: type, data: Any, name: str) -> Any:
    """``data[name]``, which a ``cls`` record must hold."""
    if name not in an_object(cls, data):
        raise unreadable(cls, f"no {name!r}")
    return data[name]


def each_known(cls: type[T], values: Any) -> tuple[T, ...]:
    """:func:`from_known` of each of ``values``, a list of ``cls`` records."""
    if not isinstance(values, list | tuple):
        raise unreadable(cls, f"a {type(values).__name__} where a list of them goes")
    return tuple(from_known(cls, value) for value in values)


def texts(cls: type, data: Mapping[str, Any], name: str, *, pairs: bool = False) -> tuple[Any, ...]:
    """``data[name]``, which a ``cls`` record holds as a list of text (of pairs of text, when
    ``pairs``), as a tuple (of pairs); empty when absent or null. A nested list is a type
    :func:`from_known` does not check: its caller reads it through this, and passes it as
    given."""
    value = data.get(name)
    if value is None:
        return ()
    readable = _text_pair if pairs else _text
    if not isinstance(value, list | tuple) or not all(map(readable, value)):
        raise unreadable(cls, f"{name!r} is not a list of {'pairs of ' if pairs else ''}text")
    return tuple(tuple(item) for item in value) if pairs else tuple(value)


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _text_pair(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) == 2 and all(map(_text, value))


def from_known(cls: type[T], data: Any, **given: Any) -> T:
    """The dataclass ``cls`` built from the items of ``data`` that name one of its fields (a
    newer version's additions left out), with ``given`` in place of theirs;
    :class:`~pipeline.errors.CorruptRecord` when ``data`` is not an object, lacks a field
    ``cls`` needs, or holds one of the wrong kind."""
    kinds, needed = _shape(cls)
    known = {}
    for name, value in an_object(cls, data).items():
        if name in kinds and name not in given:
            expected = kinds[name]
            if expected is not None and _wrong_kind(value, expected):
                raise unreadable(cls, f"{name!r} is a {type(value).__name__}")
            known[name] = value
    missing = needed.difference(known, given)
    if missing:
        raise unreadable(cls, "no " + ", ".join(repr(name) for name in sorted(missing)))
    return cls(**known, **given)
