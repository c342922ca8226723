"""publish_message against the real RabbitMQ: what is written, what is sent, and when."""

from __future__ import annotations

import datetime
import json
import threading
import time
from typing import Any

import gevent
import pytest
from django.db import connections, transaction
from django.test.utils import override_settings

from carrot import _sql, lifecycle
from carrot._group_insert import group_insert
from carrot.amqp import SignallingRpc
from carrot.broker import get_publisher
from carrot.exceptions import (
    ArgumentsNotSerializable,
    BrokerUnavailable,
    CarrotConfigException,
    MessageNotEncodable,
    TaskNotRegistered,
)
from carrot.models import MessageLog
from carrot.utilities import create_message, get_host_from_name, publish_message, validate_task
from tests.conftest import Broker, carrot_settings
from tests.project import tasks


def test_publish_writes_a_published_row_and_an_upstream_format_message(
        queue: str, broker: Broker) -> None:
    log = publish_message(tasks.add, 1, 2, priority=3, key='value')

    row = MessageLog.objects.get(pk=log.pk)
    assert row.status == MessageLog.PUBLISHED
    assert (row.task, row.queue, row.routing_key, row.priority) == \
        ('tests.project.tasks.add', queue, queue, 3)
    assert json.loads(row.task_args or '') == [1, 2]
    assert json.loads(row.content or '') == {'key': 'value'}
    assert row.publish_time is not None

    [sent] = broker.get_all(queue)
    assert sent.properties['headers']['type'] == 'tests.project.tasks.add'
    assert sent.properties['message_id'] == log.uuid
    assert sent.properties['delivery_mode'] == 2
    assert json.loads(sent.body) == {'args': [1, 2], 'kwargs': {'key': 'value'}}


def test_the_first_message_before_any_worker_ran_is_kept(broker: Broker) -> None:
    name = broker.queue_name('fresh')  # this queue has never been declared by anyone
    with override_settings(CARROT=carrot_settings(name)):
        publish_message('tests.project.tasks.noop', queue=name)
    assert broker.message_count(name) == 1


def test_a_task_can_be_given_by_path(queue: str, broker: Broker) -> None:
    log = publish_message('tests.project.tasks.echo', 'x')
    assert log.task == 'tests.project.tasks.echo'
    assert broker.message_count(queue) == 1


