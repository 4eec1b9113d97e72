//! What is particular to the DuckDB sink, against real DuckDB files (the behaviour every
//! sink shares is in `conformance.rs`).

mod common;

use collector_agent::sinks::duckdb::DuckDbSink;
use collector_agent::sinks::{Idle, Load, Sink};
use common::events;
use serde_json::json;

#[tokio::test]
async fn columns_have_duckdb_types() {
    let dir = tempfile::tempdir().unwrap();
    let sink = DuckDbSink::open(&dir.path().join("w.duckdb")).unwrap();
    let evs = events(
        json!({"batch": [{"type": "track", "messageId": "t1", "userId": "u1", "event": "E", "properties": {"a": 1}}]}),
    );
    sink.load(&Load::events(0, 1, evs)).await.unwrap();
    assert_eq!(
        sink.query("SELECT typeof(timestamp), typeof(properties) FROM tracks")
            .await
            .unwrap()
            .rows[0],
        vec![Some("TIMESTAMP".into()), Some("JSON".into())]
    );
}

#[tokio::test]
async fn bad_sql_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let sink = DuckDbSink::open(&dir.path().join("w.duckdb")).unwrap();
    let err = sink.query("SELEC nonsense").await.unwrap_err();
    assert!(err.to_string().contains("syntax"), "{err}");
}

#[tokio::test]
async fn a_long_query_does_not_hold_loads_up() {
    let dir = tempfile::tempdir().unwrap();
    common::a_long_query_does_not_hold_loads_up(
        DuckDbSink::open(&dir.path().join("w.duckdb")).unwrap(),
    )
    .await;
}

/// The `tracks` table as the first release created it, with `event_check` on `event`.
fn tracks_ddl(event_check: &str) -> String {
    format!(
        "CREATE TABLE tracks (message_id VARCHAR PRIMARY KEY, anonymous_id VARCHAR, user_id VARCHAR,
         timestamp TIMESTAMP, sent_at TIMESTAMP, received_at TIMESTAMP, original_timestamp TIMESTAMP,
         context JSON, integrations JSON, event VARCHAR {event_check}, properties JSON,
         raw JSON NOT NULL, loaded_at TIMESTAMP NOT NULL);"
    )
}

/// A warehouse file prepared by `sql` before the sink first opens it.
fn prepared_warehouse(dir: &tempfile::TempDir, sql: &str) -> std::path::PathBuf {
    let path = dir.path().join("w.duckdb");
    duckdb::Connection::open(&path)
        .unwrap()
        .execute_batch(sql)
        .unwrap();
    path
}

// Issue #8: when the warehouse itself refuses one event (here a CHECK constraint an
// analyst added), that event alone is isolated and quarantined.
#[tokio::test]
async fn event_the_warehouse_refuses_is_isolated_and_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let path = prepared_warehouse(&dir, &tracks_ddl("CHECK (event <> 'forbidden')"));
    let sink = DuckDbSink::open(&path).unwrap();
    let evs = events(json!({"batch": [
        {"type": "track", "messageId": "t1", "userId": "u", "event": "Fine"},
        {"type": "track", "messageId": "t2", "userId": "u", "event": "Forbidden"},
        {"type": "identify", "messageId": "i1", "userId": "u"}
    ]}));
    let s = sink.load(&Load::events(1, 9, evs)).await.unwrap();
    assert_eq!((s.inserted, s.quarantined), (2, 1));
    let q = sink
        .query("SELECT message_id, reason FROM quarantine")
        .await
        .unwrap();
    assert_eq!(q.rows[0][0].as_deref(), Some("t2"));
    assert!(
        q.rows[0][1]
            .as_deref()
            .unwrap()
            .to_lowercase()
            .contains("check constraint"),
        "{:?}",
        q.rows
    );
    assert_eq!(
        sink.query("SELECT count(*) FROM tracks")
            .await
            .unwrap()
            .rows[0][0]
            .as_deref(),
        Some("1")
    );
}

