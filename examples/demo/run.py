#!/usr/bin/env python3
"""The carrot demo, in one command: ``python3 examples/demo/run.py``.

Installs carrot into .venv, makes sure RabbitMQ answers, migrates the demo's SQLite
database, schedules a task every second, starts the carrot service, publishes a few tasks,
shows what became of them and of the schedule, and stops the service cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

DEMO = Path(__file__).resolve().parent
sys.path.insert(0, str(DEMO.parent.parent))

from tests.bootstrap import VENV, ensure_rabbitmq, say, venv_python  # noqa: E402


def in_virtualenv() -> None:
    """Re-run this script with the virtualenv's python, which has carrot installed."""
    python = venv_python([])
    if Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(str(python), [str(python), __file__, *sys.argv[1:]])


LOGFILE = DEMO / 'carrot-demo.log'


def start_service() -> subprocess.Popen[bytes]:
    say(f'Starting the carrot service: python manage.py carrot --logfile {LOGFILE.name}')
    LOGFILE.write_text('')
    service = subprocess.Popen(
        [sys.executable, 'manage.py', 'carrot', '--logfile', str(LOGFILE), '--loglevel',
         'INFO'], cwd=DEMO, stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while 'carrot service ready' not in LOGFILE.read_text():
        if service.poll() is not None or time.monotonic() > deadline:
            service.kill()
            sys.exit(f'The carrot service did not start; see {LOGFILE}.')
        time.sleep(0.2)
    print('   the service is consuming')
    return service


def main() -> int:
    in_virtualenv()
    ensure_rabbitmq()
    os.chdir(DEMO)
    os.environ['DJANGO_SETTINGS_MODULE'] = 'demo.settings'  # this project, whatever is set
    sys.path.insert(0, str(DEMO))
    say('Migrating the demo database (demo.sqlite3)')
    subprocess.run([sys.executable, 'manage.py', 'migrate', '-v0'], check=True)

    import django

    django.setup()
    from demo import tasks
    from django.db import transaction

    from carrot.models import MessageLog, ScheduledTask
    from carrot.utilities import create_scheduled_task, publish_message

    MessageLog.objects.all().delete()
    ScheduledTask.objects.all().delete()
    say('Scheduling demo.tasks.add(40, 2) every second (the service publishes it)')
    create_scheduled_task(tasks.add, {'seconds': 1}, 'every-second', None, 40, 2)
    service = start_service()
    try:
        say('Publishing tasks')
        logs = [
            publish_message(tasks.add, 2, 3),
            publish_message('demo.tasks.greet', 'Ada', greeting='Good morning'),
            publish_message(tasks.divide, 1, 0),
        ]
        with transaction.atomic():  # sent when the transaction commits
            logs.append(publish_message(tasks.slow, 0.5))
        logs += [publish_message(tasks.add, i, i) for i in range(10)]
        print(f'   published {len(logs)} tasks; each has a MessageLog row (PUBLISHED)')

        deadline = time.monotonic() + 30
        pending = set(log.pk for log in logs)
        while pending and time.monotonic() < deadline:
            time.sleep(0.2)
            pending = set(MessageLog.objects.filter(pk__in=pending).exclude(
                status__in=['COMPLETED', 'FAILED']).values_list('pk', flat=True))
        say('What became of them (from the MessageLog table)')
        for log in logs[:4]:
            log.refresh_from_db()
            result = log.output if log.status == 'COMPLETED' else log.exception
            print(f'   {log.task:<18} {log.status:<10} {result}')
            for line in (log.log or '').splitlines():
                if 'carrot.demo' in line:
                    print(f'   {"":<18} log: {line.split("carrot.demo: ")[-1]}')
        done = MessageLog.objects.filter(pk__in=[log.pk for log in logs[4:]],
                                         status='COMPLETED').count()
        print(f'   demo.tasks.add x10 COMPLETED: {done} of 10')
        if pending:
            print(f'   {len(pending)} task(s) did not finish within 30 s', file=sys.stderr)
        scheduled = MessageLog.objects.filter(task='demo.tasks.add', task_args='[40, 2]')
        deadline = time.monotonic() + 10
        while scheduled.filter(status='COMPLETED').count() < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        row = ScheduledTask.objects.get(task_name='every-second')
        print(f'   scheduled task {row.task_name!r}: {scheduled.count()} runs so far, '
              f'{scheduled.filter(status="COMPLETED").count()} COMPLETED; next at '
              f'{row.next_run_at:%H:%M:%S}')
    finally:
        say('Stopping the service (SIGTERM): it finishes running tasks and exits')
        service.send_signal(signal.SIGTERM)
        code = service.wait(90)
    print(f'   service exited with status {code}; its log is {LOGFILE}')
    return 0 if code == 0 and not pending else 1


if __name__ == '__main__':
    sys.exit(main())
