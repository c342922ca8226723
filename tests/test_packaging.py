"""``pip install .`` gets everything: the package data and the dependencies."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_migrations_commands_and_type_marker(tmp_path: Path) -> None:
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '-q', '-w',
                    str(tmp_path), str(ROOT)], check=True, timeout=300,
                   capture_output=True)
    [wheel] = tmp_path.glob('django_carrot-*.whl')
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith('/METADATA'))
    for expected in ('carrot/migrations/0006_scheduling.py',
                     'carrot/management/commands/carrot.py',
                     'carrot/management/commands/carrot_send.py',
                     'carrot/worker/main.py', 'carrot/py.typed',
                     'carrot/migrations/0007_monitor.py', 'carrot/urls.py',
                     'carrot/templates/carrot/monitor/base.html',
                     'carrot/templates/carrot/monitor/task_list.html',
                     'carrot/static/carrot/monitor.css', 'carrot/static/carrot/monitor.js'):
        assert expected in names
    assert not any(n.startswith('tests/') for n in names)
    requires = {line.split(':', 1)[1].strip().split('>')[0].split('<')[0].lower()
                for line in metadata.splitlines() if line.startswith('Requires-Dist:')
                and 'extra ==' not in line}
    # DESIGN.md's four, and the cron parser the scheduler uses.
    assert requires == {'gevent', 'amqpstorm', 'django', 'python-daemon', 'cronsim'}
