//! The batch codec is an API boundary: golden fixtures pin the bytes of every format
//! version, so an agent built later still reads what an older edge sealed.
//! Regenerate a fixture only for a new version: `BLESS=1 cargo test -p collector-core --test codec`.

use collector_core::codec::*;
use collector_core::{CodecError, EventKind, StoredEvent};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn sample_batch() -> Batch {
    Batch {
        shard: 3,
        sealed_at_ms: 1_795_528_444_123,
        events: vec![
            StoredEvent {
                message_id: "msg-1".into(),
                kind: EventKind::Track,
                anonymous_id: Some("anon-1".into()),
                user_id: None,
                received_at_ms: 1_795_528_444_000,
                timestamp_ms: 1_795_528_443_000,
                json: r#"{"type":"track","event":"Signed Up","anonymousId":"anon-1","messageId":"msg-1"}"#.into(),
            },
            StoredEvent {
                message_id: "msg-2".into(),
                kind: EventKind::Identify,
                anonymous_id: None,
                user_id: Some("user-9".into()),
                received_at_ms: 1_795_528_444_001,
                timestamp_ms: 1_795_528_444_001,
                json: r#"{"type":"identify","userId":"user-9","traits":{"plan":"pro"},"messageId":"msg-2"}"#.into(),
            },
        ],
    }
}

fn check_golden(name: &str, bytes: &[u8]) {
    let path = fixture(name);
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&path, bytes).unwrap();
    }
    let golden = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(
        golden, bytes,
        "encoding of {name} changed: that is a wire-format break"
    );
}

#[test]
fn batch_v1_encoding_matches_golden_fixture() {
    check_golden("batch-v1.bin", &encode_batch(&sample_batch()).unwrap());
}

#[test]
fn batch_v1_golden_fixture_decodes_to_known_batch() {
    let bytes = std::fs::read(fixture("batch-v1.bin")).unwrap();
    assert_eq!(&bytes[..3], b"ECB");
    assert_eq!(bytes[3], 1, "format version byte");
    assert_eq!(decode_batch(&bytes).unwrap(), sample_batch());
}

#[test]
fn lease_v1_golden_fixture_round_trips() {
    let lease = Lease {
        lease_id: "lease-abc".into(),
        expires_at_ms: 1_795_528_474_123,
        batches: vec![LeasedBatch {
            batch_id: 7,
            blob: encode_batch(&sample_batch()).unwrap(),
        }],
    };
    let bytes = encode_lease(&lease).unwrap();
    check_golden("lease-v1.bin", &bytes);
    assert_eq!(decode_lease(&bytes).unwrap(), lease);
}

fn sample_append() -> Append {
    Append {
        events: sample_batch().events,
        drops: vec![("missing_identity".into(), 2)],
        notes: vec![
            ("clock_untrusted".into(), 1),
            ("pii_detected_email".into(), 3),
        ],
    }
}

#[test]
fn append_v3_golden_fixture_round_trips() {
    let bytes = encode_append(&sample_append()).unwrap();
    assert_eq!((&bytes[..3], bytes[3]), (&b"ECA"[..], 3));
    check_golden("append-v3.bin", &bytes);
    assert_eq!(decode_append(&bytes).unwrap(), sample_append());
}

// Issue #13: a shard stores a version-3 append's events as they came (borrowed, not
// decoded and encoded again), and gets the same bytes from an older version's.
#[test]
fn append_parts_hold_the_events_in_the_batch_encoding_for_every_version() {
    let a = sample_append();
    let raw = encode_events_raw(&a.events).unwrap();
    let v3 = encode_append(&a).unwrap();
    let parts = decode_append_parts(&v3).unwrap();
    assert!(matches!(parts.events_raw, std::borrow::Cow::Borrowed(_)));
    assert_eq!(parts.events_raw.as_ref(), raw.as_slice());
    assert_eq!(parts.events, a.events.len() as u64);
    assert_eq!(
        (parts.drops.clone(), parts.notes.clone()),
        (a.drops.clone(), a.notes.clone())
    );
    assert_eq!(parts.decode_events().unwrap(), a.events);
    // Sealing the stored parts gives exactly the batch of those events.
    assert_eq!(
        encode_batch_from_parts(3, 7, a.events.len(), [parts.events_raw.as_ref()]).unwrap(),
        encode_batch(&Batch {
            shard: 3,
            sealed_at_ms: 7,
            events: a.events.clone()
        })
        .unwrap()
    );
    for old in [
        std::fs::read(fixture("append-v2.bin")).unwrap(),
        encode_append_v2(&a).unwrap(),
    ] {
        let parts = decode_append_parts(&old).unwrap();
        assert_eq!(parts.events_raw.as_ref(), raw.as_slice());
        assert_eq!(parts.events, a.events.len() as u64);
    }
    let v1 = std::fs::read(fixture("append-v1.bin")).unwrap();
    let parts = decode_append_parts(&v1).unwrap();
    assert_eq!(parts.decode_events().unwrap(), sample_batch().events);
    // A count that does not match the bytes is an error, not a short read.
    assert!(decode_events_raw(&raw, a.events.len() as u64 - 1).is_err());
    assert!(decode_events_raw(&raw, a.events.len() as u64 + 1).is_err());
}

