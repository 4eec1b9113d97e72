//! A request reaches a DuckDB row through the real Workers runtime: every endpoint,
//! both auth styles, gzip, text/plain, Segment's nulls and short paths.

mod common;

use std::io::Write;

use common::*;
use serde_json::json;

#[tokio::test]
async fn every_endpoint_lands_as_exact_rows_in_duckdb() {
    let st = Stack::start();
    let ok = |r: &Reply| assert_eq!((r.status, r.body.clone()), (200, json!({"success": true})));

    ok(&st
        .post(
            "/v1/track",
            &json!({"messageId": "t-1", "userId": "u1", "anonymousId": null, "event": "Signed Up",
        "properties": {"plan": "pro", "seats": 3}, "context": {"library": {"name": "e2e"}},
        "timestamp": "2026-11-24T10:00:00.000Z", "sentAt": null, "custom_field": "kept"}),
        )
        .await);
    ok(&st
        .post(
            "/v1/page",
            &json!({"messageId": "p-1", "anonymousId": "a1", "name": "Pricing", "category": "Docs",
        "properties": {"path": "/pricing"}}),
        )
        .await);
    ok(&st
        .post(
            "/v1/identify",
            &json!({"messageId": "i-1", "userId": "u1", "traits": {"plan": "pro"}}),
        )
        .await);
    ok(&st
        .post(
            "/v1/group",
            &json!({"messageId": "g-1", "userId": "u1", "groupId": "acme", "traits": {"size": 10}}),
        )
        .await);
    ok(&st
        .post(
            "/v1/alias",
            &json!({"messageId": "al-1", "userId": "u1", "previousId": "a1"}),
        )
        .await);
    ok(&st
        .post(
            "/v1/screen",
            &json!({"messageId": "s-1", "userId": "u1", "name": "Home"}),
        )
        .await);
    // Segment's browser short paths, write key in a text/plain body (no preflight).
    let r = st
        .send(st.http.post(format!("{}/v1/t", st.edge.url)).header("Content-Type", "text/plain")
            .body(json!({"writeKey": WRITE_KEY, "messageId": "t-2", "anonymousId": "a1", "event": "Clicked"}).to_string()))
        .await;
    ok(&r);
    ok(&st
        .post("/v1/p", &json!({"messageId": "p-2", "anonymousId": "a1"}))
        .await);
    // A batch with batch-level context and sentAt, gzip-encoded.
    let batch = json!({"sentAt": "2026-11-24T10:00:10.000Z", "context": {"library": {"name": "batcher"}}, "batch": [
        {"type": "track", "messageId": "b-1", "userId": "u2", "event": "A", "timestamp": "2026-11-24T10:00:05.000Z"},
        {"type": "identify", "messageId": "b-2", "userId": "u2", "traits": {"email_domain": "example.com"}}
    ]});
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(batch.to_string().as_bytes()).unwrap();
    let r = st
        .send(
            st.http
                .post(format!("{}/v1/batch", st.edge.url))
                .basic_auth(WRITE_KEY, Some(""))
                .header("Content-Type", "application/json")
                .header("Content-Encoding", "gzip")
                .body(gz.finish().unwrap()),
        )
        .await;
    ok(&r);

    let summary = st.drain().await;
    assert_eq!(summary.inserted, 10, "{summary:?}");
    assert_eq!(summary.duplicates, 0);

    assert_eq!(
        st.query("SELECT message_id, anonymous_id, user_id, event_text, properties->>'plan', properties->>'seats', \
                  context->'library'->>'name', raw->>'custom_field' FROM tracks ORDER BY message_id"),
        vec![
            vec![s("b-1"), None, s("u2"), s("A"), None, None, s("batcher"), None],
            vec![s("t-1"), None, s("u1"), s("Signed Up"), s("pro"), s("3"), s("e2e"), s("kept")],
            vec![s("t-2"), s("a1"), None, s("Clicked"), None, None, None, None],
        ]
    );
    // A client timestamp without sentAt is kept as is.
    assert_eq!(
        st.query(
            "SELECT timestamp, original_timestamp, sent_at FROM tracks WHERE message_id = 't-1'"
        ),
        vec![vec![
            s("2026-11-24T10:00:00.000Z"),
            s("2026-11-24T10:00:00.000Z"),
            None
        ]]
    );
    // Skew correction: b-1 happened 5 s before the batch was sent.
    let skew = st.query("SELECT epoch_ms(received_at) - epoch_ms(timestamp), sent_at, original_timestamp FROM tracks WHERE message_id = 'b-1'");
    assert_eq!(
        skew[0],
        vec![
            s("5000"),
            s("2026-11-24T10:00:10.000Z"),
            s("2026-11-24T10:00:05.000Z")
        ]
    );
    // The write key is never stored.
    assert_eq!(
        st.query("SELECT count(*) FROM tracks WHERE raw::VARCHAR LIKE '%writeKey%'")[0][0],
        s("0")
    );

    assert_eq!(
        st.query("SELECT message_id, anonymous_id, name, category, properties->>'path' FROM pages ORDER BY message_id"),
        vec![vec![s("p-1"), s("a1"), s("Pricing"), s("Docs"), s("/pricing")], vec![s("p-2"), s("a1"), None, None, None]]
    );
    assert_eq!(
        st.query("SELECT message_id, user_id, traits->>'plan', traits->>'email_domain' FROM identifies ORDER BY message_id"),
        vec![vec![s("b-2"), s("u2"), None, s("example.com")], vec![s("i-1"), s("u1"), s("pro"), None]]
    );
    assert_eq!(
        st.query("SELECT message_id, group_id, traits->>'size' FROM groups"),
        vec![vec![s("g-1"), s("acme"), s("10")]]
    );
    assert_eq!(
        st.query("SELECT message_id, user_id, previous_id FROM aliases"),
        vec![vec![s("al-1"), s("u1"), s("a1")]]
    );
    assert_eq!(
        st.query("SELECT message_id, user_id, name FROM screens"),
        vec![vec![s("s-1"), s("u1"), s("Home")]]
    );
    // Every row has server-set receivedAt.
    assert_eq!(
        st.query("SELECT count(*) FROM tracks WHERE received_at IS NULL")[0][0],
        s("0")
    );
}

