"""``publish_together()``: many tasks' rows written a few hundred to a statement, their
messages sent in one pipelined run at commit; against the real RabbitMQ and database."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.db import connection, transaction

from carrot import outbox
from carrot.models import MessageLog
from carrot.utilities import publish_message, publish_together
from tests.conftest import Broker
from tests.project import tasks


def sent_ids(broker: Broker, queue: str) -> list[str]:
    return [m.properties['message_id'] for m in broker.get_all(queue)]


def test_outside_a_transaction_the_block_ends_with_rows_committed_and_messages_confirmed(
        queue: str, broker: Broker) -> None:
    with publish_together():
        logs = [publish_message(tasks.add, n, 1) for n in range(1200)]
        assert all(log.pk is None for log in logs)  # kept: not written yet
        assert not MessageLog.objects.exists()
        assert broker.message_count(queue) == 0
    assert [log.pk for log in logs] == sorted(log.pk for log in logs)  # the calls' order
    rows = {row.pk: row for row in MessageLog.objects.all()}
    assert [(rows[log.pk].uuid, rows[log.pk].status) for log in logs] == [
        (log.uuid, MessageLog.PUBLISHED) for log in logs]
    assert outbox.drain(10)  # the confirms' records are written by the outbox thread
    assert not MessageLog.objects.filter(awaiting_confirm=True).exists()  # all confirmed
    assert json.loads(rows[logs[7].pk].task_args or '') == [7, 1]
    assert sent_ids(broker, queue) == [log.uuid for log in logs]  # stored, in order


def test_the_rows_take_few_statements_and_all_or_none_are_written(
        queue: str, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """More rows than one statement takes: several statements in a savepoint. One that
    fails takes the rows of the others with it, and nothing is sent."""
    from carrot import _sql

    real = _sql.insert_rows
    calls: list[int] = []

    def counted(alias: str, rows: list[list[Any]]) -> list[int]:
        calls.append(len(rows))
        return real(alias, rows)

    monkeypatch.setattr(_sql, 'insert_rows', counted)
    with publish_together():
        for _ in range(1200):
            publish_message(tasks.noop)
    per_statement = min(500, (connection.features.max_query_params or 2 ** 16)
                        // len(_sql.PUBLISHED_COLUMNS))  # 500 on PostgreSQL
    assert calls == [per_statement] * (1200 // per_statement) + (
        [1200 % per_statement] if 1200 % per_statement else [])
    assert MessageLog.objects.count() == 1200
    assert broker.message_count(queue) == 1200

    calls.clear()

    def fails_on_the_second(alias: str, rows: list[list[Any]]) -> list[int]:
        calls.append(len(rows))
        if len(calls) == 2:
            raise RuntimeError('the second statement failed')
        return real(alias, rows)

    monkeypatch.setattr(_sql, 'insert_rows', fails_on_the_second)
    with transaction.atomic():
        with pytest.raises(RuntimeError, match='second statement'):
            with publish_together():
                for _ in range(1200):
                    publish_message(tasks.noop)
        publish_message(tasks.add, 1, 2)  # the transaction goes on without those rows
    assert MessageLog.objects.count() == 1201
    assert broker.message_count(queue) == 1201


def test_a_rolled_back_transaction_writes_and_sends_nothing(
        queue: str, broker: Broker) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        with publish_together():
            logs = [publish_message(tasks.noop) for _ in range(10)]
        assert all(log.pk is not None for log in logs)  # written when the block ended
        raise RuntimeError('roll back')
    assert not MessageLog.objects.exists()
    assert broker.message_count(queue) == 0


def test_a_block_that_raises_writes_and_sends_none_of_its_rows(
        queue: str, broker: Broker) -> None:
    with transaction.atomic():
        with pytest.raises(RuntimeError):
            with publish_together():
                publish_message(tasks.noop)
                raise RuntimeError('the block failed')
        after = publish_message(tasks.noop)
    assert list(MessageLog.objects.values_list('uuid', flat=True)) == [after.uuid]
    assert sent_ids(broker, queue) == [after.uuid]
    with pytest.raises(RuntimeError):
        with publish_together():  # outside a transaction: its own is rolled back
            publish_message(tasks.noop)
            raise RuntimeError('the block failed')
    assert MessageLog.objects.count() == 1
    assert broker.message_count(queue) == 0


def test_calls_not_kept_are_written_at_once_after_the_rows_kept_before_them(
        queue: str, broker: Broker) -> None:
    """An untracked, a delayed and an optioned call: the order of rows and messages holds."""
    with transaction.atomic():
        with publish_together():
            first = publish_message(tasks.noop)
            untracked = publish_message(tasks.noop, tracked=False)
            assert first.pk is not None  # written before the untracked one was sent
            second = publish_message(tasks.noop)
            delayed = publish_message(tasks.noop, countdown=3600)
            optioned = publish_message(tasks.noop, max_retries=3)
            assert second.pk is not None and optioned.pk is not None
            third = publish_message(tasks.noop)
            assert third.pk is None
    assert third.pk is not None
    assert [first.pk, second.pk, delayed.pk, optioned.pk, third.pk] == sorted(
        [first.pk, second.pk, delayed.pk, optioned.pk, third.pk])
    assert sent_ids(broker, queue) == [first.uuid, untracked.uuid, second.uuid,
                                       optioned.uuid, third.uuid]
    assert MessageLog.objects.get(pk=delayed.pk).status == MessageLog.DELAYED
    assert MessageLog.objects.get(pk=optioned.pk).options == {'max_retries': 3}
    assert not MessageLog.objects.filter(uuid=untracked.uuid).exists()


def test_a_call_inside_a_savepoint_is_not_kept_and_goes_with_its_savepoint(
        queue: str, broker: Broker) -> None:
    """Its savepoint's rollback takes its row and message away, and only those: the rows
    kept before it are not written inside that savepoint."""
    with transaction.atomic():
        with publish_together():
            before = publish_message(tasks.noop)
            with pytest.raises(RuntimeError), transaction.atomic():
                inside = publish_message(tasks.noop)
                assert inside.pk is not None and before.pk is None
                raise RuntimeError('roll back the savepoint')
            with transaction.atomic():
                kept_savepoint = publish_message(tasks.noop)
            after = publish_message(tasks.noop)
    assert set(MessageLog.objects.values_list('uuid', flat=True)) == {
        before.uuid, kept_savepoint.uuid, after.uuid}
    # The savepoint's call was written first, so its message goes first.
    assert sent_ids(broker, queue) == [kept_savepoint.uuid, before.uuid, after.uuid]
    assert set(MessageLog.objects.values_list('status', flat=True)) == {MessageLog.PUBLISHED}


def test_a_block_inside_a_savepoint_keeps_its_rows_to_that_savepoint(
        queue: str, broker: Broker) -> None:
    with transaction.atomic():
        outer = publish_message(tasks.noop)
        with pytest.raises(RuntimeError), transaction.atomic():
            with publish_together():
                publish_message(tasks.noop)
            raise RuntimeError('roll back the savepoint')
        with transaction.atomic(), publish_together():
            kept = publish_message(tasks.noop)
    assert sorted(MessageLog.objects.values_list('uuid', flat=True)) == sorted(
        [outer.uuid, kept.uuid])
    assert sorted(sent_ids(broker, queue)) == sorted([outer.uuid, kept.uuid])


def test_the_kept_rows_are_sent_by_one_commit_hook(queue: str, broker: Broker) -> None:
    """Django runs a transaction's hooks by popping the front of a list, which is quadratic
    in their number: the kept rows register one hook, not one each."""
    with transaction.atomic():
        with publish_together():
            logs = [publish_message(tasks.noop) for _ in range(50)]
        assert len(connection.run_on_commit) == 1
    assert sent_ids(broker, queue) == [log.uuid for log in logs]


def test_a_block_inside_another_is_part_of_the_outer_one(queue: str, broker: Broker) -> None:
    with publish_together():
        first = publish_message(tasks.noop)
        with publish_together():
            second = publish_message(tasks.noop)
        assert second.pk is None  # the inner block's end wrote nothing
    assert first.pk is not None and second.pk is not None
    assert sent_ids(broker, queue) == [first.uuid, second.uuid]


def test_with_autocommit_off_outside_atomic_the_block_is_refused(
        queue: str, broker: Broker) -> None:
    transaction.set_autocommit(False)
    try:
        with pytest.raises(transaction.TransactionManagementError,
                           match='autocommit turned off outside transaction.atomic'):
            with publish_together():
                pytest.fail('the block ran')  # pragma: no cover
        transaction.commit()
    finally:
        transaction.set_autocommit(True)
    assert not MessageLog.objects.exists()
    assert broker.message_count(queue) == 0


def test_a_kept_row_is_the_row_the_per_call_path_writes(queue: str, broker: Broker) -> None:
    """The same columns, whichever path wrote it (but the primary key, uuid and times)."""
    skipped = {'id', 'uuid', 'publish_time'}
    with transaction.atomic():
        alone = publish_message(tasks.echo, 1, 'two', priority=3, three=[3])
    with publish_together():
        together = publish_message(tasks.echo, 1, 'two', priority=3, three=[3])

    assert outbox.drain(10)  # the confirms' records are written by the outbox thread

    def columns(pk: int) -> dict[str, Any]:
        return {k: v for k, v in MessageLog.objects.filter(pk=pk).values()[0].items()
                if k not in skipped}

    assert columns(together.pk) == columns(alone.pk)
