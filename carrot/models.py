"""The database records of carrot: every task's life (MessageLog) and the schedules."""

from __future__ import annotations

import ast
import json
from typing import Any

from django.core.validators import MinValueValidator
from django.db import models


class MessageLog(models.Model):
    """One task message, from publication to its end.

    Its status moves PUBLISHED → IN_PROGRESS → COMPLETED or FAILED; only
    ``carrot.lifecycle`` moves it.
    """

    PUBLISHED = 'PUBLISHED'
    IN_PROGRESS = 'IN_PROGRESS'
    FAILED = 'FAILED'
    COMPLETED = 'COMPLETED'
    STATUS_CHOICES = (
        (PUBLISHED, 'Published'),
        (IN_PROGRESS, 'In progress'),
        (FAILED, 'Failed'),
        (COMPLETED, 'Completed'),
    )

    status = models.CharField(max_length=11, choices=STATUS_CHOICES, default=PUBLISHED)
    exchange = models.CharField(max_length=200, blank=True, null=True)
    queue = models.CharField(max_length=200, blank=True, null=True)
    routing_key = models.CharField(max_length=200, blank=True, null=True)
    #: The AMQP ``message_id``: how a delivered message finds its row.
    uuid = models.CharField(max_length=200, unique=True)
    priority = models.PositiveIntegerField(default=0)

    #: The dotted path of the task function.
    task = models.CharField(max_length=200)
    #: Positional arguments, as JSON.
    task_args = models.TextField(null=True, blank=True, verbose_name='Task positional arguments')
    #: Keyword arguments, as JSON.
    content = models.TextField(null=True, blank=True, verbose_name='Task keyword arguments')

    exception = models.TextField(null=True, blank=True)
    traceback = models.TextField(null=True, blank=True)
    output = models.TextField(null=True, blank=True)

    publish_time = models.DateTimeField(null=True, blank=True)
    failure_time = models.DateTimeField(null=True, blank=True)
    completion_time = models.DateTimeField(null=True, blank=True)

    #: What the task logged (the ``carrot`` logger and its children) while it ran.
    log = models.TextField(blank=True, null=True)
    #: How many times a worker has started this task (more than one after a redelivery).
    attempts = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ('-failure_time', '-completion_time', 'status', '-priority', '-publish_time')
        indexes = [
            models.Index(fields=['status', 'publish_time'], name='carrot_log_status_time'),
            models.Index(fields=['task'], name='carrot_log_task'),
        ]

    def __str__(self) -> str:
        return self.task

    @property
    def positionals(self) -> list[Any]:
        """The positional arguments (JSON, or upstream's Python literal form)."""
        return list(_decode_arguments(self.task_args, default=[]))

    @property
    def keywords(self) -> dict[str, Any]:
        """The keyword arguments."""
        value = _decode_arguments(self.content, default={})
        return value if isinstance(value, dict) else {}

    def requeue(self) -> MessageLog:
        """Publish this task again as a new message; the new MessageLog is returned.

        Unlike upstream, the old row is kept: it is the record of what happened.
        """
        from carrot.utilities import publish_message

        return publish_message(
            self.task, *self.positionals, priority=self.priority, queue=self.queue,
            exchange=self.exchange or '', routing_key=self.routing_key, **self.keywords,
        )


def _decode_arguments(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        # Rows written by upstream django-carrot hold a Python repr such as "(1, 'a')".
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return default


class ScheduledTask(models.Model):
    """A task to publish at a fixed interval (upstream's schedule record).

    The rows and their admin are here; the scheduler that publishes them is not part of
    this release.
    """

    INTERVAL_CHOICES = (
        ('seconds', 'seconds'),
        ('minutes', 'minutes'),
        ('hours', 'hours'),
        ('days', 'days'),
    )

    interval_type = models.CharField(max_length=200, choices=INTERVAL_CHOICES, default='seconds')
    interval_count = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1)])
    exchange = models.CharField(max_length=200, blank=True, null=True)
    routing_key = models.CharField(max_length=200, blank=True, null=True)
    queue = models.CharField(max_length=200, blank=True, null=True)
    task = models.CharField(max_length=200)
    task_args = models.TextField(null=True, blank=True, verbose_name='Positional arguments')
    content = models.TextField(null=True, blank=True, verbose_name='Keyword arguments')
    task_name = models.CharField(max_length=200, unique=True)
    active = models.BooleanField(default=True)

    def __str__(self) -> str:
        return self.task_name

    @property
    def interval_display(self) -> str:
        unit = self.interval_type if self.interval_count != 1 else self.interval_type[:-1]
        return f'Every {self.interval_count} {unit}'
