"""The monitor in a real headless browser: Debian's Chromium driven by Playwright, against
``manage.py runserver`` and a real worker, as a person uses it.

Skipped where Chromium or Playwright is missing, unless CARROT_REQUIRE_BROWSER is set (CI
sets it: ``tests/run.py`` installs Chromium from Debian's packages when it can). The
screenshots go to CARROT_SCREENSHOTS when set (``docs/_static/monitor`` for the docs'
pictures), else into the test's own folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User

from carrot import message
from carrot.models import MessageLog, ScheduledTask
from carrot.utilities import publish_message
from tests.conftest import MANAGE, Broker, Worker, carrot_settings, wait_for
from tests.project import tasks

CHROMIUM = os.environ.get('CARROT_CHROMIUM', '/usr/bin/chromium')
#: How long the browser waits for what a live refresh (every 5 s) brings, in milliseconds.
LIVE_WAIT_MS = 30_000

try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:  # the README's test command installs it
    sync_playwright = None

if sync_playwright is None or shutil.which(CHROMIUM) is None:
    reason = (f'a real browser is needed: Chromium at {CHROMIUM} ("apt-get install chromium") '
              f'and Playwright ("pip install playwright")')
    if os.environ.get('CARROT_REQUIRE_BROWSER'):
        raise RuntimeError(f'CARROT_REQUIRE_BROWSER is set, but {reason}.')
    pytest.skip(reason, allow_module_level=True)

StartWorker = Callable[..., Worker]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def site(queue: str, tmp_path: Path) -> Iterator[str]:
    """The test project served by ``manage.py runserver``, with CARROT for ``queue``; its
    address."""
    port = _free_port()
    log = (tmp_path / 'runserver.log').open('w')
    server = subprocess.Popen(
        [sys.executable, str(MANAGE), 'runserver', f'127.0.0.1:{port}', '--noreload'],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, 'CARROT_TEST_CARROT': json.dumps(carrot_settings(queue))})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(('127.0.0.1', port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError('runserver did not answer:\n'
                                         + (tmp_path / 'runserver.log').read_text()) from None
                time.sleep(0.1)
        yield f'http://127.0.0.1:{port}'
    finally:
        server.terminate()
        server.wait(10)
        log.close()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get('CARROT_SCREENSHOTS') or tmp_path / 'screenshots')
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(site: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Page]:
    """A logged-in staff user's browser tab, confirming every dialog it is asked."""
    assert sync_playwright is not None
    # Playwright's sync API keeps an event loop in this thread; the test's own ORM calls
    # are plain synchronous ones all the same.
    monkeypatch.setenv('DJANGO_ALLOW_ASYNC_UNSAFE', '1')
    name = f'staff-{uuid.uuid4().hex[:8]}'
    User.objects.create_superuser(name, f'{name}@example.com', 'a-Password-1')
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=['--no-sandbox'])
        context = browser.new_context(viewport={'width': 1280, 'height': 800},
                                      timezone_id='Europe/Berlin')
        tab = context.new_page()
        tab.set_default_timeout(LIVE_WAIT_MS)
        tab.on('dialog', lambda dialog: dialog.accept())
        # Log in through the admin's own login page, then come back to the monitor.
        tab.goto(f'{site}/admin/login/?next=/monitor/tasks/completed/')
        tab.fill('#id_username', name)
        tab.fill('#id_password', 'a-Password-1')
        tab.click('input[type="submit"]')
        tab.wait_for_url('**/monitor/tasks/completed/')
        try:
            yield tab
        finally:
            browser.close()


def _row(**filters: Any) -> MessageLog | None:
    return MessageLog.objects.filter(**filters).first()


