"""The database under gevent: 90 tasks at once using it, connections closed after each."""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import pytest
from django.db import OperationalError, connection, connections
from django.utils import timezone

from carrot import _sql, _text, lifecycle
from carrot.models import MessageLog, ScheduledTask
from carrot.utilities import publish_message
from carrot.worker import recorder as recording
from tests.conftest import Worker, carrot_settings, statuses, wait_for
from tests.project import tasks

StartWorker = Callable[..., Worker]


def _open_connections() -> int:
    """Connections to the test database other than this process's own (PostgreSQL)."""
    with connection.cursor() as cursor:
        cursor.execute('SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() '
                       'AND pid <> pg_backend_pid()')
        return int(cursor.fetchone()[0])


def test_concurrency_90_with_tasks_that_use_the_database(
        queue: str, start_worker: StartWorker) -> None:
    # 90 tasks' connections, the service's own (recorder, scheduler, resender, releaser) and this
    # process's (its own, its outbox thread's) stay below PostgreSQL's default limit of 100,
    # as docs/settings.rst asks: at concurrency 100 a backlog ran into "too many clients".
    start_worker(carrot_settings(queue, concurrency=90), '--loglevel', 'WARNING')
    for index in range(300):
        publish_message(tasks.use_database, f'row-{index}')
    wait_for(lambda: statuses().get('COMPLETED') == 300 or statuses().get('FAILED'), timeout=120,
             what='300 completions')
    assert statuses() == {'COMPLETED': 300}, MessageLog.objects.exclude(
        status='COMPLETED').values_list('status', 'exception')[:3]
    assert ScheduledTask.objects.count() == 300
    assert set(MessageLog.objects.values_list('output', flat=True)) == {'1'}
    if connection.vendor == 'postgresql':
        # Each task's connection is closed after it; the recorder and the releaser keep one each.
        wait_for(lambda: _open_connections() <= 3, timeout=10, what='connections to close')


def test_text_the_database_would_refuse_is_cleaned_not_fatal_to_the_batch(
        queue: str, start_worker: StartWorker) -> None:
    start_worker(carrot_settings(queue, concurrency=10))
    nul = publish_message(tasks.nul_text)
    others = [publish_message(tasks.add, i, i) for i in range(20)]
    wait_for(lambda: statuses() == {'COMPLETED': 21}, timeout=60, what='21 completions')
    nul.refresh_from_db()
    assert nul.output == '"out\\u0000put"'  # JSON escapes it
    assert 'beforeafter' in (nul.log or '')
    assert [MessageLog.objects.get(pk=o.pk).output for o in others] == \
        [str(2 * i) for i in range(20)]


def test_a_task_that_ends_before_its_start_is_written_is_recorded_in_one_update() -> None:
    """The recorder's shortcut for short tasks: start and end written together."""
    from carrot import lifecycle

    published = MessageLog.objects.create(uuid='ours', task='tests.project.tasks.add',
                                          status=MessageLog.PUBLISHED)
    start = lifecycle.Start(message_id='ours', task='tests.project.tasks.add', args=[1, 2],
                            kwargs={}, queue='q', exchange='', routing_key='q', priority=0)
    # A foreign producer's message has no row yet: it is created and ended at once.
    foreign = lifecycle.Start(message_id='theirs', task='tests.project.tasks.add', args=[3],
                              kwargs={'b': 4}, queue='q', exchange='', routing_key='q',
                              priority=0)
    started = lifecycle.finish_many([
        lifecycle.Finish(message_id='ours', status=MessageLog.COMPLETED, output='3', start=start),
        lifecycle.Finish(message_id='theirs', status=MessageLog.FAILED, exception='boom',
                         start=foreign),
    ])
    ours, theirs = MessageLog.objects.get(uuid='ours'), MessageLog.objects.get(uuid='theirs')
    assert started == {'ours': lifecycle.Started(published.pk, already_completed=False),
                       'theirs': lifecycle.Started(theirs.pk, already_completed=False)}
    assert (ours.status, ours.output, ours.attempts, ours.completion_time is not None) == \
        (MessageLog.COMPLETED, '3', 1, True)
    assert (theirs.status, theirs.exception, theirs.attempts, theirs.positionals,
            theirs.keywords) == (MessageLog.FAILED, 'boom', 1, [3], {'b': 4})
    # An end whose start was written before adds no attempt.
    lifecycle.finish_many([lifecycle.Finish(message_id='ours', status=MessageLog.COMPLETED,
                                            pk=published.pk)])
    assert MessageLog.objects.get(uuid='ours').attempts == 1


