"""``python manage.py carrot``: run the carrot service in the foreground.

Django, and possibly the database driver and ssl, are already imported when a management
command runs, which is too late for gevent's monkey-patching. So the command checks its
options and then replaces itself (same pid, same signals) with a fresh interpreter running
``carrot.worker.main``, which patches first.
"""

from __future__ import annotations

import os
import site
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from carrot.worker.options import add_options


def worker_argv(options: dict[str, Any]) -> list[str]:
    """The worker's command line for these options."""
    argv = [sys.executable, '-m', 'carrot.worker.main',
            '--logfile', options['logfile'], '--loglevel', options['loglevel']]
    if options['no_scheduler']:
        argv.append('--no-scheduler')
    if options['testmode']:
        argv.append('--testmode')
    if options.get('shutdown_timeout') is not None:
        argv += ['--shutdown-timeout', str(options['shutdown_timeout'])]
    return argv


def worker_environment() -> dict[str, str]:
    """This environment, with the project's own import paths kept for the new interpreter.

    ``manage.py``'s folder (and any ``--pythonpath``) is on ``sys.path`` now but would not
    be in a fresh ``python -m``; the interpreter's own paths are left out so they keep
    their place after the standard library.
    """
    own = {os.path.realpath(p) for p in (*site.getsitepackages(), site.getusersitepackages())}
    prefixes = tuple(os.path.realpath(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})
    project = [
        p for p in sys.path
        if p and os.path.realpath(p) not in own
        and not os.path.realpath(p).startswith(prefixes)
    ]
    env = dict(os.environ)
    existing = env.get('PYTHONPATH')
    env['PYTHONPATH'] = os.pathsep.join(project + ([existing] if existing else []))
    return env


class Command(BaseCommand):
    help = 'Run the carrot service in the foreground: consume tasks from RabbitMQ and run them.'
    requires_system_checks: list[str] = []  # the worker checks carrot's after patching

    def add_arguments(self, parser: CommandParser) -> None:
        add_options(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, worker_argv(options), worker_environment())