// A warehouse written before the migrations existed is brought up to date: its rows are
// registered (so they still dedup) and its unkeyed dead letters are merged.
#[tokio::test]
async fn warehouse_from_an_earlier_release_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = prepared_warehouse(
        &dir,
        &(tracks_ddl("")
            + "INSERT INTO tracks (message_id, event, raw, loaded_at) VALUES ('old-1', 'A', '{}', now()::TIMESTAMP);
             CREATE TABLE dead_letters (shard INTEGER, batch_id BIGINT, error VARCHAR, blob BLOB, loaded_at TIMESTAMP);
             INSERT INTO dead_letters VALUES (1, 5, 'x', 'b'::BLOB, now()::TIMESTAMP), (1, 5, 'x', 'b'::BLOB, now()::TIMESTAMP);"),
    );
    let sink = DuckDbSink::open(&path).unwrap();
    let one = |sql: &'static str| {
        let sink = &sink;
        async move { sink.query(sql).await.unwrap().rows[0][0].clone() }
    };
    assert_eq!(
        one("SELECT count(*) FROM dead_letters").await.as_deref(),
        Some("1")
    );
    assert_eq!(
        one("SELECT max(version) FROM collector_migrations")
            .await
            .as_deref(),
        Some("15")
    );
    // Its tracks got `event_text` (the name as sent).
    assert_eq!(
        one("SELECT event_text FROM tracks").await.as_deref(),
        Some("A")
    );
    // The identity and audience tables came with the later migrations.
    assert_eq!(
        one("SELECT count(*) FROM identities").await.as_deref(),
        Some("0")
    );
    assert_eq!(
        one("SELECT count(*) FROM audience_membership")
            .await
            .as_deref(),
        Some("0")
    );
    // Its rows got Segment's `id`.
    assert_eq!(one("SELECT id FROM tracks").await.as_deref(), Some("old-1"));
    let evs = events(json!({"batch": [{"type": "page", "messageId": "old-1", "userId": "u"}]}));
    let s = sink.load(&Load::events(0, 1, evs)).await.unwrap();
    assert_eq!((s.inserted, s.duplicates), (0, 1));
    drop(sink);
    // Opening again applies nothing twice.
    let sink = DuckDbSink::open(&path).unwrap();
    assert_eq!(
        sink.query("SELECT count(*) FROM collector_migrations")
            .await
            .unwrap()
            .rows[0][0]
            .as_deref(),
        Some("15")
    );
}

// `memory_cap` replaces the default limit's cap: DuckDB's limit starts there (the
// fresh warehouse's indexes take next to nothing). Identity, audiences and activation
// run their SQL in sessions: when one runs out of memory, the limit is raised as after
// a load's, so the next run finds room (before, a session's out-of-memory error left
// the limit where it was and the run failed the same way every time).
#[tokio::test]
async fn a_memory_cap_sets_the_default_limit_and_a_session_out_of_memory_raises_it() {
    let dir = tempfile::tempdir().unwrap();
    let sink = DuckDbSink::open_config(&collector_agent::config::DuckDbConfig {
        path: dir.path().join("w.duckdb"),
        memory_cap: Some("32MB".into()),
        row_group_size: Some(16384),
        ..Default::default()
    })
    .unwrap();
    // The cap, and room for twice what the fresh warehouse's indexes measure (a few
    // blocks of 256 KiB), fitted after each call (the query that reads it is one).
    let limit = common::memory_limit_mib(&sink).await;
    assert!((30.5..=34.0).contains(&limit), "{limit} MiB");
    assert!(common::out_of_memory_until_raised(&sink).await >= 1);
    let limit = common::memory_limit_mib(&sink).await;
    assert!(limit >= 4.0 * 30.5, "{limit} MiB");
}

