"""The checks that keep the code honest: lint, types, migrations, docs."""

from __future__ import annotations

import ast
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


def _module_imports(path: Path) -> set[str]:
    """The carrot modules ``path`` imports when it is imported (not inside functions, nor
    under ``if TYPE_CHECKING``)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f'{node.module}.{alias.name}' for alias in node.names)
        elif isinstance(node, ast.Try):  # an optional driver
            found.update(alias.name for n in node.body if isinstance(n, ast.Import)
                         for alias in n.names)
    return {name for name in found if name.split('.')[0] == 'carrot'}


def test_carrot_modules_import_one_another_without_a_cycle() -> None:
    """models → publishing → lifecycle → models was a cycle; none may come back."""
    modules = {'.'.join(p.relative_to(ROOT).with_suffix('').parts).removesuffix('.__init__'): p
               for p in (ROOT / 'carrot').rglob('*.py') if 'migrations' not in p.parts}
    graph = {name: {m for m in _module_imports(path) if m in modules and m != name}
             for name, path in modules.items()}

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            name, trail = stack.pop()
            for imported in graph[name]:
                if imported == start:
                    return [*trail, start]
                if imported not in trail and len(trail) < len(graph):
                    stack.append((imported, [*trail, imported]))
        return None

    # A package's __init__ imported by its own submodules is how Python works, not a cycle.
    cycles = [c for name in graph if '.' in name and (c := cycle_from(name))
              and not any(step in ('carrot', 'carrot.worker', 'carrot.monitor',
                                   'carrot.management', 'carrot.management.commands')
                          for step in c)]
    assert not cycles, ' ; '.join(' → '.join(c) for c in cycles)
