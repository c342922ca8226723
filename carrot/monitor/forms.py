"""The monitor's form for creating and editing a scheduled task.

The task is chosen from the registered ones (``registry.registered_tasks``); arguments are
JSON, and every error (a cron expression that does not parse, arguments that are not a JSON
list or object, a queue not in ``CARROT['queues']``) is shown beside its field, by the
model's own ``clean``.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from django import forms
from django.utils import timezone

from carrot import registry, schedules
from carrot.conf import get_settings
from carrot.models import ScheduledTask

#: The fields the form edits, in the order the page shows them.
FIELDS = ('task_name', 'task', 'crontab', 'interval_type', 'interval_count', 'queue',
          'priority', 'task_args', 'content', 'active')


class ScheduleForm(forms.ModelForm):  # type: ignore[type-arg]
    """A scheduled task, new or edited; ``upcoming`` holds its next five runs once valid."""

    class Meta:
        model = ScheduledTask
        fields = FIELDS
        labels = {'task_name': 'Name', 'crontab': 'Cron expression',
                  'interval_type': 'Interval unit', 'interval_count': 'Every'}
        help_texts = {'task_name': 'Unique; how the monitor and the logs name it.'}
        widgets = {'task_args': forms.Textarea(attrs={'rows': 2, 'class': 'mono'}),
                   'content': forms.Textarea(attrs={'rows': 3, 'class': 'mono'}),
                   'crontab': forms.TextInput(attrs={'class': 'mono',
                                                     'placeholder': '*/5 * * * *'})}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        current = self.instance.task
        tasks = registry.registered_tasks()
        choices = [(path, path) for path, broken in tasks if not broken]
        if current and current not in dict(choices):
            choices.insert(0, (current, f'{current} (not a registered task)'))
        self.broken_modules = [f'{path} {broken}' for path, broken in tasks if broken]
        self.fields['task'] = forms.ChoiceField(
            choices=[('', 'Choose a task…'), *choices], label='Task',
            help_text='A registered task: a function of a module in CARROT["task_modules"], '
                      "or a @task of an installed app's tasks module.")
        queues = [queue.name for queue in get_settings().queues]
        self.fields['queue'] = forms.ChoiceField(
            choices=[('', 'The default queue'), *((name, name) for name in queues)],
            required=False, label='Queue')
        for name in ('task_args', 'content'):
            self.fields[name].required = False
        self._before = {name: _comparable(name, getattr(self.instance, name)) for name in FIELDS}
        self.upcoming: list[datetime.datetime] = [] if self.is_bound or self.instance.pk is None \
            else self._upcoming()

    def clean_queue(self) -> str | None:
        return self.cleaned_data.get('queue') or None

    def clean_crontab(self) -> str:
        return ' '.join(str(self.cleaned_data.get('crontab') or '').split())

    def clean_task_args(self) -> str:
        return _json_text(self.cleaned_data.get('task_args'), '[]', list,
                          'a list, such as [1, "two"]')

    def clean_content(self) -> str:
        return _json_text(self.cleaned_data.get('content'), '{}', dict,
                          'an object, such as {"key": "value"}')

    def _post_clean(self) -> None:
        # The model's clean, each field's error put beside it (not in django-stubs).
        super()._post_clean()  # type: ignore[misc]
        if not self.errors:
            self.upcoming = self._upcoming()

    def _upcoming(self) -> list[datetime.datetime]:
        try:
            schedule = self.instance.schedule
        except ValueError:
            return []
        unchanged = self.instance.pk is not None and not (
            {'crontab', 'interval_type', 'interval_count', 'active'} & set(self.changed_fields()))
        return schedules.upcoming(schedule, timezone.now(),
                                  self.instance.next_run_at if unchanged else None)

    def changed_fields(self) -> list[str]:
        """The fields whose value differs from the row's (blank arguments equal none)."""
        if not self.is_bound:
            return []
        return [name for name in FIELDS if name in self.cleaned_data
                and _comparable(name, self.cleaned_data[name]) != self._before[name]]

    def changes(self) -> str:
        """The fields this form changed, for the audit log."""
        return ', '.join(self.changed_fields()) or 'nothing'


def _comparable(name: str, value: Any) -> Any:
    """A field's value as a comparison sees it: the arguments parsed, blank ones as none."""
    if name in ('task_args', 'content'):
        try:
            return json.loads(value) if value else ([] if name == 'task_args' else {})
        except ValueError:
            return value
    return value


def _json_text(value: Any, empty: str, kind: type, example: str) -> str:
    """Blank arguments mean none; otherwise JSON of ``kind``, or an error that shows how."""
    text = str(value or '').strip()
    if not text:
        return empty
    try:
        found = json.loads(text)
    except ValueError as error:
        raise forms.ValidationError(f'This is not JSON ({error}): write {example}.') from None
    if not isinstance(found, kind):
        raise forms.ValidationError(f'This is JSON but not {example}.')
    return json.dumps(found)
