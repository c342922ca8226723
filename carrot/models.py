"""The database records of carrot: every task's life (MessageLog) and the schedules."""

from __future__ import annotations

import ast
import copy
import datetime
import json
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone

from carrot import message, schedules


class TaskArguments:
    """The task's arguments, read from the ``task_args`` and ``content`` text columns."""

    task_args: str | None
    content: str | None

    @property
    def positionals(self) -> list[Any]:
        """The positional arguments (JSON, or upstream's Python literal form)."""
        value = _decode_arguments(self.task_args, default=[])
        return list(value) if isinstance(value, (list, tuple)) else []

    @property
    def keywords(self) -> dict[str, Any]:
        """The keyword arguments."""
        value = _decode_arguments(self.content, default={})
        return value if isinstance(value, dict) else {}


class Status(models.TextChoices):
    """Where a task is in its life; ``carrot.lifecycle`` names each move between them."""

    PUBLISHED = 'PUBLISHED', 'Published'
    #: Waits in the database until ``run_after``: a countdown, an eta, or a retry.
    DELAYED = 'DELAYED', 'Delayed'
    IN_PROGRESS = 'IN_PROGRESS', 'In progress'
    FAILED = 'FAILED', 'Failed'
    COMPLETED = 'COMPLETED', 'Completed'


class MessageLog(TaskArguments, models.Model):
    """One task message, from publication to its end.

    Its status moves PUBLISHED → IN_PROGRESS → COMPLETED or FAILED; only
    ``carrot.lifecycle`` moves it.
    """

    Status = Status
    # Upstream django-carrot's names for the statuses.
    PUBLISHED = Status.PUBLISHED
    DELAYED = Status.DELAYED
    IN_PROGRESS = Status.IN_PROGRESS
    FAILED = Status.FAILED
    COMPLETED = Status.COMPLETED
    STATUS_CHOICES = Status.choices

    status = models.CharField(max_length=11, choices=Status.choices, default=Status.PUBLISHED)
    exchange = models.CharField(max_length=200, blank=True, null=True)
    queue = models.CharField(max_length=200, blank=True, null=True)
    routing_key = models.CharField(max_length=200, blank=True, null=True)
    #: The AMQP ``message_id``: how a delivered message finds its row.
    uuid = models.CharField(max_length=message.MAX_MESSAGE_ID, unique=True)
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
    #: When a worker last started the task (its latest attempt).
    start_time = models.DateTimeField(null=True, blank=True)
    #: The worker (``host:pid``) that last started or ended the task.
    worker = models.CharField(max_length=200, null=True, blank=True)

    #: What the task logged (the ``carrot`` logger and its children) while it ran.
    log = models.TextField(blank=True, null=True)
    #: How many times a worker has started this task (more than one after a retry, a
    #: redelivery or a requeue; ``errors`` numbers the retries).
    attempts = models.PositiveIntegerField(default=0)
    #: True from the moment the row is written until RabbitMQ has confirmed its message;
    #: a row still PUBLISHED and awaiting its confirm long after is re-sent by the service.
    awaiting_confirm = models.BooleanField(default=False)
    #: When a DELAYED task is sent to its queue (its countdown, eta or next retry); once
    #: released, when it was.
    run_after = models.DateTimeField(null=True, blank=True)
    #: Past which the task is not run any more (its ``expires`` option).
    expires_at = models.DateTimeField(null=True, blank=True)
    #: The options the call gave (``carrot.options``), which its retries keep.
    options = models.JSONField(null=True, blank=True)
    #: Each failed attempt of a task that retries, oldest first: ``attempt``,
    #: ``exception``, ``traceback``, ``log``, ``at`` and ``started_at`` (ISO 8601) and
    #: ``worker``; a requeue adds
    #: ``{"requeued_at": ...}``, after which attempts count from 1 again.
    errors = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ('-failure_time', '-completion_time', 'status', '-priority', '-publish_time')
        indexes = [
            models.Index(fields=['status', 'publish_time'], name='carrot_log_status_time'),
            # The monitor's lists: newest first (by id) within a status, a queue or a task;
            # each page starts after the last id of the one before (keyset pagination).
            models.Index(fields=['status', 'id'], name='carrot_log_status_id'),
            models.Index(fields=['queue', 'status', 'id'], name='carrot_log_queue_status_id'),
            models.Index(fields=['task', 'status', 'id'], name='carrot_log_task_status_id'),
            # The outbox: the few rows whose confirm has not come, oldest first.
            models.Index(fields=['publish_time'], name='carrot_log_awaiting_confirm',
                         condition=models.Q(awaiting_confirm=True)),
            # The releaser: delayed rows, the first due first.
            models.Index(fields=['run_after'], name='carrot_log_delayed',
                         condition=models.Q(status='DELAYED')),
        ]

    def __str__(self) -> str:
        return self.task

    def requeue(self) -> MessageLog:
        """Publish this task again as a new message; the new MessageLog is returned.

        Unlike upstream, the old row is kept: it is the record of what happened.
        """
        from carrot.publishing import publish_message

        return publish_message(
            self.task, *self.positionals, priority=self.priority, queue=self.queue,
            exchange=self.exchange or '', routing_key=self.routing_key,
            **(self.options or {}), **self.keywords,
        )


