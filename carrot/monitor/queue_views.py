"""The monitor's pages and API for RabbitMQ's queues: the dead-letter queues and what is in
them, and purging a queue. Each change asks for a confirmation first (a POST without
``confirm=1`` shows it; the API needs none), and is audited.
"""

from __future__ import annotations

import json
from typing import Any

from amqpstorm.exception import AMQPError
from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, JsonResponse

from carrot import deadletters, queues
from carrot.broker import get_publisher
from carrot.conf import get_settings
from carrot.exceptions import CarrotConfigException, CarrotError
from carrot.monitor import access, actions, queue_actions
from carrot.monitor.access import monitor_view
from carrot.monitor.views import _done, _page, url

#: The dead-letter actions by the name in their URLs.
DEAD_ACTIONS = {'requeue': queue_actions.requeue_dead, 'purge': queue_actions.purge_dead}


def _unknown(request: HttpRequest, error: CarrotConfigException) -> HttpResponse:
    if access.is_api(request):
        return JsonResponse({'error': str(error)}, status=404)
    return _page(request, 'refused.html', {'title': 'No such queue', 'reason': str(error)},
                 status=404)


def _unreachable(request: HttpRequest, error: Exception) -> HttpResponse:
    reason = f'RabbitMQ did not answer: {error}'
    if access.is_api(request):
        return JsonResponse({'error': reason}, status=503)
    return _page(request, 'refused.html', {'title': 'RabbitMQ did not answer',
                                           'reason': reason}, status=503)


def _letter_json(request: HttpRequest, letter: deadletters.DeadLetter) -> dict[str, Any]:
    return {'message_id': letter.message_id, 'task': letter.task, 'reason': letter.reason,
            'dead_at': letter.dead_at.isoformat() if letter.dead_at else None,
            'task_url': url(request, 'api-task-find', query={'id': letter.message_id})
            if letter.message_id else None}


def _waiting() -> list[tuple[str, str, int | None]]:
    """Each queue, its dead-letter queue and the letters waiting there (None where RabbitMQ
    did not say), by passive declares on the publishing connection."""
    found: list[tuple[str, str, int | None]] = []
    for queue in get_settings().queues:
        try:
            counts = get_publisher().queue_counts(queue.broker, [queue.dead_letter_queue])
            waiting: int | None = counts[queue.dead_letter_queue].ready
        except (CarrotError, AMQPError):
            waiting = None
        found.append((queue.name, queue.dead_letter_queue, waiting))
    return found


@monitor_view
def dead_letter_queues(request: HttpRequest) -> HttpResponse:
    """Each queue and how many dead letters it holds."""
    counts = _waiting()
    if access.is_api(request):
        return JsonResponse({'results': [
            {'queue': name, 'dead_letter_queue': dead, 'waiting': waiting,
             'url': url(request, 'api-dead-letters', name)} for name, dead, waiting in counts]})
    return _page(request, 'dead_letter_queues.html', {
        'title': 'Dead letters', 'section': 'dead-letters', 'counts': counts})


@monitor_view
def dead_letters(request: HttpRequest, name: str) -> HttpResponse:
    """The first dead letters of queue ``name``, of one task when ``task`` says so."""
    task = str(request.GET.get('task', '')).strip()
    try:
        found = deadletters.inspect(queue_actions.selection(
            name, task, queue_actions.SHOWN_LETTERS))
    except CarrotConfigException as error:
        return _unknown(request, error)
    except (CarrotError, AMQPError) as error:
        return _unreachable(request, error)
    if access.is_api(request):
        return JsonResponse({'queue': name, 'waiting': found.waiting, 'read': found.read,
                             'results': [_letter_json(request, letter)
                                         for letter in found.letters]})
    return _page(request, 'dead_letters.html', {
        'title': f'Dead letters of {name}', 'section': 'dead-letters', 'name': name,
        'dead_letter_queue': get_settings().queue(name).dead_letter_queue,
        'task': task, 'found': found, 'shown': queue_actions.SHOWN_LETTERS,
        'back': request.get_full_path()})


def _acting(request: HttpRequest) -> HttpResponse | None:
    if request.method != 'POST':
        if access.is_api(request):
            return JsonResponse({'error': 'Use POST: nothing changes on a GET.'}, status=405)
        return HttpResponseNotAllowed(['POST'])
    if access.read_only(request):
        return access.refuse(request, access.why_read_only(request))
    return None