def test_a_batch_of_ends_keeps_every_character_and_microsecond_it_is_given() -> None:
    """The batch UPDATEs carry their records as one JSON text on PostgreSQL: quotes,
    backslashes, control characters and non-ASCII text, and times to the microsecond with
    their offset, arrive as they were given (on every database)."""
    import datetime

    from django.utils import timezone

    texts = ['"quoted" \\ back\\slash', 'line\nbreak\ttab \u001f', 'é ☃ 𝄞 日本語', '{"a": [1]}']
    started_at = timezone.now().replace(microsecond=123456) - datetime.timedelta(seconds=5)
    ended_at = started_at + datetime.timedelta(seconds=1, microseconds=654321)
    for number in range(len(texts)):
        MessageLog.objects.create(uuid=f'text-{number}', task='tests.project.tasks.add',
                                  status=MessageLog.PUBLISHED)
    starts = [lifecycle.Start(message_id=f'text-{number}', task='tests.project.tasks.add',
                              args=[], kwargs={}, queue='q', exchange='', routing_key='q',
                              priority=0, at=started_at) for number in range(len(texts))]
    lifecycle.finish_many([
        lifecycle.Finish(message_id=f'text-{number}', status=MessageLog.FAILED, output=text,
                         log=text, exception=text, traceback=text, at=ended_at,
                         start=starts[number])
        for number, text in enumerate(texts)
    ])
    for number, text in enumerate(texts):
        row = MessageLog.objects.get(uuid=f'text-{number}')
        assert (row.output, row.log, row.exception, row.traceback) == (text,) * 4
        assert (row.start_time, row.failure_time, row.attempts) == (started_at, ended_at, 1)


def test_starts_written_by_themselves_keep_each_its_own_time() -> None:
    """PostgreSQL's batch UPDATE (in its JSON text), a foreign producer's message whose row
    the start creates, a re-sent copy, and elsewhere one prepared UPDATE a row: each start
    keeps its own time, and a message id started twice in a round keeps its first."""
    import datetime

    from django.utils import timezone

    started_at = timezone.now().replace(microsecond=123456) - datetime.timedelta(seconds=5)

    def start(message_id: str, at: datetime.datetime, resent: bool = False) -> lifecycle.Start:
        return lifecycle.Start(message_id=message_id, task='tests.project.tasks.add', args=[],
                               kwargs={}, queue='q', exchange='', routing_key='q', priority=0,
                               at=at, resent=resent)

    for message_id in ('start-only', 'twice', 'resent'):
        MessageLog.objects.create(uuid=message_id, task='tests.project.tasks.add',
                                  status=MessageLog.PUBLISHED)
    times = [started_at + datetime.timedelta(microseconds=250_001 * n) for n in range(6)]
    started = lifecycle.start_many([
        start('start-only', times[0]), start('foreign', times[1]), start('twice', times[2]),
        start('twice', times[3]), start('resent', times[4], resent=True),
        start('resent', times[5], resent=True)])
    expected = {'start-only': times[0], 'foreign': times[1], 'twice': times[2],
                'resent': times[4]}
    for message_id, at in expected.items():
        row = MessageLog.objects.get(uuid=message_id)
        assert (row.status, row.start_time, row.attempts) == (MessageLog.IN_PROGRESS, at, 1), \
            message_id
    # The second re-sent copy finds its task started by the first, and does not run.
    assert [s.started_elsewhere for s in started] == [False] * 5 + [True]


def _start_of(message_id: str) -> lifecycle.Start:
    """The start of a task of ``tests.project.tasks.add`` on queue ``q``."""
    return lifecycle.Start(message_id=message_id, task='tests.project.tasks.add',
                           args=[1], kwargs={}, queue='q', exchange='', routing_key='q',
                           priority=0)


def _retried_end(message_id: str) -> lifecycle.Finish:
    """The end of a first attempt that failed and runs again in 30 s, written with its
    start (a short task)."""
    end = lifecycle.retrying(message_id, exception='ValueError: no', traceback=None, log='',
                             attempt=1, run_after=timezone.now() + datetime.timedelta(seconds=30))
    return dataclasses.replace(end, start=_start_of(message_id))


