"""``settings.CARROT``, read once into frozen, typed objects and validated.

Every problem found names the setting key it is about, so that the system checks and the
start-up errors can say exactly what to fix.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from carrot import DEFAULT_BROKER, options
from carrot._values import AGE_HELP, is_seconds, is_whole_number, parse_age
from carrot.consumer import DEFAULT_CONSUMER_CLASS
from carrot.exceptions import CarrotConfigException

DEFAULT_QUEUE = 'default'
QUEUE_KEYS = frozenset({
    'name', 'host', 'concurrency', 'consumable', 'consumer_class', 'durable',
    'queue_arguments', 'exchange_arguments', 'prefetch', 'tracked',
}) | options.OPTION_NAMES
TOP_LEVEL_KEYS = frozenset({
    'default_broker', 'queues', 'task_modules', 'monitor_authentication', 'shutdown_timeout',
    'monitor_read_only', 'resend_unconfirmed_after', 'task_defaults', 'consumer_timeout',
    'retention', 'synchronous_commit',
})
RETENTION_KEYS = frozenset({'completed', 'failed', 'prune_hourly'})
BROKER_DICT_KEYS = frozenset({'host', 'port', 'name', 'username', 'password', 'secure', 'url'})
MAX_PREFETCH = 65535


@dataclass(frozen=True)
class Broker:
    """One RabbitMQ virtual host. ``password`` never appears in ``repr`` or ``display``."""

    host: str = 'localhost'
    port: int = 5672
    virtual_host: str = '/'
    username: str = 'guest'
    password: str = field(default='guest', repr=False)
    secure: bool = False

    @property
    def display(self) -> str:
        """The URL with the password masked: safe for logs, pages and API answers."""
        scheme = 'amqps' if self.secure else 'amqp'
        vhost = quote(self.virtual_host, safe='')
        return f'{scheme}://{quote(self.username, safe="")}:***@{self.host}:{self.port}/{vhost}'

    def __str__(self) -> str:
        return self.display


@dataclass(frozen=True)
class Queue:
    """One queue carrot publishes to and, when ``consumable``, consumes from."""

    name: str
    broker: Broker
    concurrency: int = 1
    consumable: bool = True
    consumer_class: str = DEFAULT_CONSUMER_CLASS
    durable: bool = True
    queue_arguments: Mapping[str, Any] = field(default_factory=dict)
    exchange_arguments: Mapping[str, Any] = field(default_factory=dict)
    prefetch: int = 1
    #: False: a task that succeeds leaves no MessageLog row (a failure is still recorded).
    tracked: bool = True
    #: The task options set for this queue's tasks (``carrot.options``), as given.
    task_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def dead_letter_queue(self) -> str:
        """Where messages that cannot run go, with the reason in a header."""
        return f'{self.name}.dead'


@dataclass(frozen=True)
class Retention:
    """How long finished rows are kept (``manage.py carrot_prune``)."""

    #: COMPLETED rows older than this are deleted (3 days, as upstream's docs promised).
    completed: datetime.timedelta = datetime.timedelta(days=3)
    #: FAILED rows older than this are deleted.
    failed: datetime.timedelta = datetime.timedelta(days=30)
    #: Every carrot service prunes once an hour.
    prune_hourly: bool = False


@dataclass(frozen=True)
class CarrotSettings:
    default_broker: Broker
    queues: tuple[Queue, ...]
    task_modules: tuple[str, ...]
    monitor_authentication: tuple[str, ...]
    shutdown_timeout: float = 60.0
    #: The monitor shows everything and offers no action, to everyone.
    monitor_read_only: bool = False
    #: Seconds after which the service sends again a task whose row still awaits the
    #: confirm of its message (its publishing process died before RabbitMQ answered).
    resend_unconfirmed_after: float = 60.0
    #: False: the PUBLISHED row that ``publish_message`` commits outside a transaction does
    #: not wait for PostgreSQL to flush it to disk (``synchronous_commit`` off for that
    #: statement). Faster for one caller; a crash of the database server can lose the rows
    #: of the last fraction of a second (see the reliability page).
    synchronous_commit: bool = True
    #: The task options set for every task (``carrot.options``), as given.
    task_defaults: Mapping[str, Any] = field(default_factory=dict)
    #: RabbitMQ's ``consumer_timeout``, in seconds: time limits must stay below it.
    consumer_timeout: float = options.CONSUMER_TIMEOUT
    retention: Retention = field(default_factory=Retention)

    def queue(self, name: str | None) -> Queue:
        """The queue called ``name``.

        Without a name: the queue called ``'default'``, or else the first queue listed.
        """
        wanted = name or DEFAULT_QUEUE
        for queue in self.queues:
            if queue.name == wanted:
                return queue
        if not name and self.queues:
            return self.queues[0]
        known = ', '.join(repr(q.name) for q in self.queues)
        raise CarrotConfigException(
            f"Unknown queue {name!r}: settings.CARROT['queues'] has {known}. "
            f"Add it there or publish to one of those."
        )


def parse_broker(value: Any, key: str) -> Broker:
    """A Broker from an ``amqp://``/``amqps://`` URL or upstream's dict form."""
    if isinstance(value, str):
        return _broker_from_url(value, key)
    if isinstance(value, Mapping):
        _refuse_unknown_keys(value, BROKER_DICT_KEYS, f'{key}: unknown', 'a broker dict takes')
        if 'url' in value:
            return _broker_from_url(value['url'], key)
        secure = value.get('secure', False)
        if not isinstance(secure, bool):
            raise CarrotConfigException(f'{key}["secure"] must be True or False, not {secure!r}.')
        port = value.get('port', 5671 if secure else 5672)
        if not is_whole_number(port, 1, 65535):
            raise CarrotConfigException(f'{key}["port"] must be a port number, not {port!r}.')
        vhost = str(value.get('name', '/'))
        return Broker(
            host=str(value.get('host', 'localhost')),
            port=port,
            # Upstream wrote the default vhost as '%2f'.
            virtual_host=unquote(vhost) or '/',
            username=str(value.get('username', 'guest')),
            password=str(value.get('password', 'guest')),
            secure=secure,
        )
    raise CarrotConfigException(
        f'{key} must be an amqp:// or amqps:// URL or a dict with host, port, name, username, '
        f'password and secure, not {type(value).__name__}.'
    )


