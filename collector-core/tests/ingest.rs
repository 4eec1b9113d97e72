//! Parsing and validation of Segment tracking-API request bodies.

use collector_core::ingest::{endpoint_for_path, parse_body, Endpoint, Parsed};
use collector_core::limits::{MAX_EVENT_BYTES, MAX_REQUEST_BYTES};
use collector_core::{EventError, EventKind, RequestError};
use serde_json::{json, Value};

const NOW: i64 = 1_795_528_444_000; // 2026-11-24T13:54:04.000Z

fn ids() -> impl FnMut() -> String {
    let mut n = 0;
    move || {
        n += 1;
        format!("gen-{n}")
    }
}

fn parse(endpoint: Endpoint, body: &Value) -> Result<Parsed, RequestError> {
    parse_body(endpoint, body.to_string().as_bytes(), NOW, &mut ids())
}

fn stored(p: &Parsed, i: usize) -> Value {
    serde_json::from_str(&p.accepted[i].json).unwrap()
}

#[test]
fn paths_map_to_endpoints_including_short_forms() {
    assert_eq!(
        endpoint_for_path("/v1/track"),
        Some(Endpoint::Single(EventKind::Track))
    );
    assert_eq!(
        endpoint_for_path("/v1/t"),
        Some(Endpoint::Single(EventKind::Track))
    );
    assert_eq!(
        endpoint_for_path("/v1/p"),
        Some(Endpoint::Single(EventKind::Page))
    );
    assert_eq!(
        endpoint_for_path("/v1/i"),
        Some(Endpoint::Single(EventKind::Identify))
    );
    assert_eq!(
        endpoint_for_path("/v1/g"),
        Some(Endpoint::Single(EventKind::Group))
    );
    assert_eq!(
        endpoint_for_path("/v1/a"),
        Some(Endpoint::Single(EventKind::Alias))
    );
    assert_eq!(
        endpoint_for_path("/v1/s"),
        Some(Endpoint::Single(EventKind::Screen))
    );
    assert_eq!(endpoint_for_path("/v1/b"), Some(Endpoint::Batch));
    assert_eq!(endpoint_for_path("/v1/batch/"), Some(Endpoint::Batch));
    assert_eq!(endpoint_for_path("/v1/nope"), None);
    assert_eq!(endpoint_for_path("/track"), None);
}

#[test]
fn single_track_is_normalised_with_server_fields() {
    let p = parse(
        Endpoint::Single(EventKind::Track),
        &json!({"event": "Signed Up", "userId": "u1", "anonymousId": null, "properties": {"plan": "pro"},
                "writeKey": "wk", "custom": {"kept": true}}),
    )
    .unwrap();
    assert_eq!(p.write_key.as_deref(), Some("wk"));
    assert!(p.rejected.is_empty());
    let ev = &p.accepted[0];
    assert_eq!(ev.kind, EventKind::Track);
    assert_eq!(ev.message_id, "gen-1");
    assert_eq!(ev.user_id.as_deref(), Some("u1"));
    assert_eq!(ev.anonymous_id, None);
    let v = stored(&p, 0);
    assert_eq!(v["type"], "track");
    assert_eq!(v["messageId"], "gen-1");
    assert_eq!(v["receivedAt"], "2026-11-24T13:54:04.000Z");
    assert_eq!(v["timestamp"], "2026-11-24T13:54:04.000Z");
    assert_eq!(
        v["custom"],
        json!({"kept": true}),
        "unknown fields are kept"
    );
    assert!(v.get("writeKey").is_none(), "the write key is never stored");
    assert!(v.get("anonymousId").is_none(), "null fields are dropped");
}