def test_starts_mark_rows_in_progress_create_missing_ones_and_spare_completed_ones() -> None:
    from carrot import lifecycle

    waiting = MessageLog.objects.create(uuid='waiting', task='tests.project.tasks.add')
    done = MessageLog.objects.create(uuid='done', task='tests.project.tasks.add',
                                     status=MessageLog.COMPLETED, attempts=1)
    started = lifecycle.start_many([_start_of('waiting'), _start_of('done'), _start_of('foreign'),
                                    _start_of('waiting')])
    foreign = MessageLog.objects.get(uuid='foreign')
    assert started == [lifecycle.Started(waiting.pk, already_completed=False),
                       lifecycle.Started(done.pk, already_completed=True),
                       lifecycle.Started(foreign.pk, already_completed=False),
                       lifecycle.Started(waiting.pk, already_completed=False)]
    rows = {log.uuid: (log.status, log.attempts) for log in MessageLog.objects.all()}
    assert rows == {'waiting': (MessageLog.IN_PROGRESS, 1), 'done': (MessageLog.COMPLETED, 1),
                    'foreign': (MessageLog.IN_PROGRESS, 1)}


def test_a_start_or_an_end_settles_the_rows_confirm() -> None:
    """A delivered message was stored by RabbitMQ: its start or end clears awaiting_confirm,
    so the publisher's outbox has no UPDATE of its own left to write for it."""
    for message_id in ('started', 'ended-with-start', 'ended-after-start', 'resent', 'retried',
                       'refused', 'waiting'):
        MessageLog.objects.create(uuid=message_id, task='tests.project.tasks.add',
                                  status=MessageLog.PUBLISHED, awaiting_confirm=True)
    lifecycle.start_many([_start_of('started'), _start_of('ended-after-start'),
                          dataclasses.replace(_start_of('resent'), resent=True)])
    MessageLog.objects.filter(uuid='ended-after-start').update(awaiting_confirm=True)
    lifecycle.finish_many([
        lifecycle.Finish(message_id='ended-with-start', status=MessageLog.COMPLETED,
                         output='2', start=_start_of('ended-with-start')),
        lifecycle.Finish(message_id='ended-after-start', status=MessageLog.COMPLETED,
                         output='2', pk=MessageLog.objects.get(uuid='ended-after-start').pk),
        _retried_end('retried'),
    ])
    assert lifecycle.record_refused(message_id='refused', task='tests.project.tasks.add',
                                    reason='bad', queue='q') is not None
    awaiting = dict(MessageLog.objects.values_list('uuid', 'awaiting_confirm'))
    assert awaiting == {'started': False, 'ended-with-start': False,
                        'ended-after-start': False, 'resent': False, 'retried': False,
                        'refused': False, 'waiting': True}
    assert MessageLog.objects.get(uuid='retried').status == MessageLog.DELAYED


def test_a_batch_of_a_retried_attempt_and_a_plain_end_reports_both_starts() -> None:
    """Short tasks, both ended before their start was written: one failed and retries,
    one completed. One recorder round writes both (on PostgreSQL by two paths) and reports
    both rows as started."""
    retried = MessageLog.objects.create(uuid='retried', task='tests.project.tasks.add',
                                        status=MessageLog.PUBLISHED)
    plain = MessageLog.objects.create(uuid='plain', task='tests.project.tasks.add',
                                      status=MessageLog.PUBLISHED)
    started = lifecycle.finish_many([
        _retried_end('retried'),
        lifecycle.Finish(message_id='plain', status=MessageLog.COMPLETED, output='2',
                         start=_start_of('plain')),
    ])
    assert started == {'retried': lifecycle.Started(retried.pk, already_completed=False),
                       'plain': lifecycle.Started(plain.pk, already_completed=False)}
    rows = {log.uuid: (log.status, log.attempts) for log in MessageLog.objects.all()}
    assert rows == {'retried': (MessageLog.DELAYED, 1), 'plain': (MessageLog.COMPLETED, 1)}


