"""``python manage.py carrot_daemon start|stop|restart|status``: the service as a daemon.

``start`` launches ``python -m carrot.daemon`` (see :mod:`carrot.daemon`), which detaches,
locks the pid file, monkey-patches, and runs the same service as ``manage.py carrot``; the
command returns once the service is ready (exit 0) or has failed (exit 1, with the reason).
``status`` follows the LSB convention: 0 running, 3 not running, 1 dead with a stale pid file
(4 when the pid file cannot be read). ``stop`` exits 0 also when nothing runs.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from carrot import daemon
from carrot.management.commands.carrot import worker_argv, worker_environment
from carrot.worker.options import add_options

DEFAULT_LOGFILE = '/var/log/carrot.log'
DEFAULT_PIDFILE = '/var/run/carrot.pid'
ACTIONS = ('start', 'stop', 'restart', 'status')

# LSB exit codes of ``status``.
RUNNING, DEAD_WITH_PIDFILE, NOT_RUNNING, UNKNOWN = 0, 1, 3, 4


class Command(BaseCommand):
    help = ('Run the carrot service as a daemon: start, stop, restart, or ask its status. '
            'Use "manage.py carrot" to run it in the foreground.')
    requires_system_checks: list[str] = []  # the service checks carrot's after patching

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument('action', choices=ACTIONS, metavar='start|stop|restart|status')
        add_options(parser)
        parser.add_argument('--pidfile', default=DEFAULT_PIDFILE,
                            help=f'The pid file, locked while the service runs '
                                 f'(default {DEFAULT_PIDFILE}).')
        parser.add_argument('--hard', action='store_true',
                            help='stop and restart: do not wait for running tasks; RabbitMQ '
                                 'delivers them again later.')

    def handle(self, *args: Any, **options: Any) -> None:
        action = options['action']
        if options['hard'] and action not in ('stop', 'restart'):
            raise CommandError('--hard goes with stop or restart.', returncode=2)
        if options['testmode'] and action != 'start':
            raise CommandError('--testmode goes with start: "carrot_daemon start --testmode" '
                               'runs the start-up checks in the foreground.', returncode=2)
        options['pidfile'] = os.path.abspath(options['pidfile'])
        options['logfile'] = os.path.abspath(options['logfile'])
        code = getattr(self, action)(options)
        self.stdout.flush()
        if code:
            sys.exit(code)

    def say(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def fail(self, text: str) -> None:
        self.stderr.write(f'carrot_daemon: {text}')

    # -- status --------------------------------------------------------------------------

    def inspect(self, pidfile: str) -> daemon.Status | None:
        try:
            return daemon.inspect(pidfile)
        except OSError as error:
            self.fail(f'cannot read the pid file {pidfile}: {error.strerror}. Run as the user '
                      f'that started carrot, or pass the --pidfile it was started with.')
            return None

    def status(self, options: dict[str, Any]) -> int:
        pidfile = options['pidfile']
        found = self.inspect(pidfile)
        if found is None:
            return UNKNOWN
        if found.state is daemon.State.RUNNING:
            self.say(f'carrot is running (pid {found.pid}, pid file {pidfile}).')
            return RUNNING
        if found.state is daemon.State.STOPPED:
            self.say(f'carrot is not running (no pid file at {pidfile}).')
            return NOT_RUNNING
        self.say(f'carrot is not running, but its pid file {pidfile} is stale: {found.why}. '
                 f'"carrot_daemon start" or "carrot_daemon stop" removes it.')
        return DEAD_WITH_PIDFILE

    # -- stop ----------------------------------------------------------------------------

    def stop(self, options: dict[str, Any]) -> int:
        pidfile = options['pidfile']
        found = self.inspect(pidfile)
        if found is None:
            return 1
        if found.state is daemon.State.STOPPED:
            self.say(f'carrot is not running (no pid file at {pidfile}).')
            return 0
        if found.state is daemon.State.STALE:
            self.clean_stale(pidfile, found)
            return 0  # carrot is not running, as asked (LSB)
        pid = found.pid
        assert pid is not None
        timeout = daemon.shutdown_timeout_of(pid)
        if timeout is None:
            timeout = options['shutdown_timeout']
        if timeout is None:
            timeout = self.configured_shutdown_timeout()
        self.say(f'Stopping carrot (pid {pid})' + (' at once' if options['hard'] else '') + '.')
        try:
            gone = daemon.stop(pid, hard=options['hard'], shutdown_timeout=timeout, say=self.say)
        except PermissionError:
            self.fail(f'not allowed to signal carrot (pid {pid}): run "carrot_daemon stop" as '
                      f'the user that started it (or as root).')
            return 4
        if not gone:
            self.fail(f'carrot (pid {pid}) is still running, even after SIGKILL. Check the '
                      f'process (ps -p {pid} -o stat,cmd); the pid file {pidfile} is kept.')
            return 1
        daemon.remove_stale(pidfile)  # the service removes it itself unless it was killed
        self.say(f'carrot (pid {pid}) stopped.')
        return 0

    def clean_stale(self, pidfile: str, found: daemon.Status) -> int:
        """Remove a stale pid file (never signalling its pid); non-zero when it cannot be."""
        try:
            removed = daemon.remove_stale(pidfile)
        except OSError as error:
            self.fail(f'the pid file {pidfile} is stale ({found.why}) but cannot be removed: '
                      f'{error.strerror}. Remove it as a user who may.')
            return 1
        if not removed:
            self.fail(f'the pid file {pidfile} is not carrot\'s ({found.why}), and that '
                      f'process holds its lock: left alone. Pass another --pidfile.')
            return 1
        self.say(f'carrot is not running; removed its stale pid file {pidfile} ({found.why}).')
        return 0

    def configured_shutdown_timeout(self) -> float:
        from carrot.conf import get_settings
        from carrot.exceptions import CarrotError

        try:
            return get_settings().shutdown_timeout
        except CarrotError:
            return 60.0

    # -- start ---------------------------------------------------------------------------

    def start(self, options: dict[str, Any]) -> int:
        problems = self.path_problems(options)
        if problems:
            for problem in problems:
                self.fail(problem)
            return 1
        worker_args = worker_argv(options)
        assert worker_args[1:3] == ['-m', 'carrot.worker.main'], worker_args
        worker_args = worker_args[3:]
        env = worker_environment()
        env['PYTHONPATH'] = os.pathsep.join(
            os.path.abspath(p) for p in env['PYTHONPATH'].split(os.pathsep) if p)
        directory = os.getcwd()
        if options['testmode']:
            return self.testmode(worker_args, env, directory)
        pidfile = options['pidfile']
        found = self.inspect(pidfile)
        if found is None:
            return 1
        if found.state is daemon.State.RUNNING:
            self.fail(f'carrot is already running (pid {found.pid}, pid file {pidfile}). Use '
                      f'"carrot_daemon restart" to restart it, or another --pidfile for a '
                      f'second service.')
            return 1
        if found.state is daemon.State.STALE:
            if self.clean_stale(pidfile, found):
                return 1
        self.say('Starting carrot…')
        outcome = daemon.launch(worker_args, pidfile, env, directory)
        if outcome.ready is not None:
            self.say(f'carrot started (pid {outcome.pid}): {outcome.ready}. '
                     f'Log: {options["logfile"]}; pid file: {pidfile}.')
            return 0
        if outcome.timed_out:
            who = 'carrot' if outcome.pid is None else f'carrot (pid {outcome.pid})'
            self.fail(f'{who} did not report ready within '
                      f'{daemon.START_TIMEOUT:.0f} s. It may still be starting: see '
                      f'{options["logfile"]}, then "carrot_daemon status" or '
                      f'"carrot_daemon stop".')
            return 1
        self.fail(f'carrot did not start:\n{outcome.failed}\n'
                  f'The log {options["logfile"]} has the details.')
        return 1

    def testmode(self, worker_args: list[str], env: dict[str, str], directory: str) -> int:
        """Run the start-up checks through the daemon's entry point, in the foreground."""
        import subprocess

        self.stdout.flush()
        argv = daemon.entry_argv(worker_args, '--foreground', '--directory', directory)
        return subprocess.run(argv, env=env, cwd=directory, stdin=subprocess.DEVNULL).returncode

    def path_problems(self, options: dict[str, Any]) -> list[str]:
        """Why the log or pid file cannot be written, each with what to pass instead."""
        problems = []
        logfile, pidfile = options['logfile'], options['pidfile']
        try:
            open(logfile, 'a').close()
        except OSError as error:
            problems.append(
                f'cannot write the log file {logfile}: {error.strerror}. '
                + self.privileges_hint(logfile, DEFAULT_LOGFILE, '--logfile', 'carrot.log'))
        why = unwritable(pidfile)
        if why:
            problems.append(
                f'cannot write the pid file {pidfile}: {why}. '
                + self.privileges_hint(pidfile, DEFAULT_PIDFILE, '--pidfile', 'carrot.pid'))
        return problems

    def privileges_hint(self, path: str, default: str, option: str, example: str) -> str:
        unprivileged = os.geteuid() != 0
        if unprivileged and os.path.realpath(path) == os.path.realpath(default):
            prefix = (f'{os.path.dirname(default)} is writable only with root privileges: '
                      f'run as root, or pass ')
        else:
            prefix = 'Pass '
        return f'{prefix}{option} with a path you may write to, e.g. {option} ./{example}'

    # -- restart -------------------------------------------------------------------------

    def restart(self, options: dict[str, Any]) -> int:
        code = self.stop(options)
        if code:
            return code
        return self.start(options)


def unwritable(path: str) -> str | None:
    """Why ``path`` cannot be created or written, without creating it; None when it can."""
    if os.path.isdir(path):
        return 'it is a directory'
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else os.strerror(errno.EACCES)
    directory = os.path.dirname(path) or '.'
    if not os.path.isdir(directory):
        return f'the directory {directory} does not exist'
    if os.access(directory, os.W_OK | os.X_OK):
        return None
    if os.statvfs(directory).f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    return os.strerror(errno.EACCES)
