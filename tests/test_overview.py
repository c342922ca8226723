"""The overview: the rollups a worker writes (QueueStats), and the page and API that read them.

The histograms, percentiles, flush and prune on the real database; a real worker subprocess
counting the tasks it runs; the page's numbers against what ran, RabbitMQ asked for real.
"""

from __future__ import annotations

import datetime
import re
import socket
import time
from collections.abc import Callable

import pytest
from django.contrib.auth.models import User
from django.db import DatabaseError, connection
from django.template import Context, Template
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from carrot import message, rollups
from carrot._process import worker_id
from carrot.broker import QueueCounts
from carrot.models import QueueStats, WorkerHeartbeat
from carrot.monitor import health, overview
from carrot.utilities import publish_message
from tests.conftest import Broker, Worker, carrot_settings, statuses, wait_for
from tests.monitoring import (
    PREFIX,
    client_for,
    users_fixture,  # noqa: F401  (the users fixture)
)
from tests.project import tasks

StartWorker = Callable[..., Worker]
API = PREFIX + 'api/'


def _histogram(*seconds: float) -> list[int]:
    found = [0] * rollups.BUCKETS
    for value in seconds:
        found[rollups.bucket(value)] += 1
    return found


def _minute(at: datetime.datetime) -> datetime.datetime:
    return at.replace(second=0, microsecond=0)


# -- buckets, percentiles, merge -------------------------------------------------------------

def test_buckets_run_from_a_millisecond_to_an_hour_by_a_factor_of_root_two() -> None:
    assert rollups.EDGES[0] == 0.001 and rollups.EDGES[2] == pytest.approx(0.002)
    assert 3600 < rollups.EDGES[-1] < 2 * 3600
    for index, edge in enumerate(rollups.EDGES):
        assert rollups.bucket(edge * 0.999) == index  # an edge is its bucket's upper end
        assert rollups.bucket(edge * 1.001) == index + 1
    assert rollups.bucket(0) == rollups.bucket(-5) == rollups.bucket(float('nan')) == 0
    assert rollups.bucket(10 ** 9) == rollups.bucket(float('inf')) == rollups.BUCKETS - 1


def test_percentiles_fall_in_the_bucket_of_the_value_at_their_rank() -> None:
    values = [0.010] * 50 + [0.100] * 45 + [1.0] * 5
    p50, p95, p99 = rollups.percentiles(_histogram(*values), [0.5, 0.95, 0.99])
    for found, true in ((p50, 0.010), (p95, 0.100), (p99, 1.0)):
        assert found is not None
        assert rollups.bucket(found * 0.9999) == rollups.bucket(true)  # within its bucket
    assert rollups.percentile([0] * rollups.BUCKETS, 0.5) is None
    assert rollups.percentile([], 0.99) is None
    # One value: interpolated within its bucket, the quantiles in order.
    one = rollups.percentiles(_histogram(0.3), [0.0, 0.5, 1.0])
    assert one == sorted(one) and 0.256 <= one[0] and one[2] == pytest.approx(0.362, abs=1e-3)
    # Past the last edge: that edge, "at least".
    assert rollups.percentile(_histogram(7200), 0.5) == rollups.EDGES[-1]


def test_merge_adds_bucket_by_bucket_whatever_the_stored_length() -> None:
    merged = rollups.merge([[1, 2], [0, 1, 3], _histogram(5.0)])
    assert merged[:3] == [1, 3, 3] and sum(merged) == 8 and len(merged) == rollups.BUCKETS
    assert rollups.merge([]) == [0] * rollups.BUCKETS


# -- the tally, flush, prune, series ---------------------------------------------------------

