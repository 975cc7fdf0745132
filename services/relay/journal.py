"""The settlement journal: what the relay is settling, on disk, so that a relay killed mid-way
neither leaves a charge without its log row nor a used hold without its charge.

Between quota committing a settle and Kafka acknowledging the usage event, the event exists only in
this process's memory; a SIGKILL there would leave the ledger charging a request the logs never
see. So every finishing request with a reservation writes two records here (one ``write`` each, no
``fsync``: a killed process loses nothing the kernel already has):

* ``begin``: the event as it will be published, before the Settle or Release is sent;
* ``done``: the event with what the ledger charged, once known, just before it is published.

Nothing reads the journal while its process lives; records older than ``retain_s`` are dropped from
the front (by then the event reached Kafka or the publisher's own spool). The next relay process
on the same disk adopts the journal of one that died (the directory lock of :class:`Spool` is
free) and finishes what it finds: a ``done`` event is published again (the logger stores each
event id once), a ``begin`` without ``done`` is settled again (Settle and Release are idempotent by
reservation id: quota answers the stored outcome, or settles the hold now, or says it expired and
charged nothing) and then published with that charge.

The journal lives in ``journal/`` under the event spool directory, so a spool volume keeps both.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from services.common.events import decode, encode
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.relay.spool import Spool

__all__ = ["Pending", "SettleJournal"]

log = logging.getLogger(__name__)

_BEGIN_SETTLE = b"begin-settle"
_BEGIN_RELEASE = b"begin-release"
_DONE = b"done"


@dataclass(frozen=True, slots=True)
class Pending:
    """A settlement a dead relay left: ``done`` events only need publishing again; the others
    need their Settle (``settle``) or Release first."""

    event: UsageEvent
    done: bool
    settle: bool


class SettleJournal:
    """See the module docstring. Not thread-safe; used from the event loop only."""

    def __init__(self, spool_dir: Path, *, retain_s: float, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._spool = Spool(spool_dir / "journal", max_bytes=max_bytes, exported=False)
        self._retain_s = retain_s
        # When each record still in the journal was written (monotonic), oldest first.
        self._written: collections.deque[float] = collections.deque()
        self._open = False

    def open(self) -> list[Pending]:
        """Take over the journals of relays that are gone; returns what they left unfinished."""
        self._spool.open()
        self._open = True
        adopted = self._spool.records
        if not adopted:
            return []
        by_id: dict[str, Pending] = {}
        for key, payload in self._spool.peek(adopted):
            try:
                event = decode(payload)
            except ValueError:
                continue
            known = by_id.get(event.event_id)
            if key == _DONE:
                by_id[event.event_id] = Pending(event, done=True, settle=False)
            elif known is None or not known.done:
                by_id[event.event_id] = Pending(event, done=False, settle=key == _BEGIN_SETTLE)
        # Re-journalled by whoever finishes them; the adopted copies can go.
        self._spool.commit(adopted)
        found = list(by_id.values())
        log.warning(
            "settlements left by a relay that died",
            extra={"unsettled": sum(not p.done for p in found), "unpublished": sum(p.done for p in found)},
        )
        return found

    def begin(self, event: UsageEvent, *, settle: bool) -> None:
        self._write(_BEGIN_SETTLE if settle else _BEGIN_RELEASE, event)

    def done(self, event: UsageEvent) -> None:
        self._write(_DONE, event)

    def close(self) -> None:
        """Forget everything (the publisher has delivered or spooled it) and release the directory."""
        if not self._open:
            return
        self._spool.commit(self._spool.records)
        self._spool.close()
        self._written.clear()
        self._open = False

    def _write(self, kind: bytes, event: UsageEvent) -> None:
        if not self._open:
            return
        now = time.monotonic()
        self._trim(now)
        if self._spool.append([(kind, encode(event))]):
            self._written.append(now)
        else:
            log.error("the settlement journal is full; this request is not journalled")

    def _trim(self, now: float) -> None:
        written, cutoff = self._written, now - self._retain_s
        old = 0
        while written and written[0] < cutoff:
            written.popleft()
            old += 1
        if old:
            self._spool.commit(old)
