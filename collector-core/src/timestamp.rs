//! Timestamps: ISO-8601 in, RFC 3339 (UTC, milliseconds) out, and Segment's clock-skew
//! correction. All instants are Unix milliseconds (`i64`).

use time::format_description::well_known::{Iso8601, Rfc3339};
use time::{OffsetDateTime, PrimitiveDateTime};

/// Parses an ISO-8601 / RFC 3339 date-time to Unix milliseconds. A value without an
/// offset is taken as UTC. Returns `None` for anything else.
pub fn parse_ms(s: &str) -> Option<i64> {
    i64::try_from(parse_nanos(s)? / 1_000_000).ok()
}

/// An ISO-8601 / RFC 3339 date-time as Unix nanoseconds (UTC when it has no offset).
fn parse_nanos(s: &str) -> Option<i128> {
    let s = s.trim();
    let dt = OffsetDateTime::parse(s, &Rfc3339)
        .or_else(|_| OffsetDateTime::parse(s, &Iso8601::DEFAULT))
        .or_else(|_| PrimitiveDateTime::parse(s, &Iso8601::DEFAULT).map(|p| p.assume_utc()))
        .ok()?;
    Some(dt.unix_timestamp_nanos())
}

/// Formats Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`. Out-of-range values are
/// clamped to the representable range rather than panicking. Done by hand (the civil
/// calendar from days, after Howard Hinnant's `civil_from_days`): every event is
/// stamped with up to four of these, and `time`'s formatting machinery cost more CPU
/// and wasm than the rest of the work on them.
pub fn format_ms(ms: i64) -> String {
    const MIN_MS: i64 = -62_135_596_800_000; // 0001-01-01
    const MAX_MS: i64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999
    let ms = ms.clamp(MIN_MS, MAX_MS);
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, sec, milli) = (
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000,
    );
    let mut out = String::with_capacity(24);
    let push = |out: &mut String, v: i64, width: usize| {
        let mut d = [b'0'; 4];
        let mut v = v;
        for i in (0..width).rev() {
            d[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
        out.push_str(std::str::from_utf8(&d[..width]).unwrap_or("0"));
    };
    push(&mut out, year, 4);
    out.push('-');
    push(&mut out, month, 2);
    out.push('-');
    push(&mut out, day, 2);
    out.push('T');
    push(&mut out, h, 2);
    out.push(':');
    push(&mut out, m, 2);
    out.push(':');
    push(&mut out, sec, 2);
    out.push('.');
    push(&mut out, milli, 3);
    out.push('Z');
    out
}

/// Parses exactly what [`format_ms`] writes (`YYYY-MM-DDTHH:MM:SS.mmmZ`) back to Unix
/// milliseconds, without a general date-time parser: warehouse loaders turn every
/// stored instant into a number with it. Anything else (another form, an impossible
/// date) is `None`, and callers fall back to [`parse_ms`] or to text.
pub fn parse_canonical_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 24 {
        return None;
    }
    for (i, sep) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (23, b'Z'),
    ] {
        if b[i] != sep {
            return None;
        }
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        b[from..to].iter().try_fold(0i64, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + i64::from(d - b'0'))
        })
    };
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, m, sec, milli) = (num(11, 13)?, num(14, 16)?, num(17, 19)?, num(20, 23)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if year < 1
        || !(1..=12).contains(&month)
        || day < 1
        || day > month_days[(month - 1) as usize]
        || h > 23
        || m > 59
        || sec > 59
    {
        return None;
    }
    // Days from the civil date (Howard Hinnant's `days_from_civil`, the inverse of the
    // calendar arithmetic in `format_ms`).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400_000 + h * 3_600_000 + m * 60_000 + sec * 1000 + milli)
}

/// Parses like [`parse_ms`], to Unix microseconds, the precision warehouses keep
/// (digits past the microsecond are dropped).
pub fn parse_us(s: &str) -> Option<i64> {
    i64::try_from(parse_nanos(s)?.div_euclid(1000)).ok()
}

