"""The OpenAPI document of the monitor's API: it describes every API URL, each method it
describes answers, and it is valid OpenAPI 3.1."""

from __future__ import annotations

import re

from django.contrib.auth.models import User
from django.urls import URLPattern
from openapi_spec_validator import validate

from carrot import urls
from carrot.monitor import openapi
from tests.monitoring import (
    OTHER_PREFIX,
    PREFIX,
    client_for,
    make_rows,
    make_schedule,
    users_fixture,  # noqa: F401  (the users fixture)
)


def _api_paths() -> set[str]:
    """Each ``api-`` URL of carrot.urls as OpenAPI writes it: a segment of a few fixed
    values (a status, an action) once for each, other parameters as ``{name}``."""
    found = set()
    for pattern in urls.urlpatterns:
        assert isinstance(pattern, URLPattern)
        if not (pattern.name or '').startswith('api-'):
            continue
        paths = ['/' + str(pattern.pattern)]
        for name, converter in pattern.pattern.converters.items():
            segment = re.compile(rf'<\w+:{name}>')
            values = getattr(converter, 'names', None)
            paths = [segment.sub(value, path) for path in paths for value in values] if values \
                else [segment.sub(f'{{{name}}}', path) for path in paths]
        found.update(paths)
    return found


def test_every_api_url_is_described_and_the_document_is_valid(users: dict[str, User]) -> None:
    answer = client_for(users, 'viewer').get(PREFIX + 'api/openapi.json')
    assert answer.status_code == 200
    document = answer.json()
    validate(document)
    assert set(document['paths']) == _api_paths()
    assert document['servers'] == [{'url': PREFIX.rstrip('/')}]
    other = client_for(users, 'viewer').get(OTHER_PREFIX + 'api/openapi.json').json()
    assert other['servers'] == [{'url': OTHER_PREFIX.rstrip('/')}]
    assert client_for(users, 'plain').get(PREFIX + 'api/openapi.json').status_code == 403


def test_each_method_described_answers_and_no_other(users: dict[str, User]) -> None:
    [task] = make_rows(1)
    schedule = make_schedule()
    client = client_for(users, 'viewer')  # read-only: a POST is refused, not done
    for operation in openapi.OPERATIONS:
        address = PREFIX + operation.path.lstrip('/').format(
            name='default', pk=schedule.pk if '/schedules/' in operation.path else task.pk)
        if operation.path == '/api/tasks/find/':
            address += f'?id={task.uuid}'
        get = client.get(address)
        if operation.method == 'get':
            assert get.status_code == 200, (address, get.content[:300])
            continue
        described = {o.method for o in openapi.OPERATIONS if o.path == operation.path}
        assert (get.status_code == 405) == ('get' not in described), address
        post = client.post(address, '{}', content_type='application/json')
        assert post.status_code == 403, (address, post.content[:300])
        assert 'may look but not act' in post.json()['error']
