"""Minimal Django settings for benchmarking carrot.

PostgreSQL (database ``carrot_bench``) by default; ``BENCH_DB=sqlite`` for a SQLite file in
/tmp (WAL, IMMEDIATE transactions, so 100 worker greenlets wait instead of failing).
"""

from __future__ import annotations

import os

SECRET_KEY = 'carrot-benchmark-not-secret'
DEBUG = False  # DEBUG=True would keep every SQL query in memory
USE_TZ = True
TIME_ZONE = 'UTC'
ALLOWED_HOSTS = ['*']

INSTALLED_APPS = [
    'django.contrib.contenttypes',
    'django.contrib.auth',
    'carrot',
]

if os.environ.get('BENCH_DB', 'postgres') == 'sqlite':
    DATABASES = {
        'default': {
            'ENGINE': 'django.db.backends.sqlite3',
            'NAME': os.environ.get('BENCH_SQLITE_PATH', '/tmp/carrot-bench.sqlite3'),
            'OPTIONS': {
                'init_command': 'PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL',
                'transaction_mode': 'IMMEDIATE',
                'timeout': 30,
            },
        },
    }
else:
    DATABASES = {
        'default': {
            'ENGINE': 'django.db.backends.postgresql',
            'NAME': os.environ.get('BENCH_PG_NAME', 'carrot_bench'),
            'USER': 'postgres',
            'HOST': '127.0.0.1',
        },
    }

DEFAULT_AUTO_FIELD = 'django.db.models.AutoField'
# What carrot.W002 asks for; it changes nothing measured (only error reports use it).
DEFAULT_EXCEPTION_REPORTER_FILTER = 'carrot.reporting.SafeExceptionReporterFilter'

CARROT = {
    'default_broker': 'amqp://guest:guest@127.0.0.1:5672/',
    # carrot's defaults but for the concurrency, which the peers also get: prefetch 1.
    # BENCH_CARROT_UNTRACKED=1 (carrot_untracked_adapter.py): the queue of untracked tasks.
    # BENCH_CARROT_PREFETCH=N: another prefetch, to measure what it changes (not the default).
    # BENCH_CARROT_CONCURRENCY=N: consumers per worker (benchmarks/scale.py varies it).
    # BENCH_CARROT_SYNCHRONOUS_COMMIT=0: the publisher's rows not waiting for the disk (a).
    'queues': [{**({'name': 'bench_carrot_untracked', 'tracked': False}
                   if os.environ.get('BENCH_CARROT_UNTRACKED') == '1'
                   else {'name': 'bench_carrot'}),
                'concurrency': int(os.environ.get('BENCH_CARROT_CONCURRENCY', '100')),
                'prefetch': int(os.environ.get('BENCH_CARROT_PREFETCH', '1'))}],
    'task_modules': ['tasks'],
    'synchronous_commit': os.environ.get('BENCH_CARROT_SYNCHRONOUS_COMMIT', '1') != '0',
}

LOGGING = {
    'version': 1,
    'disable_existing_loggers': False,
    'handlers': {'console': {'class': 'logging.StreamHandler'}},
    'root': {'handlers': ['console'], 'level': 'WARNING'},
}
