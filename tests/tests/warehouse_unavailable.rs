//! A warehouse that cannot take the events for a while, for the agent (the real
//! binary):
//! - its disk fills up mid-drain, then is freed: the agent backs off while loads fail,
//!   quarantines nothing (a full disk says nothing about an event), and once there is
//!   room again loads every event exactly once; for the embedded DuckDB and the Parquet
//!   lake, on a tmpfs of a few MiB ([`collector_e2e::disk::SmallDisk`]);
//! - it cannot be opened when the agent starts (another process holds the DuckDB
//!   file): the agent waits for it instead of exiting, stops cleanly on SIGTERM while it
//!   waits, and loads everything once the file is free. (PostgreSQL down at start:
//!   `postgres_e2e.rs`.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use collector_agent::config::{ParquetConfig, WarehouseConfig};
use collector_e2e::disk::SmallDisk;
use common::*;
use serde_json::json;

const BEFORE: usize = 200;
const DURING: usize = 3_000;

async fn post_tracks(st: &Stack, prefix: &str, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(250) {
        let batch: Vec<_> = chunk
            .iter()
            .map(|i| json!({"type": "track", "messageId": format!("{prefix}-{i}"), "anonymousId": format!("v-{}", i % 101),
                "event": "Disk Test", "properties": {"n": i, "note": format!("{prefix} event {i} with some text to take room")}}))
            .collect();
        let r = st.post("/v1/batch", &json!({"batch": batch})).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
}

/// Writes the agent's config for this stack (a fast poll, `/metrics` on
/// `metrics_port`) with `rest` (the warehouse, other keys) after it.
fn write_config(st: &Stack, metrics_port: u16, rest: &str) -> PathBuf {
    st.write_agent_config(&format!(
        "metrics_addr = \"127.0.0.1:{metrics_port}\"\n{rest}"
    ))
}

/// The sum of a counter's series in the agent's `/metrics`.
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

struct Run {
    st: Stack,
    metrics_port: u16,
    /// What the disk held when the agent stopped.
    out: PathBuf,
}

impl Run {
    async fn metrics(&self) -> String {
        match self
            .st
            .http
            .get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Waits until `what` of the metrics holds (or fails with `context`).
    async fn until(&self, what: impl Fn(&str) -> bool, secs: u64, context: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let m = self.metrics().await;
            if what(&m) {
                return m;
            }
            assert!(Instant::now() < deadline, "{context}:\n{m}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Drains `BEFORE` events into `warehouse` (a `[warehouse]` table whose files are under
/// `disk/`), fills the disk, sends `DURING` more, checks the loads fail and back off,
/// frees the disk and waits for every event; stops the agent. The copy of the disk.
async fn fill_mid_drain(warehouse: impl Fn(&Path) -> String, leave: u64) -> Run {
    let st = Stack::start();
    let disk_dir = st.dir.path().join("disk");
    let out = st.dir.path().join("after");
    std::fs::create_dir_all(&disk_dir).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    let metrics_port = collector_e2e::free_port();
    let config = write_config(
        &st,
        metrics_port,
        &format!("lease_batches = 2\n{}", warehouse(&disk_dir)),
    );
    let mut cmd = Command::new(agent_binary());
    cmd.args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn");
    let disk = SmallDisk::run(&disk_dir, 48, &out, &cmd).unwrap();
    let run = Run {
        st,
        metrics_port,
        out,
    };
    post_tracks(&run.st, "before", BEFORE).await;
    run.until(
        |m| counter(m, "collector_agent_events_inserted_total{") == BEFORE as u64,
        60,
        "the first events load",
    )
    .await;

    let filled = disk.fill(leave).unwrap();
    eprintln!("filled the disk with {filled} bytes");
    post_tracks(&run.st, "during", DURING).await;
    // Loads fail (transient: the warehouse could not take them), several times over.
    let failed = |m: &str| {
        counter(
            m,
            "collector_agent_drain_failures_total{reason=\"warehouse_transient\"}",
        )
    };
    let m = run
        .until(|m| failed(m) >= 3, 90, "loads fail while the disk is full")
        .await;
    let loaded_while_full = counter(&m, "collector_agent_events_inserted_total{");
    assert!(
        loaded_while_full < (BEFORE + DURING) as u64,
        "not everything fit on the full disk: {loaded_while_full}"
    );
    assert_eq!(
        counter(&m, "collector_agent_events_quarantined_total"),
        0,
        "a full disk quarantines nothing:\n{m}"
    );

    disk.free().unwrap();
    let m = run
        .until(
            |m| counter(m, "collector_agent_events_inserted_total{") >= (BEFORE + DURING) as u64,
            120,
            "every event loads once the disk has room",
        )
        .await;
    assert_eq!(
        counter(&m, "collector_agent_events_inserted_total{"),
        (BEFORE + DURING) as u64,
        "{m}"
    );
    assert_eq!(
        counter(&m, "collector_agent_events_quarantined_total"),
        0,
        "{m}"
    );
    let status = disk.stop().unwrap();
    assert!(status.success(), "the agent stops cleanly: {status}");
    // The edge holds nothing back.
    run.st.assert_edge_drained().await;
    run
}

const EXACTLY_ONCE: &str = "SELECT count(*), count(DISTINCT message_id), count(*) FILTER (WHERE message_id LIKE 'during-%') FROM tracks WHERE event = 'disk_test'";

fn expected() -> Vec<Option<String>> {
    let all = (BEFORE + DURING).to_string();
    vec![Some(all.clone()), Some(all), Some(DURING.to_string())]
}

/// The DuckDB warehouse the agent left on the disk: every event once, nothing
/// quarantined or dead-lettered.
fn check_duckdb(run: &Run) {
    let copy = run.out.join("warehouse.duckdb");
    let conn = collector_agent::sinks::duckdb::DuckDbSink::open_read_only(&copy).unwrap();
    let q = |sql: &str| {
        collector_agent::sinks::duckdb::run_query(&conn, sql)
            .unwrap()
            .rows
    };
    assert_eq!(q(EXACTLY_ONCE)[0], expected());
    assert_eq!(
        q("SELECT count(*) FROM quarantine")[0][0].as_deref(),
        Some("0")
    );
    assert_eq!(
        q("SELECT count(*) FROM dead_letters")[0][0].as_deref(),
        Some("0")
    );
}

// No room at all: the commit's write to the write-ahead log fails.
#[tokio::test]
async fn duckdb_disk_full_mid_drain_backs_off_and_loses_nothing() {
    let run = fill_mid_drain(
        |disk| {
            format!(
                "[warehouse]\npath = \"{}\"\n",
                disk.join("warehouse.duckdb").display()
            )
        },
        0,
    )
    .await;
    check_duckdb(&run);
}

// Room for the log but not for a checkpoint (one after every ~256 KiB of log): commits
// reach the log, then the checkpoint that follows them fails, and DuckDB may count the
// commit as failed although its log holds it (the next open replays it; the registry
// of loaded ids then keeps the retry from loading it twice).
#[tokio::test]
async fn duckdb_disk_full_at_a_checkpoint_loses_and_duplicates_nothing() {
    let run = fill_mid_drain(
        |disk| {
            format!(
                "[warehouse]\npath = \"{}\"\ncheckpoint_threshold = \"256KB\"\n",
                disk.join("warehouse.duckdb").display()
            )
        },
        1 << 20,
    )
    .await;
    check_duckdb(&run);
}

#[tokio::test]
async fn parquet_lake_disk_full_mid_drain_backs_off_and_loses_nothing() {
    let run = fill_mid_drain(
        |disk| {
            format!(
                "[warehouse]\nkind = \"parquet\"\npath = \"{}\"\n",
                disk.join("lake").display()
            )
        },
        0,
    )
    .await;
    let lake = run.out.join("lake");
    // What a reader of the files sees: every event once, no temp file left behind.
    let conn = duckdb::Connection::open_in_memory().unwrap();
    let seen: (u64, u64) = conn
        .query_row(
            &format!(
                "SELECT count(*), count(DISTINCT message_id) FROM read_parquet('{}/table=tracks/*/*.parquet')",
                lake.display()
            ),
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let all = (BEFORE + DURING) as u64;
    assert_eq!(seen, (all, all));
    let tmp = lake.join("_collector/tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "temp files left: {left:?}");
    let sink =
        collector_agent::sinks::open(&WarehouseConfig::Parquet(ParquetConfig::at(lake.clone())))
            .await
            .unwrap();
    let r = sink.query(EXACTLY_ONCE).await.unwrap();
    assert_eq!(r.rows[0], expected());
    let r = sink.query("SELECT count(*) FROM quarantine").await.unwrap();
    assert_eq!(r.rows[0][0].as_deref(), Some("0"));
}

// Another process (an analyst's DuckDB, here the test itself) holds the warehouse file
// when the agent starts.
#[tokio::test]
async fn the_agent_waits_for_a_duckdb_file_another_process_holds() {
    let st = Stack::start();
    post_tracks(&st, "held", BEFORE).await;
    let warehouse = st.warehouse();
    std::fs::create_dir_all(warehouse.parent().unwrap()).unwrap();
    let holder = duckdb::Connection::open(&warehouse).unwrap();
    let metrics_port = collector_e2e::free_port();
    let config = write_config(
        &st,
        metrics_port,
        &format!("[warehouse]\npath = \"{}\"\n", warehouse.display()),
    );
    // The log of the first run is read; the second's goes nowhere (a pipe nobody
    // reads would stop the agent once full).
    let spawn = |log: std::process::Stdio| {
        let mut cmd = Command::new(agent_binary());
        cmd.args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stderr(log);
        ChildGuard(cmd.spawn().unwrap())
    };
    let run = Run {
        st,
        metrics_port,
        out: PathBuf::new(),
    };
    // It waits (it does not exit), counting each attempt in /metrics, and SIGTERM stops
    // it cleanly while it does.
    let mut agent = spawn(std::process::Stdio::piped());
    run.until(
        |m| {
            counter(
                m,
                "collector_agent_drain_failures_total{reason=\"warehouse_transient\"}",
            ) >= 2
        },
        30,
        "the attempts to open the warehouse show in /metrics",
    )
    .await;
    assert!(
        agent.0.try_wait().unwrap().is_none(),
        "the agent waits for the warehouse instead of exiting"
    );
    assert!(agent.terminate(), "SIGTERM while waiting is a clean stop");
    let mut log = String::new();
    std::io::Read::read_to_string(agent.0.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(
        log.contains("cannot open the warehouse yet") && log.contains("lock"),
        "the log says what it waits for: {log}"
    );

    // Once the file is free, it opens it and loads everything.
    let mut agent = spawn(std::process::Stdio::null());
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(holder);
    run.until(
        |m| counter(m, "collector_agent_events_inserted_total{") == BEFORE as u64,
        90,
        "the events load once the file is free",
    )
    .await;
    assert!(agent.terminate(), "a clean stop");
    let conn = collector_agent::sinks::duckdb::DuckDbSink::open_read_only(&warehouse).unwrap();
    let r = collector_agent::sinks::duckdb::run_query(
        &conn,
        "SELECT count(*), count(DISTINCT message_id) FROM tracks",
    )
    .unwrap();
    let n = BEFORE.to_string();
    assert_eq!(r.rows[0], vec![Some(n.clone()), Some(n)]);
}

// The agent's state file (which only tells CLI commands where the running agent is)
// cannot be written, as on a full disk: the agent says so and drains anyway.
#[tokio::test]
async fn the_agent_drains_when_its_state_file_cannot_be_written() {
    let st = Stack::start();
    post_tracks(&st, "stateless", BEFORE).await;
    let warehouse = st.warehouse();
    std::fs::create_dir_all(warehouse.parent().unwrap()).unwrap();
    // A folder where the file would go.
    let mut state = warehouse.clone().into_os_string();
    state.push(".agent");
    std::fs::create_dir_all(&state).unwrap();
    let metrics_port = collector_e2e::free_port();
    let config = write_config(
        &st,
        metrics_port,
        &format!("[warehouse]\npath = \"{}\"\n", warehouse.display()),
    );
    let mut cmd = Command::new(agent_binary());
    cmd.args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn");
    let mut agent = ChildGuard(cmd.spawn().unwrap());
    let run = Run {
        st,
        metrics_port,
        out: PathBuf::new(),
    };
    run.until(
        |m| counter(m, "collector_agent_events_inserted_total{") == BEFORE as u64,
        90,
        "the events load without a state file",
    )
    .await;
    assert!(agent.terminate(), "a clean stop");
}
