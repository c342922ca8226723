"""``manage.py carrot_daemon`` with real processes, the real RabbitMQ and the test database.

Every daemon a test starts uses log and pid files in the test's own folder (never
/var/log/carrot.log or /var/run/carrot.pid of this machine) and is killed at the end of the
test if it is still running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from carrot.daemon import lock_held, process_alive
from carrot.models import MessageLog
from carrot.utilities import publish_message
from tests.conftest import MANAGE, Broker, carrot_settings, wait_for
from tests.project import tasks

AS_NOBODY = ['setpriv', '--reuid=nobody', '--regid=nogroup', '--clear-groups']
# Runs a command where /var/log and /run (so /var/run) are empty read-only file systems.
READ_ONLY_DEFAULTS = [
    'unshare', '--mount', '--propagation', 'private', 'sh', '-c',
    'mount -t tmpfs -o ro,size=16k tmpfs /var/log && mount -t tmpfs -o ro,size=16k tmpfs /run '
    '&& exec "$@"', 'sh',
]


@dataclass
class Result:
    pid: int  # the command's own process
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return f'exit status {self.returncode}\n{self.stdout}\n{self.stderr}'


class Daemon:
    """Runs ``manage.py carrot_daemon`` against the files of one test folder."""

    def __init__(self, folder: Path, settings: dict[str, Any]) -> None:
        self.folder = folder
        self.settings = settings
        self.logfile = folder / 'carrot.log'
        self.pidfile = folder / 'carrot.pid'

    def run(self, action: str, *args: str, paths: bool = True, as_nobody: bool = False,
            settings: dict[str, Any] | None = None, wrapper: list[str] | None = None) -> Result:
        argv = [sys.executable, str(MANAGE), 'carrot_daemon', action, *args]
        if paths:
            argv += ['--logfile', str(self.logfile), '--pidfile', str(self.pidfile)]
        if action in ('start', 'restart'):
            argv += ['--loglevel', 'INFO']
        if as_nobody:
            argv = [*AS_NOBODY, *argv]
        argv = [*(wrapper or []), *argv]
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd='/' if as_nobody else self.folder,
            env={**os.environ, 'CARROT_TEST_CARROT': json.dumps(settings or self.settings)},
        )
        stdout, stderr = process.communicate(timeout=180)
        return Result(process.pid, process.returncode, stdout, stderr)

    def pid(self) -> int:
        return int(self.pidfile.read_text())

    def processes(self) -> list[int]:
        """Live ``carrot.daemon`` processes started with this test's files."""
        found = []
        for entry in Path('/proc').iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / 'cmdline').read_bytes().split(b'\0')
            except OSError:
                continue
            if b'carrot.daemon' in argv and any(str(self.folder).encode() in a for a in argv) \
                    and process_alive(int(entry.name)):
                found.append(int(entry.name))
        return found

    def kill_all(self) -> None:
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_for(lambda: not self.processes(), timeout=15, what='the daemons to die')


@pytest.fixture
def daemon(queue: str, tmp_path: Path) -> Iterator[Daemon]:
    found = Daemon(tmp_path, carrot_settings(queue, concurrency=2))
    try:
        yield found
    finally:
        found.kill_all()


def proc_stat(pid: int) -> list[str]:
    """/proc/<pid>/stat's fields after the command name: state, ppid, pgrp, session, tty."""
    return Path(f'/proc/{pid}/stat').read_text().rpartition(')')[2].split()


def in_progress(log: MessageLog) -> bool:
    return MessageLog.objects.get(pk=log.pk).status == 'IN_PROGRESS'


def completed(log: MessageLog) -> bool:
    return MessageLog.objects.get(pk=log.pk).status == 'COMPLETED'