// `checkpoint_on_stop = false`: the agent stops without folding the write-ahead log into
// the file (under a small memory cap, that checkpoint was the agent's peak). The rows
// stay in the log beside the file, and a reader, read-only too, has them all. By
// default the stop folds the log in, as before. `run --once` tells the sink it idles
// before it exits (`Idle::Exiting`), which must not checkpoint either: it did, and
// folded the log in whatever the setting said.
#[tokio::test]
async fn checkpoint_on_stop_false_leaves_the_rows_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    for (on_stop, name) in [(Some(false), "kept.duckdb"), (None, "folded.duckdb")] {
        let path = dir.path().join(name);
        let sink = DuckDbSink::open_config(&collector_agent::config::DuckDbConfig {
            path: path.clone(),
            memory_cap: Some("32MB".into()),
            row_group_size: Some(16384),
            checkpoint_on_stop: on_stop,
            ..Default::default()
        })
        .unwrap();
        sink.load(&common::wide_lease(0..2)).await.unwrap();
        sink.idle(Idle::Exiting).await.unwrap();
        drop(sink);
        let wal = std::fs::metadata(path.with_extension("duckdb.wal")).map_or(0, |m| m.len());
        if on_stop == Some(false) {
            assert!(wal > 100_000, "{name}: log of {wal} bytes");
        } else {
            assert_eq!(wal, 0, "{name}: log of {wal} bytes");
        }
        let reader = duckdb::Connection::open_with_flags(
            &path,
            duckdb::Config::default()
                .access_mode(duckdb::AccessMode::ReadOnly)
                .unwrap(),
        )
        .unwrap();
        let n: i64 = reader
            .query_row("SELECT count(*) FROM message_ids", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1000, "{name}");
    }
}

// The tuning keys reach DuckDB.
#[tokio::test]
async fn memory_limit_and_threads_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let sink = DuckDbSink::open_config(&collector_agent::config::DuckDbConfig {
        path: dir.path().join("w.duckdb"),
        memory_limit: Some("64MB".into()),
        threads: Some(1),
        checkpoint_threshold: Some("48MB".into()),
        row_group_size: None,
        memory_cap: None,
        checkpoint_on_stop: None,
    })
    .unwrap();
    let r = sink
        .query("SELECT current_setting('threads'), current_setting('memory_limit'), current_setting('checkpoint_threshold')")
        .await
        .unwrap();
    assert_eq!(r.rows[0][0].as_deref(), Some("1"));
    let limit = r.rows[0][1].clone().unwrap();
    assert!(limit.contains("MiB") && limit.starts_with('6'), "{limit}");
    let threshold = r.rows[0][2].clone().unwrap();
    assert!(
        threshold.contains("MiB") && threshold.starts_with("4"),
        "{threshold}"
    );
}

// `row_group_size` is an option of DuckDB's `ATTACH`: the file is attached with it and
// made the default database of the sink's connection and of every session's (identity
// and audiences run in sessions), and what is loaded lands in the file, in row groups
// of at most that many rows.
#[tokio::test]
async fn a_configured_row_group_size_bounds_the_row_groups_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.duckdb");
    let sink = DuckDbSink::open_config(&collector_agent::config::DuckDbConfig {
        path: path.clone(),
        row_group_size: Some(2048),
        ..Default::default()
    })
    .unwrap();
    for l in 0..3 {
        let batch: Vec<serde_json::Value> = (0..2000)
            .map(|i| json!({"type": "track", "messageId": format!("m{l}-{i}"), "anonymousId": "a", "event": "Viewed", "properties": {"n": i}}))
            .collect();
        let stats = sink
            .load(&Load::events(0, l, events(json!({ "batch": batch }))))
            .await
            .unwrap();
        assert_eq!(stats.inserted, 2000);
    }
    sink.query("CHECKPOINT").await.unwrap();
    let r = sink
        .query(
            "SELECT current_database(), current_setting('temp_directory'),
                    (SELECT max(count) FROM pragma_storage_info('tracks')),
                    (SELECT count(DISTINCT row_group_id) FROM pragma_storage_info('tracks'))",
        )
        .await
        .unwrap();
    assert_eq!(r.rows[0][0].as_deref(), Some("w"));
    assert_eq!(
        r.rows[0][1].as_deref(),
        Some(format!("{}.tmp", path.display()).as_str())
    );
    assert_eq!(r.rows[0][2].as_deref(), Some("2048"));
    // 6,000 rows in groups of 2,048: three groups (DuckDB's default would make one).
    assert_eq!(r.rows[0][3].as_deref(), Some("3"));
    let mut session = sink.session().await.unwrap().unwrap();
    let r = session
        .query("SELECT count(*) FROM tracks JOIN viewed USING (message_id)")
        .await
        .unwrap();
    assert_eq!(r.rows[0][0].as_deref(), Some("6000"));
    drop(session);
    drop(sink);
    // The rows are in the file, for any program that opens it.
    let conn = duckdb::Connection::open(&path).unwrap();
    let n: i64 = conn
        .query_row("SELECT count(*) FROM tracks", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 6000);
}