@pytest.mark.parametrize(('call', 'error'), [
    (lambda: publish_message('os.system', 'rm -rf /'), TaskNotRegistered),
    (lambda: publish_message(tasks.add, object()), ArgumentsNotSerializable),
    (lambda: publish_message(tasks.add, 1, 2, queue='nope'), CarrotConfigException),
    (lambda: publish_message(tasks.add, priority=300), ValueError),
])
def test_bad_input_raises_before_anything_is_written_or_sent(
        queue: str, broker: Broker, call: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        call()  # type: ignore[operator]
    assert MessageLog.objects.count() == 0
    assert broker.message_count(queue) == 0


@pytest.mark.parametrize(('destination', 'error'), [
    ({'exchange': 'x' * 128}, r"exchange 'xxx.* is 128 characters long: AMQP allows at most 127"),
    ({'exchange': 'no$such'}, r"exchange 'no\$such' is not a valid name"),
    ({'routing_key': 'é' * 128}, r'routing_key .* \(256 bytes of UTF-8\) long: AMQP carries at '
                                 r'most 255 bytes'),
    ({'routing_key': 'k' * 201}, r'routing_key .* is 201 characters .* MessageLog keeps at most '
                                 r'200'),
])
def test_an_exchange_or_routing_key_amqp_cannot_carry_is_refused_before_anything_is_written(
        queue: str, broker: Broker, destination: dict[str, str], error: str) -> None:
    with pytest.raises(CarrotConfigException, match=error):
        publish_message(tasks.noop, **destination)
    assert MessageLog.objects.count() == 0
    assert broker.message_count(queue) == 0


@pytest.mark.parametrize(('properties', 'routing_key', 'named'), [
    ({'priority': 300}, None, 'priority'),
    ({'headers': {'type': 'tests.project.tasks.noop', 'x-foreign': object()}}, None,
     "headers['x-foreign']"),
    ({}, 'é' * 128, 'routing_key'),
])
def test_a_message_that_cannot_be_encoded_is_a_carrot_error_naming_what(
        queue: str, broker: Broker, properties: dict[str, object], routing_key: str | None,
        named: str) -> None:
    """The worker dead-letters foreign messages with their own properties: a CarrotError
    lets it requeue one it cannot send, where a raw TypeError would crash its consumer."""
    publisher = get_publisher()
    host = get_host_from_name(queue)
    with pytest.raises(MessageNotEncodable) as caught:
        publisher.send(host, b'{}', properties, routing_key=routing_key or queue)
    assert f'because of its {named} (' in str(caught.value)
    assert 'it was not sent' in str(caught.value)
    publisher.send(host, b'{}', {}, routing_key=queue)  # the publisher is still usable
    assert broker.message_count(queue) == 1


def test_inside_a_transaction_the_message_goes_out_on_commit(
        queue: str, broker: Broker) -> None:
    with transaction.atomic():
        log = publish_message(tasks.noop)
        assert broker.message_count(queue) == 0
    assert broker.message_count(queue) == 1
    assert MessageLog.objects.get(pk=log.pk).status == MessageLog.PUBLISHED


def test_a_rolled_back_transaction_sends_nothing_and_keeps_no_row(
        queue: str, broker: Broker) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        publish_message(tasks.noop)
        raise RuntimeError('roll back')
    assert broker.message_count(queue) == 0
    assert MessageLog.objects.count() == 0


def test_an_unreachable_broker_raises_and_leaves_no_published_row(broker: Broker) -> None:
    name = broker.queue_name()
    settings = carrot_settings(name)
    settings['queues'][0]['host'] = 'amqp://guest:s3cret@127.0.0.1:1/'
    with override_settings(CARROT=settings):
        with pytest.raises(BrokerUnavailable) as caught:
            publish_message(tasks.noop, queue=name)
    assert '127.0.0.1:1' in str(caught.value)
    assert 's3cret' not in str(caught.value)
    assert MessageLog.objects.count() == 0


def test_failed_publishes_after_commit_mark_their_rows_failed_and_spare_other_hooks(
        broker: Broker) -> None:
    name = broker.queue_name()
    settings = carrot_settings(name)
    settings['queues'][0]['host'] = 'amqp://guest:guest@127.0.0.1:1/'
    ran: list[str] = []
    with override_settings(CARROT=settings), transaction.atomic():
        logs = [publish_message(tasks.noop, queue=name) for _ in range(3)]
        transaction.on_commit(lambda: ran.append('the project\'s own hook'))
    rows = MessageLog.objects.filter(pk__in=[log.pk for log in logs])
    assert [row.status for row in rows] == [MessageLog.FAILED] * 3
    assert all('Not published' in (row.exception or '') for row in rows)
    assert ran == ["the project's own hook"]


def test_an_unroutable_exchange_is_an_error_not_a_silent_drop(
        queue: str, broker: Broker) -> None:
    with pytest.raises(CarrotConfigException, match='NOT_FOUND|could not route'):
        publish_message(tasks.noop, exchange='amq.direct', routing_key='nowhere-bound')
    assert MessageLog.objects.count() == 0


def test_connections_and_channels_are_reused(queue: str, broker: Broker) -> None:
    publish_message(tasks.noop)
    publisher = get_publisher()
    [link] = publisher._links.values()
    connection = link.connection
    for _ in range(50):
        publish_message(tasks.noop)
    [same] = publisher._links.values()
    assert same.connection is connection
    assert len(same.idle) == 1  # one channel did all the sequential publishes
    assert broker.message_count(queue) == 51


def test_upstream_helpers_keep_their_names(queue: str) -> None:
    assert validate_task(tasks.add) == 'tests.project.tasks.add'
    assert get_host_from_name(queue).host == '127.0.0.1'
    assert get_host_from_name(None).port == 5672
    message = create_message(tasks.add, task_args=(1, 2), queue=queue)
    assert message.task == 'tests.project.tasks.add' and message.uuid


def test_a_routing_key_no_queue_is_bound_to_is_a_configuration_error(queue: str) -> None:
    with pytest.raises(CarrotConfigException, match='could not route'):
        publish_message(tasks.noop, routing_key='no-queue-has-this-name')
    assert MessageLog.objects.count() == 0


def test_concurrent_publishers_each_get_their_own_row_and_message(
        queue: str, broker: Broker) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connections

    def publish(index: int) -> tuple[int, str, int]:
        try:
            log = publish_message(tasks.echo, index)
            return log.pk, log.uuid, index
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(publish, range(400)))
    rows = {row.pk: row for row in MessageLog.objects.all()}
    assert len(rows) == 400
    for pk, uuid, index in results:  # the pk each caller got is its own row
        assert rows[pk].uuid == uuid
        assert json.loads(rows[pk].task_args or '') == [index]
    assert broker.message_count(queue) == 400


