"""How the demo's pages say times (``authsessions._humanize``): "3 hours ago", "in 30 days"."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from authsessions._humanize import format_utc, time_ago

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("offset", "phrase"),
    [
        (timedelta(seconds=-59), "just now"),
        # A full minute is a minute, no longer "just now".
        (timedelta(seconds=-60), "1 minute ago"),
        (timedelta(seconds=30), "in under a minute"),
        (timedelta(minutes=-59), "59 minutes ago"),
        (timedelta(hours=-3), "3 hours ago"),
        (timedelta(days=2), "in 2 days"),
        # The count is rounded to the nearest, not cut down: 29 days 23 hours reads 30 days.
        (timedelta(days=29, hours=23), "in 30 days"),
        (timedelta(days=-400), "1 year ago"),
        # Rounded up to a whole unit above, it reads as that unit: never "60 minutes ago".
        (timedelta(minutes=-59, seconds=-40), "1 hour ago"),
        (timedelta(hours=23, minutes=45), "in 1 day"),
        (timedelta(days=-362), "1 year ago"),
    ],
)
def test_time_ago_says_the_largest_unit_that_fits(offset: timedelta, phrase: str) -> None:
    assert time_ago(NOW + offset, NOW) == phrase


def test_time_ago_measures_from_the_current_time_by_default() -> None:
    assert time_ago(datetime.now(UTC) - timedelta(hours=2)) == "2 hours ago"


def test_format_utc_writes_the_24_hour_clock() -> None:
    assert format_utc(datetime(2025, 6, 1, 14, 3, tzinfo=UTC)) == "2025-06-01 14:03 UTC"


def test_format_utc_shows_another_zones_time_in_utc() -> None:
    # 23:30 five hours west of Greenwich is already the next day in UTC.
    when = datetime(2025, 6, 1, 23, 30, tzinfo=timezone(timedelta(hours=-5)))
    assert format_utc(when) == "2025-06-02 04:30 UTC"
