"""The monitor's pages: server-rendered lists and detail pages, POST forms for actions.

Nothing here changes anything on a GET. Every action is a POST through ``actions``, with
CSRF protection (``access.monitor_view``), refused to a read-only viewer, and recorded in
the audit log.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any

from django.contrib import messages
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme, urlencode

from carrot import schedules
from carrot.models import MessageLog, MonitorAction, ScheduledTask
from carrot.monitor import access, actions, health, overview, queries
from carrot.monitor.access import monitor_view
from carrot.monitor.forms import ScheduleForm

#: Seconds between live refreshes of a page's changing regions.
REFRESH_SECONDS = 5
STATIC = Path(__file__).resolve().parent.parent / 'static' / 'carrot'
ASSETS = ('monitor.css', 'monitor.js')


def url(request: HttpRequest, name: str, *args: Any, query: dict[str, Any] | None = None) -> str:
    """A monitor URL under the prefix (and URL namespace) this request came in by."""
    namespace = request.resolver_match.namespace if request.resolver_match else 'carrot'
    found = reverse(f'carrot:{name}', args=args, current_app=namespace)
    return f'{found}?{urlencode(query, doseq=True)}' if query else found


def _page(request: HttpRequest, template: str, context: dict[str, Any],
          status: int = 200) -> HttpResponse:
    context.setdefault('refresh_seconds', 0)
    return render(request, f'carrot/monitor/{template}', {
        'read_only': access.read_only(request),
        'read_only_reason': access.why_read_only(request),
        'viewer': access.who(request),
        'statuses': list(queries.STATUSES),
        **context,
    }, status=status)


def _bad_filter(request: HttpRequest, error: queries.FilterError) -> HttpResponse:
    return _page(request, 'refused.html', {'reason': str(error), 'title': 'Bad filter'},
                 status=400)


@monitor_view
def index(request: HttpRequest) -> HttpResponse:
    return HttpResponseRedirect(url(request, 'overview'))


@monitor_view
def task_list(request: HttpRequest, status: str) -> HttpResponse:
    try:
        chosen = queries.TaskFilter.from_params(status, request.GET)
        after = queries.cursor(request.GET.get('after'))
        page = queries.task_page(chosen, after, queries.page_size(request.GET.get('limit')))
    except queries.FilterError as error:
        return _bad_filter(request, error)
    params = chosen.params()
    return _page(request, 'task_list.html', {
        'title': f'{status.capitalize()} tasks',
        'filter': chosen,
        'status': status,
        'page': page,
        'counts': queries.status_counts(chosen),
        'queues': queries.queue_names(),
        'filter_query': urlencode(params),
        'next_url': (url(request, 'task-list', status, query={**params, 'after': page.next_after})
                     if page.next_after else ''),
        'first_url': url(request, 'task-list', status, query=params) if after else '',
        'can_requeue': status == 'failed',
        'can_delete': status in ('failed', 'completed', 'delayed'),
        'refresh_seconds': REFRESH_SECONDS if after is None else 0,
        'back': request.get_full_path(),
    })


@monitor_view
def task_find(request: HttpRequest) -> HttpResponse:
    text = str(request.GET.get('id', ''))
    found = queries.find_task(text)
    if found is None:
        return _page(request, 'refused.html', {
            'title': 'Not found', 'reason': f'No task has the message id or row id {text!r}.'},
            status=404)
    return HttpResponseRedirect(url(request, 'task-detail', found.pk))


@monitor_view
def task_detail(request: HttpRequest, pk: int) -> HttpResponse:
    row = get_object_or_404(MessageLog, pk=pk)
    level = str(request.GET.get('level', ''))
    search = str(request.GET.get('q', ''))
    lines = queries.log_lines(row.log, level, search)
    unfinished = row.status in (MessageLog.PUBLISHED, MessageLog.DELAYED, MessageLog.IN_PROGRESS)
    return _page(request, 'task_detail.html', {
        'title': f'Task {row.pk}',
        'row': row,
        'status_name': queries.STATUS_NAMES.get(row.status, ''),
        'lines': lines,
        'total_lines': len(queries.log_lines(row.log)) if (level or search) else len(lines),
        'level': level.upper(),
        'levels': queries.LEVELS,
        'search': search,
        'ended': row.completion_time or row.failure_time,
        'refresh_seconds': REFRESH_SECONDS if unfinished else 0,
        'back': request.get_full_path(),
    })


def _selected(request: HttpRequest) -> list[int]:
    chosen = []
    for value in request.POST.getlist('ids'):
        try:
            chosen.append(int(value))
        except ValueError:
            continue
    return chosen


def _done(request: HttpRequest, result: actions.Result, fallback: str) -> HttpResponse:
    level = (messages.SUCCESS if (result.count or not result.skipped) and not result.error
             else messages.WARNING)
    text = result.summary
    if result.reasons and result.skipped:
        text += ' ' + '; '.join(result.reasons[:5])
    messages.add_message(request, level, text, fail_silently=True)
    back = str(request.POST.get('next', ''))
    if not url_has_allowed_host_and_scheme(back, {request.get_host()},
                                           require_https=request.is_secure()):
        back = fallback
    return HttpResponseRedirect(back)


@monitor_view
def task_action(request: HttpRequest, action: str) -> HttpResponse:
    """Requeue or delete: the chosen rows (``ids``), or every row matching a filter.

    GET shows the confirmation of "every row matching" (and changes nothing); POST acts.
    """
    perform, statuses = actions.TASK_ACTIONS[action]
    source = request.POST if request.method == 'POST' else request.GET
    status = str(source.get('status', statuses[0]))
    if status not in statuses:
        return _bad_filter(request, queries.FilterError(
            f'{action} takes {" or ".join(statuses)} tasks, not {status!r} ones.'))
    try:
        chosen = queries.TaskFilter.from_params(status, source)
    except queries.FilterError as error:
        return _bad_filter(request, error)
    if request.method not in ('GET', 'POST'):
        return HttpResponseNotAllowed(['GET', 'POST'])
    if access.read_only(request):
        return access.refuse(request, access.why_read_only(request))
    everything = source.get('all') == '1'
    if request.method == 'GET' or (everything and source.get('confirm') != '1'):
        if not everything:
            return HttpResponseRedirect(url(request, 'task-list', status, query=chosen.params()))
        return _page(request, 'confirm.html', {
            'title': f'{action.capitalize()} {chosen.describe()}',
            'action': action, 'filter': chosen, 'status': status,
            'count': queries.capped_count(chosen.matches_args(chosen.queryset())),
            'max_rows': actions.MAX_ROWS,
            'back': url(request, 'task-list', status, query=chosen.params()),
        })
    if everything:
        pks = list(chosen.matches_args(chosen.queryset())
                   .values_list('pk', flat=True)[:actions.MAX_ROWS + 1])
        target = f'all {chosen.describe()}'
    else:
        pks = _selected(request)
        target = actions.describe_ids('tasks', pks)
    result = actions.record(perform(pks), access.who(request), target)
    return _done(request, result, url(request, 'task-list', status, query=chosen.params()))


@monitor_view
def schedule_list(request: HttpRequest) -> HttpResponse:
    try:
        after = queries.cursor(request.GET.get('after'))
        size = queries.page_size(request.GET.get('limit'))
    except queries.FilterError as error:
        return _bad_filter(request, error)
    rows = ScheduledTask.objects.all()
    name = str(request.GET.get('task', '')).strip()
    if name:
        rows = rows.filter(task_name__startswith=name) | rows.filter(task__startswith=name)
    page = queries.keyset(rows, after, size)
    query = {'task': name} if name else {}
    return _page(request, 'schedule_list.html', {
        'title': 'Scheduled tasks', 'section': 'schedules', 'page': page, 'name': name,
        'next_url': (url(request, 'schedule-list', query={**query, 'after': page.next_after})
                     if page.next_after else ''),
        'first_url': url(request, 'schedule-list', query=query) if after else '',
        'refresh_seconds': REFRESH_SECONDS if after is None else 0,
        'back': request.get_full_path(),
    })


@monitor_view
def schedule_detail(request: HttpRequest, pk: int) -> HttpResponse:
    row = get_object_or_404(ScheduledTask, pk=pk)
    recent = list(MessageLog.objects.filter(task=row.task).defer(*queries.LIST_DEFERRED)
                  .order_by('-id')[:10])
    try:
        upcoming = (schedules.upcoming(row.schedule, timezone.now(), row.next_run_at)
                    if row.active else [])
    except ValueError:
        upcoming = []
    return _page(request, 'schedule_detail.html', {
        'title': row.task_name, 'section': 'schedules', 'row': row, 'recent': recent,
        'upcoming': upcoming,
        'back': request.get_full_path(),
    })


@monitor_view
def schedule_form(request: HttpRequest, pk: int | None = None) -> HttpResponse:
    """Create (``pk`` None) or edit a scheduled task; GET shows the form, POST saves it.

    A POST with ``preview`` shows the next five runs of what was typed and saves nothing.
    """
    if access.read_only(request):
        return access.refuse(request, access.why_read_only(request))
    if request.method not in ('GET', 'POST'):
        return HttpResponseNotAllowed(['GET', 'POST'])
    row = get_object_or_404(ScheduledTask, pk=pk) if pk is not None else ScheduledTask()
    form = ScheduleForm(request.POST if request.method == 'POST' else None, instance=row)
    if request.method == 'POST' and 'preview' not in request.POST and form.is_valid():
        result = actions.save_schedule(form, access.who(request))
        messages.success(request, f'{result.summary[:-1]}: {form.instance.task_name}.',
                         fail_silently=True)
        return HttpResponseRedirect(url(request, 'schedule-detail', form.instance.pk))
    if request.method == 'POST':
        form.is_valid()  # a preview: the errors and the next runs, nothing saved
    return _page(request, 'schedule_form.html', {
        'title': f'Edit {row.task_name}' if pk is not None else 'New scheduled task',
        'section': 'schedules', 'form': form, 'row': row,
    }, status=400 if request.method == 'POST' and form.errors else 200)


@monitor_view
def schedule_action(request: HttpRequest, action: str) -> HttpResponse:
    if request.method != 'POST':
        return HttpResponseNotAllowed(['POST'])
    if access.read_only(request):
        return access.refuse(request, access.why_read_only(request))
    pks = _selected(request)
    result = actions.SCHEDULE_ACTIONS[action](pks)
    actions.record(result, access.who(request), actions.describe_ids('scheduled tasks', pks))
    return _done(request, result, url(request, 'schedule-list'))


@monitor_view
def overview_page(request: HttpRequest) -> HttpResponse:
    """Per queue: ready, consumers, tasks per minute, failure rate, wait and run times, over
    the last hour and the last days (``carrot.monitor.overview``)."""
    return _page(request, 'overview.html', {
        'title': 'Overview', 'section': 'overview', 'report': overview.report(),
        'sources': overview.SOURCES, 'refresh_seconds': REFRESH_SECONDS,
    })


@monitor_view
def health_page(request: HttpRequest) -> HttpResponse:
    """Workers and their heartbeats, orphaned and stuck tasks, late schedules."""
    return _page(request, 'health.html', {
        'title': 'Health', 'section': 'health', 'report': health.report(),
        'refresh_seconds': REFRESH_SECONDS, 'back': request.get_full_path(),
    })


@monitor_view
def audit_list(request: HttpRequest) -> HttpResponse:
    try:
        after = queries.cursor(request.GET.get('after'))
        size = queries.page_size(request.GET.get('limit'))
    except queries.FilterError as error:
        return _bad_filter(request, error)
    page = queries.keyset(MonitorAction.objects.all(), after, size)
    return _page(request, 'audit.html', {
        'title': 'Audit log', 'page': page,
        'next_url': url(request, 'audit', query={'after': page.next_after})
        if page.next_after else '',
        'first_url': url(request, 'audit') if after else '',
    })


@monitor_view
def asset(request: HttpRequest, name: str) -> HttpResponse:
    """The monitor's CSS and JavaScript, served from the package: no static files setup."""
    if name not in ASSETS:
        raise Http404(name)
    content_type, _ = mimetypes.guess_type(name)
    response = HttpResponse((STATIC / name).read_bytes(), content_type=content_type)
    response['Cache-Control'] = 'private, max-age=3600'
    return response
