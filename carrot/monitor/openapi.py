"""The OpenAPI 3.1 document of the monitor's JSON API, served at ``api/openapi.json``.

Written out here, one entry per operation, rather than inferred: the views are plain Django
functions. The test suite checks that every ``api-`` URL is described, that each method
described answers, and that the document is valid OpenAPI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The path parameters, by name.
_PATH_PARAMETERS: dict[str, dict[str, Any]] = {
    'pk': {'type': 'integer'},
    'name': {'type': 'string', 'description': "A queue of CARROT['queues']."},
}
_LIST_PARAMETERS = {'after': 'integer', 'limit': 'integer'}
_FILTERS = {'queue': 'string', 'task': 'string', 'id': 'string', 'args': 'string',
            'since': 'string', 'until': 'string', **_LIST_PARAMETERS}
_IDS = {'type': 'object', 'properties': {
    'ids': {'type': 'array', 'items': {'type': 'integer'}},
    'all': {'type': 'boolean', 'description': 'Every row matching the filters instead.'},
    'status': {'type': 'string'}, 'queue': {'type': 'string'}, 'task': {'type': 'string'},
    'args': {'type': 'string'}, 'since': {'type': 'string'}, 'until': {'type': 'string'}}}
_SCHEDULE = {'type': 'object', 'properties': {
    'task_name': {'type': 'string'}, 'task': {'type': 'string'},
    'crontab': {'type': 'string'}, 'interval_type': {
        'type': 'string', 'enum': ['seconds', 'minutes', 'hours', 'days']},
    'interval_count': {'type': 'integer', 'minimum': 1},
    'queue': {'type': ['string', 'null']}, 'priority': {'type': 'integer'},
    'args': {'type': 'array'}, 'kwargs': {'type': 'object'}, 'active': {'type': 'boolean'}}}
_TASK = {'type': 'object', 'properties': {'task': {'type': 'string'}}}


@dataclass(frozen=True, kw_only=True)
class Operation:
    """One method on one path of the API."""

    path: str
    """Below the monitor's prefix, with ``{name}`` for each path parameter."""
    method: str
    """``get`` or ``post``."""
    summary: str
    """What it answers or does."""
    query: dict[str, str] = field(default_factory=dict)
    """Its query parameters and their JSON types."""
    body: dict[str, Any] | None = None
    """The JSON schema of its body (a POST's)."""
    creates: bool = False
    """It answers 201 with what it created."""
    broker: bool = False
    """It asks RabbitMQ, and answers 503 when RabbitMQ does not answer."""


_STATUSES = ('queued', 'delayed', 'running', 'failed', 'completed')

OPERATIONS = (
    Operation(path='/api/', method='get', summary='The viewer, the queues and the links; '
              'sets the csrftoken cookie.'),
    Operation(path='/api/openapi.json', method='get', summary='This document.'),
    *(Operation(path=f'/api/tasks/{status}/', method='get', summary=f'A page of {status} tasks.',
                query=_FILTERS) for status in _STATUSES),
    Operation(path='/api/tasks/find/', method='get',
              summary='The task of a message id (or row id).', query={'id': 'string'}),
    Operation(path='/api/tasks/{pk}/', method='get',
              summary='One task with its output, traceback and log records.',
              query={'level': 'string', 'q': 'string'}),
    Operation(path='/api/tasks/requeue/', method='post',
              summary='Requeue failed, orphaned and stuck tasks.', body=_IDS, broker=True),
    Operation(path='/api/tasks/delete/', method='post', summary='Delete tasks.', body=_IDS),
    Operation(path='/api/schedules/', method='get', summary='A page of scheduled tasks.',
              query=_LIST_PARAMETERS),
    Operation(path='/api/schedules/', method='post', summary='Create a scheduled task.',
              body={**_SCHEDULE, 'required': ['task_name', 'task']}, creates=True),
    Operation(path='/api/schedules/{pk}/', method='get', summary='One scheduled task.'),
    Operation(path='/api/schedules/{pk}/', method='post',
              summary='Change the fields given of a scheduled task.', body=_SCHEDULE),
    Operation(path='/api/schedules/run/', method='post', summary='Publish scheduled tasks now.',
              body=_IDS, broker=True),
    Operation(path='/api/schedules/pause/', method='post', summary='Pause scheduled tasks.',
              body=_IDS),
    Operation(path='/api/schedules/resume/', method='post', summary='Resume scheduled tasks.',
              body=_IDS),
    Operation(path='/api/overview/', method='get',
              summary='Per queue: depths, rates, waits and run times.'),
    Operation(path='/api/health/', method='get',
              summary='Workers, orphaned and stuck tasks, late schedules.'),
    Operation(path='/api/deadletters/', method='get',
              summary="Each queue's dead letters waiting."),
    Operation(path='/api/deadletters/{name}/', method='get',
              summary="A queue's first dead letters.", query={'task': 'string'}, broker=True),
    Operation(path='/api/deadletters/{name}/requeue/', method='post',
              summary="Send a queue's dead letters back.", body=_TASK, broker=True),
    Operation(path='/api/deadletters/{name}/purge/', method='post',
              summary="Remove a queue's dead letters.", body=_TASK, broker=True),
    Operation(path='/api/queues/{name}/purge/', method='post',
              summary="Purge a queue's ready messages.", broker=True),
    Operation(path='/api/audit/', method='get', summary='The audit log, newest first.',
              query=_LIST_PARAMETERS),
)