#[tokio::test]
async fn server_fills_missing_message_id_with_a_uuid_v4() {
    let st = Stack::start();
    let r = st
        .post("/v1/track", &json!({"userId": "u", "event": "No Id"}))
        .await;
    assert_eq!(r.status, 200);
    st.drain().await;
    let id = st.query("SELECT message_id FROM tracks")[0][0]
        .clone()
        .unwrap();
    let parts: Vec<&str> = id.split('-').collect();
    assert_eq!(
        parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
        vec![8, 4, 4, 4, 12],
        "{id}"
    );
    assert!(parts[2].starts_with('4'), "version 4: {id}");
}

#[tokio::test]
async fn cors_preflight_and_origins_follow_allowed_origins() {
    let st = Stack::start_with(&[(
        "ALLOWED_ORIGINS",
        "https://shop.example,http://localhost:3000",
    )]);
    let pre = st
        .send(
            st.http
                .request(
                    reqwest::Method::OPTIONS,
                    format!("{}/v1/batch", st.edge.url),
                )
                .header("Origin", "https://shop.example")
                .header("Access-Control-Request-Method", "POST")
                .header(
                    "Access-Control-Request-Headers",
                    "content-type,authorization",
                ),
        )
        .await;
    assert_eq!(pre.status, 204);
    assert_eq!(
        pre.headers["access-control-allow-origin"],
        "https://shop.example"
    );
    assert!(pre.headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("Authorization"));
    assert!(pre.headers["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));

    let denied = st
        .send(
            st.http
                .request(reqwest::Method::OPTIONS, format!("{}/v1/t", st.edge.url))
                .header("Origin", "https://evil.example"),
        )
        .await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.body["code"], "origin_not_allowed");

    let body = json!({"writeKey": WRITE_KEY, "anonymousId": "a", "event": "E"}).to_string();
    let ok = st
        .send(
            st.http
                .post(format!("{}/v1/t", st.edge.url))
                .header("Origin", "http://localhost:3000")
                .header("Content-Type", "text/plain")
                .body(body.clone()),
        )
        .await;
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.headers["access-control-allow-origin"],
        "http://localhost:3000"
    );
    let bad = st
        .send(
            st.http
                .post(format!("{}/v1/t", st.edge.url))
                .header("Origin", "https://evil.example")
                .body(body),
        )
        .await;
    assert_eq!(bad.status, 403);
    st.drain().await;
    assert_eq!(st.count("tracks"), 1);
}

