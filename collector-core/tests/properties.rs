//! Property tests: no input makes the core panic, and the codec round-trips anything.

use collector_core::codec::{decode_batch, encode_batch, Batch};
use collector_core::ingest::{parse_body, Endpoint};
use collector_core::{EventKind, StoredEvent};
use proptest::prelude::*;

fn endpoint() -> impl Strategy<Value = Endpoint> {
    prop_oneof![
        Just(Endpoint::Batch),
        proptest::sample::select(EventKind::ALL.to_vec()).prop_map(Endpoint::Single),
    ]
}

/// JSON-ish values, biased towards Segment field names so validation paths are hit.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "[a-z0-9:.T-]{0,24}".prop_map(serde_json::Value::from),
        Just(serde_json::Value::from("2026-11-24T13:54:04.123Z")),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        let key = prop_oneof![
            Just("type".to_string()),
            Just("userId".to_string()),
            Just("anonymousId".to_string()),
            Just("event".to_string()),
            Just("messageId".to_string()),
            Just("timestamp".to_string()),
            Just("sentAt".to_string()),
            Just("properties".to_string()),
            Just("context".to_string()),
            Just("batch".to_string()),
            Just("writeKey".to_string()),
            "[a-z]{1,6}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(key, inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(ep in endpoint(), body in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_body(ep, &body, 0, &mut || "id".to_string());
    }

    #[test]
    fn arbitrary_json_never_panics_and_accounts_for_every_event(ep in endpoint(), v in json_value()) {
        let body = v.to_string();
        if let Ok(p) = parse_body(ep, body.as_bytes(), 1_795_528_444_000, &mut || "id".to_string()) {
            if let (Endpoint::Batch, Some(items)) = (ep, v.get("batch").and_then(|b| b.as_array())) {
                // Every event in a batch is either accepted or rejected with its index.
                prop_assert_eq!(p.accepted.len() + p.rejected.len(), items.len());
            }
            for ev in &p.accepted {
                let stored: serde_json::Value = serde_json::from_str(&ev.json).unwrap();
                prop_assert!(stored.get("writeKey").is_none());
                prop_assert!(ev.anonymous_id.is_some() || ev.user_id.is_some());
                prop_assert_eq!(stored["messageId"].as_str(), Some(ev.message_id.as_str()));
            }
        }
    }

    #[test]
    fn codec_round_trips_any_batch(
        shard in any::<u32>(),
        sealed in any::<i64>(),
        events in prop::collection::vec(
            ("[ -~]{0,40}", proptest::sample::select(EventKind::ALL.to_vec()), proptest::option::of("[ -~]{0,20}"),
             proptest::option::of("\\PC{0,20}"), any::<i64>(), any::<i64>(), "\\PC{0,80}"),
            0..20)
    ) {
        let batch = Batch {
            shard,
            sealed_at_ms: sealed,
            events: events.into_iter().map(|(m, k, a, u, r, t, j)| StoredEvent {
                message_id: m, kind: k, anonymous_id: a, user_id: u, received_at_ms: r, timestamp_ms: t, json: j,
            }).collect(),
        };
        let bytes = encode_batch(&batch).unwrap();
        prop_assert_eq!(decode_batch(&bytes).unwrap(), batch);
    }

    #[test]
    fn truncated_or_flipped_batches_are_errors_not_panics(cut in 0usize..200, flip in 0usize..200) {
        let batch = Batch { shard: 1, sealed_at_ms: 2, events: vec![StoredEvent {
            message_id: "m".into(), kind: EventKind::Track, anonymous_id: None, user_id: Some("u".into()),
            received_at_ms: 3, timestamp_ms: 4, json: "{}".into() }] };
        let bytes = encode_batch(&batch).unwrap();
        let cut = cut.min(bytes.len());
        prop_assert!(cut == bytes.len() || decode_batch(&bytes[..cut]).is_err());
        let mut flipped = bytes.clone();
        let i = flip % flipped.len();
        flipped[i] ^= 0x01;
        prop_assert!(decode_batch(&flipped).is_err());
    }
}
