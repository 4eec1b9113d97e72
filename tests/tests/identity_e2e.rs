//! Identity, profiles and audiences from events posted to the real worker, drained by
//! the agent into DuckDB, PostgreSQL and ClickHouse: anonymous pages, a sign-in, an alias on a
//! second device → one person; placeholder ids never merge anyone (at the edge they are
//! noted and never shard); both seed audiences enter and exit at the right times.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use collector_agent::sinks::Sink;
use collector_agent::{AgentConfig, Drainer};
use collector_e2e::postgres::LocalPostgres;
use common::*;
use serde_json::{json, Value};

const MIN: i64 = 60_000;

fn repo(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(file)
}

fn with_audiences(mut cfg: AgentConfig) -> AgentConfig {
    cfg.audiences = Some(repo("audiences.toml"));
    cfg.privacy = Some(repo("privacy.toml"));
    cfg.validate().expect("valid config");
    cfg
}

fn iso(ms: i64) -> String {
    collector_core::timestamp::format_ms(ms)
}

fn ev(kind: &str, id: &str, anon: &str, at: i64, extra: Value) -> Value {
    let mut e = json!({"type": kind, "messageId": id, "anonymousId": anon, "timestamp": iso(at),
        "context": {"consent": {"categoryPreferences": {"analytics": true, "marketing": true}}}});
    for (k, v) in extra.as_object().unwrap() {
        e[k] = v.clone();
    }
    e
}