// A small DuckDB memory cap (`memory_cap = "32MB"` with `row_group_size = 16384`,
// `threads = 1`, `lease_batches = 2`: what keeps the agent's loads under 100 MB on the
// drain bench's events, README "Memory") on wider events (a browser context with page and
// campaign, identifies, pages): a checkpoint needs more than the cap and fails, which
// invalidates the warehouse. The agent opens it again and every event lands once;
// identity builds its profiles. Before, with `row_group_size` (the file attached beside
// DuckDB's in-memory default database) the agent's check that the database was still
// usable ran `SELECT 1` in the default database, which still answered, so the agent
// kept the invalidated warehouse and every load failed until it was restarted.
#[tokio::test]
async fn a_failed_checkpoint_under_a_small_memory_cap_is_survived() {
    let st = Stack::start();
    post_wide_events(&st, 24_000).await;
    let cfg = small_memory_config(&st, "32MB");
    cfg.validate().expect("a valid config");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(collector_agent::run(cfg.clone(), async move {
        let _ = stop_rx.await;
    }));
    let state = cfg.warehouse.state_file();
    let one = |sql: &'static str| {
        let w = state.clone();
        async move {
            collector_agent::admin::query_running_agent(&w, sql)
                .await
                .ok()
                .flatten()
                .and_then(|r| r.rows[0][0].clone())
                .unwrap_or_default()
        }
    };
    let wait = |sql: &'static str, want: &'static str| async move {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
        loop {
            let got = one(sql).await;
            if got == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{sql}: {got:?}, not {want}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    };
    wait("SELECT count(*) FROM message_ids", "24000").await;
    // Identity runs after each load; more identifies make sure one runs after any that
    // ran out of memory (one person per user: 50 users, each with its visitors).
    for round in 0..3 {
        let batch: Vec<_> = (0..10)
            .map(|i| {
                let mut e = wide_event(i * 10);
                e["messageId"] = json!(format!("more-{round}-{i}"));
                e
            })
            .collect();
        let r = st.post("/v1/batch", &json!({ "batch": batch })).await;
        assert_eq!(r.status, 200, "{}", r.body);
        if one("SELECT count(*) FROM profiles WHERE user_ids <> '[]'").await == "50" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    }
    wait("SELECT count(*) FROM profiles WHERE user_ids <> '[]'", "50").await;
    assert_eq!(
        one("SELECT (SELECT count(*) FROM tracks) || '/' || (SELECT count(*) FROM pages) || '/' || (SELECT count(*) FROM quarantine)").await,
        "16800/4800/0"
    );
    let _ = stop_tx.send(());
    agent.await.unwrap().unwrap();
}

