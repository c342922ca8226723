"""A consumer_class in the form upstream django-carrot documented."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from carrot.consumer import Consumer
from carrot.models import MessageLog


class FailureRecordingConsumer(Consumer):
    def __init__(self, host: Any, queue: str, logger: Any, name: str, durable: bool = True,
                 queue_arguments: Any = None, exchange_arguments: Any = None) -> None:
        super().__init__(host, queue, logger, name, durable, queue_arguments, exchange_arguments)
        self.add_failure_callback(self.failure_callback)

    def failure_callback(self, log: MessageLog, exception: Any) -> None:
        with open(os.environ['CARROT_TEST_CALLBACK_FILE'], 'a') as handle:
            handle.write(f'{log.uuid} {log.task} {exception}\n')


class CrashingConsumer(Consumer):
    """Fails inside carrot's own handling for echo tasks, to show the message is not lost."""

    def handle(self, delivery: Any) -> None:
        if delivery.properties['headers'].get('type') in (b'tests.project.tasks.echo',
                                                          'tests.project.tasks.echo'):
            raise RuntimeError('a bug in the consumer')
        super().handle(delivery)


class FailingAfterTheTaskConsumer(Consumer):
    """Fails inside carrot's own handling after an echo task ran, before its end is recorded."""

    def handle(self, delivery: Any) -> None:
        runtime = self.runtime
        assert runtime is not None
        if delivery.properties['headers'].get('type') not in (b'tests.project.tasks.echo',
                                                              'tests.project.tasks.echo'):
            super().handle(delivery)
            return
        self.runtime = replace(runtime, recorder=_RecorderFailingAtEnds(runtime.recorder))
        try:
            super().handle(delivery)
        finally:
            self.runtime = runtime


class _RecorderFailingAtEnds:
    def __init__(self, recorder: Any) -> None:
        self._recorder = recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._recorder, name)

    def record_finish(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError('a bug after the task ran')