// With no `memory_limit` configured, DuckDB's default (80% of the host's RAM) is
// capped at 1 GiB, so the blocks DuckDB caches cannot climb to most of the host's RAM;
// a configured value is left as it is, above the cap too.
#[tokio::test]
async fn default_memory_limit_is_capped_and_a_configured_one_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let limit = |sink: DuckDbSink| async move {
        sink.query("SELECT current_setting('memory_limit')")
            .await
            .unwrap()
            .rows[0][0]
            .clone()
            .unwrap()
    };
    let default = DuckDbSink::open_config(&collector_agent::config::DuckDbConfig {
        path: dir.path().join("default.duckdb"),
        ..Default::default()
    })
    .unwrap();
    // "1.0 GiB" here; on a host with less than 1.25 GiB, DuckDB's own (smaller) default.
    let l = limit(default).await;
    let (n, unit) = l.split_once(' ').unwrap();
    let n: f64 = n.parse().unwrap();
    assert!(unit == "MiB" || (unit == "GiB" && n <= 1.0), "{l}");
    let configured = DuckDbSink::open_config(&collector_agent::config::DuckDbConfig {
        path: dir.path().join("configured.duckdb"),
        memory_limit: Some("3GB".into()),
        ..Default::default()
    })
    .unwrap();
    let l = limit(configured).await;
    assert!(l.starts_with("2.7") && l.contains("GiB"), "{l}");
    // DuckDB's own default when the sink is opened without a config (tests, benches):
    // above the cap on any host with more than 1.25 GiB of RAM, like this one.
    let plain = DuckDbSink::open(&dir.path().join("plain.duckdb")).unwrap();
    let l = limit(plain).await;
    assert!(l.ends_with("GiB") && !l.starts_with("1.0 "), "{l}");
}

// A fatal DuckDB error (here a checkpoint that finds no memory) invalidates the
// database: DuckDB refuses every statement until it is opened again. The sink opens it
// again by itself (with its configured settings), the failed load is retried, and
// every event lands exactly once.
#[tokio::test]
async fn a_fatal_error_reopens_the_warehouse_and_the_retry_lands_once() {
    let dir = tempfile::tempdir().unwrap();
    let sink = DuckDbSink::open(&dir.path().join("w.duckdb")).unwrap();
    // Only this instance's settings: the sink opens the file again without them. A
    // checkpoint after every commit makes the first commit that outgrows 20MB fail in
    // its checkpoint (fatal), not in the commit itself (an ordinary rollback), so the
    // test does not depend on timing.
    sink.query("SET memory_limit = '20MB'").await.unwrap();
    sink.query("SET checkpoint_threshold = '1kB'")
        .await
        .unwrap();
    let load = |b: i64| {
        let batch: Vec<serde_json::Value> = (0..2000)
            .map(|i| json!({"type": "track", "messageId": format!("m{b}-{i}"), "anonymousId": format!("a{i}"),
                "event": "Order Completed", "properties": {"revenue": i, "sku": format!("SKU-{i}"), "note": "n".repeat(100)},
                "context": {"page": {"path": "/p", "url": format!("https://shop.example/{i}")}, "userAgent": "UA"}}))
            .collect();
        let evs: Vec<_> = batch
            .chunks(300)
            .flat_map(|c| events(json!({ "batch": c })))
            .collect();
        Load::events(0, b, evs)
    };
    // Short of memory, DuckDB either refuses a commit (rolled back, the database stays
    // usable: an ordinary transient error) or fails the checkpoint after it (fatal).
    // Which comes first depends on timing, so load until the fatal one, keeping the
    // refused loads for the retry.
    let mut refused = Vec::new();
    let mut failed = None;
    for b in 0..40 {
        match sink.load(&load(b)).await {
            Ok(s) => assert_eq!(s.inserted, 2000),
            Err(e) => {
                assert!(e.retryable(), "short of memory is transient: {e}");
                if !e.to_string().contains("FATAL") {
                    refused.push(b);
                    continue;
                }
                failed = Some(b);
                break;
            }
        }
    }
    let failed = failed.expect("20MB is too little for DuckDB's checkpoint: a fatal error");
    // A file that cannot be opened again (here for a moment not a DuckDB file) fails
    // the retry as the warehouse's error, transient: no event is quarantined for it.
    let path = dir.path().join("w.duckdb");
    let saved = std::fs::read(&path).unwrap();
    std::fs::write(&path, b"not a database").unwrap();
    let e = sink.load(&load(failed)).await.unwrap_err();
    assert!(e.retryable(), "{e}");
    assert!(
        e.to_string().contains("not a valid DuckDB database file"),
        "{e}"
    );
    std::fs::write(&path, saved).unwrap();
    // The reopened warehouse has the default memory limit. The retry of the failed
    // load lands (what its commit wrote before the fatal checkpoint counts as
    // duplicates), and so do the refused loads and the loads after them.
    let retry = sink.load(&load(failed)).await.unwrap();
    assert_eq!(retry.inserted + retry.duplicates, 2000);
    for b in refused {
        assert_eq!(
            sink.load(&load(b)).await.unwrap().inserted,
            2000,
            "refused load {b}"
        );
    }
    let next = sink.load(&load(failed + 1)).await.unwrap();
    assert_eq!(next.inserted, 2000);
    assert_eq!(
        sink.query("SELECT count(*) FROM quarantine")
            .await
            .unwrap()
            .rows,
        vec![vec![Some("0".to_string())]]
    );
    let expected = ((failed + 2) * 2000).to_string();
    assert_eq!(
        sink.query("SELECT count(*), count(DISTINCT message_id) FROM tracks")
            .await
            .unwrap()
            .rows,
        vec![vec![Some(expected.clone()), Some(expected.clone())]]
    );
    assert_eq!(
        sink.query("SELECT count(*) FROM order_completed")
            .await
            .unwrap()
            .rows,
        vec![vec![Some(expected)]]
    );
}