def _decode_arguments(text: str | None, default: Any) -> Any:
    try:
        return _parse_arguments(text, default)
    except ValueError:
        return default


def _parse_arguments(text: str | None, default: Any) -> Any:
    """JSON, or the Python literal upstream django-carrot wrote (such as "(1, 'a')")."""
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError(f'{text[:100]!r} is neither JSON nor a Python literal') from None


class ScheduledTask(TaskArguments, models.Model):
    """A task published at an interval (upstream's schedule record) or on a cron schedule.

    The service's scheduler publishes each active row when ``next_run_at`` comes, and moves
    ``next_run_at`` on (``carrot.scheduling``). Saving a row with a new schedule, or
    making it active again, sets its next run time; so edits take effect without a restart.
    """

    INTERVAL_CHOICES = (
        ('seconds', 'seconds'),
        ('minutes', 'minutes'),
        ('hours', 'hours'),
        ('days', 'days'),
    )

    interval_type = models.CharField(max_length=200, choices=INTERVAL_CHOICES, default='seconds')
    interval_count = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1)])
    #: A cron expression (``*/5 * * * *``) read in TIME_ZONE; when set, the interval is unused.
    crontab = models.CharField(
        max_length=200, blank=True, default='',
        help_text='A cron expression such as "*/5 * * * *" (minute hour day month weekday), '
                  'read in the TIME_ZONE setting. When set, it replaces the interval.',
    )
    exchange = models.CharField(max_length=200, blank=True, null=True)
    routing_key = models.CharField(max_length=200, blank=True, null=True)
    queue = models.CharField(max_length=200, blank=True, null=True)
    priority = models.PositiveIntegerField(default=0)
    task = models.CharField(max_length=200)
    task_args = models.TextField(null=True, blank=True, verbose_name='Positional arguments',
                                 help_text='A JSON list, such as [1, "two"].')
    content = models.TextField(null=True, blank=True, verbose_name='Keyword arguments',
                               help_text='A JSON object, such as {"key": "value"}.')
    task_name = models.CharField(max_length=200, unique=True)
    active = models.BooleanField(default=True)
    #: When the last scheduled run was due (the time it stood for, not when it was sent).
    last_run_at = models.DateTimeField(null=True, blank=True, editable=False)
    #: When it runs next; empty until the scheduler (or a save) sets it.
    next_run_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=['active', 'next_run_at'], name='carrot_schedule_due'),
        ]

    #: The schedule fields as loaded from the database, to tell an edit from a save.
    _loaded: tuple[Any, ...] | None = None

    def __str__(self) -> str:
        return self.task_name

    @classmethod
    def from_db(cls, db: str | None, field_names: Any, values: Any,
                **options: Any) -> ScheduledTask:
        row = super().from_db(db, field_names, values, **options)
        row._loaded = row._schedule_fields()
        return row

    def _schedule_fields(self) -> tuple[Any, ...]:
        return (self.interval_type, self.interval_count, self.crontab, self.active)

    @property
    def schedule(self) -> schedules.Schedule:
        """The Interval or Cron this row runs on; ValueError when its fields are wrong."""
        if self.crontab:
            return schedules.parse_cron(self.crontab)
        return schedules.make_interval(self.interval_type, self.interval_count)

    @property
    def interval_display(self) -> str:
        if self.crontab:
            return f'cron {self.crontab}'
        unit = self.interval_type if self.interval_count != 1 else self.interval_type[:-1]
        return f'Every {self.interval_count} {unit}'

    def call_arguments(self) -> tuple[list[Any], dict[str, Any]]:
        """The positional and keyword arguments; ValueError names a field that is wrong."""
        try:
            args = _parse_arguments(self.task_args, [])
        except ValueError as error:
            raise ValueError(f'Positional arguments: {error}; write a JSON list.') from None
        try:
            kwargs = _parse_arguments(self.content, {})
        except ValueError as error:
            raise ValueError(f'Keyword arguments: {error}; write a JSON object.') from None
        if kwargs == '{}':
            kwargs = {}  # upstream's create_scheduled_task stored json.dumps('{}')
        if not isinstance(args, (list, tuple)):
            raise ValueError(f'Positional arguments must be a JSON list, not {self.task_args!r}.')
        if not isinstance(kwargs, dict):
            raise ValueError(f'Keyword arguments must be a JSON object, not {self.content!r}.')
        return list(args), kwargs

    def save(self, *args: Any, **kwargs: Any) -> None:
        planned = self.next_run_at
        self._plan_next_run()
        if self.next_run_at != planned and kwargs.get('update_fields') is not None:
            kwargs['update_fields'] = {*kwargs['update_fields'], 'next_run_at'}
        super().save(*args, **kwargs)
        self._loaded = self._schedule_fields()

    def planned_next_run(self) -> datetime.datetime | None:
        """The ``next_run_at`` a save of this row as it stands would set (nothing saved)."""
        planned = copy.copy(self)
        planned._plan_next_run()
        return planned.next_run_at

    def _plan_next_run(self) -> None:
        """Set ``next_run_at`` for a new schedule, an edited one or a reactivated one."""
        loaded = self._loaded
        now = timezone.now()
        if loaded is None:
            if self.next_run_at is None:
                self.next_run_at = self.schedule.first_run(now)
        elif loaded[:3] != self._schedule_fields()[:3]:
            schedule = self.schedule
            if isinstance(schedule, schedules.Interval) and self.last_run_at is not None:
                # The new interval counts from the last run; a past time runs at once.
                self.next_run_at = self.last_run_at + schedule.length
            else:
                self.next_run_at = schedule.first_run(now)
        elif self.active and not loaded[3] and self.next_run_at is not None:
            # Back from inactive: the next time on its schedule, not the runs it missed.
            self.next_run_at = self.schedule.next_run(self.next_run_at, now)

    def clean(self) -> None:
        """Say what is wrong, field by field, before a form saves the row."""
        from carrot import registry
        from carrot.conf import get_settings

        errors: dict[str, str] = {}
        try:
            self.schedule  # noqa: B018  (parsed to validate)
        except ValueError as error:
            errors['crontab' if self.crontab else 'interval_count'] = str(error)
        try:
            if self.task:  # a blank one is refused as blank, by the field
                registry.resolve(self.task)
        except Exception as error:
            errors['task'] = str(error)
        try:
            args, kwargs = self.call_arguments()
            message.encode_arguments(args, kwargs)
        except (ValueError, TypeError) as error:
            errors['content' if 'Keyword' in str(error) else 'task_args'] = str(error)
        try:
            get_settings().queue(self.queue)
        except Exception as error:
            errors['queue'] = str(error)
        if errors:
            raise ValidationError(errors)

    def run_now(self) -> MessageLog:
        """Publish this task at once, leaving its schedule as it is; the new MessageLog."""
        from carrot import scheduling

        return scheduling.publish(self)

    def publish(self, priority: int | None = None) -> MessageLog:
        """Upstream's name for :meth:`run_now`; ``priority`` overrides the row's."""
        from carrot import scheduling

        return scheduling.publish(self, priority=priority)


