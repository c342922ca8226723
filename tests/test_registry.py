"""Only functions defined in CARROT['task_modules'] may run."""

from __future__ import annotations

import re

import pytest
from django.test.utils import override_settings

from carrot import registry
from carrot.exceptions import TaskImportError, TaskNotRegistered
from tests.project import tasks

ALLOWED = {'task_modules': ['tests.project.tasks', 'tests.project.broken_tasks']}


@override_settings(CARROT=ALLOWED)
def test_a_function_in_a_listed_module_resolves() -> None:
    assert registry.resolve('tests.project.tasks.add') is tasks.add
    assert registry.task_path(tasks.add) == 'tests.project.tasks.add'


@override_settings(CARROT=ALLOWED)
@pytest.mark.parametrize(('path', 'error', 'says'), [
    ('os.system', TaskNotRegistered, "os is not in settings.CARROT['task_modules']"),
    ('tests.project.tasks.getcwd', TaskNotRegistered, 'not defined there'),
    ('tests.project.tasks.missing', TaskImportError, 'has no function called missing'),
    ('tests.project.tasks.NotAFunction', TaskImportError, 'is not a function'),
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
