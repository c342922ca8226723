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
        row = self.instance
        tasks = registry.registered_tasks()
        choices = [(path, path) for path, broken in tasks if not broken]
        if row.task and row.task not in dict(choices):
            choices.insert(0, (row.task, f'{row.task} (not a registered task)'))
        self.broken_modules = [f'{path} {broken}' for path, broken in tasks if broken]
        self.fields['task'] = forms.ChoiceField(
            choices=[('', 'Choose a task…'), *choices], label='Task',
            help_text='A registered task: a function of a module in CARROT["task_modules"], '
                      "or a @task of an installed app's tasks module.")
        queues = [(queue.name, queue.name) for queue in get_settings().queues]
        if row.queue and row.queue not in dict(queues):
            queues.insert(0, (row.queue, f"{row.queue} (not in CARROT['queues'])"))
        self.fields['queue'] = forms.ChoiceField(
            choices=[('', 'The default queue'), *queues], required=False, label='Queue')
        for name in ('task_args', 'content'):
            self.fields[name].required = False
        self._before = {name: getattr(row, name) for name in FIELDS}
        try:  # as JSON, also for rows that upstream wrote as Python literals
            args, kwargs = row.call_arguments()
            self._before.update(task_args=list(args), content=kwargs)
            self.initial.update(task_args=json.dumps(args), content=json.dumps(kwargs))
        except ValueError:
            pass  # shown as stored, to be corrected
        self.upcoming: list[datetime.datetime] = [] if self.is_bound or row.pk is None \
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
        """The next five runs, from the next run a save would plan (the model's own rule)."""
        try:
            schedule = self.instance.schedule
        except ValueError:
            return []
        return schedules.upcoming(schedule, timezone.now(), self.instance.planned_next_run())

    def changed_fields(self) -> list[str]:
        """The fields whose value differs from the row's (blank arguments equal none)."""
        if not self.is_bound:
            return []
        return [name for name in FIELDS if name in self.cleaned_data
                and _comparable(name, self.cleaned_data[name]) != self._before[name]]

    def changes(self) -> str:
        """What this form changed, for the audit log: each field, from and to."""
        return '; '.join(f'{name}: {_short(self._before[name])} → '
                         f'{_short(_comparable(name, self.cleaned_data[name]))}'
                         for name in self.changed_fields()) or 'nothing'


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else repr(value)
    return text if len(text) <= 80 else text[:77] + '...'


def _comparable(name: str, value: Any) -> Any:
    """A cleaned value as the row's is kept in ``_before``: the arguments parsed."""
    if name in ('task_args', 'content') and isinstance(value, str):
        try:
            return json.loads(value)
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
