//! The real edge (workerd) drained by the agent into a real ClickHouse server started on
//! loopback for the test (Debian's 18.16, and the current engine): Segment's tables
//! and the per-event tables, each event once, with two agents draining at once.

mod common;

use collector_agent::config::{ClickHouseConfig, WarehouseConfig};
use collector_agent::sinks::clickhouse::ClickHouseSink;
use collector_agent::sinks::Sink;
use collector_agent::{drain_once, AgentConfig};
use collector_e2e::clickhouse::LocalClickHouse;
use common::*;
use serde_json::json;

fn ch_config(ch: &LocalClickHouse) -> ClickHouseConfig {
    ClickHouseConfig {
        timeout_ms: 10_000,
        ..ClickHouseConfig::at(&ch.url)
    }
}

fn agent(st: &Stack, ch: &LocalClickHouse) -> AgentConfig {
    let mut cfg = st.agent_config();
    cfg.warehouse = WarehouseConfig::ClickHouse(ch_config(ch));
    cfg.validate().expect("valid config");
    cfg
}

#[tokio::test]
async fn edge_to_clickhouse_lands_every_event_once_with_two_agents() {
    every_event_once_with_two_agents(LocalClickHouse::start().unwrap()).await;
}

// The same into the current ClickHouse engine (chDB), where Debian's server is 18.16.
#[tokio::test]
async fn edge_to_current_clickhouse_lands_every_event_once_with_two_agents() {
    every_event_once_with_two_agents(LocalClickHouse::start_current().unwrap()).await;
}

async fn every_event_once_with_two_agents(ch: LocalClickHouse) {
    let st = Stack::start();
    let r = st
        .post("/v1/batch", &json!({"batch": [
            {"type": "track", "messageId": "t-1", "userId": "u1", "event": "Order Completed", "properties": {"revenue": 42.5, "currency": "EUR"}},
            {"type": "page", "messageId": "p-1", "anonymousId": "a1", "name": "Home", "properties": {"path": "/"}},
            {"type": "identify", "messageId": "i-1", "userId": "u1", "traits": {"plan": "pro"}},
            {"type": "group", "messageId": "g-1", "userId": "u1", "groupId": "acme"},
            {"type": "alias", "messageId": "al-1", "userId": "u1", "previousId": "a1"},
            {"type": "screen", "messageId": "s-1", "userId": "u1", "name": "Main"}
        ]}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    for chunk in (0..600).collect::<Vec<_>>().chunks(100) {
        let batch: Vec<_> = chunk
            .iter()
            .map(|i| json!({"type": "track", "messageId": format!("bulk-{i}"), "anonymousId": format!("v-{i}"), "event": "Product Viewed", "properties": {"sku": format!("S{}", i % 7)}}))
            .collect();
        let r = st.post("/v1/batch", &json!({"batch": batch})).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // Two agents drain the same edge at once.
    let (a, b) = (agent(&st, &ch), agent(&st, &ch));
    let (ra, rb) = tokio::join!(drain_once(&a), drain_once(&b));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.inserted + rb.inserted, 606, "{ra:?} {rb:?}");
    // Nothing left, nothing twice.
    assert_eq!(drain_once(&a).await.unwrap().inserted, 0);
    let sink = ClickHouseSink::connect(&ch_config(&ch)).await.unwrap();
    let q = |sql: &'static str| {
        let sink = &sink;
        async move { sink.query(sql).await.unwrap().rows }
    };
    assert_eq!(
        q("SELECT (SELECT count() FROM tracks), (SELECT count() FROM pages), (SELECT count() FROM identifies), (SELECT count() FROM groups), (SELECT count() FROM aliases), (SELECT count() FROM screens), (SELECT count() FROM product_viewed), (SELECT uniqExact(message_id) FROM product_viewed)").await,
        vec![["601", "1", "1", "1", "1", "1", "600", "600"].map(s).to_vec()]
    );
    assert_eq!(
        q("SELECT event_text, revenue, currency FROM order_completed").await,
        vec![vec![s("Order Completed"), s("42.5"), s("EUR")]]
    );
    // The consent evidence the edge stamped is a flattened column like any other.
    assert_eq!(
        q("SELECT count() FROM tracks WHERE context_consent_resolved_region != ''").await,
        vec![vec![s("601")]]
    );
}
