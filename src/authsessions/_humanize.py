"""Times as people say them: "3 minutes ago", "in 30 days"."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["format_utc", "time_ago"]

# (seconds in the unit, singular name, the rounded count that reads as one of the unit
# above it); checked from the largest down. Days go up to "30 days", a month's length.
_UNITS = (
    (365 * 86400, "year", None),
    (30 * 86400, "month", 12),
    (86400, "day", None),
    (3600, "hour", 24),
    (60, "minute", 60),
)


def time_ago(when: datetime, now: datetime | None = None) -> str:
    """How far ``when`` is from ``now``: "just now", "3 minutes ago", "in 30 days".

    The unit is the largest that fits; the count is rounded to the nearest,
    so a session that expires in 29 days and 23 hours reads "in 30 days", and
    59 minutes and 40 seconds ago reads "1 hour ago".
    """
    now = now if now is not None else datetime.now(UTC)
    seconds = int((now - when).total_seconds())
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 60:
        return "in under a minute" if future else "just now"
    # The minute is the last unit and seconds >= 60 here, so the loop always breaks.
    for index, (size, name, one_up) in enumerate(_UNITS):  # noqa: B007 - used after it
        if seconds >= size:
            break
    count = round(seconds / size)
    if count == one_up:
        count, name = 1, _UNITS[index - 1][1]
    phrase = f"{count} {name}{'' if count == 1 else 's'}"
    return f"in {phrase}" if future else f"{phrase} ago"


def format_utc(when: datetime) -> str:
    """A timestamp to the minute in UTC, e.g. "2025-06-01 14:03 UTC"."""
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
