//! What is particular to the Parquet lake (the behaviour every sink shares is in
//! `conformance.rs`): its layout, files any Parquet reader can read, the manifest, and
//! a crash between writing files and committing the ids.

mod common;

use collector_agent::sinks::parquet::ParquetSink;
use collector_agent::sinks::{Load, Sink};
use common::events;
use serde_json::json;

fn files(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                if !p.ends_with("_collector") {
                    stack.push(p);
                }
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn lake_layout_is_partitioned_by_table_and_date_with_one_file_per_batch() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("lake");
    let sink = ParquetSink::open(&root).unwrap();
    let b1 = events(json!({"batch": [
        {"type": "track", "messageId": "a", "userId": "u", "event": "E", "timestamp": "2026-11-23T23:59:00Z"},
        {"type": "track", "messageId": "b", "userId": "u", "event": "E", "timestamp": "2026-11-24T00:01:00Z"},
        {"type": "page", "messageId": "c", "userId": "u", "name": "Home", "timestamp": "2026-11-24T00:02:00Z"}
    ]}));
    let b2 = events(
        json!({"batch": [{"type": "track", "messageId": "d", "userId": "u", "event": "E", "timestamp": "2026-11-24T08:00:00Z"}]}),
    );
    sink.load(&Load {
        shard: 3,
        batches: vec![
            collector_agent::sinks::LoadBatch::Decoded {
                batch_id: 41,
                events: b1,
            },
            collector_agent::sinks::LoadBatch::Decoded {
                batch_id: 42,
                events: b2,
            },
        ],
    })
    .await
    .unwrap();
    assert_eq!(
        files(&root),
        vec![
            // The per-event table of `E`, beside `tracks`.
            "table=e/date=2026-11-23/part-s3-b41.parquet",
            "table=e/date=2026-11-24/part-s3-b41.parquet",
            "table=e/date=2026-11-24/part-s3-b42.parquet",
            "table=pages/date=2026-11-24/part-s3-b41.parquet",
            "table=tracks/date=2026-11-23/part-s3-b41.parquet",
            "table=tracks/date=2026-11-24/part-s3-b41.parquet",
            "table=tracks/date=2026-11-24/part-s3-b42.parquet",
        ]
    );
    // Any Parquet reader reads them as they are (here DuckDB, without our views).
    let conn = duckdb::Connection::open_in_memory().unwrap();
    let n: i64 = conn
        .query_row(
            &format!(
                "SELECT count(*) FROM read_parquet('{}/table=tracks/*/*.parquet', hive_partitioning = true) WHERE event_text = 'E' AND event = 'e' AND date IS NOT NULL",
                root.display()
            ),
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 3);
    let manifest = sink
        .query("SELECT shard, batch_id, table_name, date, rows FROM loaded_batches WHERE table_name <> 'e' ORDER BY file")
        .await
        .unwrap();
    assert_eq!(manifest.rows.len(), 4);
    assert_eq!(
        manifest.rows[3],
        vec![
            Some("3".into()),
            Some("42".into()),
            Some("tracks".into()),
            Some("2026-11-24".into()),
            Some("1".into())
        ]
    );
}

// A crash after the files were renamed into place but before the ids were committed:
// the retry writes the same file names with the same rows, so nothing doubles.
#[tokio::test]
async fn retry_after_a_lost_commit_rewrites_the_same_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("lake");
    let sink = ParquetSink::open(&root).unwrap();
    let evs = events(json!({"batch": [
        {"type": "track", "messageId": "x1", "userId": "u", "event": "E", "timestamp": "2026-11-24T10:00:00Z"},
        {"type": "track", "messageId": "x2", "userId": "u", "event": "E", "timestamp": "2026-11-24T10:00:01Z"}
    ]}));
    let load = Load::events(0, 7, evs);
    sink.load(&load).await.unwrap();
    let before = files(&root);
    // What a crash before the commit leaves: the files, without their ids.
    sink.query("DELETE FROM message_ids").await.unwrap();
    sink.query("DELETE FROM loaded_batches").await.unwrap();
    let again = sink.load(&load).await.unwrap();
    assert_eq!(
        again.inserted, 2,
        "the ids were not committed, so the rows are new again"
    );
    assert_eq!(
        files(&root),
        before,
        "the same file names: overwritten, not added"
    );
    let n = sink.query("SELECT count(*) FROM tracks").await.unwrap();
    assert_eq!(n.rows[0][0].as_deref(), Some("2"));
    // Once committed, a third delivery writes nothing.
    let third = sink.load(&load).await.unwrap();
    assert_eq!((third.inserted, third.duplicates), (0, 2));
    assert_eq!(files(&root), before);
}