// Issue #13: version 2, what the previous front worker sent, still decodes.
#[test]
fn append_v2_golden_fixture_still_decodes() {
    let bytes = encode_append_v2(&sample_append()).unwrap();
    assert_eq!((&bytes[..3], bytes[3]), (&b"ECA"[..], 2));
    check_golden("append-v2.bin", &bytes);
    assert_eq!(decode_append(&bytes).unwrap(), sample_append());
}

// Issue #8: a value written by the previous version still decodes (an old front worker
// talking to a new shard during a deploy).
#[test]
fn append_v1_golden_fixture_still_decodes_with_no_notes() {
    let v1 = AppendV1 {
        events: sample_batch().events,
        drops: vec![("missing_identity".into(), 2)],
    };
    check_golden("append-v1.bin", &encode_append_v1(&v1).unwrap());
    let bytes = std::fs::read(fixture("append-v1.bin")).unwrap();
    assert_eq!(bytes[3], 1);
    let decoded = decode_append(&bytes).unwrap();
    assert_eq!(decoded.events, v1.events);
    assert_eq!(decoded.drops, v1.drops);
    assert!(decoded.notes.is_empty());
}

// Issue #8: the open-event format at rest in the Durable Object has its own fixture.
#[test]
fn open_event_v1_golden_fixture_decodes_to_known_event() {
    let ev = sample_batch().events.remove(1);
    check_golden("event-v1.bin", &encode_event(&ev).unwrap());
    let bytes = std::fs::read(fixture("event-v1.bin")).unwrap();
    assert_eq!((&bytes[..3], bytes[3]), (&b"ECE"[..], 1));
    assert_eq!(decode_event(&bytes).unwrap(), ev);
}

#[test]
fn each_format_has_its_own_version() {
    // Bumping one format's version leaves the others' bytes (and fixtures) alone.
    assert_eq!(encode_batch(&sample_batch()).unwrap()[3], BATCH_VERSION);
    assert_eq!(encode_append(&sample_append()).unwrap()[3], APPEND_VERSION);
    assert_eq!(
        encode_event(&sample_batch().events[0]).unwrap()[3],
        EVENT_VERSION
    );
    assert_ne!(BATCH_VERSION, APPEND_VERSION);
    // An append of an unknown future version is refused, not misread.
    let mut bytes = encode_append(&sample_append()).unwrap();
    bytes[3] = APPEND_VERSION + 1;
    assert_eq!(
        decode_append(&bytes),
        Err(CodecError::UnsupportedVersion(APPEND_VERSION + 1))
    );
}

#[test]
fn corrupted_blob_is_caught_by_checksum() {
    let mut bytes = encode_batch(&sample_batch()).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    assert!(matches!(
        decode_batch(&bytes),
        Err(CodecError::Checksum { .. })
    ));
}

#[test]
fn unknown_version_magic_and_short_input_are_rejected() {
    let mut bytes = encode_batch(&sample_batch()).unwrap();
    bytes[3] = 2;
    assert_eq!(decode_batch(&bytes), Err(CodecError::UnsupportedVersion(2)));
    bytes[0] = b'X';
    assert_eq!(decode_batch(&bytes), Err(CodecError::BadMagic));
    assert_eq!(decode_batch(b"ECB\x01"), Err(CodecError::TooShort(4)));
    // A lease is not a batch.
    let lease = encode_lease(&Lease {
        lease_id: "x".into(),
        expires_at_ms: 0,
        batches: vec![],
    })
    .unwrap();
    assert_eq!(decode_batch(&lease), Err(CodecError::BadMagic));
}

#[test]
fn empty_and_large_batches_round_trip() {
    let empty = Batch {
        shard: 0,
        sealed_at_ms: 0,
        events: vec![],
    };
    assert_eq!(decode_batch(&encode_batch(&empty).unwrap()).unwrap(), empty);
    let mut big = sample_batch();
    let ev = big.events[0].clone();
    big.events = (0..2000)
        .map(|i| StoredEvent {
            message_id: format!("m{i}"),
            ..ev.clone()
        })
        .collect();
    assert_eq!(decode_batch(&encode_batch(&big).unwrap()).unwrap(), big);
}

#[test]
fn a_batch_from_raw_parts_is_the_batch_encoding() {
    let ev = |i: u32| StoredEvent {
        message_id: format!("m-{i}"),
        kind: collector_core::EventKind::Track,
        anonymous_id: Some(format!("a-{i}")),
        user_id: i.is_multiple_of(2).then(|| format!("u-{i}")),
        received_at_ms: 1_700_000_000_000 + i64::from(i),
        timestamp_ms: 1_700_000_000_000,
        json: format!("{{\"i\":{i}}}"),
    };
    let all: Vec<StoredEvent> = (0..300).map(ev).collect();
    let parts = [
        encode_events_raw(&all[..1]).unwrap(),
        encode_events_raw(&all[1..200]).unwrap(),
        encode_events_raw(&all[200..]).unwrap(),
    ];
    let joined =
        encode_batch_from_parts(3, -5, all.len(), parts.iter().map(Vec::as_slice)).unwrap();
    let batch = Batch {
        shard: 3,
        sealed_at_ms: -5,
        events: all,
    };
    assert_eq!(joined, encode_batch(&batch).unwrap());
    assert_eq!(decode_batch(&joined).unwrap(), batch);
    let empty = encode_batch_from_parts(0, 0, 0, std::iter::empty()).unwrap();
    assert_eq!(decode_batch(&empty).unwrap().events, vec![]);
}
