"""The one exception tree of hlsvault.

    HlsvaultError
     ├── ConfigurationError        settings missing or malformed; the process refuses to start
     │    └── KeyUnwrapError       a wrapped key does not open: the wrong HLSVAULT_MASTER_KEY
     ├── PermanentError            retrying cannot help; the job fails with this reason
     │    ├── InvalidSource        the source is missing, empty, not media, not video, or not
     │    │                        allowed (a bucket outside HLSVAULT_SOURCE_BUCKETS)
     │    ├── UnsupportedMedia     decodable, but not what the chosen ladder can package
     │    ├── BadSpec              the job spec or request itself is wrong (asset id, options)
     │    │    └── TooLarge        a request body over its size limit
     │    ├── StorageRefused       a store (work, origin, vault) refused us: IAM, no bucket
     │    ├── Conflict             the asset changed under the job (a racing publish, a revoke)
     │    ├── PoisonJob            a stage was delivered more times than allowed
     │    └── CorruptRecord        a job record, or what a stage left in it, cannot be read
     ├── NotFound                  no such object, job or key; a lookup, not a failure
     ├── JobEnded                  the job ended while a stage ran: the stage stops, a signal,
     │                             not a failure
     ├── Refused                   a caller is not entitled: tokens, webhook signatures
     │    ├── Unauthenticated      missing, malformed, forged or expired credentials (401)
     │    └── Forbidden            genuine credentials, but not for this (403)
     └── TransientError            network, throttling, 5xx, a stage that ran out of time;
          ├── StageTimeout         retried with backoff, a bounded number of times
          └── NewerJobOption       a job spec names an option this worker does not know: a
                                   newer worker may take the retry

Domain code raises these and nothing else on purpose; the edges translate them once: workers
(:mod:`workers.flow`: transient is retried, anything else fails the job at once), HTTP
(:func:`pipeline.http.status_for`) and the CLI (:data:`EXIT_CODES`). Every message says what to
do about it: the CLI prints it as the one-line reason and the job record keeps it.
"""

from __future__ import annotations


class HlsvaultError(Exception):
    """Base of every error hlsvault raises on purpose."""


class ConfigurationError(HlsvaultError):
    """A setting is missing or malformed."""


class PermanentError(HlsvaultError):
    """Retrying the stage would fail the same way: the job is failed with this reason."""


class InvalidSource(PermanentError):
    """The source cannot be read as a video, or may not be read at all."""


class UnsupportedMedia(PermanentError):
    """The source is valid video, but the requested ladder cannot package it."""


class BadSpec(PermanentError):
    """The job specification (or the request that carried it) is invalid."""


class TooLarge(BadSpec):
    """A request is larger than its limit."""


class StorageRefused(PermanentError):
    """A store answered that we may not do this (access denied, no such bucket): waiting will
    not change that, fixing the IAM policy or the store's URL will."""


class Conflict(PermanentError):
    """The asset changed under the job in a way that makes finishing it wrong."""


class PoisonJob(PermanentError):
    """A stage of the job has been delivered more often than the attempt bound allows."""


class CorruptRecord(PermanentError):
    """A job record, an output a stage left beside it, or a version's description is not what
    any version of hlsvault writes (not an object, a field missing or of the wrong kind): the
    job is resubmitted, the asset packaged again (:func:`pipeline.records.unreadable`)."""


class NotFound(HlsvaultError):
    """The object, job or key asked for does not exist."""


class JobEnded(HlsvaultError):
    """The job ended (an operator cancelled it, another stage failed it, or it succeeded
    without this delivery) while this stage ran: the stage stops, having discarded what it
    made, and is no failure of its own (:func:`workers.flow.run_stage`)."""


class Refused(HlsvaultError):
    """The caller is not entitled to what it asked for."""


class Unauthenticated(Refused):
    """Credentials are missing, malformed, forged, expired or not yet valid."""


class Forbidden(Refused):
    """Credentials are genuine, but do not entitle this request."""


class TransientError(HlsvaultError):
    """A failure that may pass: the stage is retried with backoff."""


class StageTimeout(TransientError):
    """A blocking call (ffmpeg, a storage request) exceeded its own timeout."""


class NewerJobOption(TransientError):
    """A job spec names an option this worker does not know: a newer version submitted it.
    Retried (a newer worker may take the message); the job fails once retries run out.
    ``options``: the names it does not know, as the spec wrote them."""

    def __init__(self, message: str, *, options: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.options = options


#: The CLI's exit status per error class, most specific first (sysexits.h where one fits).
EXIT_CODES: tuple[tuple[type[HlsvaultError], int], ...] = (
    (ConfigurationError, 78),  # EX_CONFIG
    (TransientError, 75),  # EX_TEMPFAIL: try again later
    (BadSpec, 2),  # usage: the command line was wrong
    (NotFound, 1),
    (Refused, 1),
    (PermanentError, 1),
    (HlsvaultError, 1),
)


def exit_code(error: HlsvaultError) -> int:
    """The CLI's exit status for ``error``."""
    return next(code for kind, code in EXIT_CODES if isinstance(error, kind))
