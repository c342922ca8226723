"""The broker password never shows in Django's error reports: the debug page and the mail
AdminEmailHandler sends."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import django
import pytest
from django.core import checks, mail
from django.test import Client
from django.test.utils import override_settings
from django.views import debug

from carrot.checks import check_settings
from carrot.reporting import mask_url_passwords

PASSWORD = 's3cret-Pw'
CARROT = {
    'default_broker': f'amqp://carrot:{PASSWORD}@127.0.0.1:5672/prod',
    'queues': [{'name': 'default'},
               {'name': 'other', 'host': f'amqps://other:{PASSWORD}x@rabbit.internal/'}],
    'task_modules': ['tests.project.tasks'],
}
FILTER = 'carrot.reporting.SafeExceptionReporterFilter'


@pytest.fixture(autouse=True)
def fresh_reporter_filter() -> Iterator[None]:
    """Django caches the filter its setting names; each test here sets its own."""
    debug.get_default_exception_reporter_filter.cache_clear()
    yield
    debug.get_default_exception_reporter_filter.cache_clear()


_LOCMEM = 'django.core.mail.backends.locmem.EmailBackend'
# Django 6.1 names the mail backend in MAILERS, and 6.0 takes ADMINS as addresses alone;
# the older forms raise deprecation warnings there.
_MEMORY_MAIL: dict[str, object] = {
    **({'MAILERS': {'default': {'BACKEND': _LOCMEM}}} if django.VERSION >= (6, 1)
       else {'EMAIL_BACKEND': _LOCMEM}),
    'ADMINS': ['ops@example.com'] if django.VERSION >= (6, 0) else [('Ops', 'ops@example.com')],
}


@pytest.fixture
def mails() -> Iterator[list[mail.EmailMessage]]:
    """Error mails to ADMINS, as AdminEmailHandler sends them, kept in memory."""
    with override_settings(**_MEMORY_MAIL, DEBUG=False):
        mail.outbox = []
        handler = logging.getLogger('django').handlers
        assert any(type(h).__name__ == 'AdminEmailHandler' for h in handler)
        yield mail.outbox


def _failing_page() -> str:
    answer = Client(raise_request_exception=False).get('/fails/')
    assert answer.status_code == 500
    return answer.content.decode()


@pytest.mark.parametrize('reporter_filter',
                         [FILTER, 'django.views.debug.SafeExceptionReporterFilter'])
def test_the_debug_page_shows_no_broker_password(reporter_filter: str) -> None:
    with override_settings(CARROT=CARROT, DEBUG=True,
                           DEFAULT_EXCEPTION_REPORTER_FILTER=reporter_filter):
        page = _failing_page()
    assert 'cannot reach the broker' in page  # the debug page, with settings and locals
    assert 'broker_url' in page
    if reporter_filter == FILTER:
        assert PASSWORD not in page
        assert 'amqp://carrot:********************@127.0.0.1:5672/prod' in page
    else:  # what Django's own filter shows, and why carrot's is needed
        assert PASSWORD in page


def test_the_mailed_error_report_shows_no_broker_password(
        mails: list[mail.EmailMessage]) -> None:
    with override_settings(CARROT=CARROT, DEFAULT_EXCEPTION_REPORTER_FILTER=FILTER):
        _failing_page()
    [report] = mails
    assert 'cannot reach the broker' in report.body
    assert "'default_broker': 'amqp://carrot:********************@127.0.0.1:5672/prod'" in (
        report.body)
    assert PASSWORD not in report.body
    assert all(PASSWORD not in str(content) for content, _ in
               getattr(report, 'alternatives', []))


def test_a_check_warns_while_a_url_password_would_show_in_error_reports() -> None:
    unsafe = 'django.views.debug.SafeExceptionReporterFilter'
    with override_settings(CARROT=CARROT, DEFAULT_EXCEPTION_REPORTER_FILTER=unsafe):
        found = check_settings()
    assert [(m.id, m.level) for m in found] == [('carrot.W002', checks.WARNING)]
    assert FILTER in (found[0].hint or '')
    with override_settings(CARROT=CARROT, DEFAULT_EXCEPTION_REPORTER_FILTER=FILTER):
        assert check_settings() == []
    no_password = {**CARROT, 'default_broker': 'amqp://localhost/', 'queues': [{'name': 'q'}]}
    with override_settings(CARROT=no_password, DEFAULT_EXCEPTION_REPORTER_FILTER=unsafe):
        assert check_settings() == []


@pytest.mark.parametrize(('text', 'masked'), [
    ('amqp://u:p%40ss@h:5672/v', 'amqp://u:***@h:5672/v'),
    ('see amqps://:pw@h/ and redis://x:y@r:6379/0',
     'see amqps://:***@h/ and redis://x:***@r:6379/0'),
    ('amqp://user@host/', 'amqp://user@host/'),
    ('amqp://host:5672/', 'amqp://host:5672/'),
    ('no url here', 'no url here'),
])
def test_url_passwords_are_masked(text: str, masked: str) -> None:
    assert mask_url_passwords(text, '***') == masked
