"""What the README's two commands share: a virtualenv with what they need, and RabbitMQ.

Standard library only: this runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get('CARROT_VENV', ROOT / '.venv'))
RABBITMQ = ('127.0.0.1', 5672)
POSTGRESQL = ('127.0.0.1', 5432)
REDIS = ('127.0.0.1', 6379)


def say(text: str) -> None:
    print(f'==> {text}', flush=True)


def venv_python(requirements: list[Path], extra: list[str] | None = None,
                folder: Path = VENV) -> Path:
    """The virtualenv's python, after installing carrot and ``requirements`` when they changed.

    ``extra`` are further requirement specifiers, such as a Django version to test against.
    """
    python = folder / 'bin' / 'python'
    if not python.exists():
        say(f'Creating a virtualenv in {folder}')
        venv.EnvBuilder(with_pip=True).create(folder)
    inputs = [ROOT / 'setup.py', ROOT / 'requirements.txt', *requirements]
    extra = extra or []
    contents = b''.join(p.read_bytes() for p in inputs) + ' '.join(extra).encode()
    digest = hashlib.sha256(contents).hexdigest()[:16]
    stamp = folder / f'.carrot-installed-{digest}'
    if not stamp.exists():
        say('Installing carrot and what it needs (pip)')
        pip = [str(python), '-m', 'pip', 'install', '--disable-pip-version-check', '-q']
        subprocess.run([*pip, '--upgrade', 'pip'], check=True)
        args = [*pip, '-e', str(ROOT)]
        for requirement in requirements:
            args += ['-r', str(requirement)]
        args += extra
        subprocess.run(args, check=True)
        stamp.touch()
    return python


def answering(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=1):
            return True
    except OSError:
        return False


def wait_until_answering(address: tuple[str, int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if answering(address):
            return True
        time.sleep(1)
    return False


def ensure_rabbitmq() -> None:
    """RabbitMQ on 127.0.0.1:5672: already there, started here, or a message and exit 2."""
    if answering(RABBITMQ):
        return
    server = shutil.which('rabbitmq-server')
    if server is None:
        sys.exit(
            'RabbitMQ is not answering on 127.0.0.1:5672 and rabbitmq-server is not installed.\n'
            'Install it (Debian/Ubuntu: sudo apt-get install rabbitmq-server; macOS: brew '
            'install rabbitmq) or start one, for example:\n'
            '  docker run -d -p 5672:5672 rabbitmq:3\n'
            'then run this command again.'
        )
    say('Starting RabbitMQ (rabbitmq-server -detached)')
    subprocess.run([server, '-detached'], check=False)
    if not wait_until_answering(RABBITMQ, 90):
        sys.exit('rabbitmq-server was started but 127.0.0.1:5672 is still not answering after '
                 '90 s; see its log (usually /var/log/rabbitmq/).')
    ctl = shutil.which('rabbitmqctl')
    if ctl:
        subprocess.run([ctl, '-q', 'await_startup'], check=False, timeout=120)


def ensure_redis() -> bool:
    """Whether Redis answers on 127.0.0.1:6379, starting a local redis-server if it can."""
    if answering(REDIS):
        return True
    server = shutil.which('redis-server')
    if server:
        say('Starting Redis (redis-server --daemonize yes)')
        subprocess.run([server, '--daemonize', 'yes', '--bind', '127.0.0.1', '--port', '6379',
                        '--save', '', '--appendonly', 'no'], check=False)
        return wait_until_answering(REDIS, 30)
    return False


def ensure_postgresql() -> bool:
    """Whether PostgreSQL answers on 127.0.0.1:5432, starting a local cluster if it can."""
    if answering(POSTGRESQL):
        return True
    ctl = shutil.which('pg_ctlcluster')
    versions = Path('/etc/postgresql')
    if ctl and versions.is_dir():
        for version in sorted(p.name for p in versions.iterdir()):
            say(f'Starting PostgreSQL {version} (pg_ctlcluster)')
            subprocess.run([ctl, '--skip-systemctl-redirect', version, 'main', 'start'],
                           check=False)
        return wait_until_answering(POSTGRESQL, 60)
    return False


CHROMIUM = Path('/usr/bin/chromium')


def ensure_chromium() -> bool:
    """Whether Debian's Chromium is at /usr/bin/chromium for the browser tests, installing it
    with apt-get (as root) when it is missing."""
    if CHROMIUM.exists():
        return True
    apt = shutil.which('apt-get')
    if apt is None or os.geteuid() != 0:
        say('Chromium is not installed and cannot be installed here: the browser tests are '
            'skipped (as root on Debian or Ubuntu: apt-get install chromium)')
        return False
    say('Installing Chromium for the browser tests (apt-get install chromium)')
    env = {**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'}
    subprocess.run([apt, 'update', '-qq'], check=False, env=env)
    subprocess.run([apt, 'install', '-y', '-qq', 'chromium'], check=False, env=env)
    return CHROMIUM.exists()
