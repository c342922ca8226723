"""A small Django project that uses carrot, on SQLite."""

from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = 'carrot-demo-not-secret'
DEBUG = True
ALLOWED_HOSTS = ['localhost', '127.0.0.1']
USE_TZ = True
TIME_ZONE = 'UTC'
ROOT_URLCONF = 'demo.urls'
# The carrot monitor sends visitors who are not logged in here.
LOGIN_URL = '/admin/login/'
# Keeps the broker password out of the debug page and mailed error reports (carrot.W002).
DEFAULT_EXCEPTION_REPORTER_FILTER = 'carrot.reporting.SafeExceptionReporterFilter'
DEFAULT_AUTO_FIELD = 'django.db.models.AutoField'

INSTALLED_APPS = [
    'django.contrib.admin',
    'django.contrib.auth',
    'django.contrib.contenttypes',
    'django.contrib.sessions',
    'django.contrib.messages',
    'carrot',
    'demo',
]
MIDDLEWARE = [
    'django.contrib.sessions.middleware.SessionMiddleware',
    'django.middleware.csrf.CsrfViewMiddleware',
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

DATABASES = {'default': {
    'ENGINE': 'django.db.backends.sqlite3',
    'NAME': BASE_DIR / 'demo.sqlite3',
    # Let the worker and the web process write without "database is locked".
    'OPTIONS': {
        'init_command': 'PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;',
        'transaction_mode': 'IMMEDIATE',
        'timeout': 30,
    },
}}

CARROT = {
    'default_broker': 'amqp://guest:guest@127.0.0.1:5672/',
    'queues': [
        {'name': 'carrot_demo', 'concurrency': 10},
    ],
    'task_modules': ['demo.tasks'],
}
