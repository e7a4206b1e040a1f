"""Logging: structlog, configured once per process, with every token redacted.

JSON lines when stderr is not a terminal (what log shippers want), coloured key=value on one.
The standard library's loggers (dramatiq, uvicorn, botocore) are routed through the same
processors, so their lines are redacted and formatted alike.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

import structlog

from .errors import HlsvaultError

if TYPE_CHECKING:
    from .jobs import JobRecord

REDACTED = "[REDACTED]"
_QUERY_TOKEN = re.compile(r"(?i)((?:token|signature|x-amz-signature|x-amz-credential)=)[^&\s\"']+")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
#: A URL's userinfo (``https://user:password@host``, ``https://token@host``): a credential.
#: Its scheme is bounded (the search stays linear on any text), its userinfo ends at the last
#: '@' before the host, as curl and ffmpeg read it (``user:p@ss@host``).
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]{0,31}://)[^\s/?#]+@")
#: What each pattern above needs somewhere in the text (a query's '=', a JWT's "eyJ", the word
#: bearer, userinfo's '@'): text with none of them is left as it is at the cost of one search.
_MAY_HOLD_SECRET = re.compile(r"(?i)=|eyJ|bearer|@")
_SECRET_KEYS = ("token", "secret", "password", "authorization", "cookie", "key_bytes", "master_key")


def redact_text(text: str) -> str:
    """Replace tokens in query strings, bare JWTs, bearer credentials and URLs' userinfo."""
    if len(text) <= _CACHED_TEXT_CHARS:
        return _redact_short(text)
    return _redact(text)


#: Short values (an asset, a key id, an address, an outcome) recur line after line: their
#: redaction is remembered, in a bounded cache, rather than searched for again.
_CACHED_TEXT_CHARS = 64


@functools.lru_cache(maxsize=4096)
def _redact_short(text: str) -> str:
    return _redact(text)


def _redact(text: str) -> str:
    if not _MAY_HOLD_SECRET.search(text):
        return text
    text = _QUERY_TOKEN.sub(lambda m: m.group(1) + REDACTED, text)
    text = _JWT.sub(REDACTED, text)
    text = _USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", text)
    return _BEARER.sub(lambda m: m.group(1) + REDACTED, text)


def _redact_optional(value: str | None) -> str | None:
    return None if value is None else redact_text(value)


def redacted_record(record: JobRecord) -> JobRecord:
    """``record`` with every credential in its source, errors and details replaced: what the
    ops app and ``hlsvault status`` show. Raw fields hold the same values again; only the
    retry links are kept of them."""
    import dataclasses

    stages = tuple(
        dataclasses.replace(stage, error=_redact_optional(stage.error),
                            detail=_redact_optional(stage.detail))
        for stage in record.stages
    )
    source = redact_text(record.source)
    read_spec = record.read_spec
    if isinstance(read_spec, HlsvaultError):  # why this version cannot run it, redacted
        read_spec = type(read_spec)(redact_text(str(read_spec)))
    else:
        read_spec = dataclasses.replace(read_spec, source=redact_text(read_spec.source))
    return dataclasses.replace(
        record,
        source=source,
        read_spec=read_spec,
        error=_redact_optional(record.error),
        stages=stages,
        fields={k: v for k, v in record.fields.items() if k in ("retry_of", "retried_as")},
    )


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


@functools.lru_cache(maxsize=1024)  # field names come from the code: a few dozen
def secret_name(name: str) -> bool:
    """Whether a field called ``name`` holds a secret: its whole value is redacted."""
    return name != "event" and any(secret in name.lower() for secret in _SECRET_KEYS)


def redact_processor(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: no token, secret or key bytes survive into a log line."""
    # Values are replaced in place (the keys stay, so iterating is safe); the common kinds of
    # value (short text, None, numbers) are told apart here, without a call per field, since
    # the key server renders one line per request.
    for name, value in event_dict.items():
        if secret_name(name):
            event_dict[name] = REDACTED
        elif value.__class__ is str:
            event_dict[name] = (
                _redact_short(value) if len(value) <= _CACHED_TEXT_CHARS else _redact(value)
            )
        elif value is not None and value.__class__ not in _PLAIN:
            event_dict[name] = _redact_value(value)
    return event_dict


#: Values that cannot hold a secret, left as they are.
_PLAIN = (int, float, bool)


_configured = False


def ensure_logging() -> None:
    """Configure logging with the defaults unless this process's edge already did."""
    if not _configured:
        configure_logging()


def configure_logging(*, json: bool | None = None, level: int = logging.INFO) -> None:
    """Configure structlog and the standard library once, at a process's edge."""
    global _configured
    _configured = True
    if json is None:
        json = not sys.stderr.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_processor,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=True)
    )
    structlog.configure(
        processors=[
            *shared[:1],
            structlog.stdlib.filter_by_level,
            *shared[1:],
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
