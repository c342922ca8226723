"""Upstream's import path for the consumer class (``CARROT['queues'][n]['consumer_class']``)."""

from __future__ import annotations

import importlib

from carrot.exceptions import CarrotConfigException
from carrot.worker.consumer import Consumer

__all__ = ['Consumer', 'load_consumer_class']


def load_consumer_class(path: str) -> type[Consumer]:
    """The class a queue's ``consumer_class`` names; it must subclass carrot's Consumer."""
    module_name, _, name = path.rpartition('.')
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (Exception, SystemExit) as error:
        raise CarrotConfigException(
            f'consumer_class {path!r} cannot be imported: {type(error).__name__}: {error}'
        ) from None
    if not isinstance(found, type) or not issubclass(found, Consumer):
        raise CarrotConfigException(
            f'consumer_class {path!r} is not a subclass of carrot.consumer.Consumer.'
        )
    return found