// An agent with nothing to load gives DuckDB's memory back (`Sink::idle`): a checkpoint
// moves the rows committed since the last one from memory into the file, and the cached
// blocks are evicted; the memory limit is then what it was (a fitted default, a capped
// default, a configured one). Not while a session is open: its statements would find no
// memory while the limit is down. Loads go on after it.
#[tokio::test]
async fn idle_gives_the_memory_back_and_keeps_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let held = "SELECT sum(memory_usage_bytes)::BIGINT FROM duckdb_memory()";
    for (i, (memory_limit, memory_cap)) in
        [(None, None), (Some("200MB"), None), (None, Some("96MB"))]
            .into_iter()
            .enumerate()
    {
        let path = dir.path().join(format!("w{i}.duckdb"));
        let wal = || std::fs::metadata(path.with_extension("duckdb.wal")).map_or(0, |m| m.len());
        let sink = DuckDbSink::open_config(&collector_agent::config::DuckDbConfig {
            path: path.clone(),
            memory_limit: memory_limit.map(String::from),
            memory_cap: memory_cap.map(String::from),
            ..Default::default()
        })
        .unwrap();
        sink.load(&common::wide_lease(0..4)).await.unwrap();
        let limit = common::setting(&sink, "memory_limit").await;
        let before: i64 = common::one(&sink, held).await.unwrap().parse().unwrap();
        assert!(before > 4_000_000, "case {i}: DuckDB holds {before} bytes");
        assert!(wal() > 0, "case {i}");

        let session = sink.session().await.unwrap().unwrap();
        sink.idle(Idle::Waiting).await.unwrap();
        let kept: i64 = common::one(&sink, held).await.unwrap().parse().unwrap();
        assert!(
            kept * 10 >= before * 9,
            "case {i}: {before} → {kept} with a session open"
        );
        assert!(wal() > 0, "case {i}: checkpointed with a session open");
        drop(session);

        sink.idle(Idle::Waiting).await.unwrap();
        let after: i64 = common::one(&sink, held).await.unwrap().parse().unwrap();
        assert!(after * 4 < before, "case {i}: {before} → {after} bytes");
        assert_eq!(wal(), 0, "case {i}: the log is folded into the file");
        assert_eq!(
            common::setting(&sink, "memory_limit").await,
            limit,
            "case {i}"
        );

        sink.load(&common::wide_lease(4..6)).await.unwrap();
        assert_eq!(
            common::one(&sink, "SELECT count(*) FROM message_ids")
                .await
                .as_deref(),
            Some("3000"),
            "case {i}"
        );
    }
}