#[test]
fn skew_is_corrected_from_sent_at_and_timestamp() {
    // Device clock 1 h ahead; event 2 s before send.
    let p = parse(
        Endpoint::Single(EventKind::Page),
        &json!({"anonymousId": "a", "timestamp": "2026-11-24T14:54:02.000Z", "sentAt": "2026-11-24T14:54:04.000Z"}),
    )
    .unwrap();
    let v = stored(&p, 0);
    assert_eq!(v["timestamp"], "2026-11-24T13:54:02.000Z");
    assert_eq!(v["originalTimestamp"], "2026-11-24T14:54:02.000Z");
    assert_eq!(v["sentAt"], "2026-11-24T14:54:04.000Z");
    assert_eq!(p.accepted[0].timestamp_ms, NOW - 2000);
}

#[test]
fn batch_level_sent_at_context_and_integrations_apply_to_each_event() {
    let p = parse(
        Endpoint::Batch,
        &json!({"sentAt": "2026-11-24T13:54:14.000Z", "context": {"library": {"name": "x"}, "ip": "1.2.3.4"},
                "integrations": {"All": false},
                "batch": [{"type": "track", "event": "A", "userId": "u", "timestamp": "2026-11-24T13:54:10.000Z",
                            "context": {"ip": "5.6.7.8"}}]}),
    )
    .unwrap();
    let v = stored(&p, 0);
    assert_eq!(v["timestamp"], "2026-11-24T13:54:00.000Z");
    assert_eq!(
        v["context"]["ip"], "5.6.7.8",
        "the event's own context wins"
    );
    assert_eq!(v["context"]["library"]["name"], "x");
    assert_eq!(v["integrations"]["All"], false);
}

#[test]
fn numeric_ids_are_coerced_and_empty_ids_are_absent() {
    let p = parse(
        Endpoint::Single(EventKind::Identify),
        &json!({"userId": 42, "anonymousId": ""}),
    )
    .unwrap();
    assert_eq!(p.accepted[0].user_id.as_deref(), Some("42"));
    assert_eq!(p.accepted[0].anonymous_id, None);
    assert_eq!(stored(&p, 0)["userId"], "42");
}

#[test]
fn bad_events_in_a_batch_are_rejected_by_index_and_good_ones_kept() {
    let big = "x".repeat(MAX_EVENT_BYTES);
    let p = parse(
        Endpoint::Batch,
        &json!({"writeKey": "wk", "batch": [
            {"type": "track", "event": "ok-0", "userId": "u"},
            {"type": "track", "event": "no ids"},
            {"type": "bogus", "userId": "u"},
            {"type": "track", "event": "big", "userId": "u", "properties": {"blob": big}},
            "not an object",
            {"type": "track", "userId": "u"},
            {"type": "identify", "userId": "u", "traits": "nope"},
            {"type": "group", "userId": "u"},
            {"type": "alias", "userId": "u"},
            {"type": "page", "userId": "u", "timestamp": "last tuesday"},
            {"type": "identify", "userId": ["u"]},
            {"type": "track", "event": "ok-11", "anonymousId": "a", "messageId": "m-11"},
            {"event": "no type", "userId": "u"}
        ]}),
    )
    .unwrap();
    assert_eq!(p.write_key.as_deref(), Some("wk"));
    let ok: Vec<_> = p.accepted.iter().map(|e| e.message_id.clone()).collect();
    assert_eq!(ok, vec!["gen-1".to_string(), "m-11".to_string()]);
    let codes: Vec<_> = p
        .rejected
        .iter()
        .map(|r| (r.index.unwrap(), r.error.code()))
        .collect();
    assert_eq!(
        codes,
        vec![
            (1, "missing_identity"),
            (2, "unknown_type"),
            (3, "event_too_large"),
            (4, "not_an_object"),
            (5, "missing_field"),
            (6, "wrong_type"),
            (7, "missing_field"),
            (8, "missing_field"),
            (9, "bad_timestamp"),
            (10, "wrong_type"),
            (12, "missing_type"),
        ]
    );
    assert_eq!(p.rejected[2].error.status(), 413);
    assert_eq!(
        p.rejected[4].error.to_string(),
        "field `event` is required for this event type"
    );
}