def test_start_detaches_a_service_that_consumes_tasks_and_status_tells_its_pid(
        daemon: Daemon) -> None:
    started = daemon.run('start')
    assert started.returncode == 0, started.output
    pid = daemon.pid()
    assert f'carrot started (pid {pid}): carrot service ready' in started.stdout

    _, ppid, _, session, tty = proc_stat(pid)[:5]
    assert int(ppid) not in (started.pid, os.getpid())  # the command is not its parent
    assert int(session) not in (os.getsid(0), started.pid)  # a session of its own
    assert int(session) != pid  # not a session leader: it can never get a terminal back
    assert tty == '0'  # no controlling terminal
    assert os.readlink(f'/proc/{pid}/cwd') == str(daemon.folder)
    assert 'Umask:\t0022' in Path(f'/proc/{pid}/status').read_text()
    assert os.readlink(f'/proc/{pid}/fd/0') == os.readlink(f'/proc/{pid}/fd/1') == '/dev/null'
    assert os.readlink(f'/proc/{pid}/fd/2') == str(daemon.logfile)

    log = publish_message(tasks.add, 20, 22)
    wait_for(lambda: completed(log), what='the daemon to run the task')
    status = daemon.run('status')
    assert (status.returncode, status.stdout.strip()) == (
        0, f'carrot is running (pid {pid}, pid file {daemon.pidfile}).')
    text = daemon.logfile.read_text()
    assert 'Monkey-patching came after' not in text and 'MonkeyPatchWarning' not in text

    stopped = daemon.run('stop')
    assert stopped.returncode == 0, stopped.output
    assert not process_alive(pid) and not daemon.pidfile.exists()


def test_a_second_start_is_refused_with_the_running_pid(daemon: Daemon) -> None:
    assert daemon.run('start').returncode == 0
    pid = daemon.pid()
    second = daemon.run('start')
    assert second.returncode == 1, second.output
    assert f'carrot is already running (pid {pid}, pid file {daemon.pidfile})' in second.stderr
    assert 'Traceback' not in second.output
    assert process_alive(pid) and daemon.pid() == pid
    assert daemon.processes() == [pid]
    assert daemon.run('stop').returncode == 0


def test_status_and_stop_when_nothing_runs_follow_lsb(daemon: Daemon) -> None:
    status = daemon.run('status')
    assert (status.returncode, status.stdout.strip()) == (
        3, f'carrot is not running (no pid file at {daemon.pidfile}).')
    stopped = daemon.run('stop')
    assert (stopped.returncode, stopped.stdout.strip()) == (
        0, f'carrot is not running (no pid file at {daemon.pidfile}).')
    assert 'Traceback' not in status.output + stopped.output


def test_stop_waits_for_a_running_task_which_completes(daemon: Daemon) -> None:
    assert daemon.run('start').returncode == 0
    pid = daemon.pid()
    log = publish_message(tasks.sleep, 3)
    wait_for(lambda: in_progress(log), what='the task to start')
    stopped = daemon.run('stop')
    assert stopped.returncode == 0, stopped.output
    assert f'waiting for carrot (pid {pid}) to finish running tasks' in stopped.stdout.lower()
    assert f'carrot (pid {pid}) stopped.' in stopped.stdout
    # The stop reached the service while the task ran, and the task was let finish.
    assert 'Stopping: no new tasks; waiting up to 60 s for 1 running task(s)' \
        in daemon.logfile.read_text()
    log.refresh_from_db()
    assert log.status == 'COMPLETED'
    assert not process_alive(pid) and not daemon.pidfile.exists()


def test_a_hard_stop_hands_the_task_back_and_it_runs_after_the_next_start(
        daemon: Daemon, queue: str, broker: Broker) -> None:
    assert daemon.run('start').returncode == 0
    pid = daemon.pid()
    runs = daemon.folder / 'runs.txt'
    log = publish_message(tasks.touch, str(runs), 6)
    wait_for(lambda: in_progress(log), what='the task to start')
    stopped = daemon.run('stop', '--hard')
    assert stopped.returncode == 0, stopped.output
    assert not process_alive(pid) and not daemon.pidfile.exists()
    assert not runs.exists()  # the first run never finished
    assert MessageLog.objects.get(pk=log.pk).status == 'IN_PROGRESS'
    wait_for(lambda: broker.counts(queue) == (1, 0), what='the message back in its queue')

    assert daemon.run('start').returncode == 0
    wait_for(lambda: completed(log), timeout=60, what='the task to run again')
    assert len(runs.read_text().splitlines()) == 1
    assert daemon.run('stop').returncode == 0


