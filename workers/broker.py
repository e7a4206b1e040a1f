"""The fleet's broker: dramatiq's Redis broker, with consumers woken by their queue instead of
polling it.

dramatiq's Redis consumer fetches through its Lua script and, when the queue is empty, sleeps
(backing off up to the worker timeout) before it fetches again, so every hop between two stages
waited for the next poll: up to 100 ms at the Procfile's old setting, a second at dramatiq's
default. Here an idle consumer blocks instead, on its queue's own Redis list::

    fetch (dramatiq's script) ─► empty ─► BLMOVE queue queue (bounded) ─► fetch ─► …

``BLMOVE`` from a list to itself answers as soon as the list holds a message id, and moves it
from the head back to the head (``LEFT LEFT``): the list is left exactly as it was, so
dramatiq's first-in, first-out order (it pushes on the right, pops on the left) holds even when
several messages land during the wait. Every consumer blocked on the list is answered, each
fetches, one gets the message.
Waiting on the list itself rather than on a doorbell the sender rings means that nothing can
be missed: a message pushed between the empty fetch and the wait is already in the list the
wait looks at, and messages enqueued by any dramatiq Redis broker, requeued on shutdown or by
the dead-worker maintenance wake consumers too. Fetch, ack, nack, requeue, heartbeats and
maintenance are dramatiq's own, untouched.

Every wait is bounded (:meth:`WakingConsumer.wait_s`), after which the consumer fetches anyway:
that fallback poll sends the heartbeat an idle worker must keep sending, lets the consumer
thread see a shutdown, and releases delayed messages (retries) on time. A consumer whose
prefetch is full waits for one of its messages to be acked instead of sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import redis
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import current_millis
from dramatiq.errors import ConnectionClosed
from dramatiq.message import Message

from pipeline.redisconn import SOCKET_TIMEOUT_S

#: No wait is longer, whatever the worker timeout: a blocking command must return well within
#: the client's socket timeout, or the client would take it for a dead server.
MAX_WAIT_S = SOCKET_TIMEOUT_S / 2
#: A worker that sends no heartbeat for the heartbeat timeout is taken for dead and its
#: messages are handed to others; idle consumers fetch (and so beat) several times within it.
HEARTBEATS_PER_TIMEOUT = 4
#: The shortest wait: BLMOVE takes 0 for "forever", and a delayed message due now needs none.
MIN_WAIT_S = 0.001


class FetchedMessage(MessageProxy):
    """A message as the consumer hands it to the worker, stamped with when it was fetched
    (epoch seconds): the job record keeps it per stage (see :func:`workers.flow.run_stage`)."""

    def __init__(self, message: Message[object], fetched_at: float) -> None:
        super().__init__(message)
        self.fetched_at = fetched_at


class WakingConsumer(_RedisConsumer):
    """A consumer of one queue that blocks on the queue's list while it has nothing to do."""

    broker: WakingRedisBroker

    def __init__(self, broker: WakingRedisBroker, queue_name: str, prefetch: int,
                 timeout: int) -> None:
        # dramatiq's Redis consumer and broker methods carry no annotations (here and below).
        super().__init__(broker, queue_name, prefetch, timeout)  # type: ignore[no-untyped-call]
        self.queue_key = f"{broker.namespace}:{queue_name}"
        #: Set whenever a message of this consumer is acked, nacked or requeued: a consumer
        #: whose prefetch is full waits on it.
        self.freed = threading.Event()
        #: When each delayed message handed out is due (delay queues only), by message id.
        self.etas: dict[str, int] = {}
        #: Waits that ended because the queue got a message, and waits that ran out.
        self.wakeups = 0
        self.idle_timeouts = 0

    def wait_s(self) -> float:
        """How long the next wait may last: the worker timeout, shortened to keep the heartbeat
        going and the blocking call within the socket timeout, and to release the earliest
        delayed message this consumer holds when it is due."""
        bound = min(float(self.timeout) / 1000, MAX_WAIT_S,
                    float(self.broker.heartbeat_timeout) / 1000 / HEARTBEATS_PER_TIMEOUT)
        if self.etas:
            bound = min(bound, (min(self.etas.values()) - current_millis()) / 1000)
        return max(bound, MIN_WAIT_S)

    def _settled(self, messages: Iterable[MessageProxy]) -> None:
        for message in messages:
            self.etas.pop(message.message_id, None)
        self.freed.set()

    def ack(self, message: MessageProxy) -> None:
        try:
            super().ack(message)  # type: ignore[no-untyped-call]
        finally:
            self._settled([message])

    def nack(self, message: MessageProxy) -> None:
        try:
            super().nack(message)  # type: ignore[no-untyped-call]
        finally:
            self._settled([message])

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        messages = list(messages)
        try:
            super().requeue(messages)  # type: ignore[no-untyped-call]
        finally:
            self._settled(messages)

    def __next__(self) -> MessageProxy | None:
        woken = False
        try:
            while True:
                if self.message_cache:
                    data = self.message_cache.pop(0)
                    if data is None:  # dramatiq's own guard (its issue #266)
                        continue
                    message = Message.decode(data)
                    self.queued_message_ids.add(message.message_id)
                    eta = message.options.get("eta")
                    if isinstance(eta, int | float):
                        self.etas[message.message_id] = int(eta)
                    return FetchedMessage(message, time.time())
                free = self.prefetch - self.outstanding_message_count
                if free <= 0:
                    # Cleared before looking again, so that an ack in between is not missed.
                    self.freed.clear()
                    if self.prefetch > self.outstanding_message_count:
                        continue
                    self.freed.wait(self.wait_s())
                    return None
                self.message_cache = self.broker.do_fetch(self.queue_name, free)
                if self.message_cache:
                    continue
                # Woken, the consumer fetches at once, once (another consumer may have taken
                # the message); otherwise the consumer thread looks at shutdown and delayed
                # messages before the next fetch.
                if woken or not self.wait_for_message():
                    return None
                woken = True
        except redis.ConnectionError as error:
            raise ConnectionClosed(error) from None  # type: ignore[no-untyped-call]

    def wait_for_message(self) -> bool:
        """Block until the queue's list holds a message id (True), or the wait runs out."""
        # Redis takes a decimal timeout (since 6.0); redis-py's stubs say int.
        woken = self.broker.client.blmove(
            self.queue_key, self.queue_key, self.wait_s(), "LEFT", "LEFT"  # type: ignore[arg-type]
        )
        if woken is None:
            self.idle_timeouts += 1
            return False
        self.wakeups += 1
        return True


class WakingRedisBroker(RedisBroker):
    """dramatiq's :class:`~dramatiq.brokers.redis.RedisBroker` whose consumers are
    :class:`WakingConsumer`. Needs Redis 6.2 or later (BLMOVE)."""

    @property
    def consumer_class(self) -> type[WakingConsumer]:
        return WakingConsumer

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> WakingConsumer:
        consumer: WakingConsumer = self.consumer_class(self, queue_name, prefetch, timeout)
        return consumer

