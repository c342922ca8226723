"""Scheduled tasks in the database: creating them, running one now, and claiming due runs.

Any number of carrot services may run a scheduler against the same database. Each round
claims the due rows in one transaction: ``SELECT … FOR UPDATE SKIP LOCKED`` where the
database has it, and on every database an UPDATE that only succeeds while ``next_run_at``
still holds the value read, so a run is published by the one service that moved it on.
The MessageLog rows are written in the same transaction and the messages sent when it
commits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import IntegrityError, connections, router, transaction
from django.db.models import Min, Q, Value
from django.db.models.functions import Concat

from carrot import message, oncommit, registry, schedules
from carrot.conf import get_settings
from carrot.models import MessageLog, ScheduledTask
from carrot.publishing import Message, create_message

logger = logging.getLogger('carrot.scheduler')

#: Rows claimed per transaction; more due rows are taken by the next round at once.
CLAIM_BATCH = 100


def create_scheduled_task(
    task: registry.Task | str,
    interval: dict[str, int] | None = None,
    task_name: str | None = None,
    queue: str | None = None,
    *task_args: Any,
    crontab: str | None = None,
    priority: int = 0,
    exchange: str = '',
    routing_key: str | None = None,
    active: bool = True,
    **task_kwargs: Any,
) -> ScheduledTask:
    """Schedule ``task`` every ``interval`` (``{'minutes': 5}``) or on ``crontab``.

    The first run of an interval schedule is one interval from now; a cron schedule runs at
    its next matching minute in ``TIME_ZONE``. ``task_name`` defaults to the task's dotted
    path. Everything is checked before the row is written: raises ValueError for a bad or
    missing schedule or a name already taken, TaskNotRegistered/TaskImportError for a task
    that cannot run, ArgumentsNotSerializable for arguments that are not JSON, and
    CarrotConfigException for an unknown queue.
    """
    path = registry.task_path(task)
    registry.resolve(path)
    if interval is None and crontab is None:
        raise ValueError('A scheduled task needs a schedule: pass interval (such as '
                         '{"minutes": 5}) or crontab (such as "*/5 * * * *").')
    if interval is not None and crontab is not None:
        raise ValueError('Pass interval or crontab, not both: a scheduled task has one schedule.')
    schedule = (schedules.parse_interval(interval) if interval is not None
                else schedules.parse_cron(crontab))
    name = task_name or path
    if not isinstance(name, str) or len(name) > 200:
        raise ValueError(f'task_name must be a string of at most 200 characters, not {name!r}.')
    get_settings().queue(queue)  # an unknown queue raises, naming the known ones
    message.check_priority(priority)
    args_json, kwargs_json = message.encode_arguments(task_args, task_kwargs)
    if ScheduledTask.objects.filter(task_name=name).exists():
        raise _name_taken(name)
    fields: dict[str, Any] = {'crontab': schedule.expression} \
        if isinstance(schedule, schedules.Cron) \
        else {'interval_type': schedule.unit, 'interval_count': schedule.count}
    try:
        with transaction.atomic(using=router.db_for_write(ScheduledTask)):
            return ScheduledTask.objects.create(
                task=path, task_name=name, queue=queue, exchange=exchange,
                routing_key=routing_key, priority=priority, task_args=args_json,
                content=kwargs_json, active=active, **fields,
            )
    except IntegrityError:
        raise _name_taken(name) from None  # created by someone else meanwhile


def _name_taken(name: str) -> ValueError:
    return ValueError(f'A scheduled task named {name!r} already exists: pass another '
                      f'task_name, or edit or delete that one.')


def publish(row: ScheduledTask, priority: int | None = None) -> MessageLog:
    """Publish ``row``'s task now with its arguments, queue, exchange, routing key and
    priority; its schedule is not changed."""
    return _message(row, priority).publish()


def _message(row: ScheduledTask, priority: int | None = None) -> Message:
    """The validated message of ``row``'s task, not yet written or sent."""
    args, kwargs = row.call_arguments()
    return create_message(
        row.task, priority=row.priority if priority is None else priority, task_args=args,
        queue=row.queue or None, exchange=row.exchange or '',
        routing_key=row.routing_key or None, task_kwargs=kwargs,
    )


def run_now(scheduled: ScheduledTask | int | str) -> MessageLog:
    """Publish a scheduled task (a row, its primary key or its name) at once."""
    if not isinstance(scheduled, ScheduledTask):
        lookup = {'task_name': scheduled} if isinstance(scheduled, str) else {'pk': scheduled}
        scheduled = ScheduledTask.objects.get(**lookup)
    return publish(scheduled)


@dataclass(frozen=True)
class Round:
    """What one scheduler round did."""

    published: int
    failed: int
    more_due: bool


@dataclass(eq=False)
class _Run:
    """A claimed run of a schedule: its row is written, its message still to be sent."""

    row: ScheduledTask
    due: datetime
    following: datetime
    send: oncommit.Send


