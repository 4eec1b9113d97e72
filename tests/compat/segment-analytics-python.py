"""Sends one call of each type with Segment's own, unmodified segment-analytics-python
(PyPI, pinned in xtask/dbt-requirements.txt), pointed at a local edge: once as it sends
by default, once gzipped. Python's own values on the way: timezone-aware datetimes with
microseconds, a Decimal, a date. Usage: python segment-analytics-python.py <host> <writeKey>
"""

import datetime
import decimal
import sys

from segment.analytics import Client

host, write_key = sys.argv[1], sys.argv[2]
errors = []


def on_error(error, batch):
    errors.append(f"{error!r} ({len(batch)} messages)")


when = datetime.datetime(2026, 11, 20, 10, 0, 0, 123456, tzinfo=datetime.timezone.utc)
for gzip in (False, True):
    tag = "py-gz" if gzip else "py"
    client = Client(
        write_key=write_key,
        host=host,
        gzip=gzip,
        on_error=on_error,
        max_retries=2,
        upload_size=3,
    )
    client.identify(f"{tag}-user", {"plan": "pro", "seats": 3}, timestamp=when)
    client.track(
        f"{tag}-user",
        "Python Order",
        {
            "revenue": decimal.Decimal("19.99"),
            "shipped_on": datetime.date(2026, 11, 21),
            "at": when,
        },
        timestamp=when,
    )
    client.page(anonymous_id=f"{tag}-anon", category="Docs", name="Python", properties={"path": "/py"})
    client.screen(f"{tag}-user", name="Settings", properties={"tab": "billing"})
    client.group(f"{tag}-user", f"{tag}-group", {"employees": 12})
    client.alias(f"{tag}-anon", f"{tag}-user")
    client.flush()
    client.join()

if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
print("sent 12")