def test_a_flush_adds_to_this_writers_minute_and_hour_rows() -> None:
    tally = rollups.Tally()
    now = timezone.now().timestamp()
    tally.add('q1', now, 0.002, 0.030, True)
    tally.add('q1', now, None, 0.040, False)  # another producer's message: no wait
    tally.add('q1', now, 0.5, None, False)  # expired: no run time
    tally.add('q2', now - 120, 0.001, 0.001, True)
    assert rollups.flush(tally) == 4  # each queue's minute and hour
    assert rollups.flush(tally) == 0  # nothing new
    rows = {(r.queue, r.resolution): r for r in QueueStats.objects.filter(queue='q1')}
    minute = rows['q1', QueueStats.MINUTE]
    assert (minute.succeeded, minute.failed, minute.writer) == (1, 2, rollups.this_writer())
    assert minute.writer.startswith(f'{worker_id()}/')
    assert sum(minute.wait) == 2 and sum(minute.run) == 2
    assert minute.wait[rollups.bucket(0.5)] == 1
    assert minute.period == int(now) // 60 * 60
    hour = rows['q1', QueueStats.HOUR]
    assert (hour.succeeded, hour.failed) == (1, 2) and hour.period == int(now) // 3600 * 3600

    tally.add('q1', now, 0.002, 0.030, True)
    rollups.flush(tally)  # read, add, write: the same rows
    assert QueueStats.objects.filter(queue='q1').count() == 2
    assert QueueStats.objects.get(queue='q1', resolution=QueueStats.MINUTE).succeeded == 2
    assert QueueStats.objects.get(queue='q1', resolution=QueueStats.HOUR).succeeded == 2


