"""Exact splitting of a time interval into peak and off-peak seconds.

The window is defined in local wall-clock time (22:00-06:00 in its timezone), so across a DST
change a night's window really lasts 7 or 9 hours; boundaries are converted to instants per
local date, and the interval is intersected with each.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from oppen.cost.price_book import OffPeak


def _require_aware(moment: datetime) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{moment.isoformat()} has no timezone; pass an aware datetime")


def off_peak_windows(off_peak: OffPeak, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
    """Every off-peak window (as aware instants) that may overlap [start, end)."""
    zone = off_peak.zone
    first = start.astimezone(zone).date() - timedelta(days=1)
    last = end.astimezone(zone).date()
    crosses_midnight = off_peak.end <= off_peak.start
    windows = []
    day = first
    while day <= last:
        opens = datetime.combine(day, off_peak.start, tzinfo=zone)
        closes = datetime.combine(day + timedelta(days=1) if crosses_midnight else day, off_peak.end, tzinfo=zone)
        # In UTC: Python subtracts two datetimes that share a tzinfo by wall clock, which is
        # wrong by an hour across a DST change.
        windows.append((opens.astimezone(timezone.utc), closes.astimezone(timezone.utc)))
        day += timedelta(days=1)
    return windows


def off_peak_seconds(off_peak: OffPeak, start: datetime, end: datetime) -> float:
    """Seconds of [start, end) that fall inside the off-peak window."""
    _require_aware(start)
    _require_aware(end)
    if end <= start:
        return 0.0
    start, end = start.astimezone(timezone.utc), end.astimezone(timezone.utc)
    total = 0.0
    for opens, closes in off_peak_windows(off_peak, start, end):
        overlap = (min(end, closes) - max(start, opens)).total_seconds()  # aware arithmetic: real seconds
        total += max(0.0, overlap)
    return total


def next_off_peak_start(off_peak: OffPeak, after: datetime) -> datetime:
    """When the next off-peak window opens (or `after` itself when already inside one)."""
    _require_aware(after)
    after = after.astimezone(timezone.utc)
    for opens, closes in off_peak_windows(off_peak, after, after + timedelta(days=2)):
        if opens <= after < closes:
            return after
        if opens > after:
            return opens
    raise AssertionError("a daily window always opens within two days")


def utc_month_slices(start: datetime, end: datetime) -> list[tuple[str, datetime, datetime]]:
    """[start, end) cut at UTC month boundaries: (YYYY-MM, from, to) for each month it touches."""
    _require_aware(start)
    _require_aware(end)
    cursor = start.astimezone(timezone.utc)
    end = end.astimezone(timezone.utc)
    if (cursor.year, cursor.month) == (end.year, end.month):  # nearly always: one slice
        return [(f"{cursor.year:04d}-{cursor.month:02d}", cursor, end)] if cursor < end else []
    slices = []
    while cursor < end:
        first_of_next = (cursor.replace(day=1, hour=0, minute=0, second=0, microsecond=0) + timedelta(days=32)).replace(day=1)
        upto = min(end, first_of_next)
        slices.append((cursor.strftime("%Y-%m"), cursor, upto))
        cursor = upto
    return slices


def regime_at(off_peak: OffPeak, moment: datetime) -> tuple[datetime, datetime, bool]:
    """The stretch of one price around `moment`: (from, until, off_peak?), bounded by the window's edges."""
    _require_aware(moment)
    moment = moment.astimezone(timezone.utc)
    windows = off_peak_windows(off_peak, moment - timedelta(days=1), moment + timedelta(days=2))
    for opens, closes in windows:
        if opens <= moment < closes:
            return opens, closes, True
    before = max((closes for _, closes in windows if closes <= moment), default=moment)
    after = min((opens for opens, _ in windows if opens > moment), default=moment + timedelta(days=1))
    return before, after, False