def test_a_staff_user_watches_a_task_arrive_and_reads_its_log(
        queue: str, start_worker: StartWorker, page: Page, screenshots: Path) -> None:
    worker = start_worker(carrot_settings(queue))
    rows = page.locator('#rows')
    assert 'No completed tasks' in rows.inner_text()
    log = publish_message(tasks.log_lines, 'browser-seen', 3)
    # Without reloading: the live refresh brings the row in.
    rows.get_by_text(log.uuid).wait_for()
    page.screenshot(path=str(screenshots / 'task-list.png'))
    assert page.url.endswith('/monitor/tasks/completed/')  # never reloaded elsewhere

    page.get_by_role('link', name='tests.project.tasks.log_lines').first.click()
    page.wait_for_url(f'**/monitor/tasks/{log.pk}/')
    lines = page.locator('#log li')
    lines.first.wait_for()
    assert [line for line in lines.all_inner_texts() if 'of browser-seen' in line] and \
        len(lines.all_inner_texts()) >= 3
    assert 'Completed' in page.locator('#summary').inner_text()
    page.screenshot(path=str(screenshots / 'task-detail.png'), full_page=True)

    # The log's own search narrows it to one line, in the page.
    page.fill('input[name="q"]', 'line 1 of')
    page.locator('input[name="q"]').press('Enter')
    page.wait_for_url('**q=line+1+of*')
    found = page.locator('#log li').all_inner_texts()
    assert len(found) == 1 and 'line 1 of browser-seen' in found[0], found

    # The health page lists the worker, alive.
    page.get_by_role('link', name='Health').click()
    page.wait_for_url('**/monitor/health/')
    workers = page.locator('#health table').first.inner_text()
    assert f'{socket.gethostname()}:{worker.pid}' in workers and 'alive' in workers
    page.screenshot(path=str(screenshots / 'health.png'), full_page=True)


def test_a_failed_task_is_requeued_from_its_page_and_seen_to_complete(
        queue: str, start_worker: StartWorker, page: Page, site: str, screenshots: Path,
        tmp_path: Path) -> None:
    start_worker(carrot_settings(queue))
    runs = tmp_path / 'runs'
    log = publish_message(tasks.flaky, str(runs), 1)  # fails once, no retries: FAILED
    wait_for(lambda: _row(pk=log.pk, status='FAILED'), what='the first run to fail')

    page.goto(f'{site}/monitor/tasks/failed/')
    page.locator('#rows').get_by_text(log.uuid).wait_for()
    page.screenshot(path=str(screenshots / 'failed-list.png'))
    page.goto(f'{site}/monitor/tasks/{log.pk}/')
    assert 'ConnectionError: run 1 of 1 that fail' in page.locator('#summary').inner_text()
    page.get_by_role('button', name='Requeue').click()
    # Back on its page, which refreshes itself until the task has ended.
    page.wait_for_url(f'**/monitor/tasks/{log.pk}/')
    page.locator('#summary .status', has_text='Completed').wait_for()
    assert _row(pk=log.pk).status == 'COMPLETED'  # type: ignore[union-attr]
    assert len(runs.read_text().splitlines()) == 2
    page.screenshot(path=str(screenshots / 'requeued-task.png'), full_page=True)

    page.goto(f'{site}/monitor/audit/')
    assert 'requeue' in page.locator('main').inner_text().lower()


def test_a_scheduled_task_is_run_now_from_the_monitor(
        queue: str, start_worker: StartWorker, page: Page, site: str,
        screenshots: Path) -> None:
    schedule = ScheduledTask.objects.create(
        task='tests.project.tasks.echo', task_name=f'nightly-{uuid.uuid4().hex[:6]}',
        interval_type='days', interval_count=1, queue=queue, task_args='["from the browser"]')
    start_worker(carrot_settings(queue))
    page.goto(f'{site}/monitor/schedules/{schedule.pk}/')
    page.screenshot(path=str(screenshots / 'schedule.png'))
    assert not MessageLog.objects.filter(task='tests.project.tasks.echo').exists()
    page.get_by_role('button', name='Run now').click()
    ran = wait_for(lambda: _row(task='tests.project.tasks.echo', status='COMPLETED'),
                   what='the scheduled task, run now')
    assert json.loads(ran.output or '{}') == {'args': ['from the browser'], 'kwargs': {}}
    page.goto(f'{site}/monitor/schedules/{schedule.pk}/')
    assert str(ran.pk) in page.locator('main').inner_text()


