"""The delivery object: each of its three settles, at most once, on a real RabbitMQ channel.

A second settle must raise and send nothing: a second ack of the same delivery tag makes
RabbitMQ close the channel (PRECONDITION_FAILED), and with it every message it holds.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from gevent.event import Event

from carrot import conf, message
from carrot.amqp import SignallingChannel
from carrot.models import MessageLog
from carrot.worker.consumer import Consumer, Runtime
from carrot.worker.delivery import AlreadySettled, Delivery, Settlement
from carrot.worker.link import QueueLink
from carrot.worker.recorder import Recorder
from tests.conftest import Broker


@dataclass
class Bench:
    """One consumer on a real channel of ``queue``, a recorder running behind it."""

    queue: str
    broker: Broker
    channel: SignallingChannel
    consumer: Consumer

    def publish(self, task: str = 'tests.project.tasks.echo', args: list[Any] | None = None,
                message_id: str | None = None) -> str:
        message_id = message_id or str(uuid.uuid4())
        body = json.dumps({'args': args or [1], 'kwargs': {}}).encode()
        self.broker.publish_raw(self.queue, body, {
            'message_id': message_id, 'headers': {'type': task},
            'content_type': 'application/json', 'delivery_mode': 2})
        return message_id

    def receive(self) -> Delivery:
        received = self.channel.wait_for_message(10)
        assert received is not None, 'nothing was delivered'
        return Delivery(received, self.consumer)

    def channel_still_works(self) -> bool:
        """A round trip on the channel: False when RabbitMQ has closed it."""
        try:
            self.channel.basic.qos(prefetch_count=10)
        except Exception:
            return False
        return self.channel.is_open


@pytest.fixture
def bench(queue: str, broker: Broker) -> Iterator[Bench]:
    settings = conf.get_settings().queue(queue)
    link = QueueLink(settings)
    channel = link.open_channel(Event())
    assert channel is not None
    recorder = Recorder()
    recorder.start()
    consumer = Consumer(settings.broker, queue, logging.getLogger('carrot'), f'{queue}-1')
    consumer.runtime = Runtime(queue=settings, link=link, recorder=recorder, stopping=Event(),
                               consuming=Event())
    channel.basic.qos(prefetch_count=10)
    channel.basic.consume(queue=queue, no_ack=False)
    try:
        yield Bench(queue, broker, channel, consumer)
    finally:
        recorder.stop(timeout=10)
        link.close()


def _settle_again_is_refused(delivery: Delivery, bench: Bench) -> None:
    first = delivery.settlement
    for settle_again in (delivery.ack, lambda: delivery.requeue('again'),
                         lambda: delivery.dead_letter('again')):
        with pytest.raises(AlreadySettled, match=f'was {first.value if first else None} '
                                                 f'already'):
            settle_again()
    assert delivery.settlement is first
    assert bench.channel_still_works(), 'a second settle reached RabbitMQ and closed the channel'


def test_ack_settles_once(bench: Bench) -> None:
    bench.publish()
    delivery = bench.receive()
    delivery.ack()
    assert delivery.settlement is Settlement.ACKED
    _settle_again_is_refused(delivery, bench)
    assert bench.broker.counts(bench.queue) == (0, 0)


def test_requeue_settles_once_and_the_message_comes_back(bench: Bench) -> None:
    message_id = bench.publish()
    delivery = bench.receive()
    delivery.requeue('a test hands it back')
    assert delivery.settlement is Settlement.REQUEUED
    _settle_again_is_refused(delivery, bench)
    again = bench.receive()
    assert again.message_id == message_id
    assert (again.received.method or {}).get('redelivered') is True
    again.ack()
    assert bench.broker.counts(bench.queue) == (0, 0)


def test_dead_letter_settles_once_with_its_reason(bench: Bench, broker: Broker) -> None:
    message_id = bench.publish()
    delivery = bench.receive()
    delivery.dead_letter('a test says it cannot run')
    assert delivery.settlement is Settlement.DEAD_LETTERED
    _settle_again_is_refused(delivery, bench)
    assert broker.counts(bench.queue) == (0, 0)
    [dead] = broker.get_all(f'{bench.queue}.dead')
    assert dead.properties['message_id'] == message_id
    assert dead.properties['headers'][message.DEAD_REASON_HEADER] == 'a test says it cannot run'


def test_a_dead_letter_that_cannot_be_published_leaves_the_delivery_unsettled(
        bench: Bench, monkeypatch: pytest.MonkeyPatch) -> None:
    """So the caller can still hand it back: nothing lost, nothing settled twice."""
    bench.publish()
    delivery = bench.receive()

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError('the dead-letter publish failed')

    monkeypatch.setattr(Delivery, '_publish_dead_letter', refuse)
    with pytest.raises(ConnectionError):
        delivery.dead_letter('cannot run')
    assert delivery.settlement is None
    delivery.requeue('the dead-letter queue could not take it')
    assert bench.receive().message_id == delivery.message_id


def test_processing_a_task_acks_it_once_its_end_is_recorded(bench: Bench) -> None:
    message_id = bench.publish(args=['hello'])
    delivery = bench.receive()
    delivery.process()
    assert delivery.recorded is not None
    delivery.recorded.get(timeout=10)
    assert delivery.settlement is Settlement.ACKED
    row = MessageLog.objects.get(uuid=message_id)
    assert (row.status, row.attempts) == (MessageLog.COMPLETED, 1)
    _settle_again_is_refused(delivery, bench)
    assert bench.broker.counts(bench.queue) == (0, 0)


def test_processing_a_message_that_cannot_run_dead_letters_it_with_its_row(
        bench: Bench, broker: Broker) -> None:
    message_id = bench.publish(task='tests.project.tasks.no_such_task')
    delivery = bench.receive()
    delivery.process()
    assert delivery.settlement is Settlement.DEAD_LETTERED
    assert delivery.recorded is None
    row = MessageLog.objects.get(uuid=message_id)
    assert row.status == MessageLog.FAILED
    assert 'no_such_task' in (row.exception or '')
    [dead] = broker.get_all(f'{bench.queue}.dead')
    assert dead.properties['message_id'] == message_id
    _settle_again_is_refused(delivery, bench)


def test_a_fault_in_carrot_after_the_end_was_handed_over_settles_nothing_twice(
        bench: Bench) -> None:
    """recover() after the recorder took the end: the recorder alone settles it."""
    message_id = bench.publish()
    delivery = bench.receive()
    delivery.process()
    delivery.recover(RuntimeError('a bug after the end was handed over'))
    assert delivery.recorded is not None
    delivery.recorded.get(timeout=10)
    assert delivery.settlement is Settlement.ACKED
    assert MessageLog.objects.get(uuid=message_id).status == MessageLog.COMPLETED
    assert bench.channel_still_works()
