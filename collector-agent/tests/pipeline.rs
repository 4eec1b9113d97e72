//! The drain's load pipeline (a load is prepared while the one before is written):
//! writes stay in order, one at a time, and an error stops what comes after it.

mod common;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use collector_agent::sinks::duckdb::DuckDbSink;
use collector_agent::sinks::schema::{DeadLetter, Prepared, QuarantinedEvent};
use collector_agent::sinks::{Load, LoadPipeline, LoadStats, QueryResult, Sink, SinkError};
use common::{events, one};
use serde_json::json;

/// A real DuckDB sink that records each write's size and whether writes overlapped,
/// and refuses (transiently) the write numbered `fail_at`.
struct Recording {
    inner: DuckDbSink,
    writes: Mutex<Vec<usize>>,
    active: Mutex<u32>,
    overlapped: Mutex<bool>,
    fail_at: Option<usize>,
}

#[async_trait]
impl Sink for Recording {
    fn kind(&self) -> &'static str {
        "recording"
    }
    async fn write(&self, load: Arc<Prepared>) -> Result<LoadStats, SinkError> {
        let n = {
            let mut w = self.writes.lock().unwrap();
            w.push(load.rows.len());
            w.len()
        };
        {
            let mut a = self.active.lock().unwrap();
            *a += 1;
            if *a > 1 {
                *self.overlapped.lock().unwrap() = true;
            }
        }
        // Long enough that the next load is prepared and waiting meanwhile.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let r = if Some(n) == self.fail_at {
            Err(SinkError::Transient("warehouse down".into()))
        } else {
            self.inner.write(load).await
        };
        *self.active.lock().unwrap() -= 1;
        r
    }
    async fn quarantined(&self, ids: &[String]) -> Result<Vec<QuarantinedEvent>, SinkError> {
        self.inner.quarantined(ids).await
    }
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, SinkError> {
        self.inner.dead_letters().await
    }
    async fn query(&self, sql: &str) -> Result<QueryResult, SinkError> {
        self.inner.query(sql).await
    }
}

fn sink(dir: &tempfile::TempDir, fail_at: Option<usize>) -> Arc<Recording> {
    Arc::new(Recording {
        inner: DuckDbSink::open(&dir.path().join("w.duckdb")).unwrap(),
        writes: Mutex::new(Vec::new()),
        active: Mutex::new(0),
        overlapped: Mutex::new(false),
        fail_at,
    })
}

/// A load of track events with these message ids.
fn load(batch_id: i64, ids: &[&str]) -> Load {
    let batch: Vec<_> = ids
        .iter()
        .map(|id| json!({"type": "track", "event": "E", "messageId": id, "userId": "u"}))
        .collect();
    Load::events(0, batch_id, events(json!({ "batch": batch })))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_run_in_order_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let s = sink(&dir, None);
    let mut p = LoadPipeline::new(s.clone());
    p.push(load(1, &["a"])).await.unwrap();
    p.push(load(2, &["a", "b"])).await.unwrap();
    p.push(load(3, &["b", "c", "d"])).await.unwrap();
    let stats = p.finish().await.unwrap();
    assert_eq!(*s.writes.lock().unwrap(), vec![1, 2, 3]);
    assert!(!*s.overlapped.lock().unwrap());
    // Each load saw the ones before it committed: the repeats are duplicates.
    assert_eq!((stats.inserted, stats.duplicates), (4, 2));
    assert_eq!(
        one(&*s, "SELECT count(*) FROM tracks").await.as_deref(),
        Some("4")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_stops_the_loads_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = sink(&dir, Some(2));
    let mut p = LoadPipeline::new(s.clone());
    p.push(load(1, &["a"])).await.unwrap();
    p.push(load(2, &["b", "c"])).await.unwrap();
    // The third push waits for the second write, which failed.
    let err = p.push(load(3, &["d", "e", "f"])).await.unwrap_err();
    assert!(err.retryable(), "{err}");
    assert_eq!(*s.writes.lock().unwrap(), vec![1, 2]);
    assert_eq!(
        one(&*s, "SELECT string_agg(message_id, ',') FROM tracks")
            .await
            .as_deref(),
        Some("a")
    );
}