class MonitorAction(models.Model):
    """One change made through the monitor or its API: who did what, to what, and when."""

    REQUEUE = 'requeue'
    DELETE = 'delete'
    RUN_NOW = 'run_now'
    PAUSE = 'pause'
    RESUME = 'resume'
    CREATE = 'create'
    EDIT = 'edit'
    PURGE = 'purge'
    REQUEUE_DEAD = 'requeue_dead'
    PURGE_DEAD = 'purge_dead'
    ACTION_CHOICES = (
        (REQUEUE, 'Requeue'),
        (DELETE, 'Delete'),
        (RUN_NOW, 'Run now'),
        (PAUSE, 'Pause'),
        (RESUME, 'Resume'),
        (CREATE, 'Create schedule'),
        (EDIT, 'Edit schedule'),
        (PURGE, 'Purge queue'),
        (REQUEUE_DEAD, 'Requeue dead letters'),
        (PURGE_DEAD, 'Purge dead letters'),
    )

    #: Who acted: the user name (a name, not a foreign key, so that the record outlives the
    #: user, and carrot does not need django.contrib.auth's tables).
    username = models.CharField(max_length=150, blank=True, default='')
    action = models.CharField(max_length=20, choices=ACTION_CHOICES)
    #: What it acted on, in words: the rows chosen, or the filter that chose them.
    target = models.TextField()
    #: How many rows it changed.
    count = models.PositiveIntegerField(default=0)
    #: What happened beyond the count: rows skipped and why, messages not sent.
    detail = models.TextField(blank=True, default='')
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ('-id',)
        verbose_name = 'monitor action'

    def __str__(self) -> str:
        return f'{self.username or "?"} {self.action} {self.target}'