def test_large_bodies_and_properties_amqpstorm_encodes_arrive_intact(
        queue: str, broker: Broker) -> None:
    """Both encoders against the real broker: carrot's own, and amqpstorm's for the rest."""
    host = get_host_from_name(queue)
    large = b'{"args": ["' + b'x' * 300_000 + b'"], "kwargs": {}}'  # three frames
    get_publisher().send(host, large, {'message_id': 'large', 'headers': {'n': 70000}},
                         routing_key=queue)
    stamp = datetime.datetime(2026, 11, 28, 7, 0, tzinfo=datetime.UTC)
    get_publisher().send(host, b'{}', {'message_id': 'stamped', 'timestamp': stamp,
                                       'headers': {'nested': {'a': 1}}}, routing_key=queue)
    large_sent, stamped = broker.get_all(queue)
    assert (large_sent.body, large_sent.properties['headers']) == (large, {'n': 70000})
    assert large_sent.properties['content_encoding'] == 'utf-8'  # amqpstorm's default too
    assert stamped.properties['headers'] == {'nested': {'a': 1}}
    assert stamped.properties['timestamp'].replace(tzinfo=datetime.UTC) == stamp


def test_a_row_written_with_autocommit_off_is_not_grouped_with_other_threads_rows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With autocommit off, the caller's row is in its own transaction; another thread's
    row, written at the same moment, is committed in that thread, not in the caller's."""
    def row(message_id: str) -> dict[str, Any]:
        return dict(message_id=message_id, task='tests.project.tasks.noop', args_json='[]',
                    kwargs_json='{}', queue='q', exchange='', routing_key='q', priority=0)

    other_done = threading.Event()

    def other_thread() -> None:
        try:
            lifecycle.record_published(**row('other'))
        finally:
            connections.close_all()
            other_done.set()

    # The interleaving: the other thread publishes while this one is writing its row.
    insert_rows = _sql.insert_rows
    started: list[threading.Thread] = []

    def insert_while_the_other_publishes(alias: str, rows: list[list[Any]]) -> list[int]:
        if not started:
            started.append(threading.Thread(target=other_thread))
            started[0].start()
            deadline = time.monotonic() + 10
            while not (other_done.is_set() or group_insert._pending):
                assert time.monotonic() < deadline, 'the other thread did not publish'
                time.sleep(0.001)
        return insert_rows(alias, rows)

    monkeypatch.setattr(_sql, 'insert_rows', insert_while_the_other_publishes)
    transaction.set_autocommit(False)
    try:
        lifecycle.record_published(**row('mine'))
        transaction.rollback()
    finally:
        transaction.set_autocommit(True)
    started[0].join(10)
    assert other_done.is_set()
    assert list(MessageLog.objects.values_list('uuid', flat=True)) == ['other']


