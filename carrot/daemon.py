"""carrot as a daemon: detach with python-daemon, a locked pid file, start, stop and status.

``manage.py carrot_daemon start`` runs with Django already imported, too late for gevent's
monkey-patching, so it launches a fresh interpreter on this module (``python -m
carrot.daemon``). That process detaches (``daemon.DaemonContext``), takes the pid file's lock,
and only then imports ``carrot.worker.main``, which monkey-patches before Django and the
database driver load, and runs the same service as ``manage.py carrot``. It tells the start
command on a pipe whether the service became ready or why it could not start.

The pid file is this module's own, not python-daemon's ``lockfile``-based one (``lockfile``
is unmaintained): the daemon holds an exclusive ``flock`` on it for its whole life, so the
kernel releases it the moment the process dies. A pid file whose lock nobody holds is stale
for certain, whatever pid it names; ``stop`` never signals a process unless the lock is held
and the process's command line is this module's.

Only the standard library is imported at module level: the daemon imports this module
before it monkey-patches.
"""

from __future__ import annotations

import argparse
import enum
import fcntl
import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

ENTRY_MODULE = 'carrot.daemon'
# How long ``start`` waits for the service to say it is ready (or why it is not).
START_TIMEOUT = 60.0
# Added to the shutdown timeout when ``stop`` waits: after the running tasks, the service
# writes their last rows (up to 30 s) and hands back what did not finish.
STOP_MARGIN = 45.0
# ``--hard``: how long the service gets to stop at once before it is killed.
HARD_STOP_WAIT = 15.0
# A ``status`` or ``stop`` probing the lock holds it for an instant; a starting daemon
# that meets the lock taken tries again for this long before it calls it "running".
LOCK_RETRY_SECONDS = 2.0
UMASK = 0o022


class AlreadyRunning(Exception):
    def __init__(self, pid: int | None) -> None:
        super().__init__(pid)
        self.pid = pid


# -- the pid file --------------------------------------------------------------------------

class PidFile:
    """The daemon's own pid file: created, locked and written on ``acquire``, removed on
    ``release``. The lock lasts as long as the process (or until ``release``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        """Lock and write the pid file; AlreadyRunning when another process holds it."""
        deadline = time.monotonic() + LOCK_RETRY_SECONDS
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    raise AlreadyRunning(read_pid(self.path)) from None
                time.sleep(0.05)
                continue
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):
                break
            # Another process removed the file between our open and our lock: the lock
            # we hold is on a file nobody will find. Take the new one.
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f'{os.getpid()}\n'.encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        """Remove the pid file (while still holding its lock) and let the lock go."""
        if self.fd is None:
            return
        try:
            if _same_file(self.fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _same_file(fd: int, path: str) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def read_pid(path: str) -> int | None:
    """The pid written in ``path``; None when the file is missing, empty or not a pid."""
    try:
        with open(path) as handle:
            text = handle.read(64).strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def lock_held(path: str) -> bool:
    """Whether a process holds the pid file's lock (False when there is no file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the probe's own shared lock
    return False


# -- processes ------------------------------------------------------------------------------

def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for its parent is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    try:
        with open(f'/proc/{pid}/stat') as handle:
            state = handle.read().rpartition(')')[2].split()[0]
    except (OSError, IndexError):
        return True  # no /proc here: os.kill's answer is all there is
    return state not in ('Z', 'X')


def command_line(pid: int) -> list[str] | None:
    """The process's arguments, from /proc; None where /proc cannot tell."""
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as handle:
            raw = handle.read()
    except OSError:
        return None
    return [part.decode(errors='replace') for part in raw.split(b'\0') if part]


def is_carrot_daemon(pid: int) -> bool:
    """Whether ``pid`` runs this module's entry point (``python -m carrot.daemon``)."""
    argv = command_line(pid)
    if argv is None:
        return not os.path.isdir('/proc/self')  # no /proc: rely on the lock alone
    return any(a == '-m' and b == ENTRY_MODULE for a, b in zip(argv, argv[1:], strict=False))


def describe(pid: int) -> str:
    argv = command_line(pid)
    return ' '.join(argv)[:120] if argv else 'another program'


class State(enum.Enum):
    RUNNING = 'running'
    STOPPED = 'stopped'  # no pid file
    STALE = 'stale'      # a pid file, but no carrot service behind it


@dataclass(frozen=True)
class Status:
    state: State
    pid: int | None = None
    why: str = ''  # for STALE: what is wrong with the pid file


def inspect(path: str) -> Status:
    """What the pid file at ``path`` says, checked against the lock and the process."""
    if not os.path.exists(path):
        return Status(State.STOPPED)
    held = lock_held(path)
    pid = read_pid(path)
    if held and pid is None:
        # A daemon is between locking the file and writing its pid: give it a moment.
        deadline = time.monotonic() + 1.0
        while pid is None and time.monotonic() < deadline:
            time.sleep(0.05)
            pid = read_pid(path)
    if pid is None:
        return Status(State.STALE, None, 'it holds no process id')
    if not process_alive(pid):
        return Status(State.STALE, pid, f'process {pid} is not running')
    if not is_carrot_daemon(pid):
        return Status(State.STALE, pid, f'process {pid} is not carrot ({describe(pid)})')
    if not held:
        return Status(State.STALE, pid, f'process {pid} does not hold the pid file\'s lock')
    return Status(State.RUNNING, pid)


