"""Schedules: cron expressions (a pure parser, checked here) and scheduled functions that
run once per tick however many nodes serve them."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import nats
import pytest

from faas import SpecError, function, protocol
from faas.record import FunctionRecord
from faas.schedule import Cron
from tests.test_cluster import faas_cli, node_on, start_server


def _utc(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=timezone.utc)


@pytest.mark.parametrize(("cron", "after", "expected"), [
    ("*/5 * * * *", _utc(2026, 12, 6, 10, 2, 30), _utc(2026, 12, 6, 10, 5)),
    ("*/5 * * * *", _utc(2026, 12, 6, 10, 5), _utc(2026, 12, 6, 10, 10)),  # strictly after
    ("0 9 * * 1-5", _utc(2026, 12, 4, 9, 0, 1), _utc(2026, 12, 7, 9)),  # Friday -> Monday
    ("30 2 29 2 *", _utc(2026, 3, 1), _utc(2028, 2, 29, 2, 30)),  # the next leap day
    ("0 0 1 * 0", _utc(2026, 12, 2), _utc(2026, 12, 6)),  # day 1 OR a Sunday, as cron
    ("0 0 * * 7", _utc(2026, 12, 2), _utc(2026, 12, 6)),  # 7 is Sunday too
    ("15,45 8-10/2 * 1,6 *", _utc(2026, 12, 6), _utc(2027, 1, 1, 8, 15)),
    ("*/2 * * * * *", _utc(2026, 12, 6, 10, 0, 1), _utc(2026, 12, 6, 10, 0, 2)),  # seconds first
    ("59 23 31 12 *", _utc(2026, 12, 31, 23, 59), _utc(2027, 12, 31, 23, 59)),
])
def test_next_run(cron, after, expected):
    assert Cron.parse(cron).next_after(after) == expected


@pytest.mark.parametrize(("cron", "problem"), [
    ("* * * *", "five fields"), ("61 * * * *", "minute '61' is outside 0-59"),
    ("* * * 13 *", "month '13'"), ("*/0 * * * *", "outside"), ("a * * * *", "not a number"),
    ("0 0 30 2 *", "never runs"), ("5-1 * * * *", "outside"),
])
def test_a_bad_schedule_fails_at_declaration_naming_its_field(cron, problem):
    with pytest.raises(SpecError, match=problem):
        function(name="sched", schedule=cron)(lambda event, ctx: event)


def test_a_scheduled_function_is_triggered_by_its_ticks_and_its_record_carries_the_schedule():
    spec = function(name="nightly", schedule="0 3 * * *", triggers=["events.x"])(lambda e, c: e).__faas_spec__
    assert spec.triggers == ("events.x", "events.schedule.nightly")
    record = spec.record()
    assert FunctionRecord.from_untrusted(record.to_dict()).schedule == "0 3 * * *"
    old = {k: v for k, v in record.to_dict().items() if k != "schedule"}  # deployed before schedules
    assert FunctionRecord.from_untrusted(old).schedule is None
    with pytest.raises(SpecError, match="'schedule' is out of range"):
        FunctionRecord.from_untrusted({**record.to_dict(), "schedule": "never"})


TICKER = '''
from faas import function

@function(name="ticker", schedule="*/2 * * * * *", results=True, timeout_s=10)
def ticker(event, ctx):
    return {"scheduled_for": event["scheduled_for"], "delivered": ctx.event_info.delivered}
'''


async def test_a_schedule_runs_once_per_tick_with_two_nodes_up(models, tmp_path):
    (tmp_path / "functions").mkdir()
    (tmp_path / "functions" / "ticker.py").write_text(TICKER)
    server, url = start_server(tmp_path)
    nodes = []
    try:
        for name, uids in (("sched-a", "64000-64099"), ("sched-b", "64100-64199")):
            nodes.append(node_on(url, name, uids, tmp_path / f"{name}.log", None,
                                 "--functions", str(tmp_path / "functions")))
        nc = await nats.connect(url)
        try:
            sub = await nc.jetstream().subscribe("faas.results.ticker", ordered_consumer=True)
            ticks: list[str] = []
            deadline = time.monotonic() + 12
            while time.monotonic() < deadline:
                try:
                    msg = await sub.next_msg(timeout=1)
                except nats.errors.TimeoutError:
                    continue
                ticks.append(protocol.decode(msg.data, msg.headers)["output"]["scheduled_for"])
        finally:
            await nc.drain()
        assert len(ticks) >= 4, ticks
        assert len(set(ticks)) == len(ticks), f"a tick ran twice: {ticks}"  # two nodes, once each
        seconds = sorted(datetime.fromisoformat(t).second for t in ticks)
        assert all(s % 2 == 0 for s in seconds)
        asked = datetime.now(timezone.utc)
        out = faas_cli("events", "--nats", url)
        answered = datetime.now(timezone.utc)
        row = next(line for line in out.stdout.splitlines() if line.startswith("ticker"))
        assert "events.schedule.ticker" in row
        # The next tick after the moment the CLI looked: up to two seconds on.
        assert asked < datetime.fromisoformat(row.split()[-1]) <= answered + timedelta(seconds=2)
    finally:
        for node in nodes:
            node.stop()
        server.terminate()
        server.wait(10)
