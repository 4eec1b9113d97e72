//! Timestamps: ISO-8601 in, RFC 3339 (UTC, milliseconds) out, and Segment's clock-skew
//! correction. All instants are Unix milliseconds (`i64`).

use time::format_description::well_known::{Iso8601, Rfc3339};
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};

/// Parses an ISO-8601 / RFC 3339 date-time to Unix milliseconds. A value without an
/// offset is taken as UTC. Returns `None` for anything else.
pub fn parse_ms(s: &str) -> Option<i64> {
    let s = s.trim();
    let dt = OffsetDateTime::parse(s, &Rfc3339)
        .or_else(|_| OffsetDateTime::parse(s, &Iso8601::DEFAULT))
        .or_else(|_| PrimitiveDateTime::parse(s, &Iso8601::DEFAULT).map(|p| p.assume_utc()))
        .ok()?;
    i64::try_from(dt.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Formats Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`. Out-of-range values are
/// clamped to the representable range rather than panicking.
pub fn format_ms(ms: i64) -> String {
    const MIN_MS: i64 = -62_135_596_800_000; // 0001-01-01
    const MAX_MS: i64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999
    let ms = ms.clamp(MIN_MS, MAX_MS);
    let dt = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let fmt =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    dt.format(&fmt)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".to_string())
}

/// The event times after skew correction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Corrected {
    /// Best estimate of when the event happened, on the server's clock.
    pub timestamp_ms: i64,
    /// The device's own time of the call, if it said one.
    pub original_ms: Option<i64>,
}

/// Segment's clock-skew correction. `original` is the client's `originalTimestamp`, or
/// its `timestamp` when it sent no `originalTimestamp` (analytics.js and the server
/// libraries stamp `timestamp` at call time). With both `sentAt` and an original time,
/// `timestamp = receivedAt - (sentAt - original)`: the device clock's offset cancels
/// out. Without `sentAt` the original time is used as is, and without either the
/// server's receive time is.
pub fn correct_skew(received_ms: i64, sent_ms: Option<i64>, original_ms: Option<i64>) -> Corrected {
    let timestamp_ms = match (sent_ms, original_ms) {
        (Some(sent), Some(orig)) => received_ms.saturating_sub(sent.saturating_sub(orig)),
        (None, Some(orig)) => orig,
        (_, None) => received_ms,
    };
    Corrected {
        timestamp_ms,
        original_ms,
    }
}

#[cfg(test)]
mod tests {
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
        assert_eq!(correct_skew(10, None, Some(3)).timestamp_ms, 3);
        assert_eq!(correct_skew(10, Some(7), None).timestamp_ms, 10);
        assert_eq!(correct_skew(10, None, None).timestamp_ms, 10);
    }
}
