//! Untrusted input never costs more than a small constant times its size (issue #8).
//!
//! Each test measures the bytes the code under test allocates, with an instrumented
//! global allocator, on inputs crafted to sit at the limits: memory, not wall-clock
//! time, is what these assert. One test binary, one test at a time (the allocator's
//! counters are global).

use std::alloc::System;
use std::sync::Mutex;

use collector_core::tcf::{decode, range_bomb, TcWriter, TcfError, VendorSet, MAX_TC_STRING_CHARS};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

static SERIAL: Mutex<()> = Mutex::new(());

/// What the test harness itself may allocate meanwhile (it spawns the next test's
/// thread while one runs). Small against the bounds that matter: an expanded range
/// bomb is hundreds of megabytes.
const NOISE: usize = 64 * 1024;

/// Every test holds this for its whole run, so no other test allocates while one
/// measures.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bytes allocated while `f` runs (with its result). Call with [`serial`] held.
fn allocated<T>(f: impl FnOnce() -> T) -> (usize, T) {
    let region = Region::new(GLOBAL);
    let out = f();
    (region.change().bytes_allocated, out)
}

#[test]
fn tcf_range_bomb_at_the_length_limit_decodes_in_memory_proportional_to_its_size() {
    let _serial = serial();
    // As many ranges as fit under the limit.
    let mut entries = 1;
    while range_bomb(entries * 2).len() <= MAX_TC_STRING_CHARS {
        entries *= 2;
    }
    while range_bomb(entries + 16).len() <= MAX_TC_STRING_CHARS {
        entries += 16;
    }
    let s = range_bomb(entries);
    assert!(s.len() <= MAX_TC_STRING_CHARS && s.len() > MAX_TC_STRING_CHARS - 64);
    let (bytes, tc) = allocated(|| decode(&s));
    let tc = tc.expect("a valid, if hostile, TC string");
    assert_eq!(tc.vendor_consents, VendorSet::Ranges(vec![(1, 65_535)]));
    assert_eq!(tc.vendor_consents.len(), 65_535);
    assert!(tc.vendor_consents.contains(65_535) && !tc.vendor_consents.contains(0));
    assert!(tc.purpose_consent(1));
    // Expanded, this would be entries × 65,535 ids (hundreds of MB); kept as ranges it
    // is a few times the string.
    assert!(
        bytes <= 16 * s.len() + NOISE,
        "decoding {} chars ({entries} ranges) allocated {bytes} bytes",
        s.len()
    );
}

#[test]
fn tcf_string_over_the_limit_is_refused_before_decoding() {
    let _serial = serial();
    let s = range_bomb(4_095); // the most the 12-bit count allows: ~22 KB
    assert!(s.len() > MAX_TC_STRING_CHARS);
    let (bytes, r) = allocated(|| decode(&s));
    assert_eq!(
        r,
        Err(TcfError::TooLong {
            chars: s.len(),
            limit: MAX_TC_STRING_CHARS
        })
    );
    assert_eq!(r.unwrap_err().code(), "too_long");
    assert!(bytes < NOISE, "refusing allocated {bytes} bytes");
}

#[test]
fn tcf_full_bitfield_is_kept_as_its_bits() {
    let _serial = serial();
    let mut w = TcWriter::core_header(1);
    w.put(16, 40_000).put(1, 0);
    for _ in 0..40_000 {
        w.put(1, 1);
    }
    w.put(16, 0).put(1, 0);
    let s = w.encode();
    assert!(s.len() < MAX_TC_STRING_CHARS);
    let (bytes, tc) = allocated(|| decode(&s));
    let tc = tc.unwrap();
    assert_eq!(tc.vendor_consents.len(), 40_000);
    assert!(tc.vendor_consents.contains(40_000) && !tc.vendor_consents.contains(40_001));
    assert!(
        bytes <= 4 * s.len() + NOISE,
        "allocated {bytes} for {} chars",
        s.len()
    );
}

#[test]
fn tcf_alternating_bitfield_is_kept_as_its_bits() {
    let _serial = serial();
    let mut w = TcWriter::core_header(1);
    w.put(16, 40_000).put(1, 0);
    for i in 0..40_000 {
        w.put(1, i % 2);
    }
    w.put(16, 0).put(1, 0);
    let s = w.encode();
    let (bytes, tc) = allocated(|| decode(&s));
    let tc = tc.unwrap();
    assert_eq!(tc.vendor_consents.len(), 20_000);
    assert!(tc.vendor_consents.contains(2) && !tc.vendor_consents.contains(1));
    assert!(
        bytes <= 4 * s.len() + NOISE,
        "allocated {bytes} for {} chars",
        s.len()
    );
}

