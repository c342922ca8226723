"""``python manage.py carrot_deadletters list|requeue|purge``: the dead-letter queues."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from carrot import conf, deadletters
from carrot._values import AGE_HELP, parse_age
from carrot.exceptions import CarrotError

REASON_SHOWN = 100


class Command(BaseCommand):
    help = ('Show the dead letters of carrot\'s queues, send them back to their queue, or '
            'purge them: carrot_deadletters list [--queue Q] [--task T] [--older-than 7d]')

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument('action', choices=('list', 'requeue', 'purge'))
        parser.add_argument('--queue', action='append', default=None,
                            help='A queue of CARROT[\'queues\'] (more than once for more; '
                                 'default: every queue).')
        parser.add_argument('--task', default=None, help='Only dead letters of this task path.')
        parser.add_argument('--older-than', default=None, metavar='AGE',
                            help='Only those dead-lettered longer ago than AGE (90s, 30m, 12h, '
                                 '7d, 2w).')
        parser.add_argument('--limit', type=int, default=None,
                            help='At most this many per queue.')
        parser.add_argument('--no-input', '--noinput', action='store_false', dest='interactive',
                            help='Purge without asking for a confirmation.')

    def handle(self, *args: Any, **options: Any) -> None:
        action = options['action']
        try:
            settings = conf.get_settings()
            names = options['queue'] or [queue.name for queue in settings.queues]
            for name in names:
                settings.queue(name)  # an unknown queue is an error before anything is done
        except CarrotError as error:
            raise CommandError(str(error)) from None
        older_than = None
        if options['older_than'] is not None:
            older_than = parse_age(options['older_than'])
            if older_than is None:
                raise CommandError(f"--older-than {options['older_than']!r} is not an age: give "
                                   f'{AGE_HELP}.')
        if options['limit'] is not None and options['limit'] < 1:
            raise CommandError('--limit must be 1 or more.')
        selections = [deadletters.Selection(queue=name, task=options['task'],
                                            older_than=older_than, limit=options['limit'])
                      for name in names]
        try:
            if action == 'purge' and options['interactive'] and not self._confirmed(selections):
                self.stdout.write('Nothing purged.')
                return
            for selection in selections:
                self._act(action, selection)
        except CarrotError as error:
            raise CommandError(str(error)) from None

    def _confirmed(self, selections: list[deadletters.Selection]) -> bool:
        counts = {s.queue: len(deadletters.inspect(s).letters) for s in selections}
        total = sum(counts.values())
        if not total:
            return True  # nothing to purge: nothing to confirm
        where = ', '.join(f'{count} from {queue}.dead' for queue, count in counts.items()
                          if count)
        answer = input(f'Purge {total} dead letter(s) ({where})? Their rows stay, FAILED. '
                       f'Type "yes" to purge: ')
        return answer.strip().lower() == 'yes'

    def _act(self, action: str, selection: deadletters.Selection) -> None:
        perform = {'list': deadletters.inspect, 'requeue': deadletters.requeue,
                   'purge': deadletters.purge}[action]
        found = perform(selection)
        where = f'{selection.queue}.dead'
        if action == 'list':
            self.stdout.write(self.style.MIGRATE_HEADING(
                f'{where}: {len(found.letters)} matching of {found.read} read'))
            for letter in found.letters:
                when = letter.dead_at.isoformat(timespec='seconds') if letter.dead_at else '?'
                reason = letter.reason if len(letter.reason) <= REASON_SHOWN else \
                    letter.reason[:REASON_SHOWN - 3] + '...'
                self.stdout.write(f'  {when}  {letter.message_id or "(no id)"}  '
                                  f'{letter.task or "(no task)"}  {reason}')
            return
        done = (f'sent back to {selection.queue}' if action == 'requeue'
                else f'purged from {where}')
        left = (f'; {found.skipped} left, their rows are no longer FAILED' if found.skipped
                else '')
        self.stdout.write(self.style.SUCCESS(
            f'{len(found.letters)} dead letter(s) {done} ({found.read} read{left})'))
