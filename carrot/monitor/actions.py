"""Every change the monitor (pages, API, admin) makes, and the audit record of each.

Each action takes at most MAX_ROWS rows and works through them in transactions of BATCH
rows, so one click never holds a lock on a million rows nor runs past a request's time.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from django.db import connections, transaction
from django.utils import timezone

from carrot import heartbeats, lifecycle, oncommit
from carrot.models import MessageLog, MonitorAction, ScheduledTask, _parse_arguments
from carrot.monitor import health
from carrot.monitor.forms import ScheduleForm
from carrot.publishing import Message, create_message

#: The statuses a requeued row may be in: failed, orphaned (IN_PROGRESS), stuck (PUBLISHED).
REQUEUED_FROM = (MessageLog.FAILED, MessageLog.IN_PROGRESS, MessageLog.PUBLISHED)
#: The most rows one action changes; the rest wait for the next one.
MAX_ROWS = 1000
#: Rows per transaction.
BATCH = 100
#: Skipped rows whose reason is kept in the audit record and shown.
MAX_REASONS = 20


#: How a summary says what each action did.
VERBS = {MonitorAction.REQUEUE: 'Requeued', MonitorAction.DELETE: 'Deleted',
         MonitorAction.RUN_NOW: 'Published', MonitorAction.PAUSE: 'Paused',
         MonitorAction.RESUME: 'Resumed', MonitorAction.CREATE: 'Created',
         MonitorAction.EDIT: 'Saved', MonitorAction.PURGE: 'Purged',
         MonitorAction.REQUEUE_DEAD: 'Sent back', MonitorAction.PURGE_DEAD: 'Purged'}


@dataclass
class Result:
    """What an action did."""

    action: str
    count: int = 0
    skipped: int = 0
    #: "row id: why", for the first MAX_REASONS rows skipped or not sent.
    reasons: list[str] = field(default_factory=list)
    #: More rows (or messages) matched than ``cap``: the action took the first ``cap``.
    capped: bool = False
    #: The most one action takes (None: MAX_ROWS rows), and what it counts.
    cap: int | None = None
    unit: str = 'rows'
    audit_id: int | None = None
    #: run_now: (scheduled task name, message id) of each task published.
    published: list[tuple[str, str]] = field(default_factory=list)
    #: What else the audit record says (a schedule's changed fields, a purge's queue).
    notes: list[str] = field(default_factory=list)
    #: Why it stopped part of the way (the broker or the database failed); '' when it did not.
    error: str = ''

    @property
    def limit(self) -> int:
        return self.cap if self.cap is not None else MAX_ROWS

    def skip(self, pk: int, why: str) -> None:
        self.skipped += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(f'{pk}: {why}')

    @property
    def summary(self) -> str:
        text = f'{VERBS[self.action]} {self.count}'
        if self.skipped:
            text += f', skipped {self.skipped}'
        if self.capped:
            text += f' (the first {self.limit} of more: act again for the rest)'
        if self.error:
            text += f', then stopped: {self.error}'
        return text + '.'

    def as_json(self) -> dict[str, object]:
        return {'action': self.action, 'count': self.count, 'skipped': self.skipped,
                'reasons': self.reasons, 'capped': self.capped, 'audit_id': self.audit_id,
                'published': [{'task_name': name, 'message_id': message_id}
                              for name, message_id in self.published],
                'notes': self.notes, 'error': self.error or None, 'summary': self.summary}


def _batches(pks: Sequence[int]) -> Iterable[list[int]]:
    for start in range(0, len(pks), BATCH):
        yield list(pks[start:start + BATCH])


def _unique(pks: Iterable[int], result: Result) -> list[int]:
    chosen = list(dict.fromkeys(pks))
    if len(chosen) > MAX_ROWS:
        result.capped = True
    return chosen[:MAX_ROWS]


def _locked(alias: str, pks: list[int]) -> list[MessageLog]:
    rows = MessageLog.objects.using(alias).filter(pk__in=pks).order_by('pk')
    if connections[alias].features.has_select_for_update:
        rows = rows.select_for_update()
    return list(rows)


def requeue(pks: Iterable[int]) -> Result:
    """Send FAILED tasks again: the same message (same message id), the same row.

    In one transaction per batch the rows go back to PUBLISHED (their failure, output and
    log cleared, their publish time now) and their messages are sent when it commits,
    through carrot's own publishing path: a worker that receives one finds its row
    PUBLISHED and runs it. A message that cannot be sent leaves its row FAILED, saying why.
    Orphaned and stuck rows (``carrot.monitor.health``) are requeued too, once checked
    again here. Other rows are skipped: a queued or running task will run, a completed one
    has run (publish it anew if it should run again).
    """
    result = Result(MonitorAction.REQUEUE)
    alias = lifecycle.database()
    now = timezone.now()
    live = set(heartbeats.live_workers(now))
    thresholds: dict[str, datetime.timedelta] = {}
    ready: dict[str, int | None] = {}

    def why_not(row: MessageLog) -> str | None:
        """None when ``row`` may be requeued, else why not."""
        if row.status == MessageLog.FAILED:
            return None
        if heartbeats.is_orphaned(row, live, now):
            return None  # its worker stopped reporting
        if health.is_stuck_age(row, now, thresholds):
            queue = row.queue or ''
            if queue not in ready:
                ready.update(health.ready_counts([queue], fresh=True))
            if ready[queue] == 0:
                return None  # stuck: its message is not in its queue
        return (f'it is {row.get_status_display().lower()}; only failed, orphaned and stuck '
                f'tasks are requeued')

    for batch in _batches(_unique(pks, result)):
        sends: list[oncommit.Send] = []
        with transaction.atomic(using=alias):
            rows = _locked(alias, batch)
            for missing in sorted(set(batch) - {row.pk for row in rows}):
                result.skip(missing, 'no such task (deleted?)')
            chosen = []
            for row in rows:
                refused = why_not(row)
                if refused is not None:
                    result.skip(row.pk, refused)
                    continue
                try:
                    chosen.append((row, message_of(row)))
                except Exception as error:
                    result.skip(row.pk, f'cannot be published again: {error}')
            lifecycle.mark_requeued(alias, [row.uuid for row, _ in chosen], REQUEUED_FROM)
            for row, task_message in chosen:
                expires_at = task_message.task_message.expires_at
                if expires_at != row.expires_at:  # a new expiry, counted from now
                    MessageLog.objects.using(alias).filter(pk=row.pk).update(
                        expires_at=expires_at)
                sends.append(oncommit.send_on_commit(task_message, row, alias))
        for send in sends:  # sent on commit: each outcome is known now
            if send.outcome in (oncommit.Outcome.SENT, oncommit.Outcome.WAITING):
                result.count += 1  # WAITING: inside the caller's transaction, sent on its commit
            else:
                result.skip(send.log.pk, f'not sent ({send.outcome.value}): its row says why')
    return result


def message_of(row: MessageLog) -> Message:
    """The message of ``row`` as carrot publishes it, with the row's own message id.

    Validated as any publish is (the task registered, the queue known, the arguments JSON);
    raises otherwise. Tracked even on an untracked queue: the row exists, and the worker must
    write how this run ends into it.
    """
    args = _parse_arguments(row.task_args, [])
    kwargs = _parse_arguments(row.content, {})
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        raise ValueError('its arguments are not a list and an object')
    created = create_message(
        row.task, priority=row.priority, task_args=list(args), queue=row.queue or None,
        exchange=row.exchange or '', routing_key=row.routing_key or None, task_kwargs=kwargs,
        tracked=True, options=row.options if isinstance(row.options, dict) else None,
    )
    return dataclasses.replace(
        created, task_message=dataclasses.replace(created.task_message, message_id=row.uuid))


#: The statuses a row may be deleted in: a queued or running task's row would only be
#: written again by the worker that runs it. A DELAYED row has no message yet: deleting it
#: cancels the task.
DELETABLE = (MessageLog.COMPLETED, MessageLog.FAILED, MessageLog.DELAYED)


def delete(pks: Iterable[int]) -> Result:
    """Delete finished (COMPLETED or FAILED) task rows, and cancel DELAYED ones by deleting
    theirs; others are skipped."""
    result = Result(MonitorAction.DELETE)
    alias = lifecycle.database()
    for batch in _batches(_unique(pks, result)):
        with transaction.atomic(using=alias):
            rows = _locked(alias, batch)
            for missing in sorted(set(batch) - {row.pk for row in rows}):
                result.skip(missing, 'no such task (deleted already?)')
            finished = []
            for row in rows:
                if row.status in DELETABLE:
                    finished.append(row.pk)
                else:
                    result.skip(row.pk, f'it is {row.get_status_display().lower()}; only '
                                        f'completed, failed and delayed tasks are deleted')
            deleted, _ = MessageLog.objects.using(alias).filter(
                pk__in=finished, status__in=DELETABLE).delete()
            result.count += deleted
    return result


def _schedules(pks: Iterable[int], result: Result) -> list[ScheduledTask]:
    chosen = _unique(pks, result)
    rows = list(ScheduledTask.objects.filter(pk__in=chosen).order_by('pk'))
    for missing in sorted(set(chosen) - {row.pk for row in rows}):
        result.skip(missing, 'no such scheduled task')
    return rows


def run_now(pks: Iterable[int]) -> Result:
    """Publish each scheduled task at once; its schedule is left as it is."""
    result = Result(MonitorAction.RUN_NOW)
    for row in _schedules(pks, result):
        try:
            log = row.run_now()
        except Exception as error:
            result.skip(row.pk, f'{row.task_name} not published: {error}')
        else:
            result.count += 1
            result.published.append((row.task_name, log.uuid))
    return result


def set_active(pks: Iterable[int], active: bool) -> Result:
    """Pause (``active`` False) or resume scheduled tasks.

    Saved through the model, so a resumed schedule gets its next run on its schedule
    (not the runs it missed while paused).
    """
    result = Result(MonitorAction.RESUME if active else MonitorAction.PAUSE)
    for row in _schedules(pks, result):
        if row.active == active:
            result.skip(row.pk, f'{row.task_name} is {"active" if active else "paused"} already')
            continue
        row.active = active
        try:
            row.save(update_fields=['active'])
        except ValueError as error:  # a schedule that does not parse
            result.skip(row.pk, f'{row.task_name}: {error}')
        else:
            result.count += 1
    return result


def save_schedule(form: ScheduleForm, username: str) -> Result:
    """Save a valid schedule form, a new scheduled task or the fields changed of one, and
    its audit record, in one transaction.

    An edit writes only the fields it changed, onto the row locked afresh: the scheduler
    may have moved ``next_run_at`` on since the form was loaded, and must not be undone.
    """
    row = form.instance
    creating = row.pk is None
    result = Result(MonitorAction.CREATE if creating else MonitorAction.EDIT, count=1)
    with transaction.atomic():
        if creating:
            form.save()
            result.notes.append(f'{row.task} {row.interval_display}')
        else:
            changed = form.changed_fields()
            fresh = ScheduledTask.objects.select_for_update().get(pk=row.pk)
            for name in changed:
                setattr(fresh, name, getattr(row, name))
            if changed:
                fresh.save(update_fields=changed)
            form.instance = fresh
            result.notes.append(f'changed {form.changes()}')
        record(result, username, f'scheduled task {form.instance.task_name}')
    return result


def record(result: Result, username: str, target: str) -> Result:
    """Write the audit record of ``result``."""
    detail = '; '.join([*result.notes, *result.reasons,
                        *(f'{name} published as message {message_id}'
                          for name, message_id in result.published[:MAX_REASONS])])
    if result.skipped:
        detail = f'skipped {result.skipped}: {detail}'
    if result.capped:
        detail = f'capped at {result.limit} {result.unit}. {detail}'
    if result.error:
        detail = f'stopped: {result.error}. {detail}'
    entry = MonitorAction.objects.create(
        username=username[:150], action=result.action, target=target, count=result.count,
        detail=detail)
    result.audit_id = entry.pk
    return result


def describe_ids(noun: str, pks: Sequence[int]) -> str:
    """``tasks 3, 5 and 9`` for the audit log; long selections are cut short."""
    shown = ', '.join(str(pk) for pk in pks[:20])
    more = f' and {len(pks) - 20} more' if len(pks) > 20 else ''
    return f'{noun} {shown}{more}' if pks else f'no {noun}'


#: The task actions of the monitor's pages and API, by the name in their URLs, each with
#: the lists it takes "all matching" from. Requeue takes queued and running rows too: the
#: stuck and orphaned ones among them (``health``), the rest skipped.
TASK_ACTIONS: dict[str, tuple[Callable[[list[int]], Result], tuple[str, ...]]] = {
    'requeue': (requeue, ('failed', 'running', 'queued')),
    'delete': (delete, ('failed', 'completed', 'delayed')),
}

#: The schedule actions of the monitor's pages and API, by the name in their URLs.
SCHEDULE_ACTIONS: dict[str, Callable[[list[int]], Result]] = {
    'run': run_now,
    'pause': lambda pks: set_active(pks, False),
    'resume': lambda pks: set_active(pks, True),
}