def test_a_stale_pid_file_of_a_dead_process_is_reported_then_cleaned(daemon: Daemon) -> None:
    gone = subprocess.Popen(['true'])
    gone.wait()
    daemon.pidfile.write_text(f'{gone.pid}\n')
    status = daemon.run('status')
    assert status.returncode == 1, status.output
    assert f'pid file {daemon.pidfile} is stale: process {gone.pid} is not running' \
        in status.stdout
    assert daemon.pidfile.exists()  # status only tells
    stopped = daemon.run('stop')
    assert stopped.returncode == 0, stopped.output
    assert f'removed its stale pid file {daemon.pidfile}' in stopped.stdout
    assert not daemon.pidfile.exists()


def test_a_pid_file_naming_another_program_is_never_signalled(daemon: Daemon) -> None:
    other = subprocess.Popen(['sleep', '120'])
    # The hardest case too: a program that is alive *and* holds the pid file's lock.
    locked = daemon.folder / 'locked.pid'
    holder = subprocess.Popen(['flock', str(locked), 'sleep', '120'])
    try:
        daemon.pidfile.write_text(f'{other.pid}\n')
        status = daemon.run('status')
        assert status.returncode == 1, status.output
        assert f'process {other.pid} is not carrot (sleep 120)' in status.stdout
        stopped = daemon.run('stop')
        assert stopped.returncode == 0, stopped.output
        assert not daemon.pidfile.exists()

        wait_for(lambda: lock_held(str(locked)), what='flock to take the lock')
        locked.write_text(f'{holder.pid}\n')
        for action in ('stop', 'stop', 'restart'):
            result = daemon.run(action, '--pidfile', str(locked), paths=False)
            assert f'is not carrot\'s (process {holder.pid} is not carrot' in result.stderr
        assert locked.read_text() == f'{holder.pid}\n'
        assert result.returncode == 1  # restart: it will not start on a pid file it cannot own
        time.sleep(0.5)
        assert other.poll() is None and holder.poll() is None  # neither was signalled
    finally:
        other.kill()
        holder.kill()
        other.wait()
        holder.wait()


def test_default_paths_an_unprivileged_user_cannot_write_are_named_with_the_way_out(
        daemon: Daemon) -> None:
    usable = subprocess.run([*AS_NOBODY, sys.executable, '-c', 'import django'], cwd='/',
                            capture_output=True)
    if usable.returncode != 0:
        pytest.skip(f'{sys.executable} cannot run as nobody here (its files are not '
                    f'readable by others); the read-only test covers the same message')
    defaults = daemon.run('start', paths=False, as_nobody=True)
    assert defaults.returncode == 1, defaults.output
    assert 'cannot write the log file /var/log/carrot.log: Permission denied. /var/log is ' \
           'writable only with root privileges: run as root, or pass --logfile' in defaults.stderr
    assert 'cannot write the pid file /var/run/carrot.pid: Permission denied. /var/run is ' \
           'writable only with root privileges: run as root, or pass --pidfile' in defaults.stderr
    only_pid = daemon.run('start', '--logfile', '/dev/null', paths=False, as_nobody=True)
    assert only_pid.returncode == 1, only_pid.output
    assert 'log file' not in only_pid.stderr
    assert 'cannot write the pid file /var/run/carrot.pid' in only_pid.stderr
    assert 'Traceback' not in defaults.output + only_pid.output
    assert not daemon.processes()


