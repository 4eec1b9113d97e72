//! A poison event (it decodes, but the warehouse can never take it) through the real
//! worker and the real drain (issue #8): it is quarantined with its reason, the rest of
//! its batch loads, every other shard keeps draining, and it can be fixed and replayed.

mod common;

use collector_agent::sinks::duckdb::DuckDbSink;
use common::*;
use serde_json::json;

#[tokio::test]
async fn poison_event_is_quarantined_and_every_shard_keeps_draining() {
    let st = Stack::start();
    // Good events for every shard.
    for i in 0..40 {
        let r = st
            .post("/v1/track", &json!({"messageId": format!("g-{i}"), "anonymousId": format!("visitor-{i}"), "event": "E"}))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // Plant a poison event in shard 0, as an older or buggy edge might have stored it:
    // valid JSON framing, but a timestamp no warehouse can read.
    let poison = json!([{
        "message_id": "poison-1", "kind": "Track", "anonymous_id": "visitor-0", "user_id": null,
        "received_at_ms": 0, "timestamp_ms": 0,
        "json": "{\"type\":\"track\",\"event\":\"E\",\"messageId\":\"poison-1\",\"anonymousId\":\"visitor-0\",\"timestamp\":\"not a time\"}"
    }]);
    let r = st
        .send(
            st.http
                .post(format!("{}/dev/inject?shard=0", st.edge.url))
                .body(poison.to_string()),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);

    let summary = st.drain().await;
    assert_eq!(summary.quarantined, 1, "{summary:?}");
    assert_eq!(summary.inserted, 40, "{summary:?}");
    assert_eq!(st.count("tracks"), 40);
    let q = st.query("SELECT message_id, shard, reason FROM quarantine");
    assert_eq!(q[0][0].as_deref(), Some("poison-1"));
    assert_eq!(q[0][1].as_deref(), Some("0"));
    assert!(q[0][2].as_deref().unwrap().contains("timestamp"), "{q:?}");

    // The poison batch was acked: nothing is stuck, a second drain finds nothing.
    let again = st.drain().await;
    assert_eq!((again.batches, again.quarantined), (0, 0), "{again:?}");
    let stats = st.edge_stats().await;
    let sealed: u64 = stats["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sealed_batches"].as_u64().unwrap() + s["open_events"].as_u64().unwrap())
        .sum();
    assert_eq!(sealed, 0, "{stats}");

    // Fixed by hand, then replayed: it lands once and leaves the quarantine.
    {
        let mut sink = DuckDbSink::open(&st.warehouse()).unwrap();
        sink.query(
            "UPDATE quarantine SET event = replace(event, 'not a time', '2026-11-25T10:00:00Z')",
        )
        .unwrap();
        let r = sink.replay_quarantine(&["poison-1".to_string()]).unwrap();
        assert_eq!((r.inserted, r.quarantined), (1, 0));
    }
    assert_eq!(st.count("tracks"), 41);
    assert_eq!(st.count("quarantine"), 0);
}
