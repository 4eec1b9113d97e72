//! HMAC-SHA256 request signing for the drain API.
//!
//! The signed string is `METHOD \n PATH_AND_QUERY \n UNIX_SECONDS \n hex(sha256(body))`.
//! The signature travels as `X-Collector-Signature: v1=<hex>` with the time in
//! `X-Collector-Timestamp`. Verification is constant-time and accepts a ±300 s window.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::error::SignError;

pub const TIMESTAMP_HEADER: &str = "x-collector-timestamp";
pub const SIGNATURE_HEADER: &str = "x-collector-signature";
/// Largest accepted distance between the request's time and the verifier's clock.
pub const WINDOW_S: i64 = 300;

type HmacSha256 = Hmac<Sha256>;

fn mac_for(secret: &[u8], method: &str, path: &str, unix_s: i64, body: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    let body_hash = hex::encode(Sha256::digest(body));
    mac.update(method.to_ascii_uppercase().as_bytes());
    mac.update(b"\n");
    mac.update(path.as_bytes());
    mac.update(b"\n");
    mac.update(unix_s.to_string().as_bytes());
    mac.update(b"\n");
    mac.update(body_hash.as_bytes());
    mac
}

/// The value of the signature header for a request.
pub fn sign(secret: &[u8], method: &str, path: &str, unix_s: i64, body: &[u8]) -> String {
    let tag = mac_for(secret, method, path, unix_s, body)
        .finalize()
        .into_bytes();
    format!("v1={}", hex::encode(tag))
}

/// Verifies a request's timestamp and signature headers against `now_s`.
pub fn verify(
    secret: &[u8],
    method: &str,
    path: &str,
    body: &[u8],
    timestamp_header: Option<&str>,
    signature_header: Option<&str>,
    now_s: i64,
) -> Result<(), SignError> {
    let ts = timestamp_header.ok_or(SignError::Missing(TIMESTAMP_HEADER))?;
    let sig = signature_header.ok_or(SignError::Missing(SIGNATURE_HEADER))?;
    let unix_s: i64 = ts.trim().parse().map_err(|_| SignError::Malformed)?;
    let skew_s = now_s.saturating_sub(unix_s);
    if skew_s.abs() > WINDOW_S {
        return Err(SignError::Stale {
            skew_s,
            window_s: WINDOW_S,
        });
    }
    let hex_tag = sig.trim().strip_prefix("v1=").ok_or(SignError::Malformed)?;
    let tag = hex::decode(hex_tag).map_err(|_| SignError::Malformed)?;
    mac_for(secret, method, path, unix_s, body)
        .verify_slice(&tag)
        .map_err(|_| SignError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_528_444;

    #[test]
    fn signed_request_verifies() {
        let sig = sign(b"s3cret", "POST", "/drain/lease?x=1", NOW, b"{}");
        assert!(sig.starts_with("v1="));
        let ts = NOW.to_string();
        verify(
            b"s3cret",
            "post",
            "/drain/lease?x=1",
            b"{}",
            Some(&ts),
            Some(&sig),
            NOW + 10,
        )
        .unwrap();
    }

    #[test]
    fn rejects_wrong_secret_body_path_and_method() {
        let sig = sign(b"s3cret", "POST", "/drain/lease", NOW, b"{}");
        let ts = NOW.to_string();
        let v = |secret: &[u8], method, path, body: &[u8]| {
            verify(secret, method, path, body, Some(&ts), Some(&sig), NOW)
        };
        assert_eq!(
            v(b"other", "POST", "/drain/lease", b"{}"),
            Err(SignError::Mismatch)
        );
        assert_eq!(
            v(b"s3cret", "POST", "/drain/lease", b"{ }"),
            Err(SignError::Mismatch)
        );
        assert_eq!(
            v(b"s3cret", "POST", "/drain/ack", b"{}"),
            Err(SignError::Mismatch)
        );
        assert_eq!(
            v(b"s3cret", "GET", "/drain/lease", b"{}"),
            Err(SignError::Mismatch)
        );
    }

    #[test]
    fn rejects_stale_and_future_timestamps_outside_window() {
        let old = NOW - WINDOW_S - 1;
        let sig = sign(b"k", "POST", "/p", old, b"");
        let err = verify(
            b"k",
            "POST",
            "/p",
            b"",
            Some(&old.to_string()),
            Some(&sig),
            NOW,
        );
        assert!(matches!(err, Err(SignError::Stale { .. })));
        let future = NOW + WINDOW_S + 1;
        let sig = sign(b"k", "POST", "/p", future, b"");
        let err = verify(
            b"k",
            "POST",
            "/p",
            b"",
            Some(&future.to_string()),
            Some(&sig),
            NOW,
        );
        assert!(matches!(err, Err(SignError::Stale { .. })));
        // Edge of the window is accepted.
        let edge = NOW - WINDOW_S;
        let sig = sign(b"k", "POST", "/p", edge, b"");
        verify(
            b"k",
            "POST",
            "/p",
            b"",
            Some(&edge.to_string()),
            Some(&sig),
            NOW,
        )
        .unwrap();
    }

    #[test]
    fn rejects_missing_and_malformed_headers() {
        let ts = NOW.to_string();
        assert!(matches!(
            verify(b"k", "POST", "/p", b"", None, Some("v1=00"), NOW),
            Err(SignError::Missing(_))
        ));
        assert!(matches!(
            verify(b"k", "POST", "/p", b"", Some(&ts), None, NOW),
            Err(SignError::Missing(_))
        ));
        assert_eq!(
            verify(b"k", "POST", "/p", b"", Some("soon"), Some("v1=00"), NOW),
            Err(SignError::Malformed)
        );
        assert_eq!(
            verify(b"k", "POST", "/p", b"", Some(&ts), Some("v2=00"), NOW),
            Err(SignError::Malformed)
        );
        assert_eq!(
            verify(b"k", "POST", "/p", b"", Some(&ts), Some("v1=zz"), NOW),
            Err(SignError::Malformed)
        );
        assert_eq!(
            verify(b"k", "POST", "/p", b"", Some(&ts), Some("v1=00"), NOW),
            Err(SignError::Mismatch)
        );
    }
}
