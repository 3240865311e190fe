"""Times as users write them (ISO 8601 or Unix seconds, within years 1970-9999) and as the
API shows them; for usage, audit and the declared configuration."""

from __future__ import annotations

import datetime as dt
import math

from appliance.errors import InvalidSpecError

LAST_STAMP = 253402300799  # 9999-12-31T23:59:59Z


def parse_time(value: str | None, name: str) -> float | None:
    """An ISO 8601 date or time (UTC unless it says otherwise) or Unix seconds."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        stamp = float(text)
    except ValueError:
        try:
            when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            stamp = math.nan
        else:
            stamp = (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()
    if not 0 <= stamp <= LAST_STAMP:  # also refuses nan
        raise InvalidSpecError(
            f"{name} must be an ISO 8601 date or time (2026-11-28, 2026-11-28T14:00:00Z) or "
            f"Unix seconds, from 1970 to 9999, not {text!r}",
            field=name,
        )
    return stamp


def iso(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
