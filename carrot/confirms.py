"""The broker's answers to publishes: which of a run of publishes RabbitMQ stored, refused
or returned.

A confirm-mode channel (``carrot.amqp.SignallingChannel``) hands its Basic.Ack, Basic.Nack
and returned-message frames to its ``confirm_listener``; ``Confirms`` is the listener of a
run of publishes written without waiting (``publish_all_confirmed``), ``Returns`` the part
that tells returned messages by their ``message_id``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol


class Returns:
    """The message ids of returned messages (mandatory, and no queue was bound), taken from
    the Basic.Return frames a channel receives, which come before the message's confirm."""

    def __init__(self) -> None:
        self.message_ids: set[str] = set()
        self._header_due = False
        self._body_left = 0

    def on_frame(self, frame_in: Any) -> bool:
        """Take a frame of a returned message; False for a frame that is not one."""
        if frame_in.name == 'Basic.Return':
            self._header_due = True
        elif frame_in.name == 'ContentHeader' and self._header_due:
            self._header_due = False
            self._body_left = frame_in.body_size
            message_id = frame_in.properties.message_id
            self.message_ids.add(message_id.decode() if isinstance(message_id, bytes)
                                 else str(message_id))
        elif frame_in.name == 'ContentBody' and self._body_left > 0:
            self._body_left -= len(frame_in.value)
        else:
            return False
        return True


class ConfirmListener(Protocol):
    """What takes a confirm-mode channel's answers instead of its RPC waiter."""

    def on_confirm(self, nacked: bool, delivery_tag: int, multiple: bool) -> None: ...

    def on_return_frame(self, frame_in: Any) -> bool: ...


class Confirms:
    """The broker's answers to a run of publishes sent without waiting, by delivery tag.

    Filled in by the connection's reader thread: ``ACK`` (stored), ``NACK`` (refused) or
    ``RETURNED`` (mandatory, and no queue was bound: a Basic.Return, which comes before the
    message's ack, names it by its ``message_id``); None while unanswered. The writer
    announces each part of the run with ``expect`` before writing it, and its end with
    ``complete``: ``answered`` is set once the run is complete and every publish answered.
    """

    ACK, NACK, RETURNED = 'ack', 'nack', 'returned'

    def __init__(self, first_tag: int) -> None:
        self.first_tag = first_tag
        self.message_ids: list[str | None] = []
        self.outcomes: list[str | None] = []
        self.unanswered = 0
        self.written = 0  # how many of the publishes went to the socket
        self._lowest = 0  # every outcome below this index is known
        self._complete = False
        self._returns = Returns()
        self._lock = threading.Lock()  # the writer expects while the reader fills in
        self.answered = threading.Event()

    def expect(self, message_ids: Sequence[str | None]) -> None:
        """The next publishes of the run, one per message id, about to be written."""
        with self._lock:
            self.message_ids.extend(message_ids)
            self.outcomes.extend([None] * len(message_ids))
            self.unanswered += len(message_ids)

    def complete(self) -> None:
        """No more publishes come in this run."""
        with self._lock:
            self._complete = True
            self._note_answered()

    def outcome(self, position: int) -> str | None:
        """The answer to the run's publish number ``position`` (from 0); None if none yet,
        or if it was never expected."""
        return self.outcomes[position] if position < len(self.outcomes) else None

    def on_confirm(self, nacked: bool, delivery_tag: int, multiple: bool) -> None:
        with self._lock:
            last = delivery_tag - self.first_tag
            for index in range(self._lowest if multiple else last, last + 1):
                if 0 <= index < len(self.outcomes) and self.outcomes[index] is None:
                    returned = self.message_ids[index] in self._returns.message_ids
                    self.outcomes[index] = (self.NACK if nacked else
                                            self.RETURNED if returned else self.ACK)
                    self.unanswered -= 1
            while self._lowest < len(self.outcomes) and self.outcomes[self._lowest] is not None:
                self._lowest += 1
            self._note_answered()

    def _note_answered(self) -> None:
        if self._complete and not self.unanswered:
            self.answered.set()

    def on_return_frame(self, frame_in: Any) -> bool:
        return self._returns.on_frame(frame_in)