def test_a_scheduled_task_is_created_in_the_form_its_errors_shown_and_its_runs_previewed(
        queue: str, page: Page, site: str, screenshots: Path) -> None:
    name = f'report-{uuid.uuid4().hex[:6]}'
    page.goto(f'{site}/monitor/schedules/')
    page.get_by_role('link', name='New scheduled task').click()
    page.wait_for_url('**/monitor/schedules/new/')
    page.fill('#id_task_name', name)
    page.select_option('#id_task', 'tests.project.tasks.echo')
    page.fill('#id_crontab', '61 * * * *')
    page.fill('#id_task_args', '["weekly", ')
    page.get_by_role('button', name='Save').click()
    assert 'is not a valid cron expression' in page.locator('#crontab-error').inner_text()
    assert 'This is not JSON' in page.locator('#task_args-error').inner_text()
    assert not ScheduledTask.objects.filter(task_name=name).exists()

    page.fill('#id_crontab', '30 6 * * MON-FRI')
    page.fill('#id_task_args', '["weekly"]')
    page.get_by_role('button', name='Show the next runs').click()
    runs = page.locator('ol.upcoming li').all_inner_texts()
    assert len(runs) == 5 and all('06:30:00' in run or '07:30:00' in run for run in runs), runs
    page.screenshot(path=str(screenshots / 'schedule-form.png'), full_page=True)
    assert not ScheduledTask.objects.filter(task_name=name).exists()

    page.get_by_role('button', name='Save').click()
    page.locator('h1', has_text=name).wait_for()
    saved = ScheduledTask.objects.get(task_name=name)
    assert (saved.crontab, saved.call_arguments()) == ('30 6 * * MON-FRI', (['weekly'], {}))
    assert len(page.locator('ol.upcoming li').all_inner_texts()) == 5


def test_a_dead_letter_is_sent_back_from_the_monitor_and_runs(
        queue: str, start_worker: StartWorker, page: Page, site: str, screenshots: Path,
        broker: Broker) -> None:
    body, properties = message.encode(message.TaskMessage(
        task='tests.project.tasks.echo', args=['back from the dead']))
    broker.publish_raw(f'{queue}.dead', body, message.dead_letter_properties(
        properties, 'retries exhausted: ConnectionError: the mail server did not answer'))
    start_worker(carrot_settings(queue))
    page.goto(f'{site}/monitor/deadletters/')
    page.get_by_role('link', name=queue).click()
    page.get_by_text('the mail server did not answer').wait_for()
    page.screenshot(path=str(screenshots / 'dead-letters.png'), full_page=True)
    page.get_by_role('button', name='Send back all…').click()
    assert '1 dead letter matches.' in page.locator('main').inner_text()
    page.get_by_role('button', name='Send back 1').click()
    assert 'Sent back 1.' in page.locator('.messages').inner_text()
    ran = wait_for(lambda: _row(task='tests.project.tasks.echo', status='COMPLETED'),
                   what='the dead letter, sent back, to run')
    assert ran.uuid == properties['message_id']
    assert broker.message_count(f'{queue}.dead') == 0


def test_the_overview_shows_what_a_queue_did_without_a_reload(
        queue: str, start_worker: StartWorker, page: Page, site: str,
        screenshots: Path) -> None:
    start_worker(carrot_settings(queue))
    page.goto(f'{site}/monitor/overview/')
    section = page.locator('section.queue', has_text=queue)
    assert 'No task ended in this queue' in section.inner_text()
    logs = [publish_message(tasks.sleep, 0.01 * (n % 7)) for n in range(30)]
    logs += [publish_message(tasks.fail, 'for the chart') for _ in range(3)]
    wait_for(lambda: MessageLog.objects.filter(
        pk__in=[log.pk for log in logs], status__in=['COMPLETED', 'FAILED']).count() == 33,
        what='the 33 tasks to end')
    # The worker writes its counts every 10 s, and the page refreshes itself every 5 s.
    section.get_by_text('30 ok').first.wait_for()  # the last hour's row and the days'
    assert '3 failed' in section.inner_text()
    assert section.locator('svg').count() >= 4
    page.screenshot(path=str(screenshots / 'overview.png'), full_page=True)
