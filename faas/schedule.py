"""Cron schedules (`@function(schedule="*/5 * * * *")`), in UTC.

Five fields, as cron has them: minute (0-59), hour (0-23), day of month (1-31), month
(1-12), day of week (0-7, 0 and 7 Sunday); or six, a second (0-59) first, as Quartz and
Spring allow. Each field is `*`, a number, a range `a-b`, any of them with a step `/n`, or a
comma-separated list of those. As in cron, when both the day of month and the day of week
are restricted, a day matching either runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from faas.errors import SpecError

_FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31),
           ("month", 1, 12), ("day of week", 0, 7))
# Far enough to find any valid schedule's next time (29 February on a given weekday: 28 years).
_HORIZON = timedelta(days=366 * 29)


def _field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        spec, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if spec == "*":
                first, last = low, high
            elif "-" in spec:
                first, last = (int(v) for v in spec.split("-", 1))
            else:
                first = last = int(spec)
        except ValueError:
            raise SpecError(f"schedule: {name} {part!r} is not a number, a range or '*'") from None
        if not (low <= first <= last <= high) or step < 1:
            raise SpecError(f"schedule: {name} {part!r} is outside {low}-{high}")
        values.update(range(first, last + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class Cron:
    """A parsed schedule; `next_after(t)` is the first time it runs after `t`."""

    text: str
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 Monday .. 6 Sunday, as datetime.weekday()
    any_day: bool
    any_weekday: bool

    @classmethod
    def parse(cls, text: str) -> Cron:
        """The schedule `text` says; SpecError naming the bad field otherwise."""
        if not isinstance(text, str) or len(text) > 256:
            raise SpecError("schedule: a cron expression, e.g. '*/5 * * * *'")
        parts = text.split()
        if len(parts) == 5:
            parts = ["0", *parts]
        if len(parts) != 6:
            raise SpecError(f"schedule {text!r}: five fields (minute hour day month weekday), "
                            "or six with a second first")
        second, minute, hour, day, month, weekday = (
            _field(part, name, low, high) for part, (name, low, high) in zip(parts, _FIELDS))
        # cron's 0 and 7 are Sunday; datetime's Monday is 0.
        weekdays = frozenset((d - 1) % 7 for d in weekday)
        return cls(text, second, minute, hour, day, month, weekdays,
                   any_day=parts[3] == "*", any_weekday=parts[5] == "*")

    def _day_matches(self, t: datetime) -> bool:
        in_month, in_week = t.day in self.days, t.weekday() in self.weekdays
        if self.any_day or self.any_weekday:
            return in_month and in_week
        return in_month or in_week

    def next_after(self, t: datetime) -> datetime:
        """The first time strictly after `t` (an aware datetime) the schedule runs, in UTC."""
        t = t.astimezone(timezone.utc).replace(microsecond=0) + timedelta(seconds=1)
        end = t + _HORIZON
        while t < end:
            if t.month not in self.months:
                t = (t.replace(day=1, hour=0, minute=0, second=0) + timedelta(days=32)).replace(day=1)
            elif not self._day_matches(t):
                t = t.replace(hour=0, minute=0, second=0) + timedelta(days=1)
            elif t.hour not in self.hours:
                t = t.replace(minute=0, second=0) + timedelta(hours=1)
            elif t.minute not in self.minutes:
                t = t.replace(second=0) + timedelta(minutes=1)
            elif t.second not in self.seconds:
                t += timedelta(seconds=1)
            else:
                return t
        raise SpecError(f"schedule {self.text!r} never runs")
