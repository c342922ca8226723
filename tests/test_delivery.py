"""The delivery object: each of its three settles, at most once, on a real RabbitMQ channel.

A second settle must raise and send nothing: a second ack of the same delivery tag makes
RabbitMQ close the channel (PRECONDITION_FAILED), and with it every message it holds.
"""

from __future__ import annotations

import datetime
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from gevent.event import Event

from carrot import conf, message
from carrot.amqp import SignallingChannel, acks_together
from carrot.frames import ack_frame
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


@pytest.fixture
def writes(bench: Bench, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """What carrot writes to the socket of the bench channel's connection, write by write."""
    io = bench.channel._carrot_connection._io
    written: list[bytes] = []
    write = io.write_to_socket

    def recording(data: bytes) -> None:
        written.append(bytes(data))
        write(data)

    monkeypatch.setattr(io, 'write_to_socket', recording)
    return written


def _ack_writes(written: list[bytes], channel: SignallingChannel) -> list[bytes]:
    """The writes made only of ack frames of ``channel``."""
    size = len(ack_frame(channel.channel_id, 1))
    return [data for data in written if data and len(data) % size == 0 and all(
        ack_frame(channel.channel_id, int.from_bytes(data[at + 11:at + 19])) == data[at:at + size]
        for at in range(0, len(data), size))]


def test_acks_made_together_are_held_until_the_block_ends_and_written_at_once(
        bench: Bench, writes: list[bytes]) -> None:
    for _ in range(5):
        bench.publish()
    deliveries = [bench.receive() for _ in range(5)]
    with acks_together():
        for delivery in deliveries:
            delivery.ack()
        assert bench.broker.counts(bench.queue) == (0, 5), 'an ack was written before the end'
    assert [len(data) for data in _ack_writes(writes, bench.channel)] == [
        5 * len(ack_frame(bench.channel.channel_id, 1))]
    assert bench.broker.counts(bench.queue) == (0, 0)
    assert all(delivery.settlement is Settlement.ACKED for delivery in deliveries)
    assert bench.channel_still_works()


def test_an_ack_held_for_a_channel_closed_meanwhile_is_dropped_and_the_connection_lives(
        bench: Bench, writes: list[bytes]) -> None:
    """RabbitMQ hands back what a closed channel held; an ack sent on it would make it close
    the whole connection, and with it every consumer of the queue."""
    for _ in range(2):
        bench.publish()
    deliveries = [bench.receive() for _ in range(2)]
    with acks_together():
        for delivery in deliveries:
            delivery.ack()
        bench.channel.close()
    assert _ack_writes(writes, bench.channel) == []
    assert bench.broker.counts(bench.queue) == (2, 0)
    other = bench.consumer.runtime_or_fail().link.open_channel(Event())
    assert other is not None and other._carrot_connection is bench.channel._carrot_connection
    other.basic.qos(prefetch_count=1)  # a round trip: the connection is still open
    assert other.is_open


def test_the_recorder_writes_the_acks_of_one_round_at_once(
        bench: Bench, writes: list[bytes]) -> None:
    """Five ends handed over before the recorder's greenlet runs: one round, one write."""
    for _ in range(5):
        bench.publish()
    deliveries = [bench.receive() for _ in range(5)]
    for delivery in deliveries:
        delivery.process()
    for delivery in deliveries:
        assert delivery.recorded is not None
        delivery.recorded.get(timeout=10)
    assert [len(data) for data in _ack_writes(writes, bench.channel)] == [
        5 * len(ack_frame(bench.channel.channel_id, 1))]
    assert bench.broker.counts(bench.queue) == (0, 0)
    assert MessageLog.objects.filter(status=MessageLog.COMPLETED).count() == 5


@pytest.fixture
def pamqp_decoded(bench: Bench, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the frames of the bench connection that pamqp decoded, not carrot."""
    connection = bench.channel._carrot_connection
    decoded: list[str] = []
    handle = connection._handle_amqp_frame

    def recording(data_in: bytes) -> Any:
        rest, channel_id, frame_in = handle(data_in)
        decoded.append(getattr(frame_in, 'name', '?'))
        return rest, channel_id, frame_in

    monkeypatch.setattr(connection, '_handle_amqp_frame', recording)
    return decoded


def test_deliveries_are_decoded_by_carrot_and_arrive_whole(
        bench: Bench, pamqp_decoded: list[str]) -> None:
    """Task messages, one with a body of several frames: no frame of theirs goes to pamqp,
    and what arrives is what was sent."""
    large = json.dumps({'args': ['x' * 300_000], 'kwargs': {}}).encode()
    sent = [bench.publish(args=['ü']), bench.publish()]
    bench.broker.publish_raw(bench.queue, large, {
        'message_id': 'large', 'headers': {'type': 'tests.project.tasks.echo', 'n': 2 ** 40},
        'content_type': 'application/json', 'delivery_mode': 2, 'priority': 3})
    first, second, third = (bench.receive() for _ in range(3))
    assert [first.message_id, second.message_id, third.message_id] == [*sent, 'large']
    assert json.loads(first.body) == {'args': ['ü'], 'kwargs': {}}
    assert third.body == large
    assert third.properties['headers'] == {'type': 'tests.project.tasks.echo', 'n': 2 ** 40}
    assert (third.properties['priority'], third.properties['timestamp']) == (3, None)
    assert third.received.method['redelivered'] is False
    assert third.received.method['delivery_tag'] == first.received.method['delivery_tag'] + 2
    assert [name for name in pamqp_decoded
            if name in ('Basic.Deliver', 'ContentHeader', 'ContentBody')] == []
    for delivery in (first, second, third):
        delivery.ack()
    assert bench.broker.counts(bench.queue) == (0, 0)


def test_a_delivery_whose_properties_carrot_does_not_decode_arrives_whole(
        bench: Bench, pamqp_decoded: list[str]) -> None:
    """A timestamp and a header that is a list of tables (RabbitMQ's x-death): pamqp
    decodes that header frame, between a Basic.Deliver and body frames carrot decodes."""
    at = datetime.datetime(2026, 12, 7, 12, 0, tzinfo=datetime.UTC)
    body = b'{"args": [1], "kwargs": {}}'
    bench.broker.publish_raw(bench.queue, body, {
        'message_id': 'other', 'timestamp': at,
        'headers': {'type': 'tests.project.tasks.echo',
                    'x-death': [{'count': 1, 'queue': 'elsewhere'}]}})
    delivery = bench.receive()
    assert (delivery.message_id, delivery.body) == ('other', body)
    assert delivery.properties['timestamp'].replace(tzinfo=datetime.UTC) == at
    assert delivery.properties['headers']['x-death'] == [{'count': 1, 'queue': 'elsewhere'}]
    assert [name for name in pamqp_decoded
            if name in ('Basic.Deliver', 'ContentHeader', 'ContentBody')] == ['ContentHeader']
    delivery.ack()
    assert bench.broker.counts(bench.queue) == (0, 0)