class WorkerHeartbeat(models.Model):
    """A carrot service process that says, every few seconds, that it is alive.

    Written by the service (``carrot.heartbeats``) and deleted when it stops cleanly; the
    monitor tells from it which workers are alive, and so which IN_PROGRESS rows lost theirs.
    """

    #: The process as MessageLog.worker names it: ``host:pid``.
    worker = models.CharField(max_length=200, unique=True)
    #: The queues it consumes, each ``name×concurrency``.
    queues = models.JSONField(default=list)
    #: Whether it runs the scheduler.
    scheduler = models.BooleanField(default=False)
    #: By queue name, the messages it had received and not yet settled (acknowledged,
    #: requeued or dead-lettered) at its last beat.
    held = models.JSONField(default=dict)
    started_at = models.DateTimeField(default=timezone.now)
    #: When it last said it was alive.
    seen_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ('worker',)
        verbose_name = 'worker heartbeat'

    def __str__(self) -> str:
        return self.worker


class QueueStats(models.Model):
    """What ended in one queue in one minute or hour, as one worker process counted it.

    Written only by its ``writer`` (``carrot.rollups.flush``), so no two processes update the
    same row; the monitor's overview merges the writers' rows. ``wait`` and ``run`` are
    histograms of the wait from publish to start and of the run time, counts over the buckets
    of ``carrot.rollups.EDGES`` (trailing zeros left out).
    """

    MINUTE = 'minute'
    HOUR = 'hour'
    RESOLUTION_CHOICES = ((MINUTE, 'Minute'), (HOUR, 'Hour'))

    queue = models.CharField(max_length=200)
    #: The start of the minute or hour, in seconds since the epoch: a UTC instant whatever
    #: USE_TZ says (a local time would name two periods alike when clocks go back).
    period = models.BigIntegerField()
    resolution = models.CharField(max_length=6, choices=RESOLUTION_CHOICES)
    #: The process that counted: ``host:pid/<token>``, the token drawn at its start (two
    #: containers may both be ``host:1``).
    writer = models.CharField(max_length=200)
    #: Attempts that returned, and attempts that raised (a retried one too) or expired.
    succeeded = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    #: Waits left out of ``wait``: negative, or over a day (the clocks of the publishing and
    #: the working machine apart, or another producer's header).
    skewed = models.PositiveIntegerField(default=0)
    wait = models.JSONField(default=list)
    run = models.JSONField(default=list)

    class Meta:
        verbose_name = 'queue statistics'
        verbose_name_plural = 'queue statistics'
        constraints = [
            # Also the index of the overview's "queue, resolution, period >= since".
            models.UniqueConstraint(fields=['queue', 'resolution', 'period', 'writer'],
                                    name='carrot_queuestats_unique'),
        ]

    def __str__(self) -> str:
        at = datetime.datetime.fromtimestamp(self.period, tz=datetime.UTC)
        return f'{self.queue} {self.resolution} {at:%Y-%m-%d %H:%M}Z {self.writer}'