// A running agent that finds the edge empty gives back what its embedded DuckDB kept
// for the loads: it checkpoints (the rows of the loads leave memory for the file, so
// the write-ahead log is folded in while the agent runs, not only when it stops) and
// evicts the cached blocks. Loads go on when events come again.
#[tokio::test]
async fn an_idle_agent_folds_the_log_into_the_file_and_loads_on() {
    let st = Stack::start();
    post_wide_events(&st, 2_000).await;
    let cfg = st.agent_config();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(collector_agent::run(cfg.clone(), async move {
        let _ = stop_rx.await;
    }));
    let state = cfg.warehouse.state_file();
    let wal = st.warehouse().with_extension("duckdb.wal");
    let wal_len = || std::fs::metadata(&wal).map_or(0, |m| m.len());
    let count = || {
        let w = state.clone();
        async move {
            collector_agent::admin::query_running_agent(&w, "SELECT count(*) FROM message_ids")
                .await
                .ok()
                .flatten()
                .and_then(|r| r.rows[0][0].clone())
                .unwrap_or_default()
        }
    };
    for (want, more) in [("2000", true), ("2100", false)] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        // Loaded, then idle: the log is empty while the agent runs.
        loop {
            if count().await == want && wal_len() == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{:?} events loaded, a log of {} bytes",
                count().await,
                wal_len()
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        if more {
            let batch: Vec<_> = (2_000..2_100).map(wide_event).collect();
            let r = st.post("/v1/batch", &json!({ "batch": batch })).await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
    }
    let _ = stop_tx.send(());
    agent.await.unwrap().unwrap();
    assert_eq!(st.count("tracks"), 1_470);
}

// `run --once` with `checkpoint_on_stop = false` exits with the loads' rows in the
// write-ahead log. Its idle step before the exit (the lake's compaction) checkpointed the
// DuckDB warehouse, which made the setting do nothing in `run --once` and put back the
// peak it exists to avoid (BENCHMARKS.md, "Twenty-eighth round").
#[tokio::test]
async fn run_once_with_checkpoint_on_stop_false_exits_with_the_rows_in_the_log() {
    let st = Stack::start();
    post_wide_events(&st, 2_000).await;
    let mut cfg = st.agent_config();
    let collector_agent::config::WarehouseConfig::DuckDb(duck) = &mut cfg.warehouse else {
        unreachable!("the stack's warehouse is DuckDB")
    };
    duck.checkpoint_on_stop = Some(false);
    let summary = collector_agent::drain_once(&cfg).await.expect("drains");
    assert_eq!(summary.inserted, 2_000, "{summary:?}");
    let wal = std::fs::metadata(st.warehouse().with_extension("duckdb.wal")).map_or(0, |m| m.len());
    assert!(wal > 100_000, "a log of {wal} bytes");
    assert_eq!(st.count("tracks"), 1_400);
}

/// Browser events wider than the drain bench's: a context with page and campaign, and
/// one identify (50 users) and two pages in ten.
fn wide_event(i: usize) -> serde_json::Value {
    let ua = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";
    let visitor = format!("visitor-{}", i % 2_000);
    let context = json!({"userAgent": ua, "locale": "fr-FR",
        "page": {"url": format!("https://shop.example/p/{}", i % 300), "path": format!("/p/{}", i % 300),
                 "referrer": "https://search.example/", "title": "A product"},
        "campaign": {"source": "newsletter", "medium": "email"}});
    match i % 10 {
        0 => json!({"type": "identify", "messageId": format!("lean-{i}"), "anonymousId": visitor,
            "userId": format!("user-{}", i % 500), "traits": {"plan": "pro", "visits": i % 40}, "context": context}),
        1 | 2 => json!({"type": "page", "messageId": format!("lean-{i}"), "anonymousId": visitor,
            "name": "Product", "properties": {"path": format!("/p/{}", i % 300)}, "context": context}),
        _ => json!({"type": "track", "messageId": format!("lean-{i}"), "anonymousId": visitor,
            "event": if i.is_multiple_of(3) { "Order Completed" } else { "Product Viewed" },
            "properties": {"product_id": format!("sku-{}", i % 300), "price": (i % 97) as f64 + 0.99,
                           "currency": "EUR", "category": "shoes"}, "context": context}),
    }
}

async fn post_wide_events(st: &Stack, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let batch: Vec<_> = chunk.iter().map(|i| wide_event(*i)).collect();
        let r = st.post("/v1/batch", &json!({ "batch": batch })).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
}

// Identity's SQL that runs out of memory under a small cap raises the limit (as a
// load's does) and is tried once more at once, so the profiles are there after the
// drain that loaded their events, not after some later load.
#[tokio::test]
async fn identity_that_runs_out_of_memory_is_tried_again_at_once() {
    let st = Stack::start();
    post_wide_events(&st, 24_000).await;
    let cfg = small_memory_config(&st, "48MB");
    let summary = collector_agent::drain_once(&cfg).await.expect("drains");
    assert_eq!(summary.inserted, 24_000, "{summary:?}");
    assert_eq!(
        st.query("SELECT count(*) FROM profiles WHERE user_ids <> '[]'"),
        vec![vec![s("50")]]
    );
}

// The same wider events into a Parquet lake under the README's lean lake settings
// (`memory_cap = "32MB"`, `threads = 1`, `lease_batches = 2`): where its DuckDB runs out
// of memory (the loads' staged rows, identity over the files), the limit is raised and
// the call retried, so every event lands once and identity builds its profiles. Before,
// the lake's DuckDB had no limit but DuckDB's own (80% of RAM) and no key to set one.
#[tokio::test]
async fn a_lake_under_a_small_memory_cap_loads_everything_and_resolves_identity() {
    let st = Stack::start();
    post_wide_events(&st, 24_000).await;
    let mut cfg = st.agent_config();
    cfg.lease_batches = 2;
    cfg.warehouse =
        collector_agent::config::WarehouseConfig::Parquet(collector_agent::config::ParquetConfig {
            memory_cap: Some("32MB".into()),
            threads: Some(1),
            ..collector_agent::config::ParquetConfig::at(st.warehouse().with_file_name("lake"))
        });
    cfg.validate().expect("a valid config");
    let summary = collector_agent::drain_once(&cfg).await.expect("drains");
    assert_eq!(summary.inserted, 24_000, "{summary:?}");
    let lake = collector_agent::sinks::open(&cfg.warehouse).await.unwrap();
    let one = |sql: &'static str| {
        let lake = lake.clone();
        async move { lake.query(sql).await.unwrap().rows[0][0].clone().unwrap() }
    };
    assert_eq!(
        one("SELECT (SELECT count(*) FROM tracks) || '/' || (SELECT count(*) FROM pages) || '/' || (SELECT count(*) FROM identifies) || '/' || (SELECT count(*) FROM quarantine)").await,
        "16800/4800/2400/0"
    );
    assert_eq!(
        one("SELECT count(*) FROM profiles WHERE user_ids <> '[]'").await,
        "50"
    );
}

/// The agent's config with the README's small-memory settings and this `memory_cap`.
fn small_memory_config(st: &Stack, cap: &str) -> collector_agent::AgentConfig {
    let mut cfg = st.agent_config();
    cfg.lease_batches = 2;
    cfg.warehouse =
        collector_agent::config::WarehouseConfig::DuckDb(collector_agent::config::DuckDbConfig {
            path: st.warehouse(),
            memory_cap: Some(cap.into()),
            row_group_size: Some(16_384),
            threads: Some(1),
            ..Default::default()
        });
    cfg
}