def document(prefix: str, version: str) -> dict[str, Any]:
    """The OpenAPI document, its server at ``prefix`` (where the monitor is mounted)."""
    paths: dict[str, dict[str, Any]] = {}
    for operation in OPERATIONS:
        paths.setdefault(operation.path, {})[operation.method] = _operation(operation)
    return {
        'openapi': '3.1.0',
        'info': {'title': 'carrot monitor', 'version': version,
                 'description': 'What the monitor shows and does. The session\'s user, staff '
                                'only by default; a POST needs the csrftoken cookie\'s value '
                                'in an X-CSRFToken header.'},
        'servers': [{'url': prefix.rstrip('/') or '/'}],
        'components': {'securitySchemes': {
            'session': {'type': 'apiKey', 'in': 'cookie', 'name': 'sessionid'},
            'csrf': {'type': 'apiKey', 'in': 'header', 'name': 'X-CSRFToken'}}},
        'security': [{'session': []}],
        'paths': paths,
    }


def _operation(operation: Operation) -> dict[str, Any]:
    names = [part[1:-1] for part in operation.path.split('/') if part.startswith('{')]
    parameters = [{'name': name, 'in': 'path', 'required': True,
                   'schema': _PATH_PARAMETERS[name]} for name in names]
    parameters += [{'name': name, 'in': 'query', 'required': False, 'schema': {'type': kind}}
                   for name, kind in operation.query.items()]
    found: dict[str, Any] = {
        'summary': operation.summary,
        'operationId': _operation_id(operation),
        'parameters': parameters,
        'responses': {
            '200': {'description': 'The answer, as JSON.',
                    'content': {'application/json': {'schema': {'type': 'object'}}}},
            '400': {'description': 'A bad parameter or body; "error" says which.'},
            '403': {'description': 'Not allowed (not staff, or read-only for a POST).'},
            '404': {'description': 'No such row or queue.'},
        },
    }
    if operation.creates:
        found['responses']['201'] = found['responses'].pop('200')
    if operation.broker:
        found['responses']['503'] = {'description': 'RabbitMQ did not answer, or stopped '
                                                    'answering part of the way.'}
    if operation.method == 'post':
        found['security'] = [{'session': [], 'csrf': []}]
        found['responses']['405'] = {'description': 'A GET of an action.'}
        found['requestBody'] = {'required': False, 'content': {'application/json': {
            'schema': operation.body or {'type': 'object'}}}}
    return found


def _operation_id(operation: Operation) -> str:
    words = [part.strip('{}').replace('.', '_') for part in operation.path.split('/')
             if part and part != 'api']
    return '_'.join([operation.method, *words]) if words else f'{operation.method}_root'
