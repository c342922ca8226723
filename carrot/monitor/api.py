"""The monitor's JSON API: what the pages show (GET) and do (POST), under the same prefix.

The same access rules as the pages: the session's user, staff only by default (or the
project's ``monitor_authentication``), CSRF on every POST (send the ``csrftoken`` cookie's
value in an ``X-CSRFToken`` header), read-only viewers refused with 403. No answer holds a
broker password: brokers appear as ``Broker.display``, the password masked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import ensure_csrf_cookie

from carrot import __version__
from carrot.conf import get_settings
from carrot.models import MessageLog, MonitorAction, ScheduledTask
from carrot.monitor import access, actions, forms, health, openapi, overview, queries
from carrot.monitor.access import monitor_view
from carrot.monitor.views import url


def _time(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def task_json(request: HttpRequest, row: MessageLog, full: bool = False) -> dict[str, Any]:
    found: dict[str, Any] = {
        'id': row.pk,
        'message_id': row.uuid,
        'status': queries.STATUS_NAMES.get(row.status, row.status),
        'task': row.task,
        'queue': row.queue,
        'exchange': row.exchange,
        'routing_key': row.routing_key,
        'priority': row.priority,
        'attempts': row.attempts,
        'args': row.positionals,
        'kwargs': row.keywords,
        'exception': row.exception,
        'publish_time': _time(row.publish_time),
        'start_time': _time(row.start_time),
        'worker': row.worker,
        'completion_time': _time(row.completion_time),
        'failure_time': _time(row.failure_time),
        'run_after': _time(row.run_after),
        'expires_at': _time(row.expires_at),
        'url': url(request, 'api-task-detail', row.pk),
        'page': url(request, 'task-detail', row.pk),
    }
    if full:
        found.update({'output': row.output, 'traceback': row.traceback,
                      'options': row.options or {}, 'errors': row.errors or []})
    return found


def schedule_json(request: HttpRequest, row: ScheduledTask) -> dict[str, Any]:
    return {
        'id': row.pk,
        'task_name': row.task_name,
        'task': row.task,
        'schedule': row.interval_display,
        'crontab': row.crontab,
        'interval_type': row.interval_type,
        'interval_count': row.interval_count,
        'queue': row.queue,
        'priority': row.priority,
        'args': row.positionals,
        'kwargs': row.keywords,
        'active': row.active,
        'last_run_at': _time(row.last_run_at),
        'next_run_at': _time(row.next_run_at),
        'url': url(request, 'api-schedule-detail', row.pk),
        'page': url(request, 'schedule-detail', row.pk),
    }


def audit_json(row: MonitorAction) -> dict[str, Any]:
    return {'id': row.pk, 'user': row.username, 'action': row.action, 'target': row.target,
            'count': row.count, 'detail': row.detail, 'at': _time(row.at)}


def _error(message: str, status: int = 400) -> JsonResponse:
    return JsonResponse({'error': message}, status=status)


def _page_json(request: HttpRequest, page: queries.Page[Any], name: str, args: tuple[Any, ...],
               params: dict[str, str], items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        'results': items,
        'next': url(request, name, *args, query={**params, 'after': page.next_after})
        if page.next_after else None,
        'note': page.note or None,
    }


@monitor_view
@ensure_csrf_cookie
def root(request: HttpRequest) -> HttpResponse:
    """What the API offers, the viewer's rights, and the queues (brokers masked).

    Sets the ``csrftoken`` cookie that POSTs need.
    """
    settings = get_settings()
    return JsonResponse({
        'user': access.who(request),
        'read_only': access.read_only(request),
        'queues': [{'name': q.name, 'broker': q.broker.display, 'consumable': q.consumable,
                    'concurrency': q.concurrency} for q in settings.queues],
        'statuses': list(queries.STATUSES),
        'links': {
            **{f'tasks_{name}': url(request, 'api-task-list', name) for name in queries.STATUSES},
            'schedules': url(request, 'api-schedule-list'),
            'audit': url(request, 'api-audit'),
            'health': url(request, 'api-health'),
            'dead_letters': url(request, 'api-dead-letter-queues'),
            'openapi': url(request, 'api-openapi'),
            'overview': url(request, 'api-overview'),
            'requeue': url(request, 'api-task-action', 'requeue'),
            'delete': url(request, 'api-task-action', 'delete'),
            'run': url(request, 'api-schedule-action', 'run'),
            'pause': url(request, 'api-schedule-action', 'pause'),
            'resume': url(request, 'api-schedule-action', 'resume'),
        },
        'max_rows_per_action': actions.MAX_ROWS,
    })


@monitor_view
def openapi_document(request: HttpRequest) -> HttpResponse:
    """The OpenAPI 3.1 document of this API, its server where this monitor is mounted."""
    return JsonResponse(openapi.document(url(request, 'index'), __version__))


@monitor_view
def task_list(request: HttpRequest, status: str) -> HttpResponse:
    try:
        chosen = queries.TaskFilter.from_params(status, request.GET)
        page = queries.task_page(chosen, queries.cursor(request.GET.get('after')),
                                 queries.page_size(request.GET.get('limit')))
    except queries.FilterError as error:
        return _error(str(error))
    found = _page_json(request, page, 'api-task-list', (status,), chosen.params(),
                       [task_json(request, row) for row in page.rows])
    if not chosen.args:
        found['count'] = queries.capped_count(chosen.queryset()).as_json()
    found['counts'] = {name: count.as_json()
                       for name, count in queries.status_counts(chosen).items()}
    return JsonResponse(found)


@monitor_view
def task_detail(request: HttpRequest, pk: int) -> HttpResponse:
    row = MessageLog.objects.filter(pk=pk).first()
    if row is None:
        return _error(f'No task has the id {pk}.', 404)
    found = task_json(request, row, full=True)
    lines = queries.log_lines(row.log, str(request.GET.get('level', '')),
                              str(request.GET.get('q', '')))
    found['log'] = [{'line': line.number, 'level': line.level, 'text': line.full}
                    for line in lines]
    return JsonResponse(found)


@monitor_view
def task_find(request: HttpRequest) -> HttpResponse:
    text = str(request.GET.get('id', ''))
    row = queries.find_task(text)
    if row is None:
        return _error(f'No task has the message id or row id {text!r}.', 404)
    return JsonResponse(task_json(request, row, full=True))


@monitor_view
def schedule_list(request: HttpRequest) -> HttpResponse:
    """GET: a page of scheduled tasks. POST: create one (the fields of ``schedule_json``)."""
    if request.method == 'POST':
        return _save_schedule(request, ScheduledTask())
    try:
        page = queries.keyset(ScheduledTask.objects.all(),
                              queries.cursor(request.GET.get('after')),
                              queries.page_size(request.GET.get('limit')))
    except queries.FilterError as error:
        return _error(str(error))
    return JsonResponse(_page_json(request, page, 'api-schedule-list', (), {},
                                   [schedule_json(request, row) for row in page.rows]))


@monitor_view
def schedule_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """GET: one scheduled task. POST: change the fields given, keep the others."""
    row = ScheduledTask.objects.filter(pk=pk).first()
    if row is None:
        return _error(f'No scheduled task has the id {pk}.', 404)
    if request.method == 'POST':
        return _save_schedule(request, row)
    return JsonResponse(schedule_json(request, row))


#: The fields of a scheduled task in the API, with their JSON types, and the form's name of
#: each where it differs.
_SCHEDULE_TYPES: dict[str, tuple[type | tuple[type, ...], str]] = {
    'task_name': (str, 'a string'), 'task': (str, 'a dotted task path (a string)'),
    'crontab': (str, "a cron expression, or '' for the interval"),
    'interval_type': (str, 'seconds, minutes, hours or days'),
    'interval_count': (int, 'a whole number of at least 1'),
    'queue': ((str, type(None)), 'a queue name, or null for the default queue'),
    'priority': (int, 'a whole number'), 'args': (list, 'a JSON list'),
    'kwargs': (dict, 'a JSON object'), 'active': (bool, 'true or false'),
}
_FORM_NAMES = {'args': 'task_args', 'kwargs': 'content'}
_API_NAMES = {form: api for api, form in _FORM_NAMES.items()}


def _schedule_body(request: HttpRequest, creating: bool) -> dict[str, Any]:
    """The fields a POST gives, each of its type; FilterError says what is wrong."""
    if request.content_type != 'application/json':
        raise queries.FilterError('Send the scheduled task as a JSON object '
                                  '(Content-Type: application/json).')
    body = dict(_body(request))
    unknown = sorted(set(body) - set(_SCHEDULE_TYPES))
    if unknown:
        raise queries.FilterError(f'Unknown fields {", ".join(unknown)}: a scheduled task has '
                                  f'{", ".join(_SCHEDULE_TYPES)}.')
    for name, value in body.items():
        kind, what = _SCHEDULE_TYPES[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise queries.FilterError(f'{name} must be {what}, not {json.dumps(value)}.')
    interval = {'interval_type', 'interval_count'} & set(body)
    if creating and not body.get('crontab') and len(interval) < 2:
        raise queries.FilterError('Give a schedule: a crontab, or interval_type and '
                                  'interval_count.')
    if 'crontab' in body and not body['crontab'] and len(interval) < 2:
        raise queries.FilterError("A crontab of '' runs on the interval: give interval_type "
                                  "and interval_count with it.")
    if body.get('crontab') and interval:
        raise queries.FilterError("A crontab replaces the interval: send either, or crontab "
                                  "'' with the interval.")
    return body


def _save_schedule(request: HttpRequest, row: ScheduledTask) -> HttpResponse:
    refused = _acting(request)
    if refused is not None:
        return refused
    creating = row.pk is None
    try:
        body = _schedule_body(request, creating)
    except queries.FilterError as error:
        return _error(str(error))
    data = {name: value for name, value in forms.ScheduleForm(instance=row).initial.items()
            if name in forms.FIELDS}
    if creating:
        data['active'] = True
    for name, value in body.items():
        field = _FORM_NAMES.get(name, name)
        data[field] = json.dumps(value) if field in ('task_args', 'content') else value
    if not data.get('active'):
        data.pop('active', None)  # an unchecked box: a form leaves it out
    form = forms.ScheduleForm({key: '' if value is None else value
                               for key, value in data.items()}, instance=row)
    if not form.is_valid():
        return JsonResponse({'error': 'The scheduled task was not saved.',
                             'errors': {_API_NAMES.get(name, name): [str(text) for text in texts]
                                        for name, texts in form.errors.items()}}, status=400)
    result = actions.save_schedule(form, access.who(request))
    return JsonResponse({**result.as_json(), 'schedule': schedule_json(request, form.instance),
                         'next_runs': [moment.isoformat() for moment in form.upcoming]},
                        status=201 if creating else 200)


@monitor_view
def overview_report(request: HttpRequest) -> HttpResponse:
    """Per queue: ready, consumers, and the rollups of the last hour and days
    (``carrot.monitor.overview``); times in seconds."""
    return JsonResponse(overview.report().as_json())


@monitor_view
def health_report(request: HttpRequest) -> HttpResponse:
    """Workers, orphaned and stuck tasks, late schedules (``carrot.monitor.health``)."""
    found = health.report()
    return JsonResponse({
        'workers': [{'worker': beat.worker, 'queues': beat.queues, 'scheduler': beat.scheduler,
                     'started_at': _time(beat.started_at), 'seen_at': _time(beat.seen_at),
                     'alive': beat.seen_at >= found.stale_before} for beat in found.workers],
        'orphaned': [task_json(request, row) for row in found.orphaned],
        'stuck': [task_json(request, row) for row in found.stuck],
        'late': [schedule_json(request, row) for row in found.late],
        'ready': found.ready,
    })


@monitor_view
def audit(request: HttpRequest) -> HttpResponse:
    try:
        page = queries.keyset(MonitorAction.objects.all(),
                              queries.cursor(request.GET.get('after')),
                              queries.page_size(request.GET.get('limit')))
    except queries.FilterError as error:
        return _error(str(error))
    return JsonResponse(_page_json(request, page, 'api-audit', (), {},
                                   [audit_json(row) for row in page.rows]))


def _body(request: HttpRequest) -> Mapping[str, Any]:
    """A POST's fields: a JSON object, or a form."""
    if request.content_type == 'application/json':
        try:
            found = json.loads(request.body or b'{}')
        except ValueError as error:
            raise queries.FilterError(f'The body is not JSON: {error}.') from None
        if not isinstance(found, dict):
            raise queries.FilterError('The body must be a JSON object.')
        return found
    form = request.POST
    return {**{key: form.get(key) for key in form}, 'ids': form.getlist('ids')}