#[test]
fn whole_request_errors_name_the_problem() {
    let e = |ep, body: &[u8]| parse_body(ep, body, NOW, &mut ids()).unwrap_err();
    assert!(matches!(
        e(Endpoint::Batch, b"{\"batch\": ["),
        RequestError::MalformedJson(_)
    ));
    assert!(matches!(
        e(Endpoint::Single(EventKind::Track), b"nope"),
        RequestError::MalformedJson(_)
    ));
    assert_eq!(e(Endpoint::Batch, b"[1,2]"), RequestError::NotAnObject);
    assert_eq!(
        e(Endpoint::Single(EventKind::Track), b"[1,2]"),
        RequestError::NotAnObject
    );
    assert_eq!(e(Endpoint::Batch, b"{}"), RequestError::MissingBatch);
    assert_eq!(
        e(Endpoint::Batch, b"{\"batch\": null}"),
        RequestError::MissingBatch
    );
    assert_eq!(
        e(Endpoint::Batch, b"{\"batch\": {}}"),
        RequestError::WrongType {
            field: "batch",
            expected: "an array"
        }
    );
    assert_eq!(
        e(Endpoint::Batch, b"{\"batch\": [], \"writeKey\": 5}"),
        RequestError::WrongType {
            field: "writeKey",
            expected: "a string"
        }
    );
    assert_eq!(
        e(Endpoint::Batch, b"{\"batch\": [\xff]}"),
        RequestError::NotUtf8
    );
    let huge = vec![b' '; MAX_REQUEST_BYTES + 1];
    let err = e(Endpoint::Batch, &huge);
    assert_eq!(err.status(), 413);
    assert_eq!(err.code(), "request_too_large");
}

#[test]
fn oversized_single_event_is_413_with_reason() {
    let big = "y".repeat(MAX_EVENT_BYTES);
    let p = parse(
        Endpoint::Single(EventKind::Track),
        &json!({"event": "E", "userId": "u", "writeKey": "k", "properties": {"b": big}}),
    )
    .unwrap();
    assert!(p.accepted.is_empty());
    assert_eq!(p.write_key.as_deref(), Some("k"));
    assert!(matches!(p.rejected[0].error, EventError::TooLarge { .. }));
    assert_eq!(p.rejected[0].error.status(), 413);
}

#[test]
fn single_endpoint_type_wins_over_body_type() {
    let p = parse(
        Endpoint::Single(EventKind::Screen),
        &json!({"type": "track", "userId": "u", "name": "Home"}),
    )
    .unwrap();
    assert_eq!(p.accepted[0].kind, EventKind::Screen);
    assert_eq!(stored(&p, 0)["type"], "screen");
}

#[test]
fn a_clients_report_of_events_it_did_not_send_is_read_leniently() {
    let p = parse(
        Endpoint::Batch,
        &json!({"batch": [{"type": "track", "event": "E", "anonymousId": "a"}],
                "dropped": {"queue_full": 2, "consent_unknown_at_unload": 1, "zero": 0}}),
    )
    .unwrap();
    assert_eq!(p.accepted.len(), 1);
    assert_eq!(
        p.client_drops,
        vec![
            ("client_consent_unknown_at_unload".to_string(), 1),
            ("client_queue_full".to_string(), 2)
        ]
    );
    // Bad entries never cost the events next to them; they are counted as invalid.
    let p = parse(
        Endpoint::Batch,
        &json!({"batch": [{"type": "track", "event": "E", "anonymousId": "a"}],
                "dropped": {"Bad Reason": 1, "ok": -1, "huge": 1e12, "fine": 3}}),
    )
    .unwrap();
    assert_eq!(p.accepted.len(), 1);
    assert_eq!(
        p.client_drops,
        vec![
            ("client_fine".to_string(), 3),
            ("client_report_invalid".to_string(), 3)
        ]
    );
    let p = parse(Endpoint::Batch, &json!({"batch": [], "dropped": "lots"})).unwrap();
    assert_eq!(
        p.client_drops,
        vec![("client_report_invalid".to_string(), 1)]
    );
    let p = parse(Endpoint::Batch, &json!({"batch": []})).unwrap();
    assert!(p.client_drops.is_empty());
}