def test_counts_a_failed_flush_took_are_written_by_the_next(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tally = rollups.Tally()
    now = timezone.now().timestamp()
    tally.add('q', now, 0.1, 0.2, True)
    write = rollups._write

    def refused(taken: object) -> int:
        raise DatabaseError('the database went away')

    monkeypatch.setattr(rollups, '_write', refused)
    with pytest.raises(DatabaseError):
        rollups.flush(tally)
    tally.add('q', now, 0.1, 0.2, False)
    monkeypatch.setattr(rollups, '_write', write)
    assert rollups.flush(tally) == 2
    row = QueueStats.objects.get(queue='q', resolution=QueueStats.MINUTE)
    assert (row.succeeded, row.failed, sum(row.wait)) == (1, 1, 2)


def test_counts_too_old_to_keep_are_not_kept_for_ever() -> None:
    tally = rollups.Tally()
    now = timezone.now().timestamp()
    tally.add('q', now - 2 * 86400, 0.1, 0.2, True)
    tally.add('q', now, 0.1, 0.2, True)
    tally.put_back(tally.take())
    assert list(tally.take()) == [('q', int(now) // 60)]


def test_waits_of_clocks_apart_are_counted_apart() -> None:
    tally = rollups.Tally()
    now = timezone.now().timestamp()
    for wait in (-0.5, 2 * 86400.0, 0.2):
        tally.add('q', now, wait, 0.1, True)
    rollups.flush(tally)
    row = QueueStats.objects.get(queue='q', resolution=QueueStats.MINUTE)
    assert (row.succeeded, row.skewed, sum(row.wait), sum(row.run)) == (3, 2, 1, 3)
    [point] = rollups.series(['q'], timezone.now(), QueueStats.MINUTE)['q']
    assert point.counts.skewed == 2


def test_a_flush_writes_only_its_own_rows() -> None:
    now = timezone.now().timestamp()
    minute = int(now) // 60 * 60
    other = QueueStats.objects.create(queue='q', resolution=QueueStats.MINUTE, period=minute,
                                      writer=f'{worker_id()}/another', succeeded=5)
    tally = rollups.Tally()
    tally.add('q', now, 0.1, 0.2, True)
    rollups.flush(tally)
    other.refresh_from_db()
    assert other.succeeded == 5
    mine = QueueStats.objects.get(queue='q', resolution=QueueStats.MINUTE,
                                  writer=rollups.this_writer())
    assert mine.succeeded == 1 and mine.writer != other.writer


def test_fold_merges_the_writers_rows_of_finished_periods_and_counts_each_once() -> None:
    now = timezone.now()
    minute = int(now.timestamp()) // 60 * 60
    old, recent = minute - 600, minute - 60
    for writer in ('a:1/x', 'b:2/y', 'c:3/z'):
        for period in (old, recent):
            QueueStats.objects.create(queue='q', resolution=QueueStats.MINUTE, period=period,
                                      writer=writer, succeeded=2, failed=1, skewed=1,
                                      wait=_histogram(0.01, 0.01), run=_histogram(0.5))
    before = rollups.series(['q'], now - datetime.timedelta(minutes=11), QueueStats.MINUTE, now)
    assert rollups.fold(now) == 3  # the old period's three rows; the recent one waits
    assert rollups.fold(now) == 0  # nothing left to fold: nothing counted twice
    [folded] = QueueStats.objects.filter(period=old)
    assert (folded.writer, folded.succeeded, folded.failed, folded.skewed) == (
        rollups.FOLDED, 6, 3, 3)
    assert sum(folded.wait) == 6 and folded.wait[rollups.bucket(0.01)] == 6
    assert QueueStats.objects.filter(period=recent).count() == 3
    after = rollups.series(['q'], now - datetime.timedelta(minutes=11), QueueStats.MINUTE, now)
    assert after == before
    # A late flush to a folded period writes a row of its own; the next fold takes it.
    QueueStats.objects.create(queue='q', resolution=QueueStats.MINUTE, period=old,
                              writer='a:1/x', succeeded=1)
    assert rollups.fold(now) == 1
    assert QueueStats.objects.get(period=old).succeeded == 7


def test_prune_keeps_a_day_of_minutes_and_thirty_days_of_hours() -> None:
    now = timezone.now()
    for resolution, age in ((QueueStats.MINUTE, datetime.timedelta(hours=2)),
                            (QueueStats.MINUTE, datetime.timedelta(days=2)),
                            (QueueStats.HOUR, datetime.timedelta(days=2)),
                            (QueueStats.HOUR, datetime.timedelta(days=31))):
        QueueStats.objects.create(queue='q', resolution=resolution,
                                  period=int((now - age).timestamp()), writer='w:1', succeeded=1)
    assert rollups.prune(now) == 2
    assert sorted((r.resolution, int(now.timestamp() - r.period) // 86400)
                  for r in QueueStats.objects.all()) == [
        (QueueStats.HOUR, 2), (QueueStats.MINUTE, 0)]


def test_series_merges_the_writers_and_fills_the_empty_periods() -> None:
    now = timezone.now()
    start = _minute(now) - datetime.timedelta(minutes=2)
    for writer, succeeded, failed, wait in (('a:1', 3, 1, [0.01] * 4), ('b:2', 5, 0, [1.0])):
        QueueStats.objects.create(queue='q', resolution=QueueStats.MINUTE,
                                  period=int(start.timestamp()),
                                  writer=writer, succeeded=succeeded, failed=failed,
                                  wait=_histogram(*wait), run=[])
    points = rollups.series(['q', 'other'], now - datetime.timedelta(minutes=4),
                            QueueStats.MINUTE, now)
    assert [p.at for p in points['q']] == [_minute(now) - datetime.timedelta(minutes=n)
                                           for n in (4, 3, 2, 1, 0)]
    merged = points['q'][2].counts
    assert (merged.succeeded, merged.failed, sum(merged.wait)) == (8, 1, 5)
    assert merged.wait[rollups.bucket(1.0)] == 1
    assert all(p.counts.total == 0 for p in points['other'])


def test_the_overview_reads_the_rollups_and_never_message_log(
        queue: str, users: dict[str, User]) -> None:
    now = timezone.now()
    this_hour = int(now.timestamp()) // 3600 * 3600  # hours of UTC, whatever the zone
    hour_rows = [QueueStats(queue=queue, resolution=QueueStats.HOUR, writer=writer,
                            period=this_hour - d * 86400,
                            succeeded=90, failed=10, wait=_histogram(*[0.05] * 100),
                            run=_histogram(*[0.2] * 100))
                 for d in (0, 2, 5) for writer in ('a:1', 'b:2')]
    QueueStats.objects.bulk_create(hour_rows)
    QueueStats.objects.create(queue=queue, resolution=QueueStats.MINUTE,
                              period=int(_minute(now).timestamp()),
                              writer='a:1', succeeded=30, failed=30,
                              wait=_histogram(*[0.003] * 60), run=_histogram(*[2.0] * 60))
    with CaptureQueriesContext(connection) as queries:
        found = client_for(users, 'viewer').get(API + 'overview/').json()
    assert not [q for q in queries.captured_queries if 'carrot_messagelog' in q['sql']]
    [seen] = found['queues']
    assert seen['name'] == queue and seen['ready'] == 0 and seen['consumers'] == 0
    assert seen['unacknowledged'] == 0 and 'last heartbeats' in found['sources']['unacknowledged']
    hour, days = seen['last_hour'], seen['last_days']
    assert (hour['succeeded'], hour['failed'], hour['failure_rate']) == (30, 30, 0.5)
    assert 0.95 <= hour['per_minute'] <= 60 / 59 + 0.01  # 60 tasks in the last 59-60 minutes
    assert rollups.bucket(hour['run']['p50']) == rollups.bucket(2.0)
    assert rollups.bucket(hour['wait']['p99']) == rollups.bucket(0.003)
    assert len(hour['series']['at']) == 60 and hour['series']['succeeded'][-1] == 30
    assert len(hour['series']['wait']['p95']) == 60 and hour['series']['run']['p50'][0] is None
    assert (days['succeeded'], days['failed'], days['failure_rate']) == (540, 60, 0.1)
    assert len(days['series']['at']) == 24 * overview.DAYS
    assert rollups.bucket(days['wait']['p95']) == rollups.bucket(0.05)
    assert days['series']['wait']['p50'][0] is None  # an hour without tasks
    assert days['series']['failed'][-1] == 20  # this hour's, both writers'

    page = client_for(users, 'viewer').get(PREFIX + 'overview/').content.decode()
    assert queue in page and '50.0 %' in page and '10.0 %' in page
    assert page.count('<svg class="spark') == 8  # four charts for each window
    assert 'passive declare' in page and 'management API' in page


def test_a_queue_without_tasks_says_so() -> None:
    report = overview.report()
    [queue] = report.queues
    assert all(window.total == 0 and window.failure_rate is None for window in queue.windows)
    assert queue.windows[0].wait.p50 is None


# -- the sparklines and the header of the publish time ---------------------------------------

def test_a_sparkline_is_inline_svg_with_gaps_and_an_escaped_label() -> None:
    html = Template('{% load carrot_monitor %}{% sparkline series label="<b>" log=True %}'
                    ).render(Context({'series': [[0.01, None, 0.02, 0.5], [None, 1.0]]}))
    assert html.startswith('<svg class="spark"') and '&lt;b&gt;' in html and '<b>' not in html
    assert html.count('<polyline class="s1"') == 2 and html.count('<polyline class="s2"') == 1
    bars = Template('{% load carrot_monitor %}{% sparkline series bars=True %}').render(
        Context({'series': [[3, 0, 5], [1, 0, 0]]}))
    assert bars.count('<rect class="s1"') == 2 and bars.count('<rect class="s2"') == 1
    empty = Template('{% load carrot_monitor %}{% sparkline series %}').render(
        Context({'series': [[None, 0]]}))
    assert '<polyline' not in empty and '</svg>' in empty


def test_a_message_says_when_it_was_published_and_a_requeue_says_when_again() -> None:
    before = datetime.datetime.now(datetime.UTC)
    _, properties = message.encode(message.TaskMessage(task='a.b'))
    published = message.published_at_of(properties)
    assert published is not None and before <= published <= datetime.datetime.now(datetime.UTC)
    assert message.published_at_of({'headers': {}}) is None
    assert message.published_at_of({'headers': {message.PUBLISHED_HEADER: 'soon'}}) is None
    old = {'headers': {**properties['headers'],
                       message.PUBLISHED_HEADER: '2020-01-01T00:00:00+00:00'}}
    again = message.published_at_of(message.requeued_properties(old))
    assert again is not None and again >= published


# -- a real worker ---------------------------------------------------------------------------

def test_a_worker_counts_every_end_and_the_overview_shows_it(
        queue: str, start_worker: StartWorker, broker: Broker, users: dict[str, User]) -> None:
    worker = start_worker(carrot_settings(queue, concurrency=4))
    host_pid = f'{socket.gethostname()}:{worker.pid}/'
    client = client_for(users, 'staff')
    assert client.get(API + 'overview/').json()['queues'][0]['consumers'] == 4
    for _ in range(6):
        publish_message(tasks.noop)
    for _ in range(2):
        publish_message(tasks.sleep, 0.05)
    for _ in range(3):
        publish_message(tasks.noop, tracked=False)  # no row when it succeeds: counted all the same
    for _ in range(2):
        publish_message(tasks.fail, 'counted')
    wait_for(lambda: statuses() == {'COMPLETED': 8, 'FAILED': 2}, what='the tracked ends')
    wait_for(lambda: broker.counts(queue) == (0, 0), what='every message acknowledged')
    # Written by the rollups round within its 10 s, while the worker runs.
    wait_for(lambda: sum(QueueStats.objects.filter(
        queue=queue, resolution=QueueStats.HOUR).values_list('succeeded', flat=True)) == 11,
        timeout=25, what='the rollups round')
    assert worker.stop() == 0

    for resolution in (QueueStats.MINUTE, QueueStats.HOUR):
        rows = QueueStats.objects.filter(queue=queue, resolution=resolution)
        [writer] = {row.writer for row in rows}
        assert writer.startswith(host_pid)
        assert sum(r.succeeded for r in rows) == 11 and sum(r.failed for r in rows) == 2
        assert sum(sum(r.run) for r in rows) == 13 and sum(sum(r.wait) for r in rows) == 13
    assert health.queue_counts([queue], fresh=True)[queue] == QueueCounts(0, 0)
    [seen] = client.get(API + 'overview/').json()['queues']
    for window in (seen['last_hour'], seen['last_days']):
        assert (window['succeeded'], window['failed']) == (11, 2)
        assert window['failure_rate'] == pytest.approx(2 / 13)
        assert all(window[kind][p] is not None for kind in ('wait', 'run')
                   for p in ('p50', 'p95', 'p99'))
        assert window['run']['p50'] < 0.05 <= window['run']['p99'] * 1.5  # the two sleeps
        assert window['wait']['p99'] < 30
    page = client.get(PREFIX + 'overview/').content.decode()
    assert '15.4 %' in page and re.search(r'11 ok, <a [^>]*>2 failed</a>', page)


def test_a_worker_that_stops_writes_its_last_counts(
        queue: str, start_worker: StartWorker) -> None:
    began = time.monotonic()
    worker = start_worker(carrot_settings(queue))
    for _ in range(3):
        publish_message(tasks.noop)
    wait_for(lambda: statuses() == {'COMPLETED': 3}, what='the three tasks')
    if time.monotonic() - began > rollups.FLUSH_SECONDS - 1:
        pytest.skip('too slow to stop before the rollups round: it would prove nothing')
    assert not QueueStats.objects.filter(queue=queue).exists()  # no round has run yet
    assert worker.stop() == 0
    rows = QueueStats.objects.filter(queue=queue, resolution=QueueStats.MINUTE)
    assert sum(r.succeeded for r in rows) == 3


def test_unacknowledged_counts_what_the_live_workers_hold(
        queue: str, start_worker: StartWorker, users: dict[str, User]) -> None:
    worker = start_worker(carrot_settings(queue, concurrency=4))
    for _ in range(2):
        publish_message(tasks.sleep, 20)
    wait_for(lambda: statuses() == {'IN_PROGRESS': 2}, what='two tasks running')

    def unacknowledged() -> int:
        [seen] = client_for(users, 'viewer').get(API + 'overview/').json()['queues']
        return int(seen['unacknowledged'])

    wait_for(lambda: unacknowledged() == 2, timeout=25, what='the next heartbeat')
    WorkerHeartbeat.objects.update(seen_at=timezone.now() - datetime.timedelta(minutes=5))
    assert unacknowledged() == 0  # a worker that stopped reporting holds nothing known
    worker.kill()  # rather than wait for the two sleeps


def test_a_retried_attempt_counts_as_failed(
        queue: str, start_worker: StartWorker) -> None:
    start_worker(carrot_settings(queue))
    publish_message(tasks.fail, 'again', max_retries=1, retry_backoff=0.2)
    wait_for(lambda: statuses() == {'FAILED': 1}, what='both attempts')
    wait_for(lambda: sum(QueueStats.objects.filter(
        queue=queue, resolution=QueueStats.MINUTE).values_list('failed', flat=True)) == 2,
        timeout=25, what='the two failed attempts counted')


def test_the_overview_follows_the_access_rules(users: dict[str, User]) -> None:
    for path in (PREFIX + 'overview/', API + 'overview/'):
        assert client_for(users, 'plain').get(path).status_code == 403
        assert client_for(users, 'viewer').get(path).status_code == 200
    assert client_for(users, 'anonymous').get(API + 'overview/').status_code == 403
    assert client_for(users, 'staff').get(PREFIX)['Location'] == PREFIX + 'overview/'
    assert client_for(users, 'staff').get(API).json()['links']['overview'] == API + 'overview/'
