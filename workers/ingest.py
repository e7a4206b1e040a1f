"""The ``ingest`` process: S3 ``ObjectCreated`` notifications from SQS become packaging jobs.

    S3 ObjectCreated ─► SQS (HLSVAULT_INGEST_QUEUE_URL) ─► ingest ─► Ingest.accept ─► probe …

Each message is deleted only after every object it names has its job enqueued (or already had
one: :class:`pipeline.ingest.Ingest` makes a redelivery a no-op). A message that can never
become a job — not JSON, not an S3 event, a bucket outside HLSVAULT_SOURCE_BUCKETS — is
*parked*: pushed with the reason onto the Redis list ``hlsvault:ingest:parked``, then deleted,
so it is neither retried forever nor lost. A message that fails for a passing reason (S3 or
Redis unreachable) is left on the queue to come back after its visibility timeout, and parked
once it has been received :data:`MAX_RECEIVES` times.

Run as ``python -m workers.ingest [--wait-seconds N]``; SIGTERM stops it between messages.
Without HLSVAULT_INGEST_QUEUE_URL it idles (saying so) instead of exiting, so that running the
whole Procfile with ``honcho start`` works in a deployment that does not ingest from S3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

import redis
import structlog
from botocore.exceptions import BotoCoreError, ClientError
from redis.exceptions import RedisError

from pipeline.errors import ConfigurationError, TransientError
from pipeline.ingest import Ingest, IngestError, is_test_event, parse_request

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
PARKED_LIST = "hlsvault:ingest:parked"


class ParkingLot:
    """Where messages that cannot become jobs wait for a human: a Redis list of JSON entries
    ``{"message_id", "reason", "body", "parked_at"}``, oldest first."""

    def __init__(self, client: redis.Redis, *, key: str = PARKED_LIST) -> None:
        self.client = client
        self.key = key

    def park(self, message: dict[str, Any], reason: str) -> None:
        entry = {
            "message_id": message.get("MessageId"),
            "reason": reason,
            "body": message.get("Body", ""),
            "parked_at": time.time(),
        }
        self.client.rpush(self.key, json.dumps(entry))


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
        """Enqueue the jobs of one message, then delete it; or park it; or leave it to retry."""
        message_id = message.get("MessageId")
        receives = int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
        try:
            document = json.loads(message.get("Body", ""))
        except ValueError:
            self._park(message, "message body is not JSON; expected an S3 event notification")
            return
        if is_test_event(document):
            log.info("s3 test event received; the bucket notifies this queue",
                     message_id=message_id, bucket=document.get("Bucket"))
            self._delete(message)
            return
        try:
            requests = parse_request(document)
            for request in requests:
                accepted = self.ingest.accept(request)
                log.info("ingest job", message_id=message_id, job_id=accepted.job_id,
                         asset=accepted.asset, source=accepted.source,
                         duplicate=accepted.duplicate)
        except IngestError as error:
            self._park(message, error.message)
            return
        except (TransientError, RedisError, BotoCoreError, ClientError) as error:
            self._retry_or_park(message, receives, f"{type(error).__name__}: {error}")
            return
        except Exception as error:
            log.exception("ingest message failed unexpectedly", message_id=message_id)
            self._retry_or_park(message, receives, f"{type(error).__name__}: {error}")
            return
        if not requests:
            log.info("s3 event without ObjectCreated records skipped", message_id=message_id)
        self._delete(message)

    def _retry_or_park(self, message: dict[str, Any], receives: int, reason: str) -> None:
        if receives >= self.max_receives:
            self._park(message, f"failed {receives} times, last: {reason}")
            return
        log.warning("ingest message failed; it will be received again",
                    message_id=message.get("MessageId"), receives=receives, reason=reason)

    def _park(self, message: dict[str, Any], reason: str) -> None:
        self.parking.park(message, reason)
        log.warning("ingest message parked", message_id=message.get("MessageId"),
                    reason=reason, parked_in=self.parking.key)
        self._delete(message)

    def _delete(self, message: dict[str, Any]) -> None:
        # A failed delete only means a redelivery, which the ingest ledger answers as a
        # duplicate; the message is not lost and no second job is made.
        try:
            self.sqs.delete_message(QueueUrl=self.queue_url,
                                    ReceiptHandle=message["ReceiptHandle"])
        except (BotoCoreError, ClientError) as error:
            log.warning("could not delete ingest message; it will come back",
                        message_id=message.get("MessageId"), error=type(error).__name__)

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set."""
        log.info("ingest polling", queue=self.queue_url, wait_s=self.wait_s)
        while not stop.is_set():
            try:
                self.poll_once()
            except (BotoCoreError, ClientError) as error:
                log.warning("receiving from SQS failed", error=type(error).__name__)
                stop.wait(RECEIVE_ERROR_PAUSE_S)


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
        poller = _build_poller(args.wait_seconds)
    except ConfigurationError as error:
        log.error("ingest cannot start", reason=str(error))
        print(f"ingest: {error}", file=sys.stderr)
        return 2
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


def _build_poller(wait_s: int) -> IngestPoller | None:
    """The poller for the configured queue; None when no queue is configured."""
    # Importing the actors installs the broker from the settings, as for every worker.
    from pipeline.aws import make_client
    from pipeline.jobs_redis import connect
    from pipeline.settings import load_settings

    from .runtime import install

    settings = load_settings()
    if settings.ingest_queue_url is None:
        return None
    if settings.redis_url is None:
        raise ConfigurationError("the ingest process feeds the fleet: set REDIS_URL")
    if not settings.source_buckets:
        raise ConfigurationError(
            "HLSVAULT_SOURCE_BUCKETS is not set: list the buckets (comma-separated) whose "
            "uploads become jobs"
        )
    runtime = install(settings)
    client = connect(settings.redis_url)
    ingest = Ingest(settings, redis_client=client, s3=make_client(), jobs=runtime.services.jobs,
                    submit=runtime.enqueue)
    return IngestPoller(ingest, make_client("sqs"), settings.ingest_queue_url,
                        parking=ParkingLot(client), wait_s=wait_s)


if __name__ == "__main__":
    sys.exit(main())