def test_a_message_id_twice_in_one_batch_is_written_twice_in_order() -> None:
    """A producer that reuses a message id: both runs are recorded, the later one last."""
    from carrot import lifecycle

    published = MessageLog.objects.create(uuid='twice', task='tests.project.tasks.add',
                                          status=MessageLog.PUBLISHED)
    start = lifecycle.Start(message_id='twice', task='tests.project.tasks.add', args=[1, 2],
                            kwargs={}, queue='q', exchange='', routing_key='q', priority=0)
    started = lifecycle.finish_many([
        lifecycle.Finish(message_id='twice', status=MessageLog.COMPLETED, output='3',
                         start=start),
        lifecycle.Finish(message_id='twice', status=MessageLog.FAILED, exception='second',
                         start=start),
    ])
    assert started == {'twice': lifecycle.Started(published.pk, already_completed=False)}
    row = MessageLog.objects.get(uuid='twice')
    assert (row.status, row.exception, row.attempts) == (MessageLog.FAILED, 'second', 2)


def test_a_large_group_of_published_rows_is_written_in_one_statement_in_order() -> None:
    """The group insert's many-row form (arrays on PostgreSQL) returns each row's key."""
    from django.utils import timezone

    from carrot import lifecycle

    rows = [[MessageLog.PUBLISHED, f'group-{index}', 'tests.project.tasks.add', f'[{index}]',
             '{}', 'q', '', 'q', index % 10, timezone.now(), 0, True]
            for index in range(_sql.UNNEST_FROM_ROWS + 5)]
    pks = _sql.insert_rows(lifecycle.database(), rows)
    written = {log.pk: log for log in MessageLog.objects.all()}
    assert len(written) == len(rows)
    for pk, row in zip(pks, rows, strict=True):
        log = written[pk]
        assert (log.uuid, log.positionals, log.priority, log.status, log.awaiting_confirm) == \
            (row[1], [int(row[1].split('-')[1])], row[8], MessageLog.PUBLISHED, True)


def test_the_instance_of_a_row_just_written_is_the_one_a_query_loads() -> None:
    """``loaded_row`` builds the instance without ``__init__``; it must hold what a query of
    the same row loads, and a ``post_init`` receiver must still see it."""
    from django.db.models import signals
    from django.utils import timezone

    values = [MessageLog.PUBLISHED, 'built-1', 'tests.project.tasks.add', '[1]', '{}', 'q', '',
              'q', 3, timezone.now(), 0, True]
    [pk] = _sql.insert_rows(lifecycle.database(), [values])
    built = _sql.loaded_row(lifecycle.database(), pk, values)
    loaded = MessageLog.objects.get(pk=pk)
    names = [field.attname for field in MessageLog._meta.concrete_fields]
    assert {name: getattr(built, name) for name in names} == \
        {name: getattr(loaded, name) for name in names}
    assert (built._state.adding, built._state.db) == (False, loaded._state.db)
    built.status = MessageLog.COMPLETED
    built.save(update_fields=['status'])  # saved as a loaded row is: an UPDATE of its row
    assert MessageLog.objects.get(pk=pk).status == MessageLog.COMPLETED
    seen: list[MessageLog] = []

    def receiver(instance: MessageLog, **_: Any) -> None:
        seen.append(instance)

    signals.post_init.connect(receiver, sender=MessageLog)
    try:
        again = _sql.loaded_row(lifecycle.database(), pk, values)
    finally:
        signals.post_init.disconnect(receiver, sender=MessageLog)
    assert seen == [again]


def _start(message_id: str, again: bool = False) -> lifecycle.Start:
    """The start of a task whose row was published (``again``: a redelivery's)."""
    if not again:
        MessageLog.objects.create(uuid=message_id, task='tests.project.tasks.add')
    return _start_of(message_id)


def _status(message_id: str) -> tuple[str, int]:
    row = MessageLog.objects.get(uuid=message_id)
    return row.status, row.attempts


