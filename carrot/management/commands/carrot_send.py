"""``python manage.py carrot_send myapp.tasks.my_task arg ... --key=value``: publish one task."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from carrot.exceptions import CarrotError
from carrot.utilities import publish_message


def parse_value(text: str) -> Any:
    """A JSON value where the text is one (1, true, "x", [1]), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


class Command(BaseCommand):
    help = 'Publish a task: carrot_send myapp.tasks.my_task 1 2 --kwargs \'{"key": "value"}\''

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument('task', help='The dotted path of the task.')
        parser.add_argument('task_args', nargs='*', metavar='arg',
                            help='Positional arguments (JSON or text).')
        parser.add_argument('--queue', default=None)
        parser.add_argument('--routing_key', default=None)
        parser.add_argument('--exchange', default='')
        parser.add_argument('--priority', type=int, default=0)
        parser.add_argument('--kwargs', default='{}', help='Keyword arguments as a JSON object.')

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            kwargs = json.loads(options['kwargs'])
        except ValueError as error:
            raise CommandError(f'--kwargs is not JSON: {error}') from None
        if not isinstance(kwargs, dict):
            raise CommandError('--kwargs must be a JSON object such as {"key": "value"}.')
        try:
            log = publish_message(
                options['task'], *[parse_value(a) for a in options['task_args']],
                queue=options['queue'], routing_key=options['routing_key'],
                exchange=options['exchange'], priority=options['priority'], **kwargs,
            )
        except (CarrotError, ValueError, TypeError) as error:
            raise CommandError(str(error)) from None
        self.stdout.write(self.style.SUCCESS(f'Published {log.task} as {log.uuid}'))