def _broker_from_url(url: Any, key: str) -> Broker:
    if not isinstance(url, str):
        raise CarrotConfigException(f'{key} must be a string URL, not {type(url).__name__}.')
    if '://' not in url:
        # Upstream accepted 'user:pass@host:port/vhost' without a scheme.
        url = 'amqp://' + url
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        # The parser's own message may quote part of the password: never show it.
        raise CarrotConfigException(
            f'{key} is not a valid broker URL: check the port number, and URL-encode special '
            f'characters (such as / : @ %) in the user name and password.'
        ) from None
    if parts.scheme not in ('amqp', 'amqps'):
        raise CarrotConfigException(
            f'{key} must start with amqp:// or amqps://, not {parts.scheme}://.'
        )
    if not parts.hostname:
        raise CarrotConfigException(f'{key} has no host name.')
    secure = parts.scheme == 'amqps'
    path = parts.path[1:] if parts.path.startswith('/') else parts.path
    return Broker(
        host=parts.hostname,
        port=port or (5671 if secure else 5672),
        virtual_host=unquote(path) if path else '/',
        username=unquote(parts.username) if parts.username is not None else 'guest',
        password=unquote(parts.password) if parts.password is not None else 'guest',
        secure=secure,
    )


def _refuse_unknown_keys(given: Mapping[Any, Any], known: frozenset[str] | set[str],
                         where: str, takes: str) -> None:
    """CarrotConfigException naming the keys of ``given`` not in ``known``, and those."""
    unknown = set(given) - known
    if unknown:
        raise CarrotConfigException(
            f'{where} key(s) {", ".join(sorted(map(str, unknown)))}; '
            f'{takes} {", ".join(sorted(known))}.'
        )


