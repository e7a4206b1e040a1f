"""workers.broker: idle consumers wake when their queue gets a message, on a real redis-server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq.broker import MessageProxy

from pipeline.redisconn import connect
from workers.broker import WakingConsumer, WakingRedisBroker

from fleet import RedisServer

#: The worker timeout the tests give consumers: each wait is as long as the broker allows.
IDLE_POLL_MS = 600_000
#: How long a test waits for something that happens in milliseconds when the code is right.
PATIENCE_S = 20.0


@pytest.fixture
def broker(redis_server: RedisServer) -> Iterator[WakingRedisBroker]:
    broker = WakingRedisBroker(  # type: ignore[no-untyped-call]  # dramatiq's, unannotated
        client=connect(redis_server.url, decode_responses=False),
        namespace="test-broker",
        heartbeat_timeout=IDLE_POLL_MS * 4,
    )
    yield broker
    broker.close()


def declare(broker: WakingRedisBroker, seen: list[str] | None = None) -> dramatiq.Actor[..., None]:
    def note(word: str) -> None:
        if seen is not None:
            seen.append(word)

    return dramatiq.actor(note, actor_name="note", queue_name="words", broker=broker)


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def blocked_clients(redis_server: RedisServer) -> int:
    return int(redis_server.client().info("clients")["blocked_clients"])


class Receiver:
    """A consumer driven in a thread of its own, as dramatiq's consumer thread drives it."""

    def __init__(self, consumer: WakingConsumer) -> None:
        self.consumer = consumer
        self.got: list[MessageProxy] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            message = next(self.consumer)
            if message is not None:
                self.got.append(message)

    def close(self) -> None:
        self.stop.set()


def args_of(messages: list[MessageProxy]) -> list[Any]:
    return [m.args for m in messages]


class TestWakeUp:
    def test_an_idle_consumer_takes_a_message_when_it_arrives(
        self, broker: WakingRedisBroker, redis_server: RedisServer
    ) -> None:
        """A message sent to a consumer blocked on its empty queue ends that wait: it is not
        left for the fallback poll."""
        actor = declare(broker)
        receiver = Receiver(broker.consume("words", prefetch=1, timeout=IDLE_POLL_MS))
        try:
            # Given a consumer that found its queue empty and is waiting on it
            until(lambda: blocked_clients(redis_server) == 1, "the consumer to block")
            # When a message is sent
            actor.send("hello")
            # Then the consumer has it, its wait ended by the message
            until(lambda: len(receiver.got) == 1, "the message to be taken")
            assert args_of(receiver.got) == [("hello",)]
            assert receiver.consumer.wakeups == 1
        finally:
            receiver.close()
            actor.send("bye")  # ends the receiver's wait

    def test_every_waiting_consumer_wakes_and_exactly_one_takes_the_message(
        self, broker: WakingRedisBroker, redis_server: RedisServer
    ) -> None:
        actor = declare(broker)
        receivers = [Receiver(broker.consume("words", prefetch=1, timeout=IDLE_POLL_MS))
                     for _ in range(2)]
        try:
            until(lambda: blocked_clients(redis_server) == 2, "both consumers to block")
            actor.send("once")
            until(lambda: all(r.consumer.wakeups >= 1 for r in receivers), "both to wake")
            # the one that took it holds it unacked (its prefetch is full); the other waits again
            until(lambda: blocked_clients(redis_server) == 1, "the other to wait again")
            assert sorted(args_of([m for r in receivers for m in r.got])) == [("once",)]
            # the wake-up left nothing behind in the queue: the message was taken, once
            assert redis_server.client().llen("test-broker:words") == 0
        finally:
            for receiver in receivers:
                receiver.close()
            actor.send("bye")
            actor.send("bye")

    def test_a_message_that_came_before_the_wait_ends_it_at_once(
        self, broker: WakingRedisBroker
    ) -> None:
        """The wait looks at the queue itself, so a message enqueued between the consumer's
        empty fetch and its wait cannot be missed."""
        actor = declare(broker)
        consumer = broker.consume("words", prefetch=1, timeout=IDLE_POLL_MS)
        assert broker.do_fetch("words", 1) == []  # the empty fetch
        actor.send("early")  # a message lands before the consumer waits
        consumer.wait_for_message()
        assert (consumer.wakeups, consumer.idle_timeouts) == (1, 0)
        message = next(consumer)
        assert message is not None and message.args == ("early",)

    def test_a_full_consumer_takes_the_next_message_once_one_is_acked(
        self, broker: WakingRedisBroker
    ) -> None:
        actor = declare(broker)
        receiver = Receiver(broker.consume("words", prefetch=1, timeout=IDLE_POLL_MS))
        try:
            actor.send("first")
            until(lambda: len(receiver.got) == 1, "the first message")
            # Given a consumer whose one prefetch slot holds an unacked message
            actor.send("second")
            time.sleep(0.2)
            assert len(receiver.got) == 1
            # When the first is acked, the second is taken
            receiver.consumer.ack(receiver.got[0])
            until(lambda: len(receiver.got) == 2, "the second message")
            assert args_of(receiver.got) == [("first",), ("second",)]
        finally:
            receiver.close()
            actor.send("bye")


class TestWorker:
    def test_a_worker_runs_messages_before_and_after_a_redis_restart(
        self, broker: WakingRedisBroker, redis_server: RedisServer
    ) -> None:
        """The blocked wait rides out a Redis restart: the worker takes the next message."""
        seen: list[str] = []
        actor = declare(broker, seen)
        worker = dramatiq.Worker(broker, worker_timeout=1000, worker_threads=1)
        worker.start()
        try:
            actor.send("before")
            until(lambda: seen == ["before"], "the message sent before the restart")
            until(lambda: blocked_clients(redis_server) >= 1, "the worker to wait")
            # When Redis restarts under the waiting worker (AOF keeps what it held)
            redis_server.stop()
            redis_server.start()
            actor.send("after")
            # Then the message sent after it runs, once
            until(lambda: seen == ["before", "after"], "the message sent after the restart")
        finally:
            worker.stop(timeout=10_000)
