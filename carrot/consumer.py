"""Upstream's import path for the consumer class (``CARROT['queues'][n]['consumer_class']``).

``Consumer`` is imported from the worker (and with it gevent) only when it is asked for, so a
web process that runs ``manage.py check`` or imports carrot's settings never loads gevent.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from carrot.exceptions import CarrotConfigException

if TYPE_CHECKING:
    from carrot.worker.consumer import Consumer

__all__ = ['Consumer', 'check_consumer_class', 'load_consumer_class']

DEFAULT_CONSUMER_CLASS = 'carrot.consumer.Consumer'
_WORKER_CONSUMER = 'carrot.worker.consumer'


def __getattr__(name: str) -> Any:
    if name == 'Consumer':
        return importlib.import_module(_WORKER_CONSUMER).Consumer
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def load_consumer_class(path: str) -> type[Consumer]:
    """The class a queue's ``consumer_class`` names; it must subclass carrot's Consumer."""
    found = _imported(path)
    base: type[Consumer] = importlib.import_module(_WORKER_CONSUMER).Consumer
    if not isinstance(found, type) or not issubclass(found, base):
        raise _not_a_consumer(path)
    return found


def check_consumer_class(path: str) -> None:
    """CarrotConfigException unless ``path`` names a subclass of carrot's Consumer.

    Loads gevent only when the class's own module does (a subclass imports this module's
    ``Consumer``): a class from a module that never did cannot be a subclass.
    """
    if path == DEFAULT_CONSUMER_CLASS:
        return
    found = _imported(path)
    worker = sys.modules.get(_WORKER_CONSUMER)
    if worker is None or not isinstance(found, type) or not issubclass(found, worker.Consumer):
        raise _not_a_consumer(path)


def _imported(path: str) -> object:
    module_name, _, name = path.rpartition('.')
    try:
        return getattr(importlib.import_module(module_name), name)  # type: ignore[no-any-return]
    except (Exception, SystemExit) as error:
        raise CarrotConfigException(
            f'consumer_class {path!r} cannot be imported: {type(error).__name__}: {error}'
        ) from None


def _not_a_consumer(path: str) -> CarrotConfigException:
    return CarrotConfigException(
        f'consumer_class {path!r} is not a subclass of carrot.consumer.Consumer.')