def remove_stale(path: str) -> bool:
    """Remove a pid file whose lock nobody holds; whether it is gone.

    A file whose lock a live process holds is left alone, whatever that process is.
    """
    if lock_held(path):
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return True


# -- stop -----------------------------------------------------------------------------------

def wait_gone(pid: int, seconds: float, tick: Callable[[float], None] | None = None) -> bool:
    """Wait up to ``seconds`` for ``pid`` to exit; ``tick(elapsed)`` about once a second."""
    start = time.monotonic()
    next_tick = start + 1.0
    while process_alive(pid):
        now = time.monotonic()
        if now - start >= seconds:
            return False
        if tick is not None and now >= next_tick:
            tick(now - start)
            next_tick += 1.0
        time.sleep(0.1)
    return True


def stop(pid: int, *, hard: bool, shutdown_timeout: float,
         say: Callable[[str], None]) -> bool:
    """Stop the carrot service ``pid``; whether it is gone.

    Graceful: SIGTERM, then wait for running tasks (the shutdown timeout plus a margin),
    then the hard way. Hard: SIGTERM repeated (the service's "second signal stops at once"),
    then SIGKILL. Either way RabbitMQ delivers unfinished messages again.
    """
    if not hard:
        os.kill(pid, signal.SIGTERM)
        bound = shutdown_timeout + STOP_MARGIN
        say(f'Waiting for carrot (pid {pid}) to finish running tasks '
            f'(up to {shutdown_timeout:.0f} s, then they are handed back to RabbitMQ)…')
        if wait_gone(pid, bound, lambda elapsed: say(
                f'waiting for carrot (pid {pid}) to finish running tasks… {elapsed:.0f} s')):
            return True
        say(f'carrot (pid {pid}) is still running after {bound:.0f} s: stopping it at once.')
    deadline = time.monotonic() + HARD_STOP_WAIT
    while time.monotonic() < deadline:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return True
        if wait_gone(pid, 0.5):
            return True
    say(f'carrot (pid {pid}) did not stop within {HARD_STOP_WAIT:.0f} s: killing it (SIGKILL).')
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    return wait_gone(pid, 10.0)


def shutdown_timeout_of(pid: int) -> float | None:
    """The ``--shutdown-timeout`` the running service was started with, if any."""
    argv = command_line(pid) or []
    for option, value in zip(argv, argv[1:], strict=False):
        if option == '--shutdown-timeout':
            try:
                return float(value)
            except ValueError:
                return None
    return None


# -- start: the command's side --------------------------------------------------------------

@dataclass
class Outcome:
    """What the daemon said before it was ready, or why it is not."""

    pid: int | None = None
    ready: str | None = None
    failed: str | None = None
    timed_out: bool = False


def entry_argv(worker_args: list[str], *entry_options: str) -> list[str]:
    """The daemon's command line: its own options, then the worker's after ``--``."""
    return [sys.executable, '-m', ENTRY_MODULE, *entry_options, '--', *worker_args]


def launch(worker_args: list[str], pidfile: str, env: dict[str, str], directory: str,
           timeout: float = START_TIMEOUT) -> Outcome:
    """Start ``python -m carrot.daemon`` and wait until the service is up or has failed.

    ``worker_args`` are ``carrot.worker.main``'s options.
    """
    import subprocess  # not at module level: it imports threading, before the daemon patches

    read_end, write_end = os.pipe()
    argv = entry_argv(worker_args, '--pidfile', pidfile, '--ready-fd', str(write_end),
                      '--directory', directory)
    try:
        launcher = subprocess.Popen(argv, env=env, cwd=directory,
                                    stdin=subprocess.DEVNULL, pass_fds=(write_end,))
    finally:
        os.close(write_end)
    outcome = Outcome()
    buffer = b''
    deadline = time.monotonic() + timeout
    try:
        while outcome.ready is None and outcome.failed is None:
            left = deadline - time.monotonic()
            if left <= 0:
                outcome.timed_out = True
                break
            readable, _, _ = select.select([read_end], [], [], min(left, 1.0))
            if not readable:
                continue
            chunk = os.read(read_end, 65536)
            if not chunk:
                break  # every writer is gone
            buffer += chunk
            while b'\n' in buffer:
                line, buffer = buffer.split(b'\n', 1)
                message: dict[str, Any] = json.loads(line)
                outcome.pid = message.get('pid', outcome.pid)
                outcome.ready = message.get('ready', outcome.ready)
                outcome.failed = message.get('failed', outcome.failed)
    finally:
        os.close(read_end)
    # The launcher exits as soon as python-daemon's first fork is done (or when it fails
    # before that, having printed why).
    try:
        code = launcher.wait(10)
    except subprocess.TimeoutExpired:
        code = None
    if outcome.ready is None and outcome.failed is None and not outcome.timed_out:
        outcome.failed = ('the daemon process exited before the service was ready'
                          + (f' (exit status {code})' if code else ''))
    return outcome


