"""Group commit for PUBLISHED rows written outside a transaction.

Publishers that arrive together (greenlets or threads) share one INSERT and one commit,
which waits for the disk unless ``CARROT['synchronous_commit']`` is False.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from carrot import conf
from carrot._sql import insert_rows


@dataclass
class PendingRow:
    alias: str
    values: list[Any]
    done: threading.Event = field(default_factory=threading.Event)
    pk: int = 0
    error: BaseException | None = None


class GroupInsert:
    """Group commit for PUBLISHED rows written outside a transaction.

    The first publisher to arrive writes, in one statement, its row and every row that
    arrives while it writes; the others wait for it. With one publisher at a time this is a
    plain INSERT; with many greenlets or threads publishing at once it saves most of the
    database's per-transaction work.
    """

    BATCH = 500  # 11 parameters a row, well under PostgreSQL's 65,535

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[PendingRow] = []
        self._writing = False

    def insert(self, alias: str, values: list[Any]) -> int:
        row = PendingRow(alias, values)
        with self._lock:
            self._pending.append(row)
            lead, self._writing = not self._writing, True
        if lead:
            self._write_until_empty()
        row.done.wait()
        if row.error is not None:
            raise row.error
        return row.pk

    def _write_until_empty(self) -> None:
        try:
            while True:
                with self._lock:
                    batch = self._pending[:self.BATCH]
                    del self._pending[:self.BATCH]
                    if not batch:
                        self._writing = False
                        return
                self._write(batch)
        except BaseException as interrupted:  # e.g. the writer's greenlet was killed
            with self._lock:
                left, self._pending, self._writing = self._pending, [], False
            for row in left:
                row.error = interrupted
                row.done.set()
            raise

    def _write(self, batch: list[PendingRow]) -> None:
        synchronous = conf.get_settings().synchronous_commit
        try:
            for alias in {row.alias for row in batch}:
                rows = [row for row in batch if row.alias == alias]
                try:
                    pks = insert_rows(alias, [r.values for r in rows], synchronous=synchronous)
                except Exception as error:
                    if len(rows) == 1:
                        rows[0].error = error
                    else:  # find the bad row: the others must not fail with it
                        for row in rows:
                            self._write([row])
                else:
                    for row, pk in zip(rows, pks, strict=True):
                        row.pk = pk
        except BaseException as error:
            for row in batch:
                if not row.pk and row.error is None:
                    row.error = error
            raise
        finally:
            for row in batch:
                row.done.set()


group_insert = GroupInsert()