def _positive_int(value: Any, key: str, maximum: int | None = None) -> int:
    if not is_whole_number(value, 1):
        raise CarrotConfigException(f'{key} must be a whole number of 1 or more, not {value!r}.')
    if maximum is not None and value > maximum:
        raise CarrotConfigException(f'{key} must be at most {maximum}, not {value!r}.')
    return value


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise CarrotConfigException(f'{key} must be a dict, not {type(value).__name__}.')
    return dict(value)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise CarrotConfigException(f'{key} must be True or False, not {value!r}.')
    return value


def _parse_queue(raw: Any, index: int, default_broker: Broker,
                 consumer_timeout: float) -> Queue:
    key = f"CARROT['queues'][{index}]"
    if not isinstance(raw, Mapping):
        raise CarrotConfigException(f'{key} must be a dict with at least a name.')
    _refuse_unknown_keys(raw, QUEUE_KEYS, f'{key}: unknown', 'a queue takes')
    name = raw.get('name')
    if not isinstance(name, str) or not name.strip():
        raise CarrotConfigException(f"{key}['name'] must be a non-empty string.")
    key = f"CARROT['queues'][{index}] ({name!r})"
    host = raw.get('host')
    consumer_class = raw.get('consumer_class', DEFAULT_CONSUMER_CLASS)
    if not isinstance(consumer_class, str) or '.' not in consumer_class:
        raise CarrotConfigException(
            f"{key}['consumer_class'] must be a dotted path such as {DEFAULT_CONSUMER_CLASS!r}."
        )
    return Queue(
        name=name,
        broker=parse_broker(host, f"{key}['host']") if host else default_broker,
        concurrency=_positive_int(raw.get('concurrency', 1), f"{key}['concurrency']"),
        consumable=_bool(raw.get('consumable', True), f"{key}['consumable']"),
        consumer_class=consumer_class,
        durable=_bool(raw.get('durable', True), f"{key}['durable']"),
        queue_arguments=_mapping(raw.get('queue_arguments'), f"{key}['queue_arguments']"),
        exchange_arguments=_mapping(raw.get('exchange_arguments'), f"{key}['exchange_arguments']"),
        prefetch=_positive_int(raw.get('prefetch', 1), f"{key}['prefetch']", MAX_PREFETCH),
        tracked=_bool(raw.get('tracked', True), f"{key}['tracked']"),
        task_options=options.validate(
            {name: value for name, value in raw.items() if name in options.OPTION_NAMES},
            key, code_as='paths', consumer_timeout=consumer_timeout),
    )