def test_the_recorder_holds_a_start_back_so_a_short_task_is_written_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A start waits START_HOLD_SECONDS for its end; an urgent one and a long task's do not."""
    monkeypatch.setattr(recording, 'START_HOLD_SECONDS', 1.0)
    start, status = _start, _status
    recorder = recording.Recorder()
    recorder.start()
    try:
        short = recorder.record_start(start('short'))
        long = recorder.record_start(start('long'))
        urgent = recorder.record_start(start('urgent'), urgent=True)
        assert urgent.get(timeout=10).already_completed is False
        assert status('urgent') == (MessageLog.IN_PROGRESS, 1)
        assert status('short') == status('long') == (MessageLog.PUBLISHED, 0)  # held

        settled: list[bool] = []
        recorder.record_finish(short, lifecycle.Finish(message_id='short', output='2',
                                                       status=MessageLog.COMPLETED),
                               settle=settled.append,
                               start=start('short', again=True)).get(timeout=10)
        assert settled == [True]
        assert short.get(timeout=1).pk == MessageLog.objects.get(uuid='short').pk
        assert status('short') == (MessageLog.COMPLETED, 1)  # start and end in one write

        deadline = time.monotonic() + 10
        while status('long')[0] != MessageLog.IN_PROGRESS:  # written once it is due
            assert time.monotonic() < deadline, 'the held start was never written'
            gevent.sleep(0.05)
        assert long.get(timeout=1).already_completed is False
    finally:
        recorder.stop()


def test_a_start_being_written_is_not_discarded_but_can_be_waited_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault after a task ran writes FAILED only after a start the recorder already took."""
    monkeypatch.setattr(recording, 'START_HOLD_SECONDS', 0.0)
    write_ends = lifecycle.finish_many
    writing_ends = gevent.event.Event()
    may_write = gevent.event.Event()

    def slow_ends(finishes: list[lifecycle.Finish]) -> dict[str, lifecycle.Started]:
        writing_ends.set()  # a round writes its ends first, holding the starts it took
        may_write.wait(10)
        return write_ends(finishes)

    monkeypatch.setattr(lifecycle, 'finish_many', slow_ends)
    recorder = recording.Recorder()
    recorder.start()
    try:
        first = recorder.record_start(_start('first'), urgent=True)
        first.get(timeout=10)
        taken = recorder.record_start(_start('taken'))
        recorder.record_finish(first, lifecycle.Finish(message_id='first',
                                                       status=MessageLog.COMPLETED),
                               settle=lambda recorded: None, start=_start('first', again=True))
        assert writing_ends.wait(10)  # the round has taken both and is writing the end
        assert recorder.discard_start(taken) is False
        may_write.set()
        assert taken.get(timeout=10).already_completed is False
        assert _status('taken') == (MessageLog.IN_PROGRESS, 1)

        monkeypatch.setattr(recording, 'START_HOLD_SECONDS', 5.0)
        held = recorder.record_start(_start('held'))
        assert recorder.discard_start(held) is True
        assert not held.ready()
    finally:
        recorder.stop()
    assert _status('held') == (MessageLog.PUBLISHED, 0)


def test_an_end_the_database_refuses_is_written_without_its_texts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The last resort: the row gets its status and the message its ack, not a requeue loop."""
    # carrot's own cleaning now escapes every text a driver refuses; without it, a lone
    # surrogate reaches the driver as an end nothing else could make it refuse.
    monkeypatch.setattr(_text, 'clean', lambda text: text)
    recorder = recording.Recorder()
    recorder.start()
    try:
        started = recorder.record_start(_start('refused'), urgent=True)
        started.get(timeout=10)
        settled: list[bool] = []
        recorder.record_finish(started, lifecycle.Finish(
            message_id='refused', status=MessageLog.FAILED, log='\udcff',
            exception='OSError: \udcff', traceback='\udcff',
        ), settle=settled.append, start=_start('refused', again=True)).get(timeout=10)
    finally:
        recorder.stop()
    assert settled == [True]
    row = MessageLog.objects.get(uuid='refused')
    assert row.status == MessageLog.FAILED
    assert 'carrot could not store what this task returned, logged or raised' in row.log
    assert 'UnicodeEncodeError' in row.log
    assert row.exception == row.log
    assert row.traceback is None


def test_a_refusal_leaves_a_completed_row_as_it_is() -> None:
    """A redelivery of a task that completed, refused by a worker that no longer has it."""
    lifecycle.start_many([_start('done')])
    MessageLog.objects.filter(uuid='done').update(status=MessageLog.COMPLETED, output='2')
    assert lifecycle.record_refused(message_id='done', task='tests.project.tasks.add',
                                    reason='not registered', queue='q') is None
    row = MessageLog.objects.get(uuid='done')
    assert (row.status, row.output, row.exception) == (MessageLog.COMPLETED, '2', None)


