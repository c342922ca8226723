"""The errors carrot raises, each with a message that says what to do."""

from __future__ import annotations


class CarrotError(Exception):
    """Base class of carrot's errors."""


class CarrotConfigException(CarrotError):
    """``settings.CARROT`` is wrong; the message names the key. (Upstream's name, kept.)"""


class TaskNotRegistered(CarrotError):
    """The task path is not in a module listed in ``CARROT['task_modules']``."""


class TaskImportError(CarrotError):
    """A registered task path does not import, or does not name a function."""


class ArgumentsNotSerializable(CarrotError, TypeError):
    """The task's arguments cannot be encoded as JSON."""


class BrokerUnavailable(CarrotError):
    """RabbitMQ could not be reached, or did not confirm a publish."""


class MessageNotEncodable(CarrotError):
    """A message's exchange, routing key or properties cannot be encoded as AMQP frames."""


class BadMessage(CarrotError):
    """A delivered message cannot be decoded into a task call."""
