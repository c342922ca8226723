"""The checks that keep the code honest: lint, types, migrations, docs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from django.core.management import call_command

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    folders = [f for f in ('carrot', 'tests', 'examples', 'benchmarks', 'docs')
               if (ROOT / f).is_dir()]
    result = run('ruff', 'check', *folders)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_finds_nothing() -> None:
    result = run('mypy')
    assert result.returncode == 0, result.stdout + result.stderr


def test_migrations_match_the_models() -> None:
    call_command('makemigrations', 'carrot', '--check', '--dry-run', verbosity=0)


def test_docs_build_without_warnings(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-b', 'html', 'docs',
         str(tmp_path / 'html')], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, 'DJANGO_SETTINGS_MODULE': 'tests.project.settings'},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_web_process_checking_and_publishing_imports_no_gevent() -> None:
    """``manage.py check``, the monitor's URLs and the publishing API run in web processes,
    which must not be monkey-patched or slowed by importing gevent."""
    code = (
        'import sys, django\n'
        'django.setup()\n'
        'from django.core.management import call_command\n'
        "call_command('check', verbosity=0)\n"
        'import carrot.urls, carrot.utilities, carrot.admin\n'
        "print(sorted(m for m in sys.modules if m == 'gevent' or m.startswith('gevent.')))\n"
    )
    result = subprocess.run(
        [sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, 'DJANGO_SETTINGS_MODULE': 'tests.project.settings'},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == '[]', f'imported: {result.stdout}'