def test_default_paths_that_cannot_be_written_are_named_with_the_option_to_use_instead(
        daemon: Daemon) -> None:
    probe = subprocess.run([*READ_ONLY_DEFAULTS, 'true'], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f'cannot make a private read-only /var/log here: {probe.stderr.strip()}')
    defaults = daemon.run('start', paths=False, wrapper=READ_ONLY_DEFAULTS)
    assert defaults.returncode == 1, defaults.output
    assert 'cannot write the log file /var/log/carrot.log: Read-only file system. Pass ' \
           '--logfile with a path you may write to, e.g. --logfile ./carrot.log' \
           in defaults.stderr
    assert 'cannot write the pid file /var/run/carrot.pid: Read-only file system. Pass ' \
           '--pidfile with a path you may write to, e.g. --pidfile ./carrot.pid' \
           in defaults.stderr
    missing = daemon.folder / 'missing'
    elsewhere = daemon.run('start', '--logfile', str(missing / 'carrot.log'),
                           '--pidfile', str(missing / 'carrot.pid'), paths=False)
    assert elsewhere.returncode == 1, elsewhere.output
    assert f'cannot write the pid file {missing}/carrot.pid: the directory {missing} does ' \
           f'not exist. Pass --pidfile' in elsewhere.stderr
    assert f'cannot write the log file {missing}/carrot.log' in elsewhere.stderr
    assert 'Traceback' not in defaults.output + elsewhere.output
    assert not daemon.processes()


def test_restart_starts_a_stopped_service_and_replaces_a_running_one(daemon: Daemon) -> None:
    gone = subprocess.Popen(['true'])
    gone.wait()
    daemon.pidfile.write_text(f'{gone.pid}\n')  # stopped, and not cleanly
    first = daemon.run('restart')
    assert first.returncode == 0, first.output
    assert 'removed its stale pid file' in first.stdout
    old = daemon.pid()
    second = daemon.run('restart')
    assert second.returncode == 0, second.output
    new = daemon.pid()
    assert new != old and not process_alive(old) and process_alive(new)
    assert f'carrot (pid {old}) stopped.' in second.stdout
    assert f'carrot started (pid {new})' in second.stdout
    log = publish_message(tasks.noop)
    wait_for(lambda: completed(log), what='the new service to run a task')
    assert daemon.run('stop', '--hard').returncode == 0


def test_sighup_reopens_the_log_file_that_logrotate_moved(daemon: Daemon) -> None:
    assert daemon.run('start').returncode == 0
    pid = daemon.pid()
    rotated = daemon.logfile.rename(daemon.folder / 'carrot.log.1')
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: daemon.logfile.exists()
             and 'Reopened the log file' in daemon.logfile.read_text(), what='a new log file')
    assert process_alive(pid)
    assert os.readlink(f'/proc/{pid}/fd/2') == str(daemon.logfile)  # standard error too
    log = publish_message(tasks.add, 1, 1)
    wait_for(lambda: completed(log), what='a task after the rotation')
    assert f'({log.uuid})' in daemon.logfile.read_text()
    assert f'({log.uuid})' not in rotated.read_text()
    assert daemon.run('stop').returncode == 0


@pytest.mark.parametrize('settings, reason', [
    ({'default_broker': 'amqp://guest:guest@127.0.0.1:1/', 'queues': [{'name': 'unused'}],
      'task_modules': ['tests.project.tasks']},
     'Cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:1/'),
    ({'queues': [{'name': 'unused'}], 'task_modules': ['tests.project.tasks'], 'bogus': 1},
     'settings.CARROT has unknown key(s) bogus'),
], ids=['broker down', 'bad settings'])
def test_a_start_that_fails_says_why_and_exits_non_zero(
        daemon: Daemon, settings: dict[str, Any], reason: str) -> None:
    started = daemon.run('start', settings=settings)
    assert started.returncode == 1, started.output
    assert 'carrot did not start:' in started.stderr and reason in started.stderr
    assert 'Traceback' not in started.output
    assert not daemon.pidfile.exists()
    wait_for(lambda: not daemon.processes(), timeout=15, what='the failed daemon to exit')


def test_testmode_checks_in_the_foreground_and_leaves_nothing_running(daemon: Daemon) -> None:
    checked = daemon.run('start', '--testmode')
    assert checked.returncode == 0, checked.output
    assert 'monkey-patched socket, ssl, threading, time, select; nothing imported before ' \
           'patching' in checked.stdout
    assert not daemon.pidfile.exists() and not daemon.processes()
