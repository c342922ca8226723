"""``manage.py carrot_prune`` and the retention settings, on the real database."""

from __future__ import annotations

import datetime
import io

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.utils import timezone
from gevent.event import Event

from carrot.conf import parse
from carrot.exceptions import CarrotConfigException
from carrot.models import MessageLog
from carrot.worker import rounds
from tests.monitoring import make_rows


def _aged(status: str, days: float, count: int = 1) -> set[int]:
    """``count`` rows of ``status`` that ended (or were published) ``days`` ago."""
    at = timezone.now() - datetime.timedelta(days=days)
    rows = make_rows(count, status=status)
    MessageLog.objects.filter(pk__in=[r.pk for r in rows]).update(
        publish_time=at, completion_time=at if status == 'COMPLETED' else None,
        failure_time=at if status == 'FAILED' else None)
    return {r.pk for r in rows}


def _prune(*args: str) -> str:
    out = io.StringIO()
    call_command('carrot_prune', *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def rows() -> dict[str, set[int]]:
    return {
        'old completed': _aged('COMPLETED', 4, count=5),
        'recent completed': _aged('COMPLETED', 2),
        'old failed': _aged('FAILED', 31, count=3),
        'recent failed': _aged('FAILED', 29),
        'unfinished': _aged('PUBLISHED', 60) | _aged('IN_PROGRESS', 60) | _aged('DELAYED', 60),
    }


def test_prune_deletes_exactly_the_old_completed_and_failed_rows(
        rows: dict[str, set[int]]) -> None:
    assert 'Deleted 5 COMPLETED row(s) older than 3d and 3 FAILED row(s) older than 30d' in \
        _prune('--batch', '2')
    left = set(MessageLog.objects.values_list('pk', flat=True))
    assert left == rows['recent completed'] | rows['recent failed'] | rows['unfinished']


def test_a_dry_run_counts_and_deletes_nothing(rows: dict[str, set[int]]) -> None:
    before = MessageLog.objects.count()
    assert 'Would delete 5 COMPLETED row(s)' in _prune('--dry-run')
    assert MessageLog.objects.count() == before


def test_the_ages_come_from_the_options_or_the_settings(rows: dict[str, set[int]]) -> None:
    assert 'Deleted 6 COMPLETED row(s) older than 1d and 0 FAILED row(s) older than 6w' in \
        _prune('--completed-older-than', '1d', '--failed-older-than', '6w')
    with override_settings(CARROT={'retention': {'completed': '5d', 'failed': '12h'}}):
        assert 'Deleted 0 COMPLETED row(s) older than 5d and 4 FAILED row(s) older than 12h' \
            in _prune()


def test_the_services_hourly_pruner_prunes_with_the_settings(
        rows: dict[str, set[int]]) -> None:
    rounds.pruner(Event()).work()
    assert not MessageLog.objects.filter(pk__in=rows['old completed'] | rows['old failed'])
    assert MessageLog.objects.filter(pk__in=rows['recent completed']).exists()


def test_bad_ages_are_refused() -> None:
    with pytest.raises(CommandError, match="--completed-older-than '3 days' is not an age"):
        _prune('--completed-older-than', '3 days')
    with pytest.raises(CarrotConfigException,
                       match=r"CARROT\['retention'\]\['failed'\] must be an age"):
        parse({'retention': {'failed': 30}})
    with pytest.raises(CarrotConfigException, match=r"CARROT\['retention'\] has unknown"):
        parse({'retention': {'keep': '3d'}})
