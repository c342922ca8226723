"""Settings of the small Django project the tests run carrot in.

The tests start workers as subprocesses, so what varies between tests comes from the
environment: CARROT_TEST_DB (sqlite or postgresql), CARROT_TEST_SQLITE_PATH,
CARROT_TEST_PG_NAME, CARROT_TEST_PG_PORT, CARROT_TEST_USE_TZ (0 turns USE_TZ off) and
CARROT_TEST_CARROT (a JSON ``CARROT`` setting).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent
SECRET_KEY = 'carrot-tests-only'
DEBUG = False
USE_TZ = os.environ.get('CARROT_TEST_USE_TZ', '1') == '1'
TIME_ZONE = os.environ.get('CARROT_TEST_TIME_ZONE', 'UTC')
ALLOWED_HOSTS = ['*']
ROOT_URLCONF = 'tests.project.urls'
# The broker password stays out of the debug page and the mailed error reports.
DEFAULT_EXCEPTION_REPORTER_FILTER = 'carrot.reporting.SafeExceptionReporterFilter'
DEFAULT_AUTO_FIELD = 'django.db.models.AutoField'

INSTALLED_APPS = [
    'django.contrib.admin',
    'django.contrib.auth',
    'django.contrib.contenttypes',
    'django.contrib.sessions',
    'django.contrib.messages',
    'carrot',
]
# Django's task framework: built in from Django 6.0, the django-tasks backport on 5.2. Its
# tests' tasks are in an installed app that carrot's autodiscovery finds.
if importlib.util.find_spec('django.tasks') is None \
        and importlib.util.find_spec('django_tasks') is not None:
    INSTALLED_APPS.append('django_tasks')
if importlib.util.find_spec('django.tasks') or importlib.util.find_spec('django_tasks'):
    INSTALLED_APPS.append('tests.taskapp')
    TASKS = {'default': {'BACKEND': 'carrot.task_backend.CarrotBackend'}}
MIDDLEWARE = [
    'django.contrib.sessions.middleware.SessionMiddleware',
    'django.contrib.auth.middleware.AuthenticationMiddleware',
    'django.contrib.messages.middleware.MessageMiddleware',
]
TEMPLATES = [{
    'BACKEND': 'django.template.backends.django.DjangoTemplates',
    'APP_DIRS': True,
    'OPTIONS': {'context_processors': [
        'django.template.context_processors.request',
        'django.contrib.auth.context_processors.auth',
        'django.contrib.messages.context_processors.messages',
    ]},
}]

if os.environ.get('CARROT_TEST_DB', 'sqlite') == 'postgresql':
    DATABASES = {'default': {
        'ENGINE': 'django.db.backends.postgresql',
        'NAME': os.environ.get('CARROT_TEST_PG_NAME', 'carrot_tests'),
        'USER': 'postgres',
        'HOST': '127.0.0.1',
        # A test's proxy in front of PostgreSQL, to cut the worker off from its database.
        'PORT': int(os.environ.get('CARROT_TEST_PG_PORT', 5432)),
    }}
else:
    DATABASES = {'default': {
        'ENGINE': 'django.db.backends.sqlite3',
        'NAME': os.environ.get('CARROT_TEST_SQLITE_PATH', str(BASE_DIR / 'carrot-tests.sqlite3')),
        # WAL lets the worker write while readers read; IMMEDIATE and a busy timeout make
        # concurrent writers wait for each other instead of failing with "locked".
        'OPTIONS': {
            'init_command': 'PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;',
            'transaction_mode': 'IMMEDIATE',
            'timeout': float(os.environ.get('CARROT_TEST_SQLITE_TIMEOUT', 30)),
        },
    }}

CARROT = json.loads(os.environ['CARROT_TEST_CARROT']) if 'CARROT_TEST_CARROT' in os.environ else {
    'default_broker': 'amqp://guest:guest@127.0.0.1:5672/',
    'queues': [{'name': 'default', 'concurrency': 2}],
    'task_modules': ['tests.project.tasks'],
}

LOGGING = {
    'version': 1,
    'disable_existing_loggers': False,
}