/// Formats Unix microseconds as [`format_ms`] does, with three more digits when the
/// instant is not on a whole millisecond (`YYYY-MM-DDTHH:MM:SS.mmmuuuZ`).
pub fn format_us(us: i64) -> String {
    let mut out = format_ms(us.div_euclid(1000));
    let micros = us.rem_euclid(1000);
    if micros != 0 {
        out.pop();
        out.push_str(&format!("{micros:03}Z"));
    }
    out
}

/// Parses exactly what [`format_us`] writes back to Unix microseconds (see
/// [`parse_canonical_ms`]).
pub fn parse_canonical_us(s: &str) -> Option<i64> {
    match s.len() {
        24 => parse_canonical_ms(s).map(|ms| ms * 1000),
        27 => {
            let b = s.as_bytes();
            if b[26] != b'Z' || !b[23..26].iter().all(u8::is_ascii_digit) {
                return None;
            }
            let ms = parse_canonical_ms(&format!("{}Z", &s[..23]))?;
            let micros = b[23..26]
                .iter()
                .fold(0i64, |n, &d| n * 10 + i64::from(d - b'0'));
            Some(ms * 1000 + micros)
        }
        _ => None,
    }
}

/// The event times after skew correction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Corrected {
    /// Best estimate of when the event happened, on the server's clock.
    pub timestamp_ms: i64,
    /// The device's own time of the call, if it said one.
    pub original_ms: Option<i64>,
    /// `false` when the client's times were inconsistent or insane and were not used
    /// (the event is counted as `clock_untrusted`).
    pub trusted: bool,
}

/// Earliest event time believed without question: 2000-01-01T00:00:00Z.
pub const CLOCK_FLOOR_MS: i64 = 946_684_800_000;
/// How far ahead of the server's clock a client's time may be (or how long before the
/// event its `sentAt` may be) and still be believed.
pub const CLOCK_FUTURE_TOLERANCE_MS: i64 = 5 * 60 * 1000;
/// The oldest an event may be when it is sent (`sentAt - originalTimestamp`) for the
/// skew correction to apply: SDKs keep unsent events for days, not for longer.
pub const MAX_EVENT_AGE_AT_SEND_MS: i64 = 30 * 24 * 3_600_000;