# -- the daemon's side ----------------------------------------------------------------------

class Reporter:
    """The daemon's half of the readiness pipe: one JSON object a line."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.done = False

    def send(self, **message: object) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, json.dumps(message).encode() + b'\n')
        except OSError:
            self.close()  # the start command is gone: nobody to tell, carry on

    def ready(self, line: str) -> None:
        self.send(ready=line)
        self.done = True
        self.close()

    def failed(self, reason: str) -> None:
        if not self.done:
            self.send(failed=reason)
        self.done = True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def reopen_log(logfile: str) -> None:
    """SIGHUP: reopen the log file (``logrotate`` moved it away) for logging and stderr."""
    import logging
    import logging.handlers

    log = logging.getLogger('carrot.worker')
    try:
        fd = os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        log.error('SIGHUP: cannot reopen the log file %s (%s); still writing to the old one',
                  logfile, error.strerror)
        return
    try:
        os.dup2(fd, sys.stderr.fileno())
    finally:
        os.close(fd)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                if handler.stream is not None:
                    handler.stream.close()
                handler.stream = handler._open()
                if isinstance(handler, logging.handlers.WatchedFileHandler):
                    handler._statstream()  # remember which file it now writes
            finally:
                handler.release()
    log.info('Reopened the log file %s (SIGHUP)', logfile)


def _reopen_log_on_sighup(logfile: str) -> None:
    import gevent  # after monkey-patching

    gevent.signal_handler(signal.SIGHUP, reopen_log, logfile)


def _entry_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m carrot.daemon', allow_abbrev=False)
    parser.add_argument('--pidfile', help='The pid file to lock and write.')
    parser.add_argument('--ready-fd', type=int, help='Where to report ready or failed.')
    parser.add_argument('--directory', default='/', help='The working directory.')
    parser.add_argument('--foreground', action='store_true',
                        help='Do not detach (for --testmode).')
    return parser


def run(argv: list[str]) -> int:
    """``python -m carrot.daemon [entry options] -- [worker options]``."""
    split = argv.index('--') if '--' in argv else len(argv)
    options = _entry_parser().parse_args(argv[:split])
    worker_args = argv[split + 1:]
    from carrot.worker.options import add_options  # standard library only

    worker_parser = argparse.ArgumentParser(prog='carrot')
    add_options(worker_parser)
    worker_options = worker_parser.parse_args(worker_args)

    if options.foreground:
        from carrot.worker import main as worker  # monkey-patches first

        return worker.main(worker_args)

    reporter = Reporter(options.ready_fd)
    if not options.pidfile:
        reporter.failed('no --pidfile given')
        return 2
    try:
        log: IO[str] = open(worker_options.logfile, 'a', buffering=1)
    except OSError as error:
        reporter.failed(f'--logfile {worker_options.logfile} cannot be written: '
                        f'{error.strerror}. Pass --logfile with a path you may write to.')
        return 2

    import daemon as python_daemon  # python-daemon

    context = python_daemon.DaemonContext(
        working_directory=options.directory,
        umask=UMASK,
        detach_process=True,  # also when started by init or from a socket
        files_preserve=[log, options.ready_fd],
        stdin=None,     # /dev/null
        stdout=None,    # /dev/null: the service already writes each log line to the file
        stderr=log,     # tracebacks and anything printed go to the log file
        signal_map={
            signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None,
            signal.SIGHUP: None,  # until the service reopens its log on it
            signal.SIGTERM: 'terminate',  # until the service handles it gracefully
        },
    )
    with context:
        log.close()  # standard error is a copy of it now; SIGHUP reopens that copy
        pidfile = PidFile(options.pidfile)
        try:
            pidfile.acquire()
        except AlreadyRunning as running:
            reporter.failed(f'carrot is already running (pid {running.pid}, pid file '
                            f'{options.pidfile})')
            return 1
        except OSError as error:
            reporter.failed(f'--pidfile {options.pidfile} cannot be written: '
                            f'{error.strerror}. Pass --pidfile with a path you may write to.')
            return 1
        reporter.send(pid=os.getpid())
        try:
            return _serve(worker_args, worker_options.logfile, reporter)
        finally:
            pidfile.release()
            reporter.close()


def _serve(worker_args: list[str], logfile: str, reporter: Reporter) -> int:
    code = 1
    try:
        from carrot.worker import main as worker  # monkey-patches before Django loads

        _reopen_log_on_sighup(logfile)
        code = worker.main(worker_args, on_ready=reporter.ready, on_failure=reporter.failed)
    except SystemExit as exit:
        reporter.failed(f'stopped before it was ready ({exit})')
        raise
    except Exception as error:
        import traceback

        traceback.print_exc()  # into the log file
        reporter.failed(f'{type(error).__name__}: {error}')
        return 1
    if not reporter.done:
        reporter.failed(f'the service exited with status {code} before it was ready')
    return code


if __name__ == '__main__':
    sys.exit(run(sys.argv[1:]))
