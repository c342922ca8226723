"""settings.CARROT: parsing, defaults, and errors that name the key."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.core import checks
from django.db import connection
from django.test.utils import override_settings

from carrot import conf
from carrot.checks import check_settings
from carrot.exceptions import CarrotConfigException
from tests.conftest import MANAGE, ROOT


def test_no_carrot_setting_means_one_default_queue_on_local_guest() -> None:
    parsed = conf.parse(None)
    assert [q.name for q in parsed.queues] == ['default']
    broker = parsed.queues[0].broker
    assert (broker.host, broker.port, broker.virtual_host, broker.username, broker.password,
            broker.secure) == ('localhost', 5672, '/', 'guest', 'guest', False)


def test_amqp_url_with_encoded_credentials_and_vhost() -> None:
    broker = conf.parse_broker('amqp://us%40er:p%3Ass%2Fw@rabbit.example:5673/my%2Fvhost', 'k')
    assert broker.username == 'us@er'
    assert broker.password == 'p:ss/w'
    assert broker.host == 'rabbit.example'
    assert broker.port == 5673
    assert broker.virtual_host == 'my/vhost'
    assert not broker.secure


def test_amqps_url_is_secure_and_defaults_to_port_5671() -> None:
    broker = conf.parse_broker('amqps://u:p@h/', 'k')
    assert broker.secure and broker.port == 5671 and broker.virtual_host == '/'


def test_upstream_url_without_scheme_and_percent_2f_vhost() -> None:
    broker = conf.parse_broker('guest:guest@localhost:5672/%2f', 'k')
    assert broker.virtual_host == '/'
    assert broker.host == 'localhost'


def test_dict_form_of_a_broker() -> None:
    broker = conf.parse_broker({'host': 'h', 'port': 1234, 'name': 'vh', 'username': 'u',
                                'password': 'secret', 'secure': True}, 'k')
    assert (broker.host, broker.port, broker.virtual_host, broker.username, broker.secure) == \
        ('h', 1234, 'vh', 'u', True)


def test_password_never_in_repr_or_display() -> None:
    broker = conf.parse_broker('amqp://u:topsecret@h:5672/v', 'k')
    assert 'topsecret' not in repr(broker)
    assert 'topsecret' not in broker.display
    assert broker.display == 'amqp://u:***@h:5672/v'


def test_default_broker_serves_queues_without_host() -> None:
    parsed = conf.parse({
        'default_broker': 'amqp://a:b@broker-one:5672/one',
        'queues': [{'name': 'q1'}, {'name': 'q2', 'host': 'amqp://c:d@broker-two:5672/two',
                                    'concurrency': 5, 'prefetch': 3}],
    })
    assert parsed.queue('q1').broker.host == 'broker-one'
    assert parsed.queue('q2').broker.host == 'broker-two'
    assert parsed.queue('q2').concurrency == 5
    assert parsed.queue('q2').prefetch == 3


@pytest.mark.parametrize(('raw', 'named'), [
    ({'queues': [{'name': 'q', 'concurrency': 0}]}, "['concurrency']"),
    ({'queues': [{'name': 'q', 'concurrency': 'many'}]}, "['concurrency']"),
    ({'queues': [{'name': 'q', 'prefetch': 70000}]}, "['prefetch']"),
    ({'queues': [{'name': 'q', 'durable': 'yes'}]}, "['durable']"),
    ({'queues': [{'name': 'q', 'colour': 'red'}]}, 'colour'),
    ({'queues': [{'concurrency': 1}]}, "['name']"),
    ({'queues': [{'name': 'q'}, {'name': 'q'}]}, "'q'"),
    ({'queues': 'default'}, "CARROT['queues']"),
    ({'default_broker': 'http://h/'}, "CARROT['default_broker']"),
    ({'default_broker': 'amqp://h:notaport/'}, "CARROT['default_broker']"),
    ({'queues': []}, "CARROT['queues'] is empty"),
    ({'default_broker': {'host': 'h', 'port': 'x'}}, 'port'),
    ({'task_modules': 'myapp.tasks'}, "CARROT['task_modules']"),
    ({'shutdown_timeout': -1}, 'shutdown_timeout'),
    ({'resend_unconfirmed_after': 0}, 'resend_unconfirmed_after'),
    ({'resend_unconfirmed_after': True}, 'resend_unconfirmed_after'),
    ({'resend_unconfirmed_after': float('inf')}, 'resend_unconfirmed_after'),
    ({'brokers': []}, 'brokers'),
    ({'synchronous_commit': 'off'}, "CARROT['synchronous_commit'] must be True or False"),
])
def test_bad_settings_raise_an_error_naming_the_key(raw: dict[str, object], named: str) -> None:
    with pytest.raises(CarrotConfigException) as caught:
        conf.parse(raw)
    assert named in str(caught.value)


def test_unknown_queue_error_lists_the_known_ones() -> None:
    parsed = conf.parse({'queues': [{'name': 'a'}, {'name': 'b'}]})
    with pytest.raises(CarrotConfigException, match="Unknown queue 'c'.*'a', 'b'"):
        parsed.queue('c')
    assert parsed.queue(None).name == 'a'  # no 'default' queue: the first one listed


def test_system_check_reports_bad_settings_by_key() -> None:
    with override_settings(CARROT={'queues': [{'name': 'q', 'concurrency': -3}]}):
        found = check_settings()
    assert [m.id for m in found] == ['carrot.E001']
    assert "['concurrency']" in found[0].msg


def test_system_check_reports_task_modules_that_do_not_import() -> None:
    with override_settings(CARROT={'task_modules': ['tests.project.broken_tasks',
                                                    'no.such.module']}):
        found = check_settings()
    assert [m.id for m in found] == ['carrot.E002', 'carrot.E002']
    assert 'broken_tasks' in found[0].msg and 'no.such.module' in found[1].msg


def test_system_check_reports_a_consumer_class_that_is_not_a_consumer() -> None:
    with override_settings(CARROT={'task_modules': ['tests.project.tasks'], 'queues': [
        {'name': 'q', 'consumer_class': 'tests.project.tasks.NotAFunction'},
        {'name': 'r', 'consumer_class': 'tests.project.nothing.Here'},
    ]}):
        found = check_settings()
    assert [m.id for m in found] == ['carrot.E003', 'carrot.E003']
    assert 'not a subclass of carrot.consumer.Consumer' in found[0].msg
    assert 'cannot be imported' in found[1].msg


def test_system_check_warns_when_no_task_module_is_listed() -> None:
    with override_settings(CARROT={}):
        found = check_settings()
    assert [(m.id, m.level) for m in found] == [('carrot.W001', checks.WARNING)]


def test_system_check_warns_that_synchronous_commit_off_changes_nothing_but_on_postgresql(
        ) -> None:
    assert conf.parse({}).synchronous_commit is True
    with override_settings(CARROT={'task_modules': ['tests.project.tasks'],
                                   'synchronous_commit': False}):
        found = check_settings()
    if connection.vendor == 'postgresql':
        assert found == []
    else:
        assert [(m.id, m.level) for m in found] == [('carrot.W005', checks.WARNING)]
        assert f"{connection.vendor} database 'default'" in found[0].msg


def test_settings_are_read_once_and_again_after_override() -> None:
    with override_settings(CARROT={'queues': [{'name': 'first'}]}):
        assert conf.get_settings() is conf.get_settings()
        assert conf.get_settings().queues[0].name == 'first'
    with override_settings(CARROT={'queues': [{'name': 'second'}]}):
        assert conf.get_settings().queues[0].name == 'second'


def test_a_malformed_url_error_never_quotes_the_password() -> None:
    with pytest.raises(CarrotConfigException) as caught:
        conf.parse_broker('amqp://user:sekret/part@host:5672/', "CARROT['default_broker']")
    assert 'sekret' not in str(caught.value)
    assert 'URL-encode' in str(caught.value)


def test_manage_py_check_in_a_web_process_imports_no_gevent() -> None:
    """A web process checks carrot's settings without loading the worker's gevent."""
    probe = ('import sys; from django.core.management import execute_from_command_line; '
             'execute_from_command_line(["manage.py", "check"]); '
             'print("gevent loaded:", sorted(m for m in sys.modules if m.startswith("gevent")))')
    result = subprocess.run([sys.executable, '-c', probe], cwd=MANAGE.parent, text=True,
                            capture_output=True, timeout=60,
                            env={**os.environ, 'PYTHONPATH': str(ROOT)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'System check identified no issues' in result.stdout + result.stderr
    assert 'gevent loaded: []' in result.stdout
