"""What the monitor's tests share: users of each kind, clients logged in as them, and rows."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from carrot.models import MessageLog, MonitorAction, ScheduledTask

PREFIX = '/monitor/'
OTHER_PREFIX = '/ops/queue-monitor/'
#: A log as the worker writes it: two records, the second with a traceback.
LOG = ('2026-12-01 09:30:00,001 INFO carrot.task: Starting the import\n'
       '2026-12-01 09:30:00,002 DEBUG carrot.task: read 10 rows\n'
       '2026-12-01 09:30:01,003 ERROR carrot.task: row 7 is bad\n'
       'Traceback (most recent call last):\n'
       '  File "import.py", line 3\n'
       'ValueError: row 7')


@pytest.fixture(name='users')
def users_fixture() -> Iterator[dict[str, User]]:
    """staff (a superuser: may act), plain (not staff), viewer (staff without permissions:
    read-only), actor (staff with carrot.change_messagelog only)."""
    User.objects.all().delete()
    MonitorAction.objects.all().delete()
    # No passwords: the tests log in with force_login, and hashing one costs ~0.3 s here.
    found = {
        'staff': User.objects.create(username='staff', is_staff=True, is_superuser=True),
        'plain': User.objects.create(username='plain'),
        'viewer': User.objects.create(username='viewer', is_staff=True),
        'actor': User.objects.create(username='actor', is_staff=True),
    }
    found['actor'].user_permissions.add(
        Permission.objects.get(codename='change_messagelog', content_type__app_label='carrot'))
    yield found
    User.objects.all().delete()
    MonitorAction.objects.all().delete()


def client_for(users: dict[str, User], who: str, csrf: bool = False) -> Client:
    client = Client(enforce_csrf_checks=csrf)
    if who != 'anonymous':
        client.force_login(users[who])
    return client


def make_rows(count: int, status: str = MessageLog.FAILED, task: str = 'tests.project.tasks.echo',
              queue: str = 'default', args: list[Any] | None = None,
              **fields: Any) -> list[MessageLog]:
    now = timezone.now()
    rows = [MessageLog(**{
        'uuid': str(uuid.uuid4()), 'status': status, 'task': task, 'queue': queue,
        'routing_key': queue, 'task_args': json.dumps([index] if args is None else args),
        'content': '{}', 'publish_time': now,
        'failure_time': now if status == MessageLog.FAILED else None,
        'completion_time': now if status == MessageLog.COMPLETED else None,
        'exception': 'ValueError: boom' if status == MessageLog.FAILED else None,
        **fields}) for index in range(count)]
    MessageLog.objects.bulk_create(rows)
    return list(MessageLog.objects.filter(uuid__in=[r.uuid for r in rows]).order_by('pk'))


def make_schedule(name: str = 'nightly', queue: str | None = None,
                  active: bool = True) -> ScheduledTask:
    return ScheduledTask.objects.create(task='tests.project.tasks.echo', task_name=name,
                                        interval_type='hours', interval_count=1, queue=queue,
                                        task_args='["from-schedule"]', active=active)
