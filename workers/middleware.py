"""Middleware: log context per message, and the job's failure once retries are exhausted."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import dramatiq
import structlog
from dramatiq.broker import MessageProxy
from dramatiq.middleware import Middleware

from pipeline.errors import HlsvaultError
from pipeline.logs import redact_text

from . import flow

if TYPE_CHECKING:
    from .runtime import Runtime

log = structlog.get_logger(__name__)


class MessageScope(Middleware):
    """Something begun as a worker thread takes a message and ended once the message is done
    with, processed or skipped: subclasses say what in :meth:`begin` and :meth:`end`."""

    def begin(self, message: MessageProxy) -> None:
        """Before the message's handler runs."""

    def end(self) -> None:
        """After it ran, or was skipped."""

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        self.begin(message)

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        self.end()

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        self.end()


class LogContext(MessageScope):
    """Bind ``job_id``, actor and message id to every log line a message's handler writes."""

    def begin(self, message: MessageProxy) -> None:
        structlog.contextvars.clear_contextvars()
        subject = "job_id" if message.actor_name in flow.JOB_ACTORS else "asset"
        structlog.contextvars.bind_contextvars(
            **{subject: message.args[0] if message.args else None},
            actor=message.actor_name,
            message_id=message.message_id,
        )

    def end(self) -> None:
        structlog.contextvars.clear_contextvars()


class DeliveryTimes(MessageScope):
    """Note when the message a worker thread is about to handle was enqueued, fetched and
    picked up (:func:`workers.flow.note_delivery`): the job record keeps them per stage."""

    def begin(self, message: MessageProxy) -> None:
        flow.note_delivery(message)

    def end(self) -> None:
        flow.forget_delivery()


def failure_reason(exception: BaseException) -> str:
    """What the job record and the CLI say about a failure: never a credential."""
    if isinstance(exception, HlsvaultError):
        return redact_text(str(exception))
    return redact_text(f"{type(exception).__name__}: {exception}")


class JobOutcome(Middleware):
    """Fail the job when one of its messages fails for good (retries exhausted).

    Permanent errors never reach here: the stage marks the job failed and returns. This
    covers what retrying could not mend, so that no job is left running forever.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None or not message.failed or not message.args:
            return
        if message.actor_name not in flow.JOB_ACTORS:
            log.error("message failed for good", reason=failure_reason(exception))
            return
        stage = flow.stage_of(message.actor_name, message.args)
        reason = failure_reason(exception)
        job_id = str(message.args[0])
        flow.fail(self.runtime, job_id, stage, f"{stage} failed after retries: {reason}")
