//! Exactly once through kill -9: the agent (the real binary) drains a backlog of 50,000
//! events and is killed with SIGKILL at random points, 20 times; a last run drains the
//! rest. Every event is in the warehouse exactly once, with its content. For DuckDB,
//! PostgreSQL and the Parquet lake (whose files a reader never sees an event twice in,
//! between kills either).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use collector_agent::config::{PostgresConfig, WarehouseConfig};
use collector_agent::sinks::Sink;
use collector_e2e::postgres::LocalPostgres;
use common::*;
use serde_json::json;

const EVENTS: usize = 50_000;
const ROUNDS: usize = 20;

/// A pseudo-random number from the time (no rand dependency needed).
fn jitter_ms(round: usize) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    150 + (nanos ^ (round as u64 * 7919)) % 500
}

async fn post_backlog(st: &Stack) {
    for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(500) {
        let batch: Vec<_> = chunk
            .iter()
            .map(|i| json!({"type": "track", "messageId": format!("k-{i}"), "anonymousId": format!("v-{}", i % 997),
                "event": "Kill Test", "properties": {"n": i}}))
            .collect();
        let r = st.post("/v1/batch", &json!({"batch": batch})).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
}

fn write_config(st: &Stack, warehouse: &str) -> std::path::PathBuf {
    st.write_agent_config(&format!("lease_batches = 2\nlease_ms = 2000\n{warehouse}"))
}

fn spawn(bin: &std::path::Path, config: &std::path::Path, once: bool) -> Child {
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--config"]).arg(config);
    if once {
        cmd.arg("--once");
    }
    // A killed agent leaves its state file; for a server warehouse that is in the temp
    // folder, so the test's own.
    cmd.env("RUST_LOG", "warn")
        .env("TMPDIR", config.parent().unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Kills the agent 20 times at random points, then lets one run drain the rest.
/// `loaded` counts what is in the warehouse between rounds: the kills must land while
/// the agent is loading, not after it finished.
async fn kill_and_finish<F, Fut>(bin: &std::path::Path, config: &std::path::Path, loaded: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let mut progress: Vec<u64> = Vec::new();
    // How much longer than the jitter an agent runs before its kill: a slow or busy
    // machine (CI runs two test binaries at once) may not reach a load within it, so a
    // round that loaded nothing makes the next ones wait longer.
    let mut scale = 1.0f64;
    for round in 0..ROUNDS {
        let mut child = spawn(bin, config, false);
        let wait = (jitter_ms(round) as f64 * scale) as u64;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let n = loaded().await;
        if n == progress.last().copied().unwrap_or(0) && n < EVENTS as u64 {
            scale = (scale * 1.5).min(20.0);
        }
        progress.push(n);
    }
    eprintln!("loaded after each kill: {progress:?}");
    assert!(
        progress.iter().any(|n| *n > 0 && *n < EVENTS as u64),
        "the kills happened mid-drain: {progress:?}"
    );
    // Leases held by killed agents expire (lease_ms = 2 s), then everything drains.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let status = spawn(bin, config, true).wait().unwrap();
    assert!(status.success(), "the final drain succeeds");
}

/// How many rows `tracks` of the warehouse holds now (0 while it cannot be opened, as
/// just after a kill).
async fn tracks_in(wh: WarehouseConfig) -> u64 {
    match collector_agent::sinks::open(&wh).await {
        Ok(s) => s
            .query("SELECT count(*) FROM tracks")
            .await
            .map(|r| r.rows[0][0].as_deref().unwrap_or("0").parse().unwrap())
            .unwrap_or(0),
        Err(_) => 0,
    }
}

async fn check(sink: &dyn Sink) {
    check_with(sink, "SELECT count(*), count(DISTINCT message_id), sum(CAST(properties->>'n' AS BIGINT)) FROM tracks WHERE event_text = 'Kill Test' AND event = 'kill_test'").await;
}

/// `sql` answers the rows, the distinct ids and the sum of `n`: every event once, with
/// its content.
async fn check_with(sink: &dyn Sink, sql: &str) {
    let r = sink.query(sql).await.unwrap();
    let n = EVENTS as u64;
    assert_eq!(
        r.rows[0],
        vec![
            Some(n.to_string()),
            Some(n.to_string()),
            Some((n * (n - 1) / 2).to_string())
        ],
        "every event exactly once, with its content"
    );
}

#[tokio::test]
async fn duckdb_exactly_once_through_kill_9() {
    let bin = agent_binary();
    let st = Stack::start();
    post_backlog(&st).await;
    let config = write_config(
        &st,
        &format!("[warehouse]\npath = \"{}\"\n", st.warehouse().display()),
    );
    let warehouse = st.warehouse();
    let count = || {
        let w = warehouse.clone();
        async move {
            if !w.exists() {
                return 0;
            }
            let conn = collector_agent::sinks::duckdb::DuckDbSink::open_read_only(&w).unwrap();
            collector_agent::sinks::duckdb::run_query(&conn, "SELECT count(*) FROM tracks")
                .map(|r| r.rows[0][0].as_deref().unwrap_or("0").parse().unwrap())
                .unwrap_or(0)
        }
    };
    kill_and_finish(&bin, &config, count).await;
    let sink = collector_agent::sinks::duckdb::DuckDbSink::open(&st.warehouse()).unwrap();
    check(&sink).await;
}

#[tokio::test]
async fn postgres_exactly_once_through_kill_9() {
    let bin = agent_binary();
    let st = Stack::start();
    let pg = LocalPostgres::start().unwrap();
    post_backlog(&st).await;
    let config = write_config(
        &st,
        &format!("[warehouse]\nkind = \"postgres\"\nurl = \"{}\"\n", pg.url),
    );
    let wh = WarehouseConfig::Postgres(PostgresConfig {
        url: pg.url.clone(),
        password_env: None,
        schema: "public".into(),
        timeout_ms: 30_000,
        query_timeout_ms: 3_600_000,
    });
    let count = || tracks_in(wh.clone());
    kill_and_finish(&bin, &config, count).await;
    let sink = collector_agent::sinks::open(&wh).await.unwrap();
    check(&*sink).await;
}

#[tokio::test]
async fn parquet_lake_exactly_once_through_kill_9() {
    let bin = agent_binary();
    let st = Stack::start();
    post_backlog(&st).await;
    let lake = st.dir.path().join("lake");
    let config = write_config(
        &st,
        &format!(
            "[warehouse]\nkind = \"parquet\"\npath = \"{}\"\n",
            lake.display()
        ),
    );
    // What any reader of the folder sees between kills (the files only, not the
    // agent's state): never an event twice.
    let count = || {
        let lake = lake.clone();
        async move {
            let conn = duckdb::Connection::open_in_memory().unwrap();
            let seen: Result<(u64, u64), _> = conn.query_row(
                &format!(
                    "SELECT count(*), count(DISTINCT message_id) FROM read_parquet('{}/table=tracks/*/*.parquet')",
                    lake.display()
                ),
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            );
            match seen {
                Ok((rows, distinct)) => {
                    assert_eq!(rows, distinct, "a reader of the lake saw an event twice");
                    rows
                }
                // No file yet.
                Err(_) => 0,
            }
        }
    };
    kill_and_finish(&bin, &config, count).await;
    assert_eq!(count().await, EVENTS as u64);
    let sink = collector_agent::sinks::parquet::ParquetSink::open(&lake).unwrap();
    check(&sink).await;
}

// ClickHouse has no transactions: a kill can land between a load's inserts and its
// ledger entry. What a query sees through the views (`FINAL`, deduplicated by
// `message_id`) is every event once, with its content.
#[tokio::test]
async fn clickhouse_exactly_once_through_kill_9() {
    let bin = agent_binary();
    let st = Stack::start();
    let ch = collector_e2e::clickhouse::LocalClickHouse::start().unwrap();
    post_backlog(&st).await;
    let config = write_config(
        &st,
        &format!("[warehouse]\nkind = \"clickhouse\"\nurl = \"{}\"\n", ch.url),
    );
    let wh = WarehouseConfig::ClickHouse(collector_agent::config::ClickHouseConfig {
        timeout_ms: 30_000,
        ..collector_agent::config::ClickHouseConfig::at(&ch.url)
    });
    let count = || tracks_in(wh.clone());
    kill_and_finish(&bin, &config, count).await;
    let sink = collector_agent::sinks::open(&wh).await.unwrap();
    let n = EVENTS as u64;
    let r = sink
        .query("SELECT count(), uniqExact(message_id) FROM tracks WHERE event_text = 'Kill Test' AND event = 'kill_test'")
        .await
        .unwrap();
    assert_eq!(r.rows[0], vec![Some(n.to_string()), Some(n.to_string())]);
    // (ClickHouse 18.16 has no `->>`: the per-event table's typed column.)
    check_with(
        &*sink,
        "SELECT count(), uniqExact(message_id), toUInt64(sum(n)) FROM kill_test",
    )
    .await;
}
