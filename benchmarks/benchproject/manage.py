#!/usr/bin/env python
"""manage.py for the benchmark project; puts the carrot checkout on sys.path."""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent  # /work/main: where the carrot package lives

if __name__ == '__main__':
    sys.path.insert(0, str(HERE))
    sys.path.insert(1, str(REPO))
    os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'settings')
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
