//! Instants are UTC whatever the host's time zone. DuckDB (with ICU, which the
//! agent's build loads) gives each session the host's zone, in which `now()::TIMESTAMP`
//! is the local wall clock: `loaded_at` and every stamp the agent writes were hours
//! off on a host outside UTC. These tests run in a child process of their own whose
//! `TZ` is far from UTC (DuckDB reads it once per process).

mod common;

use collector_agent::sinks::duckdb::DuckDbSink;
use collector_agent::sinks::parquet::ParquetSink;
use collector_agent::sinks::{Load, Sink};
use common::events;
use serde_json::json;

/// UTC+14: no instant of a day reads the same there and in UTC.
const FAR_ZONE: &str = "Pacific/Kiritimati";

/// Runs the test `name` of this file again, in a child process with `TZ` set to
/// [`FAR_ZONE`]; true in that child, which then runs the test's body.
fn in_far_zone(name: &str) -> bool {
    if std::env::var_os("COLLECTOR_TZ_CHILD").is_some() {
        assert_eq!(std::env::var("TZ").as_deref(), Ok(FAR_ZONE));
        return true;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("TZ", FAR_ZONE)
        .env("COLLECTOR_TZ_CHILD", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the test in {FAR_ZONE} failed:\n{text}"
    );
    // The filter matched the test: it ran, and passed.
    assert!(text.contains("1 passed"), "{text}");
    false
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Loads one track event into `sink` and checks that its `loaded_at`, and the rest of
/// what the agent stamps, are the UTC instants of the load.
async fn stamps_are_utc(sink: &dyn Sink) {
    let before = now_ms();
    let evs = events(json!({"batch": [
        {"type": "track", "messageId": "t1", "userId": "u", "event": "Signed Up",
         "timestamp": "2026-11-24T13:54:00.250Z", "properties": {"at": "2026-11-24T13:00:00Z"}},
        // An event with a type the warehouse refuses after the first: its
        // rejected value is stamped too.
        {"type": "track", "messageId": "t2", "userId": "u", "event": "Signed Up",
         "timestamp": "2026-11-24T13:54:00.250Z", "properties": {"at": "not an instant"}}
    ]}));
    sink.load(&Load::events(0, 1, evs)).await.unwrap();
    let after = now_ms();
    let r = sink
        .query(
            "SELECT CAST(t.loaded_at AS VARCHAR), CAST(s.loaded_at AS VARCHAR), CAST(t.timestamp AS VARCHAR), CAST(s.at AS VARCHAR),
                    (SELECT CAST(max(rejected_at) AS VARCHAR) FROM rejected_values)
             FROM tracks t JOIN signed_up s USING (message_id) WHERE message_id = 't1'",
        )
        .await
        .unwrap();
    let row = &r.rows[0];
    let instant = |i: usize| {
        let text = row[i].clone().unwrap();
        collector_core::timestamp::parse_ms(&format!("{}Z", text.replace(' ', "T")))
            .unwrap_or_else(|| panic!("{text:?}"))
    };
    for (i, what) in [
        (0, "tracks.loaded_at"),
        (1, "signed_up.loaded_at"),
        (4, "rejected_values.rejected_at"),
    ] {
        let at = instant(i);
        assert!(
            (before - 1000..=after + 1000).contains(&at),
            "{what} {:?} is not the load's UTC instant (between {before} and {after} ms): {row:?}",
            row[i]
        );
    }
    // What the events said is kept as sent, in UTC.
    assert_eq!(row[2].as_deref(), Some("2026-11-24 13:54:00.25"));
    assert_eq!(row[3].as_deref(), Some("2026-11-24 13:00:00"));
}

#[tokio::test]
async fn a_duckdb_warehouse_stamps_utc_in_any_zone() {
    if !in_far_zone("a_duckdb_warehouse_stamps_utc_in_any_zone") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.duckdb");
    stamps_are_utc(&DuckDbSink::open(&path).unwrap()).await;
    // A file read on its own (`collector-agent sql` with no agent running) is in UTC
    // too, so `now()` compares with the stored instants as they are.
    let conn = DuckDbSink::open_read_only(&path).unwrap();
    let (zone, fresh): (String, bool) = conn
        .query_row(
            "SELECT current_setting('TimeZone'), max(loaded_at) > now() - INTERVAL 1 HOUR FROM tracks",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((zone.as_str(), fresh), ("UTC", true));
}

#[tokio::test]
async fn an_attached_duckdb_warehouse_stamps_utc_in_any_zone() {
    if !in_far_zone("an_attached_duckdb_warehouse_stamps_utc_in_any_zone") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sink = DuckDbSink::open_config(&collector_agent::config::DuckDbConfig {
        path: dir.path().join("w.duckdb"),
        row_group_size: Some(16384),
        ..Default::default()
    })
    .unwrap();
    stamps_are_utc(&sink).await;
}

#[tokio::test]
async fn a_lake_stamps_utc_in_any_zone() {
    if !in_far_zone("a_lake_stamps_utc_in_any_zone") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    stamps_are_utc(&ParquetSink::open(&dir.path().join("lake")).unwrap()).await;
}