def test_an_end_left_for_a_later_round_is_written_before_its_redelivery_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A backed-up recorder: the earlier run's end, not the batch limit, decides."""
    monkeypatch.setattr(recording, 'BATCH_LIMIT', 1)
    recorder = recording.Recorder()
    recorder.start()
    try:
        first = recorder.record_start(_start('first'), urgent=True)
        redelivered = recorder.record_start(_start('redelivered'), urgent=True)
        first.get(timeout=10)
        redelivered.get(timeout=10)
        for started, message_id in ((first, 'first'), (redelivered, 'redelivered')):
            recorder.record_finish(started, lifecycle.Finish(
                message_id=message_id, status=MessageLog.COMPLETED), settle=lambda ok: None,
                start=_start(message_id, again=True))
        # Its channel was lost before the ack: the message comes back while its end waits.
        again = recorder.record_start(_start('redelivered', again=True), urgent=True)
        assert again.get(timeout=10).already_completed is True
    finally:
        recorder.stop()
    assert _status('redelivered') == (MessageLog.COMPLETED, 1)


def _failing(write: Callable[..., Any], times: int) -> Callable[..., Any]:
    """``write``, failing its first ``times`` calls as it does while the database is away."""
    left = [times]

    def failing(*args: Any) -> Any:
        if left[0]:
            left[0] -= 1
            raise OperationalError('connection refused: the database is away')
        return write(*args)

    return failing


