//! A poison event (it decodes, but the warehouse can never take it) through the real
//! worker and the real drain (issue #8): it is quarantined with its reason, the rest of
//! its batch loads, every other shard keeps draining, and it can be fixed and replayed.

mod common;

use collector_agent::sinks::duckdb::DuckDbSink;
use collector_agent::sinks::Sink;
use common::*;
use serde_json::json;

/// Plants one event in a shard as stored, skipping validation (`/dev/inject`, DEV_MODE
/// only): what an older or buggy edge might have written.
async fn inject(st: &Stack, shard: u32, id: &str, kind: &str, event_json: &str) {
    let events = json!([{
        "message_id": id, "kind": kind, "anonymous_id": "v", "user_id": null,
        "received_at_ms": 0, "timestamp_ms": 0, "json": event_json
    }]);
    let r = st
        .send(
            st.http
                .post(format!("{}/dev/inject?shard={shard}", st.edge.url))
                .body(events.to_string()),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

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
    inject(
        &st,
        0,
        "poison-1",
        "Track",
        r#"{"type":"track","event":"E","messageId":"poison-1","anonymousId":"visitor-0","timestamp":"not a time"}"#,
    )
    .await;

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
    st.assert_edge_drained().await;

    // Fixed by hand, then replayed: it lands once and leaves the quarantine.
    {
        let sink = DuckDbSink::open(&st.warehouse()).unwrap();
        sink.query(
            "UPDATE quarantine SET event = replace(event, 'not a time', '2026-11-25T10:00:00Z')",
        )
        .await
        .unwrap();
        let r = sink
            .replay_quarantine(&["poison-1".to_string()])
            .await
            .unwrap();
        assert_eq!((r.inserted, r.quarantined), (1, 0));
    }
    assert_eq!(st.count("tracks"), 41);
    assert_eq!(st.count("quarantine"), 0);
}

// The daemon drains past a poison event, and `collector-agent quarantine replay` goes
// through its admin endpoint while it holds the warehouse.
#[tokio::test]
async fn running_agent_quarantines_and_replays_through_its_admin_endpoint() {
    use collector_agent::admin::{query_running_agent, replay_running_agent};
    let st = Stack::start();
    inject(
        &st,
        2,
        "poison-2",
        "Page",
        r#"{"type":"page","messageId":"poison-2","anonymousId":"v","sentAt":[1]}"#,
    )
    .await;
    for i in 0..8 {
        let r = st
            .post(
                "/v1/page",
                &json!({"messageId": format!("p-{i}"), "anonymousId": format!("v-{i}")}),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    let cfg = st.agent_config();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(collector_agent::run(cfg.clone(), async move {
        let _ = stop_rx.await;
    }));
    let state = cfg.warehouse.state_file();
    let count = |sql: &'static str| {
        let w = state.clone();
        async move {
            query_running_agent(&w, sql)
                .await
                .ok()
                .flatten()
                .and_then(|r| r.rows[0][0].clone())
                .unwrap_or_default()
        }
    };
    // Open batches seal after BATCH_MAX_AGE_MS; wait for everything to land.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while count("SELECT (SELECT count(*) FROM pages) || '/' || (SELECT count(*) FROM quarantine)")
        .await
        != "8/1"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not drain past the poison event"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let reason = query_running_agent(&state, "SELECT reason FROM quarantine")
        .await
        .unwrap()
        .unwrap();
    assert!(
        reason.rows[0][0].as_deref().unwrap().contains("sentAt"),
        "{reason:?}"
    );
    query_running_agent(
        &state,
        "UPDATE quarantine SET event = replace(event, '\"sentAt\":[1]', '\"sentAt\":null')",
    )
    .await
    .unwrap();
    let replayed = replay_running_agent(&state, &[])
        .await
        .unwrap()
        .expect("the agent answers");
    assert_eq!((replayed.inserted, replayed.quarantined), (1, 0));
    assert_eq!(
        count("SELECT count(*) || '/' || (SELECT count(*) FROM quarantine) FROM pages").await,
        "9/0"
    );
    let _ = stop_tx.send(());
    agent.await.unwrap().unwrap();
}