async fn post(st: &Stack, now: i64, batch: Vec<Value>) {
    let r = st
        .post("/v1/batch", &json!({"batch": batch, "sentAt": iso(now)}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

async fn one(sink: &dyn Sink, sql: &str) -> Option<String> {
    sink.query(sql)
        .await
        .unwrap()
        .rows
        .first()
        .and_then(|r| r[0].clone())
}

async fn members(sink: &dyn Sink, audience: &str) -> Vec<String> {
    let r = sink
        .query(&format!(
            "SELECT DISTINCT i.id_value FROM audience_membership m JOIN identities i ON i.person_id = m.person_id
             WHERE m.audience = '{audience}' AND m.exited_at IS NULL AND i.id_type = 'user_id' ORDER BY 1"
        ))
        .await
        .unwrap();
    r.rows.into_iter().filter_map(|r| r[0].clone()).collect()
}

async fn person(sink: &dyn Sink, id: &str) -> Option<String> {
    one(
        sink,
        &format!("SELECT person_id FROM identities WHERE id_value = '{id}'"),
    )
    .await
}

async fn scenario(st: &Stack, cfg: AgentConfig) {
    let now = collector_agent::now_ms();
    let t = now - 30 * MIN;
    post(
        st,
        now,
        vec![
            ev(
                "page",
                "e1",
                "dev1",
                t,
                json!({"properties": {"path": "/pricing"}}),
            ),
            ev(
                "identify",
                "e2",
                "dev1",
                t + MIN,
                json!({"userId": "u-1", "traits": {"plan": "free"}}),
            ),
            ev(
                "page",
                "e3",
                "dev2",
                t + 2 * MIN,
                json!({"properties": {"path": "/"}}),
            ),
            ev(
                "alias",
                "e4",
                "dev2",
                t + 4 * MIN,
                json!({"previousId": "dev2", "userId": "u-1"}),
            ),
            ev(
                "identify",
                "e5",
                "dev2",
                t + 5 * MIN,
                json!({"userId": "u-1", "traits": {"plan": "pro"}}),
            ),
            ev(
                "track",
                "e6",
                "dev2",
                now - 10 * MIN,
                json!({"event": "Product Added"}),
            ),
            // Two visitors whose site sends a placeholder user id.
            ev(
                "identify",
                "k1",
                "kiosk-1",
                t + 5 * MIN,
                json!({"userId": "undefined"}),
            ),
            ev(
                "identify",
                "k2",
                "kiosk-2",
                t + 5 * MIN,
                json!({"userId": "undefined"}),
            ),
        ],
    )
    .await;
    // The edge noticed the placeholders (and sharded those events by their other id).
    let stats = st.edge_stats().await;
    assert_eq!(stats["notes"]["blocked_id"].as_u64(), Some(2), "{stats}");

    // The agent drains, resolves people and evaluates audiences at the system clock.
    let summary = collector_agent::drain_once(&cfg).await.expect("drain");
    assert_eq!(summary.inserted, 8);
    let sink = collector_agent::sinks::open(&cfg.warehouse).await.unwrap();
    let p = person(&*sink, "u-1").await.expect("u-1 is a person");
    for id in ["dev1", "dev2"] {
        assert_eq!(person(&*sink, id).await.as_ref(), Some(&p), "{id}");
    }
    assert_ne!(
        person(&*sink, "kiosk-1").await,
        person(&*sink, "kiosk-2").await
    );
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM identity_merges WHERE kind = 'refused' AND reason = 'blocked id: undefined'").await.as_deref(),
        Some("2")
    );
    let traits: Value = serde_json::from_str(
        &one(
            &*sink,
            &format!("SELECT CAST(traits AS VARCHAR) FROM profiles WHERE person_id = '{p}'"),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    assert_eq!(traits, json!({"plan": "pro"}));
    assert_eq!(members(&*sink, "pricing_no_purchase_7d").await, vec!["u-1"]);
    // The add to cart is 10 minutes old: not yet an abandoned cart.
    assert!(members(&*sink, "cart_abandoners_15m").await.is_empty());

    // The injected clock, 6 minutes on: 16 minutes since the add, it is one.
    let drainer = Drainer::new(cfg.clone(), sink.clone()).unwrap();
    drainer.evaluate_audiences(now + 6 * MIN).await.unwrap();
    assert_eq!(members(&*sink, "cart_abandoners_15m").await, vec!["u-1"]);
    drop(drainer);
    drop(sink);

    // The order arrives (drained without evaluating, so the clock stays injected):
    // both audiences are left at the next evaluation.
    post(
        st,
        now,
        vec![ev(
            "track",
            "e7",
            "dev2",
            now - MIN,
            json!({"userId": "u-1", "event": "Order Completed"}),
        )],
    )
    .await;
    let mut quiet = cfg.clone();
    quiet.audiences = None;
    collector_agent::drain_once(&quiet).await.expect("drain");
    let sink: Arc<dyn Sink> = collector_agent::sinks::open(&cfg.warehouse).await.unwrap();
    let drainer = Drainer::new(cfg.clone(), sink.clone()).unwrap();
    let evals = drainer.evaluate_audiences(now + 7 * MIN).await.unwrap();
    assert_eq!(evals.iter().map(|e| e.exited).sum::<u64>(), 2, "{evals:?}");
    assert!(members(&*sink, "pricing_no_purchase_7d").await.is_empty());
    assert!(members(&*sink, "cart_abandoners_15m").await.is_empty());
    assert_eq!(
        one(
            &*sink,
            &format!("SELECT event_count FROM profiles WHERE person_id = '{p}'")
        )
        .await
        .as_deref(),
        Some("7")
    );
}

#[tokio::test]
async fn people_and_audiences_from_the_worker_into_duckdb() {
    let st = Stack::start();
    let cfg = with_audiences(st.agent_config());
    scenario(&st, cfg.clone()).await;

    // `collector-agent profile` prints the person by any id (no agent running: the
    // file is read directly).
    let toml = format!(
        "edge_url = \"{}\"\ndrain_secret = \"{SECRET}\"\n[warehouse]\npath = \"{}\"\n",
        st.edge.url,
        st.warehouse().display()
    );
    let config = st.dir.path().join("agent.toml");
    std::fs::write(&config, toml).unwrap();
    let out = std::process::Command::new(agent_binary())
        .args(["profile", "dev1", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "user ids:      u-1",
        "anonymous ids: dev1, dev2",
        "plan = \"pro\"",
        "marketing: granted",
        "Order Completed",
    ] {
        assert!(text.contains(want), "{want:?} in\n{text}");
    }
}

#[tokio::test]
async fn people_and_audiences_from_the_worker_into_postgres() {
    let st = Stack::start();
    let pg = LocalPostgres::start().unwrap();
    let cfg = st.pg_config(&pg);
    scenario(&st, with_audiences(cfg)).await;
}

#[tokio::test]
async fn people_and_audiences_from_the_worker_into_clickhouse() {
    into_clickhouse(collector_e2e::clickhouse::LocalClickHouse::start().unwrap()).await;
}

// The same into the current ClickHouse engine (chDB), where Debian's server is 18.16.
#[tokio::test]
async fn people_and_audiences_from_the_worker_into_current_clickhouse() {
    into_clickhouse(collector_e2e::clickhouse::LocalClickHouse::start_current().unwrap()).await;
}

async fn into_clickhouse(ch: collector_e2e::clickhouse::LocalClickHouse) {
    let st = Stack::start();
    let mut cfg = st.agent_config();
    cfg.warehouse = collector_agent::config::WarehouseConfig::ClickHouse(
        collector_agent::config::ClickHouseConfig {
            timeout_ms: 10_000,
            ..collector_agent::config::ClickHouseConfig::at(&ch.url)
        },
    );
    scenario(&st, with_audiences(cfg)).await;
}