def _ids(body: Mapping[str, Any]) -> list[int]:
    raw = body.get('ids') or []
    if not isinstance(raw, list):
        raise queries.FilterError('ids must be a list of row ids.')
    try:
        return [int(value) for value in raw]
    except (TypeError, ValueError):
        raise queries.FilterError('ids must be a list of row ids.') from None


def _acting(request: HttpRequest) -> HttpResponse | None:
    if request.method != 'POST':
        return _error('Use POST: nothing changes on a GET.', 405)
    if access.read_only(request):
        return _error(access.why_read_only(request), 403)
    return None


@monitor_view
def task_action(request: HttpRequest, action: str) -> HttpResponse:
    """POST ``{"ids": [...]}``, or ``{"all": true, "status": ..., <filters>}``."""
    refused = _acting(request)
    if refused is not None:
        return refused
    perform, statuses = actions.TASK_ACTIONS[action]
    try:
        body = _body(request)
        if body.get('all') in (True, '1', 'true'):
            status = str(body.get('status') or statuses[0])
            if status not in statuses:
                raise queries.FilterError(
                    f'{action} takes {" or ".join(statuses)} tasks, not {status!r} ones.')
            chosen = queries.TaskFilter.from_params(status, body)
            pks = list(chosen.matches_args(chosen.queryset())
                       .values_list('pk', flat=True)[:actions.MAX_ROWS + 1])
            target = f'all {chosen.describe()}'
        else:
            pks = _ids(body)
            target = actions.describe_ids('tasks', pks)
    except queries.FilterError as error:
        return _error(str(error))
    result = actions.record(perform(pks), access.who(request), target)
    return JsonResponse(result.as_json())


@monitor_view
def schedule_action(request: HttpRequest, action: str) -> HttpResponse:
    """POST ``{"ids": [...]}``."""
    refused = _acting(request)
    if refused is not None:
        return refused
    try:
        pks = _ids(_body(request))
    except queries.FilterError as error:
        return _error(str(error))
    result = actions.record(actions.SCHEDULE_ACTIONS[action](pks), access.who(request),
                            actions.describe_ids('scheduled tasks', pks))
    return JsonResponse(result.as_json())
