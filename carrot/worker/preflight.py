"""What must hold before the service starts: settings, database, brokers, topology."""

from __future__ import annotations

import logging

from amqpstorm.exception import AMQPError
from django.db import DatabaseError, connections

from carrot import broker, conf, lifecycle
from carrot.exceptions import CarrotError
from carrot.models import MessageLog


def notices() -> list[tuple[int, str]]:
    """What the service starts despite, with its logging level: carrot's system check
    warnings, and task modules that do not import (an error: their messages will be
    dead-lettered with the reason)."""
    from django.core import checks

    return [(logging.ERROR if message.level >= checks.ERROR else logging.WARNING,
             f'{message.msg} ({message.id})')
            for message in checks.run_checks(tags=['carrot'])
            if message.level < checks.ERROR or message.id == 'carrot.E002']


def problems() -> list[str]:
    """Each reason the service cannot start, as a sentence that says what to do."""
    try:
        settings = conf.get_settings()
    except CarrotError as error:
        return [str(error)]
    found = _database_problems()
    from carrot.consumer import load_consumer_class

    by_broker: dict[conf.Broker, list[conf.Queue]] = {}
    for queue in settings.queues:
        by_broker.setdefault(queue.broker, []).append(queue)
        try:
            load_consumer_class(queue.consumer_class)
        except CarrotError as error:
            found.append(f"CARROT['queues'] ({queue.name!r}): {error}")
    for server, queues in by_broker.items():
        found.extend(_broker_problems(server, queues))
    return found


def _database_problems() -> list[str]:
    alias = lifecycle.database()
    try:
        MessageLog.objects.using(alias).exists()
    except DatabaseError as error:
        return [f'The database {alias!r} cannot be used for carrot\'s MessageLog: {error}. '
                f'Check DATABASES and run "python manage.py migrate carrot".']
    finally:
        connections[alias].close()
    return []


def _broker_problems(server: conf.Broker, queues: list[conf.Queue]) -> list[str]:
    try:
        connection = broker.connect(server, 'start-up check')
    except CarrotError as error:
        return [str(error)]
    found = []
    try:
        for queue in queues:
            try:
                with connection.channel() as channel:
                    broker.declare(channel, queue)
            except (CarrotError, AMQPError) as error:
                found.append(str(error))
    finally:
        try:
            connection.close()
        except AMQPError:
            pass
    return found