class _BadBody(ValueError):
    """A POST body that cannot be read; the message says what to send instead."""


def _task_field(request: HttpRequest) -> str:
    """The ``task`` a POST names ('' for every task): a form field, or a JSON object's."""
    if request.content_type == 'application/json':
        try:
            body = json.loads(request.body or b'{}')
        except ValueError as error:
            raise _BadBody(f'The body is not JSON: {error}.') from None
        if not isinstance(body, dict) or set(body) - {'task'}:
            raise _BadBody('The body must be a JSON object with at most "task", the dotted '
                           'path of the task whose dead letters to take (all when left out).')
        value = body.get('task')
    elif request.content_type in ('application/x-www-form-urlencoded', 'multipart/form-data'):
        value = request.POST.get('task')
    elif request.body:
        raise _BadBody(f'Send JSON or a form, not {request.content_type}.')
    else:
        value = None
    if value is not None and not isinstance(value, str):
        raise _BadBody('"task" must be a dotted task path (a string).')
    return (value or '').strip()


@transaction.non_atomic_requests
@monitor_view
def dead_letter_action(request: HttpRequest, name: str, action: str) -> HttpResponse:
    """Send back or purge the dead letters of ``name`` (of ``task``, when given)."""
    refused = _acting(request)
    if refused is not None:
        return refused
    try:
        task = _task_field(request)
    except _BadBody as error:
        return JsonResponse({'error': str(error)}, status=400) if access.is_api(request) else \
            _page(request, 'refused.html', {'title': 'Bad request', 'reason': str(error)},
                  status=400)
    target = f'dead letters of {name}' + (f' of task {task}' if task else '')
    try:
        if not access.is_api(request) and request.POST.get('confirm') != '1':
            return _confirm_dead(request, name, task, action, target)
        result = DEAD_ACTIONS[action](name, task)
    except CarrotConfigException as error:
        return _unknown(request, error)
    except (CarrotError, AMQPError) as error:
        return _unreachable(request, error)
    actions.record(result, access.who(request), target)
    if access.is_api(request):
        return JsonResponse(result.as_json(), status=200 if not result.error else 503)
    return _done(request, result, url(request, 'dead-letters', name))


def _confirm_dead(request: HttpRequest, name: str, task: str, action: str,
                  target: str) -> HttpResponse:
    """How many letters the action would take: the queue's depth, or (for one task's) the
    matches among the first SCAN_LETTERS."""
    limit = queue_actions.MAX_LETTERS
    found = deadletters.inspect(queue_actions.selection(name, task, limit + 1 if task else 0))
    return _page(request, 'confirm_queue.html', {
        'title': f'{"Send back" if action == "requeue" else "Purge"} the {target}?',
        'action': action, 'count': len(found.letters) if task else found.waiting,
        'scanned': found.read < found.waiting and bool(task), 'read': found.read,
        'name': name, 'task': task, 'limit': limit, 'dead': True,
        'back': url(request, 'dead-letters', name)})


@transaction.non_atomic_requests
@monitor_view
def purge_queue(request: HttpRequest, name: str) -> HttpResponse:
    """Take the ready messages off queue ``name``; GET (or a POST unconfirmed) asks first."""
    if request.method == 'POST' or access.is_api(request):
        refused = _acting(request)
        if refused is not None:
            return refused
    elif access.read_only(request):
        return access.refuse(request, access.why_read_only(request))
    elif request.method != 'GET':
        return HttpResponseNotAllowed(['GET', 'POST'])
    try:
        if access.is_api(request) or request.POST.get('confirm') == '1':
            result = queue_actions.purge_queue(name, access.who(request))
        else:
            return _page(request, 'confirm_queue.html', {
                'title': f'Purge queue {name}?', 'action': 'purge', 'name': name,
                'count': queues.ready_count(name), 'limit': queue_actions.PURGE_MAX,
                'dead': False, 'back': url(request, 'task-list', 'queued',
                                           query={'queue': name})})
    except CarrotConfigException as error:
        return _unknown(request, error)
    except (CarrotError, AMQPError) as error:
        return _unreachable(request, error)
    actions.record(result, access.who(request), f'queue {name}')
    if access.is_api(request):
        return JsonResponse(result.as_json(), status=200 if not result.error else 503)
    return _done(request, result, url(request, 'task-list', 'queued', query={'queue': name}))
