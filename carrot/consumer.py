"""Upstream's import path for the consumer class (``CARROT['queues'][n]['consumer_class']``)."""

from carrot.worker.consumer import Consumer

__all__ = ['Consumer']
