"""Sphinx configuration of the carrot docs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'tests.project.settings')
os.environ.setdefault('CARROT_TEST_SQLITE_PATH', ':memory:')

import django  # noqa: E402

django.setup()

project = 'carrot'
author = 'the carrot developers'
copyright = '2026, the carrot developers'
extensions = ['sphinx.ext.autodoc', 'sphinx.ext.viewcode']
autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
nitpicky = False
exclude_patterns = ['_build']
html_theme = 'alabaster'
