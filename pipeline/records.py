"""Reading back what a job record and its outputs hold, which another version of hlsvault
may have written: the one rule for it.

During a rolling deploy, workers of two versions run the same jobs: a newer worker's probe
writes the plan an older worker's segment stage reads, and the other way round. A field a
version adds has a default (so an older record reads in a newer worker), and a version that
does not know a field leaves it out when it reads (so a newer record reads in an older
worker): :func:`from_known`. The job spec is the exception
(:meth:`pipeline.jobs.JobSpec.from_dict`): an option a worker does not know would be silently
ignored, so it is refused instead.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


@functools.cache  # a few record classes; read once per segment of every record
def _field_names(cls: type[DataclassInstance]) -> frozenset[str]:
    return frozenset(field.name for field in fields(cls))


def from_known(cls: type[T], data: Mapping[str, Any], **given: Any) -> T:
    """The dataclass ``cls`` built from the items of ``data`` that name one of its fields (a
    newer version's additions left out), with ``given`` in place of theirs."""
    names = _field_names(cls)
    return cls(**{**{name: value for name, value in data.items() if name in names}, **given})
