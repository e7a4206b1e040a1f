"""The one exception tree of hlsvault.

    HlsvaultError
     ├── ConfigurationError        settings missing or malformed; the process refuses to start
     ├── PermanentError            retrying cannot help; the job fails with this reason
     │    ├── InvalidSource        the source is missing, empty, not media, or not video
     │    ├── UnsupportedMedia     decodable, but not what the chosen ladder can package
     │    ├── BadSpec              the job spec itself is wrong (asset id, options)
     │    └── PoisonJob            a stage was delivered more times than allowed
     └── TransientError            network, throttling, 5xx, a stage that ran out of time;
                                   retried with backoff, a bounded number of times

Every message says what to do about it: the CLI prints it as the one-line reason and the
job record keeps it. Token and key-server refusals live in ``keyserver``; they never reach a job.
"""

from __future__ import annotations


class HlsvaultError(Exception):
    """Base of every error hlsvault raises on purpose."""


class ConfigurationError(HlsvaultError):
    """A setting is missing or malformed."""


class PermanentError(HlsvaultError):
    """Retrying the stage would fail the same way: the job is failed with this reason."""


class InvalidSource(PermanentError):
    """The source cannot be read as a video."""


class UnsupportedMedia(PermanentError):
    """The source is valid video, but the requested ladder cannot package it."""


class BadSpec(PermanentError):
    """The job specification is invalid."""


class PoisonJob(PermanentError):
    """A stage of the job has been delivered more often than the attempt bound allows."""


class TransientError(HlsvaultError):
    """A failure that may pass: the stage is retried with backoff."""


class StageTimeout(TransientError):
    """A blocking call (ffmpeg, a storage request) exceeded its own timeout."""