def test_an_end_whose_start_could_not_be_written_is_written_with_it_and_acknowledged(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not handed back to run again: the task ran, and the database is back for its end."""
    monkeypatch.setattr(recording, 'RETRY_DELAYS', (0.01,))
    monkeypatch.setattr(recording, 'START_HOLD_SECONDS', 0.0)
    # Starts fail and ends do not: no real database does that on cue.
    monkeypatch.setattr(lifecycle, 'start_many', _failing(lifecycle.start_many, 1000))
    recorder = recording.Recorder()
    recorder.start()
    try:
        start = _start('lost-start')
        started = recorder.record_start(start)
        with pytest.raises(recording.RecordingFailed):
            started.get(timeout=10)
        settled: list[bool] = []
        recorder.record_finish(started, lifecycle.Finish(
            message_id='lost-start', status=MessageLog.COMPLETED, output='2',
        ), settle=settled.append, start=start).get(timeout=10)
    finally:
        recorder.stop()
    assert settled == [True]
    row = MessageLog.objects.get(uuid='lost-start')
    assert (row.status, row.output, row.attempts) == (MessageLog.COMPLETED, '2', 1)


def test_ends_and_awaited_starts_are_retried_until_the_database_takes_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past RETRY_DELAYS: an end given up would hand back a task that ran."""
    monkeypatch.setattr(recording, 'RETRY_DELAYS', (0.01, 0.02))
    tries = 3 * len(recording.RETRY_DELAYS)
    monkeypatch.setattr(lifecycle, 'start_many', _failing(lifecycle.start_many, tries))
    monkeypatch.setattr(lifecycle, 'finish_many', _failing(lifecycle.finish_many, tries))
    recorder = recording.Recorder()
    recorder.start()
    try:
        start = _start('awaited')
        started = recorder.record_start(start, urgent=True)
        assert started.get(timeout=10).already_completed is False
        settled: list[bool] = []
        recorder.record_finish(started, lifecycle.Finish(
            message_id='awaited', status=MessageLog.COMPLETED, output='2',
        ), settle=settled.append, start=start).get(timeout=10)
        assert recorder.healthy
    finally:
        recorder.stop()
    assert settled == [True]
    assert _status('awaited') == (MessageLog.COMPLETED, 1)


def test_a_connection_that_fails_to_close_does_not_end_the_retries(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing what the database broke can raise; the end must still be written."""
    monkeypatch.setattr(recording, 'RETRY_DELAYS', (0.01,))
    monkeypatch.setattr(lifecycle, 'finish_many', _failing(lifecycle.finish_many, 1))
    wrapper = type(connections['default'])
    close = wrapper.close
    closes: list[object] = []

    def close_failing_once(self: Any) -> None:
        closes.append(self)
        if len(closes) == 1:  # as the driver may, closing a connection it saw break
            raise OperationalError('the connection is already broken')
        close(self)

    recorder = recording.Recorder()
    recorder.start()
    try:
        start = _start('unclosable')
        started = recorder.record_start(start, urgent=True)
        started.get(timeout=10)
        monkeypatch.setattr(wrapper, 'close', close_failing_once)
        settled: list[bool] = []
        recorder.record_finish(started, lifecycle.Finish(
            message_id='unclosable', status=MessageLog.COMPLETED,
        ), settle=settled.append, start=start).get(timeout=10)
    finally:
        recorder.stop()
    assert closes and settled == [True]
    assert _status('unclosable') == (MessageLog.COMPLETED, 1)


def test_the_recorder_stops_within_its_timeout_while_the_database_is_away(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Its round is killed, end and start retries and all. The end is not settled: its
    message stays unacknowledged, and goes back to its queue when the service closes its
    link."""
    monkeypatch.setattr(recording, 'RETRY_DELAYS', (0.01, 0.05))
    monkeypatch.setattr(recording, 'KILL_TIMEOUT_SECONDS', 60.0)  # not the kill's timeout
    recorder = recording.Recorder()
    recorder.start()
    start = _start('stopped')
    started = recorder.record_start(start, urgent=True)
    started.get(timeout=10)
    monkeypatch.setattr(lifecycle, 'finish_many', _failing(lifecycle.finish_many, 10 ** 9))
    monkeypatch.setattr(lifecycle, 'start_many', _failing(lifecycle.start_many, 10 ** 9))
    settled: list[bool] = []
    ended = recorder.record_finish(started, lifecycle.Finish(
        message_id='stopped', status=MessageLog.COMPLETED), settle=settled.append, start=start)
    waited_for = recorder.record_start(_start('waited-for'), urgent=True)  # the same round
    gevent.sleep(0.3)
    stopping = gevent.spawn(recorder.stop, 0.5)
    stopping.join(3)
    if not stopping.dead:
        assert recorder.greenlet is not None
        recorder.greenlet.kill(block=False)
        raise AssertionError('the recorder did not stop')
    assert settled == [] and not ended.ready() and not waited_for.ready()
    assert _status('stopped') == (MessageLog.IN_PROGRESS, 1)


def test_an_end_written_again_counts_its_attempt_once() -> None:
    """The recorder writes a whole batch again when part of it failed; on PostgreSQL the ends
    found by message id were committed already, and writing them again changes nothing."""
    start = _start('twice')
    end = lifecycle.Finish(message_id='twice', status=MessageLog.COMPLETED, output='2',
                           start=start)
    first = lifecycle.finish_many([end])
    assert _status('twice') == (MessageLog.COMPLETED, 1)
    assert first['twice'].already_completed is False
    if connection.vendor != 'postgresql':
        return  # elsewhere a batch is one transaction, never partly committed
    again = lifecycle.finish_many([end])
    assert _status('twice') == (MessageLog.COMPLETED, 1)
    assert again['twice'].already_completed is True


def test_ends_that_come_close_together_are_written_in_one_round(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """At a low rate of tasks, a round waits END_GATHER_SECONDS for more ends to write; a
    start a consumer waits for is not held up by that wait."""
    rounds: list[int] = []
    write_ends = lifecycle.finish_many

    def counted(finishes: Any) -> Any:
        rounds.append(len(finishes))
        return write_ends(finishes)

    monkeypatch.setattr(lifecycle, 'finish_many', counted)
    monkeypatch.setattr(recording, 'END_GATHER_SECONDS', 2.0)
    names = ('one', 'two', 'three')
    recorder = recording.Recorder()
    recorder.start()
    try:
        starts = [recorder.record_start(_start(name), urgent=True) for name in names]
        gevent.wait(starts, timeout=10)
        results = []
        for name, started in zip(names, starts, strict=True):
            results.append(recorder.record_finish(
                started, lifecycle.Finish(message_id=name, status=MessageLog.COMPLETED),
                settle=lambda recorded: None, start=_start(name, again=True)))
            gevent.sleep(0.01)  # the recorder wakes between them
        waited_for = time.monotonic()
        urgent = recorder.record_start(_start('urgent'), urgent=True)
        urgent.get(timeout=10)
        assert time.monotonic() - waited_for < 1.0, 'the urgent start waited for the gathering'
        gevent.wait(results, timeout=10)
    finally:
        recorder.stop()
    assert rounds == [3]
    assert [_status(name) for name in names] == [(MessageLog.COMPLETED, 1)] * 3
