"""A task module holding what a message must never reach: secrets, and callables that are
not tasks (tests/test_registry.py publishes a message naming each)."""

from __future__ import annotations

import functools
import json  # noqa: F401  (a module, reachable as an attribute)
from os import getcwd  # noqa: F401  (a builtin function, imported)
from os.path import join  # noqa: F401  (a function defined elsewhere, imported)

API_TOKEN = 'tok-6f1d0c-never-shown'
WEBHOOK_URL = 'https://hooks.example/carrot'


def webhook_url() -> str:
    """A real task that uses a global the refused messages must not change."""
    return WEBHOOK_URL


def _private_helper() -> str:
    return API_TOKEN


class Client:
    def token(self) -> str:
        return API_TOKEN

    def __call__(self) -> str:
        return API_TOKEN


client = Client()
client_token = client.token  # a bound method
reveal = functools.partial(_private_helper)  # a callable object
