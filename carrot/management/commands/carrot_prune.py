"""``python manage.py carrot_prune``: delete old COMPLETED and FAILED rows, a batch at a time."""

from __future__ import annotations

import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from carrot import conf, retention
from carrot._values import AGE_HELP, parse_age


class Command(BaseCommand):
    help = ("Delete COMPLETED rows older than CARROT['retention']['completed'] (3 days) and "
            "FAILED rows older than its 'failed' (30 days), in small batches.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument('--completed-older-than', default=None, metavar='AGE',
                            help=f'Instead of the setting: {AGE_HELP}.')
        parser.add_argument('--failed-older-than', default=None, metavar='AGE',
                            help=f'Instead of the setting: {AGE_HELP}.')
        parser.add_argument('--dry-run', action='store_true',
                            help='Count what would be deleted; delete nothing.')
        parser.add_argument('--batch', type=int, default=retention.BATCH,
                            help=f'Rows a statement deletes (default {retention.BATCH}).')

    def handle(self, *args: Any, **options: Any) -> None:
        kept = conf.get_settings().retention
        completed = self._age(options['completed_older_than'], '--completed-older-than',
                              kept.completed)
        failed = self._age(options['failed_older_than'], '--failed-older-than', kept.failed)
        if options['batch'] < 1:
            raise CommandError('--batch must be 1 or more.')
        pruned = retention.prune(completed=completed, failed=failed,
                                 dry_run=options['dry_run'], batch=options['batch'])
        verb = 'Would delete' if options['dry_run'] else 'Deleted'
        self.stdout.write(self.style.SUCCESS(
            f'{verb} {pruned.completed} COMPLETED row(s) older than {_shown(completed)} and '
            f'{pruned.failed} FAILED row(s) older than {_shown(failed)}.'))

    @staticmethod
    def _age(text: str | None, option: str, default: datetime.timedelta) -> datetime.timedelta:
        if text is None:
            return default
        age = parse_age(text)
        if age is None or age <= datetime.timedelta(0):
            raise CommandError(f'{option} {text!r} is not an age: give {AGE_HELP}.')
        return age


def _shown(age: datetime.timedelta) -> str:
    seconds = age.total_seconds()
    for unit, size in (('w', 604800), ('d', 86400), ('h', 3600), ('m', 60)):
        if seconds >= size and seconds % size == 0:
            return f'{int(seconds // size)}{unit}'
    return f'{seconds:g}s'
