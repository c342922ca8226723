#!/usr/bin/env python
"""manage.py of the test project; the tests run ``manage.py carrot`` through it."""

import os
import sys
from pathlib import Path

if __name__ == '__main__':
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'tests.project.settings')
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
