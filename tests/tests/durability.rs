//! No event acknowledged with 200 is lost, and none lands twice: worker restarts,
//! duplicate deliveries, agents that die holding a lease, and batch sealing.

mod common;

use std::time::Duration;

use collector_agent::sinks::duckdb::DuckDbSink;
use collector_agent::sinks::{Load, Sink};
use collector_core::codec::decode_batch;
use common::*;
use serde_json::{json, Value};

fn shard_stat(stats: &Value, shard: u64, key: &str) -> u64 {
    stats["shards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["shard"] == json!(shard))
        .map(|s| s[key].as_u64().unwrap())
        .unwrap()
}

fn total_stat(stats: &Value, key: &str) -> u64 {
    stats["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[key].as_u64().unwrap())
        .sum()
}

#[tokio::test]
async fn acknowledged_events_survive_a_worker_restart() {
    let mut st = Stack::start_with(&[("BATCH_MAX_EVENTS", "10")]);
    let mut sent = 0;
    for i in 0..20 {
        let r = st.post("/v1/track", &json!({"messageId": format!("r-{i}"), "userId": format!("u{}", i % 3), "event": "E"})).await;
        assert_eq!(r.status, 200);
        sent += 1;
    }
    let r = st
        .post(
            "/v1/batch",
            &json!({"batch": (20..45).map(|i| json!({"type": "track", "messageId": format!("r-{i}"),
            "anonymousId": format!("a{}", i % 7), "event": "B"})).collect::<Vec<_>>()}),
        )
        .await;
    assert_eq!(r.status, 200);
    sent += 25;
    let before = st.edge_stats().await;
    assert!(
        total_stat(&before, "sealed_batches") >= 1,
        "some batches sealed by size: {before}"
    );
    assert!(
        total_stat(&before, "open_events") >= 1,
        "some events still open: {before}"
    );

    st.edge.restart().expect("wrangler dev restarts");

    let summary = st.drain().await;
    assert_eq!(summary.inserted, sent, "{summary:?}");
    assert_eq!(st.count("tracks"), sent);
    assert_eq!(
        st.query("SELECT count(DISTINCT message_id) FROM tracks")[0][0],
        Some(sent.to_string())
    );
}

#[tokio::test]
async fn the_same_batch_sent_twice_lands_once() {
    let st = Stack::start();
    let batch = json!({"batch": (0..15).map(|i| json!({"type": if i % 2 == 0 {"track"} else {"identify"},
        "messageId": format!("dup-{i}"), "userId": format!("u{i}"), "event": "Retried"})).collect::<Vec<_>>()});
    assert_eq!(st.post("/v1/batch", &batch).await.status, 200);
    assert_eq!(st.post("/v1/batch", &batch).await.status, 200);
    let first = st.drain().await;
    assert_eq!(
        (first.events, first.inserted, first.duplicates),
        (30, 15, 15),
        "{first:?}"
    );
    // A third delivery after the first load is a duplicate too.
    assert_eq!(st.post("/v1/batch", &batch).await.status, 200);
    let again = st.drain().await;
    assert_eq!((again.inserted, again.duplicates), (0, 15), "{again:?}");
    assert_eq!(st.count("tracks") + st.count("identifies"), 15);
}

#[tokio::test]
async fn a_lease_that_is_never_acked_comes_back_after_expiry_and_lands_once() {
    let st = Stack::start();
    let n = 12u64;
    for i in 0..n {
        let r = st.post("/v1/track", &json!({"messageId": format!("l-{i}"), "userId": format!("user-{i}"), "event": "E"})).await;
        assert_eq!(r.status, 200);
    }
    // An agent leases every shard, loads what it got into the warehouse, and dies before acking.
    let sink = DuckDbSink::open(&st.warehouse()).unwrap();
    let mut leased = 0;
    for shard in 0..4 {
        let lease = st.lease(shard, 100, 2000).await;
        for b in lease.batches {
            let batch = decode_batch(&b.blob).unwrap();
            leased += batch.events.len() as u64;
            sink.load(&Load::events(shard, b.batch_id, batch.events))
                .await
                .unwrap();
        }
    }
    drop(sink);
    assert_eq!(leased, n);
    assert_eq!(st.count("tracks"), n);

    // While the lease holds, another drain gets nothing.
    let during = st.drain().await;
    assert_eq!(during.batches, 0, "{during:?}");

    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let after = st.drain().await;
    assert_eq!(
        (after.events, after.inserted, after.duplicates),
        (n, 0, n),
        "{after:?}"
    );
    assert_eq!(st.count("tracks"), n);
    // Acked this time: nothing is left.
    let stats = st.edge_stats().await;
    assert_eq!(total_stat(&stats, "sealed_batches"), 0, "{stats}");
    assert_eq!(st.drain().await.batches, 0);
}

#[tokio::test]
async fn an_agent_killed_after_leasing_loses_nothing() {
    let st = Stack::start();
    for i in 0..8 {
        let r = st
            .post(
                "/v1/identify",
                &json!({"messageId": format!("k-{i}"), "userId": format!("u{i}")}),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    // Lease everything and vanish without loading or acking.
    for shard in 0..4 {
        let body = json!({"shard": shard, "lease_ms": 1000, "flush": true}).to_string();
        let r = st
            .signed("POST", "/drain/lease", &body, SECRET, now_s())
            .await;
        assert_eq!(r.status, 200);
    }
    let stats = st.edge_stats().await;
    assert!(total_stat(&stats, "leased_batches") >= 1, "{stats}");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let summary = st.drain().await;
    assert_eq!(
        (summary.inserted, summary.duplicates),
        (8, 0),
        "{summary:?}"
    );
    assert_eq!(st.count("identifies"), 8);
}

#[tokio::test]
async fn the_open_batch_is_sealed_by_the_alarm_after_max_age() {
    let st = Stack::start_with(&[("BATCH_MAX_AGE_MS", "1000")]);
    for i in 0..3 {
        let r = st
            .post(
                "/v1/track",
                &json!({"messageId": format!("age-{i}"), "anonymousId": "same-user", "event": "E"}),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    let stats = st.edge_stats().await;
    assert_eq!(
        (
            total_stat(&stats, "open_events"),
            total_stat(&stats, "sealed_batches")
        ),
        (3, 0),
        "{stats}"
    );
    let mut sealed = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let stats = st.edge_stats().await;
        if total_stat(&stats, "sealed_batches") == 1 && total_stat(&stats, "open_events") == 0 {
            assert_eq!(total_stat(&stats, "sealed_events"), 3);
            sealed = true;
            break;
        }
    }
    assert!(sealed, "the alarm sealed the open batch");
}

#[tokio::test]
async fn batches_seal_at_max_events_and_keep_one_users_order() {
    let st = Stack::start_with(&[("BATCH_MAX_EVENTS", "5")]);
    for i in 0..12 {
        let r = st.post("/v1/track", &json!({"messageId": format!("o-{i:02}"), "anonymousId": "ordered-user", "event": "E"})).await;
        assert_eq!(r.status, 200);
    }
    let shard = collector_core::shard::shard_for(Some("ordered-user"), None, 4);
    let stats = st.edge_stats().await;
    assert_eq!(
        shard_stat(&stats, u64::from(shard), "sealed_batches"),
        2,
        "{stats}"
    );
    assert_eq!(
        shard_stat(&stats, u64::from(shard), "open_events"),
        2,
        "{stats}"
    );
    assert_eq!(
        total_stat(&stats, "sealed_batches"),
        2,
        "one user, one shard"
    );

    let lease = st.lease(shard, 10, 30_000).await;
    let sizes: Vec<usize> = lease
        .batches
        .iter()
        .map(|b| decode_batch(&b.blob).unwrap().events.len())
        .collect();
    assert_eq!(sizes, vec![5, 5, 2]);
    let order: Vec<String> = lease
        .batches
        .iter()
        .flat_map(|b| decode_batch(&b.blob).unwrap().events)
        .map(|e| e.message_id)
        .collect();
    let expected: Vec<String> = (0..12).map(|i| format!("o-{i:02}")).collect();
    assert_eq!(order, expected);
}