def test_a_publish_interrupted_after_commit_marks_its_row_then_raises(
        queue: str, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gevent.Timeout while waiting for the confirm: sent, but its fate unknown."""
    waits: list[str] = []
    wait = SignallingRpc._wait_for_request

    def timed_out(rpc: SignallingRpc, uuid: str, connection_adapter: Any = None) -> None:
        waits.append(uuid)
        if len(waits) == 1:
            raise gevent.Timeout(5)
        wait(rpc, uuid, connection_adapter)  # the interrupted channel's close, meanwhile

    publish_message(tasks.noop)  # the queue declared: the next wait is the confirm's
    monkeypatch.setattr(SignallingRpc, '_wait_for_request', timed_out)
    with pytest.raises(gevent.Timeout), transaction.atomic():
        log = publish_message(tasks.noop)
    row = MessageLog.objects.get(pk=log.pk)
    assert row.status == MessageLog.FAILED
    assert row.exception == ('Not published, or not confirmed: the publish was interrupted by '
                             'Timeout (5 seconds), so RabbitMQ may or may not have it.')
    assert broker.message_count(queue) == 2  # it was written before the wait


def _interrupt_writes(monkeypatch: pytest.MonkeyPatch, call: int,
                      interruption: BaseException) -> None:
    """Publish one message per socket write, and make the ``call``-th write raise
    ``interruption`` (a Ctrl-C or a kill arriving then), once the broker had time to confirm
    what went before."""
    from carrot import amqp

    write = amqp.Connection.write_bytes
    calls: list[int] = []

    def interrupted(connection: amqp.Connection, data: bytes) -> None:
        calls.append(len(data))
        if len(calls) == call:
            time.sleep(0.5)
            raise interruption
        write(connection, data)

    monkeypatch.setattr(amqp, 'PIPELINE_WRITE', 1)
    monkeypatch.setattr(amqp.Connection, 'write_bytes', interrupted)


def test_an_interrupted_send_on_commit_marks_every_later_row_of_the_transaction(
        queue: str, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Django runs no hook after one that raises KeyboardInterrupt or GreenletExit: the
    rows after it must not be left PUBLISHED with no message sent."""
    publish_message(tasks.noop)  # declares the queue: the writes below are the publishes
    broker.get_all(queue)
    MessageLog.objects.all().delete()
    _interrupt_writes(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt), transaction.atomic():
        first, second = publish_message(tasks.noop), publish_message(tasks.noop)
        with pytest.raises(RuntimeError), transaction.atomic():  # a savepoint rolled back
            publish_message(tasks.noop)
            raise RuntimeError('roll back the savepoint')
        third, fourth = publish_message(tasks.noop), publish_message(tasks.noop)
    rows = {row.pk: row for row in MessageLog.objects.all()}
    assert set(rows) == {first.pk, second.pk, third.pk, fourth.pk}
    assert rows[first.pk].status == MessageLog.PUBLISHED
    assert rows[second.pk].status == MessageLog.FAILED
    assert 'interrupted by KeyboardInterrupt, so RabbitMQ may or may not have it' in (
        rows[second.pk].exception or '')
    for later in (third, fourth):
        assert rows[later.pk].status == MessageLog.FAILED
        assert rows[later.pk].exception == (
            'Not published: the transaction committed, but sending its messages was '
            'interrupted by KeyboardInterrupt before this one, so RabbitMQ does not have it. '
            'Publish it again if it should still run.')
    [sent] = broker.get_all(queue)
    assert sent.properties['message_id'] == first.uuid


def test_after_a_rolled_back_savepoint_the_others_are_sent_and_nothing_is_kept(
        queue: str, broker: Broker) -> None:
    from carrot import oncommit

    with transaction.atomic():
        kept = publish_message(tasks.noop)
        with pytest.raises(RuntimeError), transaction.atomic():
            publish_message(tasks.noop)
            raise RuntimeError('roll back the savepoint')
        last = publish_message(tasks.noop)
    assert sorted(m.properties['message_id'] for m in broker.get_all(queue)) == sorted(
        [kept.uuid, last.uuid])
    assert set(MessageLog.objects.values_list('status', flat=True)) == {MessageLog.PUBLISHED}
    with transaction.atomic():
        publish_message(tasks.noop)
    assert not oncommit._waiting.get(transaction.get_connection())  # nothing piles up


def test_with_autocommit_off_outside_atomic_publishing_is_refused_writing_nothing(
        queue: str, broker: Broker) -> None:
    """Its row would wait for a commit carrot cannot see, while the message went at once."""
    transaction.set_autocommit(False)
    try:
        with pytest.raises(transaction.TransactionManagementError,
                           match='autocommit turned off outside transaction.atomic'):
            publish_message(tasks.noop)
        transaction.commit()
    finally:
        transaction.set_autocommit(True)
    assert not MessageLog.objects.exists()
    assert broker.message_count(queue) == 0


def test_a_transactions_messages_are_sent_together_and_confirmed_by_the_commit(
        queue: str, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """One pipelined run: every message written, then one wait for all the confirms."""
    from carrot import amqp
    from carrot.confirms import Confirms

    waits: list[int] = []
    pipelined = amqp.SignallingChannel.publish_all_confirmed

    def counted(channel: amqp.SignallingChannel, publications: Any, confirms: Confirms,
                timeout: float) -> None:
        pipelined(channel, publications, confirms, timeout)
        waits.append(confirms.written)

    monkeypatch.setattr(amqp.SignallingChannel, 'publish_all_confirmed', counted)
    with transaction.atomic():
        logs = [publish_message(tasks.add, n, 1) for n in range(2000)]
        assert broker.message_count(queue) == 0
    assert waits == [2000]
    assert broker.message_count(queue) == 2000  # stored when the commit returned
    assert MessageLog.objects.filter(status=MessageLog.PUBLISHED).count() == len(logs)


def test_a_pipelined_run_writes_its_first_messages_before_the_last_is_encoded(
        queue: str, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """RabbitMQ stores the first messages of a commit's run while carrot encodes the next."""
    from carrot import amqp
    from carrot import broker as carrot_broker

    events: list[str] = []
    encode, write = carrot_broker.publication, amqp.Connection.write_bytes

    def encoding(channel: amqp.SignallingChannel, item: Any) -> bytes:
        events.append('encode')
        return encode(channel, item)

    def writing(connection: amqp.Connection, data: bytes) -> None:
        events.append('write')
        write(connection, data)

    monkeypatch.setattr(carrot_broker, 'publication', encoding)
    monkeypatch.setattr(amqp.Connection, 'write_bytes', writing)
    with transaction.atomic():
        for n in range(3 * amqp.PIPELINE_WRITE):
            publish_message(tasks.add, n, 1)
    assert events.count('encode') == 3 * amqp.PIPELINE_WRITE
    last_encode = len(events) - 1 - events[::-1].index('encode')
    assert 'write' in events[:last_encode]
    assert broker.message_count(queue) == 3 * amqp.PIPELINE_WRITE


def test_in_a_pipelined_run_an_unroutable_message_fails_alone(
        queue: str, broker: Broker) -> None:
    """A message RabbitMQ returns (no queue bound), and one whose exchange does not exist
    (RabbitMQ closes the channel), get FAILED rows saying so; the others are sent."""
    with transaction.atomic():
        before = publish_message(tasks.noop)
        returned = publish_message(tasks.noop, exchange='amq.direct',
                                   routing_key='nobody-is-bound-here')
        middle = publish_message(tasks.noop)
        missing = publish_message(tasks.noop, exchange='no-such-exchange-here')
        after = publish_message(tasks.noop)
    rows = {row.pk: row for row in MessageLog.objects.all()}
    assert [rows[log.pk].status for log in (before, middle, after)] == [MessageLog.PUBLISHED] * 3
    assert rows[returned.pk].status == MessageLog.FAILED
    assert 'could not route the message' in (rows[returned.pk].exception or '')
    assert rows[missing.pk].status == MessageLog.FAILED
    assert 'NOT_FOUND' in (rows[missing.pk].exception or '')
    assert sorted(m.properties['message_id'] for m in broker.get_all(queue)) == sorted(
        log.uuid for log in (before, middle, after))


def test_confirms_are_matched_to_their_messages_by_delivery_tag() -> None:
    """Frames a real broker sends rarely (a nack, a multiple ack after a return), fed to the
    confirm collector as the connection's reader thread would."""
    from types import SimpleNamespace

    from carrot.confirms import Confirms

    confirms = Confirms(first_tag=11)
    confirms.expect(['a', 'b', 'c'])
    frame = SimpleNamespace
    assert confirms.on_return_frame(frame(name='Basic.Return'))
    assert confirms.on_return_frame(frame(name='ContentHeader', body_size=4,
                                          properties=frame(message_id='b')))
    assert confirms.on_return_frame(frame(name='ContentBody', value=b'body'))
    assert not confirms.on_return_frame(frame(name='ContentBody', value=b'stray'))
    confirms.on_confirm(False, 12, multiple=True)  # a and b
    confirms.expect(['d', 'e'])  # the next part of the run, written after the first
    confirms.on_confirm(True, 14, multiple=False)  # d refused
    assert not confirms.answered.is_set()
    confirms.on_confirm(False, 15, multiple=True)  # c and e
    assert not confirms.answered.is_set()  # all answered, but more may come
    confirms.complete()
    assert confirms.answered.is_set()
    assert confirms.outcomes == ['ack', 'returned', 'ack', 'nack', 'ack']
    assert confirms.outcome(4) == 'ack' and confirms.outcome(5) is None
