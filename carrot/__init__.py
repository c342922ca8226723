"""carrot: a task queue for Django projects on RabbitMQ.

Nothing is imported here on purpose: the worker imports this package before it
monkey-patches, so it must not pull in Django, ssl or a database driver.
"""

__version__ = '2.0.0.dev0'

DEFAULT_BROKER = 'amqp://guest:guest@localhost:5672/'
