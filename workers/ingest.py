"""The ``ingest`` process: S3 ``ObjectCreated`` notifications from SQS become packaging jobs.

    S3 ObjectCreated ─► SQS (HLSVAULT_INGEST_QUEUE_URL) ─► ingest ─► Ingest.accept ─► probe …

Each message is deleted only after every object it names has its job enqueued (or already had
one: :class:`pipeline.ingest.Ingest` makes a redelivery a no-op). A message that can never
become a job — not JSON, nested too deep, not an S3 event, a bucket outside
HLSVAULT_SOURCE_BUCKETS — is *parked* with the reason (:class:`pipeline.parked.ParkingLot`,
bounded; ``hlsvault ingest parked`` lists, replays and drops them), then deleted, so it is
neither retried forever nor lost. A message that fails for a passing reason (S3 or Redis
unreachable) is left on the queue to come back after its visibility timeout, and parked once it
has been received :data:`MAX_RECEIVES` times. One bad message never stops the rest of its batch.

Run as ``python -m workers.ingest [--wait-seconds N]``; SIGTERM stops it between messages.
Without HLSVAULT_INGEST_QUEUE_URL it idles (saying so) instead of exiting, so that running the
whole Procfile with ``honcho start`` works in a deployment that does not ingest from S3.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from types import FrameType
from typing import Any

import redis
import structlog

from pipeline.aws import botocore_errors, describe, make_client
from pipeline.errors import ConfigurationError, HlsvaultError, TransientError, exit_code
from pipeline.ingest import Ingest
from pipeline.jobs import JobStore
from pipeline.jobs.redis import RedisRecordBackend
from pipeline.parked import ParkingLot
from pipeline.redisconn import connect
from pipeline.settings import Settings

from .sending import submitter

log = structlog.get_logger("workers.ingest")  # also when run as __main__

#: SQS's longest long poll: an idle queue costs one request per 20 s.
DEFAULT_WAIT_S = 20
#: SQS's largest batch.
MAX_MESSAGES = 10
#: A batch takes a HEAD, a Redis round trip and an enqueue per object: well under a second.
#: Two minutes also covers botocore's own retries of a slow S3 before the message reappears.
VISIBILITY_TIMEOUT_S = 120
#: A message that failed this many times for "passing" reasons is not going to pass: park it.
MAX_RECEIVES = 5
#: Pause after a failed receive, so that an unreachable SQS is not hammered.
RECEIVE_ERROR_PAUSE_S = 5.0


class IngestPoller:
    """Long-polls one SQS queue and turns its S3 notifications into jobs."""

    def __init__(
        self,
        ingest: Ingest,
        sqs: Any,
        queue_url: str,
        *,
        parking: ParkingLot,
        wait_s: int = DEFAULT_WAIT_S,
        visibility_timeout_s: int = VISIBILITY_TIMEOUT_S,
        max_receives: int = MAX_RECEIVES,
    ) -> None:
        self.ingest = ingest
        self.sqs = sqs
        self.queue_url = queue_url
        self.parking = parking
        self.wait_s = wait_s
        self.visibility_timeout_s = visibility_timeout_s
        self.max_receives = max_receives
        #: True while blocked in the long poll, where SIGTERM may stop the process at once.
        self.waiting = False

    def poll_once(self) -> int:
        """Receive one batch and handle it; returns how many messages were received."""
        self.waiting = True
        try:
            answer = self.sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=MAX_MESSAGES,
                WaitTimeSeconds=self.wait_s,
                VisibilityTimeout=self.visibility_timeout_s,
                AttributeNames=["ApproximateReceiveCount"],
            )
        finally:
            self.waiting = False
        messages: list[dict[str, Any]] = answer.get("Messages", [])
        for message in messages:
            self.handle(message)
        return len(messages)

    def handle(self, message: dict[str, Any]) -> None:
        """Enqueue the jobs of one message, then delete it; or park it; or leave it to retry.
        Never raises: whatever one message does, the rest of the batch is handled."""
        message_id = message.get("MessageId")
        receives = _receive_count(message)
        try:
            accepted = self.ingest.accept_body(str(message.get("Body", "")))
        except TransientError as error:
            self._retry_or_park(message, receives, str(error))
            return
        except HlsvaultError as error:  # permanent: it would fail the same way every time
            self._park(message, str(error))
            return
        except Exception as error:
            log.exception("ingest message failed unexpectedly", message_id=message_id)
            self._retry_or_park(message, receives, f"{type(error).__name__}: {error}")
            return
        for item in accepted:
            log.info("ingest job", message_id=message_id, job_id=item.job_id, asset=item.asset,
                     source=item.source, duplicate=item.duplicate)
        if not accepted:
            log.info("s3 event without ObjectCreated records skipped", message_id=message_id)
        self._delete(message)

    def _retry_or_park(self, message: dict[str, Any], receives: int, reason: str) -> None:
        if receives >= self.max_receives:
            self._park(message, f"failed {receives} times, last: {reason}")
            return
        log.warning("ingest message failed; it will be received again",
                    message_id=message.get("MessageId"), receives=receives, reason=reason)

    def _park(self, message: dict[str, Any], reason: str) -> None:
        try:
            entry = self.parking.park(str(message.get("Body", "")), reason,
                                      message_id=message.get("MessageId"))
        except Exception as error:
            # Not parked, so not deleted: it comes back after its visibility timeout.
            log.warning("could not park ingest message; it will come back",
                        message_id=message.get("MessageId"), error=type(error).__name__)
            return
        log.warning("ingest message parked", message_id=message.get("MessageId"),
                    parked_id=entry.id, reason=reason,
                    mend="hlsvault ingest parked --replay ID once fixed, or --drop ID")
        self._delete(message)

    def _delete(self, message: dict[str, Any]) -> None:
        # A failed delete only means a redelivery, which the ingest ledger answers as a
        # duplicate; the message is not lost and no second job is made.
        try:
            self.sqs.delete_message(QueueUrl=self.queue_url,
                                    ReceiptHandle=message["ReceiptHandle"])
        except botocore_errors() as error:
            log.warning("could not delete ingest message; it will come back",
                        message_id=message.get("MessageId"), error=describe(error))

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set."""
        log.info("ingest polling", queue=self.queue_url, wait_s=self.wait_s)
        while not stop.is_set():
            try:
                self.poll_once()
            except botocore_errors() as error:
                log.warning("receiving from SQS failed", error=describe(error))
                stop.wait(RECEIVE_ERROR_PAUSE_S)


