"""Only functions defined in CARROT['task_modules'] may run."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest
from django.test.utils import override_settings

from carrot import registry
from carrot.exceptions import TaskImportError, TaskNotRegistered
from carrot.models import MessageLog
from carrot.utilities import publish_message
from tests.conftest import BROKER_URL, Broker, Worker, statuses, wait_for
from tests.project import guarded_tasks, tasks

ALLOWED = {'task_modules': ['tests.project.tasks', 'tests.project.broken_tasks']}


@override_settings(CARROT=ALLOWED)
def test_a_function_in_a_listed_module_resolves() -> None:
    assert registry.resolve('tests.project.tasks.add') is tasks.add
    assert registry.task_path(tasks.add) == 'tests.project.tasks.add'


@override_settings(CARROT=ALLOWED)
@pytest.mark.parametrize(('path', 'error', 'says'), [
    ('os.system', TaskNotRegistered, "os is not in settings.CARROT['task_modules']"),
    ('tests.project.tasks.getcwd', TaskNotRegistered, 'it is a builtin function'),
    ('tests.project.tasks.missing', TaskImportError, 'has no function called missing'),
    ('tests.project.tasks.NotAFunction', TaskNotRegistered, 'it is a class'),
    ('tests.project.broken_tasks.never', TaskImportError, 'broken_tasks cannot be imported'),
    ('nodots', TaskNotRegistered, 'not a dotted path'),
])
def test_anything_else_is_refused_with_a_reason(path: str, error: type[Exception],
                                                says: str) -> None:
    with pytest.raises(error, match=re.escape(says)):
        registry.resolve(path)


def test_a_nested_function_cannot_be_a_task() -> None:
    def inner() -> None:
        pass

    with pytest.raises(TaskNotRegistered, match='not a module-level function'):
        registry.task_path(inner)


GUARDED = 'tests.project.guarded_tasks'
# What a message may name in a listed module without it being a task, with the arguments
# that would do harm, and what the refusal says.
NOT_TASKS: list[tuple[str, list[object], str]] = [
    ('__getattribute__', ['API_TOKEN'], 'start with an underscore'),
    ('__setattr__', ['WEBHOOK_URL', 'https://elsewhere.example/'], 'start with an underscore'),
    ('__delattr__', ['WEBHOOK_URL'], 'start with an underscore'),
    ('__init__', ['tests.project.guarded_tasks'], 'start with an underscore'),
    ('__repr__', [], 'start with an underscore'),
    ('__dict__', [], 'start with an underscore'),
    ('_private_helper', [], 'start with an underscore'),
    ('getcwd', [], 'it is a builtin function'),
    ('join', ['/etc', 'passwd'], 'not defined there'),
    ('client_token', [], 'it is a bound method'),
    ('Client', [], 'it is a class'),
    ('json', [], 'it is a module'),
    ('client', [], 'it is a Client object'),
    ('reveal', [], 'it is a partial object'),
]


@pytest.mark.parametrize(('name', 'says'), [(name, says) for name, _, says in NOT_TASKS])
def test_what_is_not_a_plain_function_defined_in_the_module_is_refused(name: str,
                                                                       says: str) -> None:
    with override_settings(CARROT={'task_modules': [GUARDED]}):
        with pytest.raises(TaskNotRegistered, match=re.escape(says)) as refused:
            registry.resolve(f'{GUARDED}.{name}')
        with pytest.raises(TaskNotRegistered):
            publish_message(f'{GUARDED}.{name}')
    assert guarded_tasks.API_TOKEN not in str(refused.value)
    assert not MessageLog.objects.exists()


@pytest.mark.slow
def test_a_message_naming_what_is_not_a_task_is_refused_by_the_worker(
        broker: Broker, start_worker: Callable[..., Worker]) -> None:
    """Through the real worker: each is dead-lettered with a FAILED row saying why, the
    module is unchanged, and nothing of its globals reaches a row or the log."""
    queue = broker.queue_name()
    settings = {'default_broker': BROKER_URL, 'queues': [{'name': queue, 'concurrency': 2}],
                'task_modules': [GUARDED]}
    with override_settings(CARROT=settings):
        worker = start_worker(settings)
        for index, (name, args, _) in enumerate(NOT_TASKS):
            broker.publish_raw(queue, json.dumps({'args': args, 'kwargs': {}}).encode(), {
                'message_id': f'not-a-task-{index}', 'delivery_mode': 2,
                'headers': {'type': f'{GUARDED}.{name}'}, 'content_type': 'application/json',
            })
        # Published after the refused ones: it runs once they have all been handled.
        good = publish_message(guarded_tasks.webhook_url)
        wait_for(lambda: statuses() == {'FAILED': len(NOT_TASKS), 'COMPLETED': 1},
                 what='every message handled')
        wait_for(lambda: broker.counts(f'{queue}.dead') == (len(NOT_TASKS), 0),
                 what='the dead letters')
        assert worker.process.poll() is None
    good.refresh_from_db()
    assert good.output == json.dumps(guarded_tasks.WEBHOOK_URL)  # __setattr__ did not run
    for index, (_, _, says) in enumerate(NOT_TASKS):
        row = MessageLog.objects.get(uuid=f'not-a-task-{index}')
        assert row.status == MessageLog.FAILED
        assert says in (row.exception or '')
        assert not row.output
    secret = guarded_tasks.API_TOKEN
    for row in MessageLog.objects.values():
        assert not any(secret in str(value) for value in row.values())
    assert secret not in worker.logfile.read_text()
    assert secret not in worker.output
