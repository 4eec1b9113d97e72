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

#[test]
fn append_round_trips() {
    let append = Append {
        events: sample_batch().events,
        drops: vec![("missing_identity".into(), 2)],
    };
    assert_eq!(
        decode_append(&encode_append(&append).unwrap()).unwrap(),
        append
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