def _receive_count(message: dict[str, Any]) -> int:
    count = str(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
    return int(count) if count.isascii() and count.isdigit() and len(count) < 10 else 1


class _Stopped(BaseException):
    """Raised by the SIGTERM handler inside a long poll: nothing is in hand to finish."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.ingest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wait-seconds", type=int, default=DEFAULT_WAIT_S,
                        choices=range(0, 21), metavar="0-20",
                        help="SQS long-poll wait (default %(default)s)")
    args = parser.parse_args(argv)

    from pipeline.logs import configure_logging
    from pipeline.settings import load_settings

    configure_logging()
    stop = threading.Event()
    poller: IngestPoller | None = None

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if poller is not None and poller.waiting:
            raise _Stopped

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        poller = build_poller(load_settings(), wait_s=args.wait_seconds)
    except ConfigurationError as error:
        log.error("ingest cannot start", reason=str(error))
        print(f"ingest: {error}", file=sys.stderr)
        return exit_code(error)
    if poller is None:
        # `honcho start` runs every Procfile type and stops them all when one exits: a
        # deployment without S3 ingest keeps this one idle rather than take the fleet down.
        log.warning("ingest idle: HLSVAULT_INGEST_QUEUE_URL is not set; set it to the SQS "
                    "queue your source buckets notify, or do not run this process type")
        stop.wait()
        return 0
    # Messages received in an interrupted poll reappear after their visibility timeout.
    with contextlib.suppress(_Stopped):
        poller.run(stop)
    log.info("ingest stopped")
    return 0


def build_poller(settings: Settings, *, wait_s: int = DEFAULT_WAIT_S) -> IngestPoller | None:
    """The poller for the configured queue; None when no queue is configured."""
    if settings.ingest_queue_url is None:
        return None
    if settings.redis_url is None:
        raise ConfigurationError("the ingest process feeds the fleet: set REDIS_URL")
    if not settings.source_buckets:
        raise ConfigurationError(
            "HLSVAULT_SOURCE_BUCKETS is not set: list the buckets (comma-separated) whose "
            "uploads become jobs"
        )
    client = connect(settings.redis_url)
    return IngestPoller(open_ingest(settings, client), make_client("sqs"),
                        settings.ingest_queue_url, parking=ParkingLot(client), wait_s=wait_s)


def open_ingest(settings: Settings, client: redis.Redis) -> Ingest:
    """:class:`Ingest` for the fleet ``settings`` name: what the poller and a replay of a
    parked message turn bodies into jobs with."""
    return Ingest(settings, redis_client=client, s3=make_client(),
                  jobs=JobStore(RedisRecordBackend(client)), submit=submitter(settings))


if __name__ == "__main__":
    sys.exit(main())