/// Segment's clock-skew correction, bounded. `original` is the client's
/// `originalTimestamp`, or its `timestamp` when it sent no `originalTimestamp`
/// (analytics.js and the server libraries stamp `timestamp` at call time).
///
/// 1. With both `sentAt` and an original time, and `0 <= sentAt - original <= 30 days`
///    (within the 5-minute tolerance): `timestamp = receivedAt - (sentAt - original)`;
///    the device clock's offset cancels out, and the result lies between 30 days before
///    and 5 minutes after `receivedAt`.
/// 2. Otherwise, an original time between 2000-01-01 and `receivedAt` + 5 minutes is used
///    as is (imports of history keep their times).
/// 3. Otherwise `receivedAt`.
///
/// The result is `trusted: false` when a time the client sent was set aside (a `sentAt`
/// that does not fit step 1, an original time outside step 2's window); the client's own
/// values are kept in `sentAt`/`originalTimestamp` either way.
pub fn correct_skew(received_ms: i64, sent_ms: Option<i64>, original_ms: Option<i64>) -> Corrected {
    let plausible = |t: i64| {
        (CLOCK_FLOOR_MS..=received_ms.saturating_add(CLOCK_FUTURE_TOLERANCE_MS)).contains(&t)
    };
    let (timestamp_ms, trusted) = match (sent_ms, original_ms) {
        (Some(sent), Some(orig))
            if (-CLOCK_FUTURE_TOLERANCE_MS..=MAX_EVENT_AGE_AT_SEND_MS)
                .contains(&sent.saturating_sub(orig)) =>
        {
            (received_ms.saturating_sub(sent.saturating_sub(orig)), true)
        }
        (sent, Some(orig)) if plausible(orig) => (orig, sent.is_none()),
        (_, Some(_)) => (received_ms, false),
        (Some(sent), None) => (received_ms, plausible(sent)),
        (None, None) => (received_ms, true),
    };
    Corrected {
        timestamp_ms,
        original_ms,
        trusted,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn microseconds_are_kept_and_written_only_when_there_are_some() {
        let us = parse_us("2026-11-20T10:00:00.123456Z").unwrap();
        assert_eq!(us, 1_795_168_800_123_456);
        assert_eq!(format_us(us), "2026-11-20T10:00:00.123456Z");
        assert_eq!(parse_canonical_us("2026-11-20T10:00:00.123456Z"), Some(us));
        // Python's isoformat(), with an offset; nanoseconds are dropped.
        assert_eq!(parse_us("2026-11-20T11:00:00.123456789+01:00"), Some(us));
        // On a whole millisecond: the usual form.
        assert_eq!(format_us(1_795_168_800_123_000), "2026-11-20T10:00:00.123Z");
        assert_eq!(
            parse_canonical_us("2026-11-20T10:00:00.123Z"),
            Some(1_795_168_800_123_000)
        );
        // Before 1970 the digits still read forwards in time.
        assert_eq!(format_us(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(parse_us("1969-12-31T23:59:59.999999Z"), Some(-1));
        for bad in [
            "2026-11-20T10:00:00.12345xZ",
            "2026-11-20T10:00:00.123456+",
            "2026-11-20T10:00:00.1234Z",
        ] {
            assert_eq!(parse_canonical_us(bad), None, "{bad}");
        }
    }

    use super::*;

    #[test]
    fn parses_common_iso_forms() {
        assert_eq!(parse_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_ms("1970-01-01T00:00:01.500Z"), Some(1500));
        assert_eq!(parse_ms("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_ms("1970-01-01T00:00:02"), Some(2000));
        assert_eq!(
            parse_ms("2026-11-24T13:54:04.123Z"),
            Some(1_795_528_444_123)
        );
        assert_eq!(parse_ms("yesterday"), None);
        assert_eq!(parse_ms(""), None);
    }

    #[test]
    fn formats_utc_millis_and_round_trips() {
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ms(1_795_528_444_123), "2026-11-24T13:54:04.123Z");
        assert_eq!(
            parse_ms(&format_ms(1_795_528_444_123)),
            Some(1_795_528_444_123)
        );
        // Clamped, not a panic.
        assert_eq!(format_ms(i64::MAX), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn canonical_form_parses_back_exactly_and_nothing_else_does() {
        // Every day of four centuries (leap rules included) and instants across the
        // whole range `format_ms` writes round-trip, and agree with the general parser.
        let day = 86_400_000;
        let start = parse_ms("1900-01-01T00:00:00Z").unwrap();
        for d in 0..(400 * 366) {
            let ms = start + d * day + (d * 7_919_123) % day;
            let text = format_ms(ms);
            assert_eq!(parse_canonical_ms(&text), Some(ms), "{text}");
        }
        for ms in [-62_135_596_800_000, -1, 0, 1, 253_402_300_799_999] {
            let text = format_ms(ms);
            assert_eq!(parse_canonical_ms(&text), Some(ms), "{text}");
            assert_eq!(parse_ms(&text), Some(ms), "{text}");
        }
        for other in [
            "2026-11-24T13:54:04Z",
            "2026-11-24T13:54:04.123+00:00",
            "2026-11-24 13:54:04.123Z",
            "2026-02-29T00:00:00.000Z",
            "2024-02-30T00:00:00.000Z",
            "2026-13-01T00:00:00.000Z",
            "2026-11-24T24:00:00.000Z",
            "2026-11-24T23:60:00.000Z",
            "0000-01-01T00:00:00.000Z",
            "2026-11-2xT13:54:04.123Z",
            "+026-11-24T13:54:04.123Z",
            "2026-11-24T13:54:04.123z",
            "",
        ] {
            assert_eq!(parse_canonical_ms(other), None, "{other}");
        }
        assert_eq!(
            parse_canonical_ms("2024-02-29T23:59:59.999Z"),
            parse_ms("2024-02-29T23:59:59.999Z")
        );
    }

    #[test]
    fn skew_correction_cancels_device_clock_offset() {
        // Device clock is 1 h fast; the event happened 5 s before the batch was sent,
        // and the server received it 200 ms after sending.
        let hour = 3_600_000;
        let received = 1_000_000_000;
        let sent = received - 200 + hour;
        let original = sent - 5_000;
        let c = correct_skew(received, Some(sent), Some(original));
        assert_eq!(c.timestamp_ms, received - 5_000);
        assert_eq!(c.original_ms, Some(original));
    }

    #[test]
    fn skew_without_sent_at_keeps_original_and_without_either_uses_received() {
        let received = 1_795_528_444_123;
        let c = correct_skew(received, None, Some(received - 3));
        assert_eq!((c.timestamp_ms, c.trusted), (received - 3, true));
        let c = correct_skew(received, Some(received - 7), None);
        assert_eq!((c.timestamp_ms, c.trusted), (received, true));
        let c = correct_skew(received, None, None);
        assert_eq!((c.timestamp_ms, c.trusted), (received, true));
    }

    // Regression (issue #8): sentAt in 2999 with a 2026 timestamp once gave year 1053.
    #[test]
    fn sent_at_far_in_the_future_is_not_trusted_and_the_timestamp_is_kept() {
        let received = parse_ms("2026-11-25T10:00:00Z").unwrap();
        let sent = parse_ms("2999-01-01T00:00:00Z").unwrap();
        let ts = parse_ms("2026-11-25T09:59:00Z").unwrap();
        let c = correct_skew(received, Some(sent), Some(ts));
        assert_eq!(c.timestamp_ms, ts);
        assert!(!c.trusted);
        assert_eq!(c.original_ms, Some(ts));
    }

    #[test]
    fn untrusted_times_fall_back_to_received_at() {
        let received = parse_ms("2026-11-25T10:00:00Z").unwrap();
        let year = 365 * 24 * 3_600_000;
        // Sent a year before the event happened, and the event is in the future.
        let c = correct_skew(received, Some(received), Some(received + year));
        assert_eq!((c.timestamp_ms, c.trusted), (received, false));
        // Before the floor, no sentAt.
        let c = correct_skew(received, None, Some(CLOCK_FLOOR_MS - 1));
        assert_eq!((c.timestamp_ms, c.trusted), (received, false));
        // A sentAt in the far future alone.
        let c = correct_skew(received, Some(received + year), None);
        assert_eq!((c.timestamp_ms, c.trusted), (received, false));
    }

    #[test]
    fn a_device_clock_reset_to_1970_is_still_corrected() {
        let received = parse_ms("2026-11-25T10:00:00Z").unwrap();
        let c = correct_skew(received, Some(10_000), Some(4_000));
        assert_eq!((c.timestamp_ms, c.trusted), (received - 6_000, true));
    }

    #[test]
    fn corrected_time_is_always_within_the_window_around_received_at() {
        let received = parse_ms("2026-11-25T10:00:00Z").unwrap();
        for sent in [
            i64::MIN,
            -1,
            0,
            received - 1,
            received,
            received + 1,
            i64::MAX,
        ] {
            for orig in [
                i64::MIN,
                0,
                CLOCK_FLOOR_MS,
                received,
                received + 10,
                i64::MAX,
            ] {
                let c = correct_skew(received, Some(sent), Some(orig));
                assert!(
                    c.timestamp_ms >= CLOCK_FLOOR_MS.min(received - MAX_EVENT_AGE_AT_SEND_MS)
                        && c.timestamp_ms <= received + CLOCK_FUTURE_TOLERANCE_MS,
                    "sent {sent} orig {orig} -> {c:?}"
                );
            }
        }
    }
}

#[cfg(test)]
mod format_tests {
    use super::format_ms;

    /// What the `time` crate writes for the same instant.
    fn reference(ms: i64) -> String {
        let dt =
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap();
        let fmt = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        dt.format(&fmt).unwrap()
    }

    #[test]
    fn formatting_by_hand_matches_the_time_crate() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let (lo, hi) = (-62_135_596_800_000i64, 253_402_300_799_999i64);
        let mut cases = vec![
            lo,
            hi,
            0,
            -1,
            1,
            951_782_400_000,
            951_868_799_999,
            1_795_000_000_123,
        ];
        for _ in 0..20_000 {
            // xorshift: instants spread over the whole representable range.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            cases.push(lo + (x % (hi - lo) as u64) as i64);
        }
        for ms in cases {
            assert_eq!(format_ms(ms), reference(ms), "{ms}");
        }
        assert_eq!(format_ms(i64::MIN), reference(lo));
        assert_eq!(format_ms(i64::MAX), reference(hi));
    }
}
