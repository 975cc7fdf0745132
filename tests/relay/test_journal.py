"""The settlement journal on disk: it is not the event spool (its gauges stay the spool's), and a
clean close leaves nothing for the next relay."""

from __future__ import annotations

from pathlib import Path

from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.common.telemetry import METRICS
from services.relay.journal import SettleJournal
from services.relay.spool import Spool


def spooled() -> float:
    return float(METRICS.events_spooled._value.get())


def test_journal_records_do_not_count_as_spooled_events_and_a_clean_close_leaves_nothing(
    tmp_path: Path,
) -> None:
    events = Spool(tmp_path, max_bytes=1 << 20)
    events.open()
    events.append([(b"k", UsageEvent(event_id="spooled").SerializeToString())])
    assert spooled() == 1

    journal = SettleJournal(tmp_path, retain_s=60)
    assert journal.open() == []
    for i in range(5):
        journal.begin(UsageEvent(event_id=f"req-{i}", reservation_id=f"req-{i}"), settle=True)
        journal.done(UsageEvent(event_id=f"req-{i}", cost_micros=7))
    assert spooled() == 1
    journal.close()
    events.close()

    # The event spool's own records are still there; the journal left nothing to finish.
    assert SettleJournal(tmp_path, retain_s=60).open() == []
    again = Spool(tmp_path, max_bytes=1 << 20)
    again.open()
    assert again.records == 1
    again.close()