def _dotted_paths(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise CarrotConfigException(f'{key} must be a list of dotted module paths.')
    for item in value:
        if not isinstance(item, str) or not item or item.startswith('.') or item.endswith('.'):
            raise CarrotConfigException(f'{key} holds {item!r}, which is not a dotted path.')
    return tuple(value)


def parse(raw: Any) -> CarrotSettings:
    """Validate ``settings.CARROT`` (``None`` when it is missing) into CarrotSettings."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise CarrotConfigException(f'settings.CARROT must be a dict, not {type(raw).__name__}.')
    _refuse_unknown_keys(raw, TOP_LEVEL_KEYS, 'settings.CARROT has unknown', 'it takes')
    default_broker = parse_broker(
        raw.get('default_broker') or DEFAULT_BROKER, "CARROT['default_broker']"
    )
    raw_queues = raw.get('queues')
    if raw_queues is None:
        raw_queues = [{'name': DEFAULT_QUEUE}]
    if isinstance(raw_queues, (str, Mapping)) or not isinstance(raw_queues, (list, tuple)):
        raise CarrotConfigException("CARROT['queues'] must be a list of dicts.")
    if not raw_queues:
        raise CarrotConfigException(
            "CARROT['queues'] is empty: list at least one queue, or leave the key out for "
            "one queue called 'default'."
        )
    consumer_timeout = raw.get('consumer_timeout', options.CONSUMER_TIMEOUT)
    if not is_seconds(consumer_timeout):
        raise CarrotConfigException(
            f"CARROT['consumer_timeout'] must be a positive number of seconds (RabbitMQ's "
            f"consumer_timeout, 1800 unless the broker sets another), not {consumer_timeout!r}."
        )
    queues = tuple(_parse_queue(q, i, default_broker, consumer_timeout)
                   for i, q in enumerate(raw_queues))
    names = [q.name for q in queues]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CarrotConfigException(
            f"CARROT['queues'] names the queue(s) {', '.join(map(repr, duplicates))} "
            f'more than once.'
        )
    timeout = raw.get('shutdown_timeout', 60.0)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0:
        raise CarrotConfigException(
            f"CARROT['shutdown_timeout'] must be a number of seconds, not {timeout!r}."
        )
    resend_after = raw.get('resend_unconfirmed_after', 60.0)
    if not is_seconds(resend_after):
        raise CarrotConfigException(
            f"CARROT['resend_unconfirmed_after'] must be a positive number of seconds, not "
            f'{resend_after!r}.'
        )
    task_defaults = options.validate(
        _mapping(raw.get('task_defaults'), "CARROT['task_defaults']"),
        "CARROT['task_defaults']", code_as='paths', consumer_timeout=consumer_timeout)
    if task_defaults.get('time_limit', options.TaskOptions.time_limit) >= consumer_timeout:
        raise CarrotConfigException(
            f"CARROT['consumer_timeout'] is {consumer_timeout:g} s, not above the default time "
            f'limit of {options.TaskOptions.time_limit:g} s: set CARROT[\'task_defaults\']'
            f"['time_limit'] below it, so that a task is stopped before RabbitMQ closes its "
            f'channel.')
    return CarrotSettings(
        default_broker=default_broker,
        queues=queues,
        task_modules=_dotted_paths(raw.get('task_modules'), "CARROT['task_modules']"),
        monitor_authentication=_dotted_paths(
            raw.get('monitor_authentication'), "CARROT['monitor_authentication']"
        ),
        shutdown_timeout=float(timeout),
        monitor_read_only=_bool(raw.get('monitor_read_only', False),
                                "CARROT['monitor_read_only']"),
        resend_unconfirmed_after=float(resend_after),
        synchronous_commit=_bool(raw.get('synchronous_commit', True),
                                 "CARROT['synchronous_commit']"),
        task_defaults=task_defaults,
        consumer_timeout=float(consumer_timeout),
        retention=_parse_retention(raw.get('retention')),
    )


def _parse_retention(raw: Any) -> Retention:
    given = _mapping(raw, "CARROT['retention']")
    _refuse_unknown_keys(given, RETENTION_KEYS, "CARROT['retention'] has unknown", 'it takes')
    ages: dict[str, datetime.timedelta] = {}
    for key in ('completed', 'failed'):
        if key in given:
            age = parse_age(given[key])
            if age is None or age <= datetime.timedelta(0):
                raise CarrotConfigException(
                    f"CARROT['retention']['{key}'] must be an age, {AGE_HELP}; not "
                    f'{given[key]!r}.')
            ages[key] = age
    return Retention(**ages, prune_hourly=_bool(given.get('prune_hourly', False),
                                               "CARROT['retention']['prune_hourly']"))


@functools.cache
def get_settings() -> CarrotSettings:
    """The project's carrot settings, parsed once (and again after ``override_settings``)."""
    from django.conf import settings

    return parse(getattr(settings, 'CARROT', None))


def _reset_on_change(*, setting: str, **_: Any) -> None:
    if setting == 'CARROT':
        get_settings.cache_clear()


def connect_signals() -> None:
    from django.core.signals import setting_changed

    setting_changed.connect(_reset_on_change, dispatch_uid='carrot-settings-reset')