#[test]
fn tcf_bitfield_claiming_more_vendors_than_bits_is_truncated_not_read() {
    let _serial = serial();
    let mut w = TcWriter::core_header(1);
    w.put(16, 65_535).put(1, 0).put(8, 0xff);
    let s = w.encode();
    let (bytes, r) = allocated(|| decode(&s));
    assert!(matches!(r, Err(TcfError::Truncated { .. })), "{r:?}");
    assert!(bytes < NOISE, "allocated {bytes}");
}

fn engine() -> collector_core::privacy::PrivacyEngine {
    collector_core::privacy::PrivacyEngine::new(
        collector_core::policy::parse(include_str!("../../privacy.toml")).unwrap(),
        collector_core::pii::PiiHasher::new("v1", b"bounded-work-key", &[]),
    )
}

fn batch_body(events: usize) -> String {
    let evs: Vec<String> = (0..events)
        .map(|i| {
            format!(r#"{{"type":"track","event":"E","messageId":"m{i}","anonymousId":"a","properties":{{"n":{i}}}}}"#)
        })
        .collect();
    format!(r#"{{"batch":[{}]}}"#, evs.join(","))
}

fn parse_with_cookie(body: &str, cookie: Option<String>) -> (usize, usize) {
    use collector_core::ingest::{parse_body_with_privacy, Endpoint};
    use collector_core::privacy::RequestSignals;
    let engine = engine();
    let signals = RequestSignals::new(false, cookie, Some("DE".into()), None);
    let (bytes, parsed) = allocated(|| {
        parse_body_with_privacy(
            Endpoint::Batch,
            body.as_bytes(),
            1_795_528_444_000,
            &mut || "id".into(),
            Some((&engine, &signals)),
        )
        .unwrap()
    });
    (bytes, parsed.accepted.len() + parsed.withheld.len())
}

// Issue #8: the request's `euconsent-v2` cookie is decoded once per request, not once per
// event: a batch of 500 events with a TC string at the length limit costs about what the
// same batch costs without it.
#[test]
fn tcf_cookie_is_decoded_once_per_request_not_per_event() {
    let _serial = serial();
    let body = batch_body(500);
    let mut entries = 1;
    while range_bomb(entries * 2).len() <= MAX_TC_STRING_CHARS {
        entries *= 2;
    }
    let cookie = range_bomb(entries);
    let (without, n) = parse_with_cookie(&body, None);
    assert_eq!(n, 500);
    let (with, n) = parse_with_cookie(&body, Some(cookie.clone()));
    assert_eq!(n, 500);
    assert!(
        with <= without + 16 * cookie.len() + NOISE,
        "a {}-char cookie over 500 events added {} bytes",
        cookie.len(),
        with.saturating_sub(without)
    );
}

// Issue #8: PII detection runs on every string; hostile strings (thousands of `@`, `%40`,
// `+1`, digit runs) cost a small constant times their size.
#[test]
fn pii_detection_on_hostile_strings_is_linear() {
    let _serial = serial();
    let engine = engine();
    let signals =
        collector_core::privacy::RequestSignals::new(false, None, Some("US".into()), None);
    let hostile = [
        "@".repeat(30_000),
        "%40".repeat(10_000),
        "a@".repeat(15_000),
        "a.".repeat(15_000) + "@x",
        "+1".repeat(15_000),
        "4 ".repeat(15_000),
        "x@y.zz ".repeat(4_000),
        "4111 1111 1111 1111 ".repeat(1_500),
    ];
    for s in hostile {
        let mut ev = serde_json::json!({"type": "track", "event": "E", "anonymousId": "a",
            "properties": {"text": s}, "context": {"page": {"title": s}}})
        .as_object()
        .unwrap()
        .clone();
        let size = serde_json::to_string(&ev).unwrap().len();
        let (bytes, r) = allocated(|| engine.apply(&mut ev, &signals));
        r.unwrap();
        assert!(
            bytes <= 24 * size + NOISE,
            "{}…: {bytes} bytes allocated for a {size}-byte event",
            &s[..8]
        );
    }
}

#[test]
fn largest_range_bomb_sits_just_under_the_limit() {
    let _serial = serial();
    let s = collector_core::tcf::largest_range_bomb();
    assert!(
        s.len() <= MAX_TC_STRING_CHARS && s.len() > MAX_TC_STRING_CHARS - 16,
        "{}",
        s.len()
    );
    let (bytes, tc) = allocated(|| decode(&s));
    assert_eq!(tc.unwrap().vendor_consents.len(), 65_535);
    assert!(bytes <= 16 * s.len() + NOISE, "{bytes}");
}