def run_due(now: datetime) -> Round:
    """Claim the rows due at ``now``, move each on to its next run and publish it.

    Rows with no next run yet (written by ``bulk_create``, an upstream migration, or an
    ``update()``) are given one and not published. A row that cannot be published (its
    task no longer imports, its arguments are not valid) is logged at ERROR and moved on
    like the others, so it neither blocks the rest nor repeats its error every second.

    The round's messages are sent once it commits, as one unit. A round interrupted while
    sending (the service stopped it: ``GreenletExit``) hands back every run not confirmed
    sent: its schedule is set back to that run, which the next round publishes again.
    """
    alias = router.db_for_write(ScheduledTask)
    runs: list[_Run] = []
    failed = 0
    with transaction.atomic(using=alias):
        rows = list(_claimable(alias, now)[:CLAIM_BATCH])
        for row in rows:
            due = row.next_run_at
            try:
                schedule = row.schedule
            except ValueError as error:
                logger.error('Scheduled task %r (id %s) has a bad schedule and is paused '
                             '(active=False): %s Fix it and make the row active again.',
                             row.task_name, row.pk, error)
                ScheduledTask.objects.filter(pk=row.pk).update(active=False)
                failed += 1
                continue
            following = schedule.first_run(now) if due is None else schedule.next_run(due, now)
            if not _advance(row, due, following):
                continue  # another service moved it on first
            if due is None:
                continue
            try:
                # A savepoint: one row's failure stays its own.
                with transaction.atomic(using=alias):
                    task_message = _message(row)
                    send = oncommit.Send(task_message, task_message.record())
            except Exception as error:
                failed += 1
                logger.error('Scheduled task %r (id %s) was due at %s but could not be '
                             'published, and is skipped until its next run at %s: %s',
                             row.task_name, row.pk, due.isoformat(), following.isoformat(),
                             error)
                continue
            runs.append(_Run(row, due, following, send))
        if runs:
            transaction.on_commit(lambda: _send_round(runs), using=alias)
    published = sum(1 for run in runs if run.send.outcome is not oncommit.Outcome.FAILED)
    return Round(published, failed + len(runs) - published,
                 more_due=len(rows) == CLAIM_BATCH)


def _send_round(runs: list[_Run]) -> None:
    """Send the round's messages once its claims are committed; hand back what was not sent
    when the sending is interrupted."""
    try:
        oncommit.send_all([run.send for run in runs])
    except BaseException:
        _hand_back([run for run in runs if run.send.outcome in
                    (oncommit.Outcome.UNCERTAIN, oncommit.Outcome.NOT_SENT)])
        raise
    for run in runs:
        if run.send.outcome is oncommit.Outcome.SENT:
            logger.info('Scheduled task %r published (due at %s; next run at %s)',
                        run.row.task_name, run.due.isoformat(), run.following.isoformat())


def _hand_back(runs: list[_Run]) -> None:
    """Set each schedule back to its run that was not sent, so the next round publishes it.

    The row of a message certainly not sent goes; the row of one interrupted while being
    sent stays FAILED (RabbitMQ may have it, and a worker may run it) with a note.
    """
    for run in runs:
        try:
            ScheduledTask.objects.filter(pk=run.row.pk, next_run_at=run.following).update(
                next_run_at=run.due, last_run_at=run.row.last_run_at)
            log = MessageLog.objects.filter(pk=run.send.log.pk, status=MessageLog.FAILED)
            if run.send.outcome is oncommit.Outcome.NOT_SENT:
                log.delete()
            else:
                log.update(exception=Concat(
                    'exception', Value(' Its schedule publishes this run again.')))
        except Exception as error:
            logger.error('Scheduled task %r (id %s): its run due at %s was not published and '
                         'could not be handed back: %s', run.row.task_name, run.row.pk,
                         run.due.isoformat(), error)
            continue
        logger.warning('Scheduled task %r (id %s): its run due at %s was interrupted before it '
                       'was published, and is handed back to the next round',
                       run.row.task_name, run.row.pk, run.due.isoformat())


def _claimable(alias: str, now: datetime) -> Any:
    rows = ScheduledTask.objects.using(alias).filter(
        Q(next_run_at__lte=now) | Q(next_run_at__isnull=True), active=True,
    ).order_by('next_run_at', 'pk')
    if connections[alias].features.has_select_for_update_skip_locked:
        rows = rows.select_for_update(skip_locked=True)
    return rows


def _advance(row: ScheduledTask, due: datetime | None, following: datetime) -> bool:
    """Move ``row`` to its next run if it still has ``due``; whether this service did."""
    claimed = ScheduledTask.objects.filter(pk=row.pk, next_run_at=due) if due is not None \
        else ScheduledTask.objects.filter(pk=row.pk, next_run_at__isnull=True)
    changes: dict[str, Any] = {'next_run_at': following}
    if due is not None:
        changes['last_run_at'] = due
    return claimed.update(**changes) == 1


def next_due() -> datetime | None:
    """The earliest next run of an active schedule (None when there is none)."""
    found = ScheduledTask.objects.filter(active=True).aggregate(first=Min('next_run_at'))
    first: datetime | None = found['first']
    return first
