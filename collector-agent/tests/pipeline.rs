//! The drain's load pipeline (a load is prepared while the one before is written):
//! writes stay in order, one at a time, and an error stops what comes after it; a load
//! stuck on an error no sink calls the data's is written in parts.

mod common;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use collector_agent::sinks::duckdb::DuckDbSink;
use collector_agent::sinks::schema::{self, DeadLetter, Prepared, QuarantinedEvent};
use collector_agent::sinks::{
    load_stuck, Load, LoadPipeline, LoadStats, QueryResult, Sink, SinkError, Stuck,
};
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

/// A real DuckDB sink behind refusals the agent cannot classify as the data's: a write
/// holding one of `refused` fails transiently (as an analyst's trigger raising an
/// exception, or a permission refused on one table, would), one holding `panics`
/// panics (a bug an event reaches), `flaky` ids are refused until their first write
/// alone, and `down` refuses every write.
#[derive(Default)]
struct Refusing {
    inner: Option<DuckDbSink>,
    refused: Vec<String>,
    panics: Vec<String>,
    flaky: Mutex<Vec<String>>,
    down: bool,
    writes: Mutex<u32>,
}

#[async_trait]
impl Sink for Refusing {
    fn kind(&self) -> &'static str {
        "refusing"
    }
    async fn write(&self, load: Arc<Prepared>) -> Result<LoadStats, SinkError> {
        *self.writes.lock().unwrap() += 1;
        if self.down {
            return Err(SinkError::Transient("connection refused".into()));
        }
        let ids: Vec<&str> = load.rows.iter().map(|r| r.message_id()).collect();
        if ids.iter().any(|id| self.panics.iter().any(|p| p == id)) {
            panic!("a planted bug");
        }
        if ids.iter().any(|id| self.refused.iter().any(|p| p == id)) {
            return Err(SinkError::Transient("P0001: refused by a trigger".into()));
        }
        {
            let mut flaky = self.flaky.lock().unwrap();
            if let Some(i) = flaky.iter().position(|f| ids.contains(&f.as_str())) {
                if ids.len() == 1 {
                    flaky.remove(i);
                }
                return Err(SinkError::Transient("P0001: refused by a trigger".into()));
            }
        }
        self.inner.as_ref().unwrap().write(load).await
    }
    async fn quarantined(&self, ids: &[String]) -> Result<Vec<QuarantinedEvent>, SinkError> {
        self.inner.as_ref().unwrap().quarantined(ids).await
    }
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, SinkError> {
        self.inner.as_ref().unwrap().dead_letters().await
    }
    async fn query(&self, sql: &str) -> Result<QueryResult, SinkError> {
        self.inner.as_ref().unwrap().query(sql).await
    }
}

fn refusing(dir: &tempfile::TempDir, refused: &[&str]) -> Refusing {
    Refusing {
        inner: Some(DuckDbSink::open(&dir.path().join("w.duckdb")).unwrap()),
        refused: refused.iter().map(|s| s.to_string()).collect(),
        ..Refusing::default()
    }
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("e{i}")).collect()
}

fn prepared(batch_id: i64, ids: &[String]) -> Prepared {
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    schema::prepare(load(batch_id, &ids))
}

/// The quarantine's ids and reasons, in id order (numeric).
async fn quarantine(s: &dyn Sink) -> Vec<(String, String)> {
    let rows = s
        .query("SELECT message_id, reason FROM quarantine ORDER BY length(message_id), message_id")
        .await
        .unwrap()
        .rows;
    rows.into_iter()
        .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap()))
        .collect()
}

// A load that keeps failing with an error no sink calls the data's is written in parts:
// every event the warehouse takes loads, and each it refuses alone (twice) is
// quarantined with the warehouse's words; a panic is quarantined the same way. Far
// fewer writes than one per event, and a redelivery changes nothing.
#[tokio::test]
async fn a_stuck_load_loads_what_the_warehouse_takes_and_quarantines_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let s = Refusing {
        panics: vec!["e31".into()],
        ..refusing(&dir, &["e7", "e23"])
    };
    let all = ids(40);
    let st = load_stuck(&s, prepared(1, &all), false).await.unwrap();
    assert_eq!((st.inserted, st.quarantined), (37, 3), "{st:?}");
    let writes = *s.writes.lock().unwrap();
    assert!(writes < 40, "{writes} writes");
    let q = quarantine(&s).await;
    assert_eq!(
        q.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        vec!["e7", "e23", "e31"]
    );
    for (id, reason) in &q[..2] {
        assert!(
            reason.contains("P0001: refused by a trigger") && reason.contains("alone"),
            "{id}: {reason}"
        );
    }
    assert!(q[2].1.contains("panicked: a planted bug"), "{}", q[2].1);
    assert_eq!(
        one(&s, "SELECT count(*) FROM tracks").await.as_deref(),
        Some("37")
    );
    // Delivered again: all duplicates (a quarantined id counts as known), the
    // quarantine as it was.
    let again = load_stuck(&s, prepared(1, &all), false).await.unwrap();
    assert_eq!((again.inserted, again.duplicates), (0, 40), "{again:?}");
    assert_eq!(quarantine(&s).await, q);
}

// When the warehouse takes no part of the load and has taken no other load meanwhile,
// the error is the warehouse's (down, full, locked), not the events': nothing is
// quarantined, the load fails as before, after one write per part.
#[tokio::test]
async fn a_warehouse_that_refuses_everything_quarantines_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Refusing {
        down: true,
        ..refusing(&dir, &[])
    };
    let err = load_stuck(&s, prepared(1, &ids(40)), false)
        .await
        .unwrap_err();
    assert!(err.retryable(), "{err}");
    assert_eq!(*s.writes.lock().unwrap(), 1 + 14);
    assert!(quarantine(&s).await.is_empty());
    assert_eq!(
        one(&s, "SELECT count(*) FROM tracks").await.as_deref(),
        Some("0")
    );
}

// A load whose every event is refused: its events' fault only when the warehouse took
// other loads (other shards') meanwhile.
#[tokio::test]
async fn a_load_refused_whole_is_quarantined_only_when_others_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let all = ids(5);
    let refused: Vec<&str> = all.iter().map(String::as_str).collect();
    let s = refusing(&dir, &refused);
    let err = load_stuck(&s, prepared(1, &all), false).await.unwrap_err();
    assert!(err.retryable());
    assert!(quarantine(&s).await.is_empty());
    let st = load_stuck(&s, prepared(1, &all), true).await.unwrap();
    assert_eq!((st.inserted, st.quarantined), (0, 5));
    assert_eq!(quarantine(&s).await.len(), 5);
}

// An event refused alone once, but taken the second time, was not refused for what it
// is: it loads.
#[tokio::test]
async fn a_refusal_that_goes_away_is_not_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let s = Refusing {
        flaky: Mutex::new(vec!["e5".into()]),
        ..refusing(&dir, &[])
    };
    let st = load_stuck(&s, prepared(1, &ids(40)), false).await.unwrap();
    assert_eq!((st.inserted, st.quarantined), (40, 0), "{st:?}");
    assert!(quarantine(&s).await.is_empty());
}

// The pipeline says which load failed, and writes only the load holding the stuck batch
// in parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_writes_only_the_stuck_load_in_parts() {
    let dir = tempfile::tempdir().unwrap();
    let s: Arc<Refusing> = Arc::new(refusing(&dir, &["b2"]));
    let mut p = LoadPipeline::new(s.clone());
    p.push(load(1, &["a1"])).await.unwrap();
    p.push(load(2, &["a2", "b2"])).await.unwrap();
    let err = match p.push(load(3, &["a3"])).await {
        Err(e) => e,
        Ok(()) => p.finish().await.unwrap_err(),
    };
    assert!(err.retryable());
    assert_eq!(p.failed_batch(), Some(2));
    assert!(quarantine(&*s).await.is_empty());

    let mut p = LoadPipeline::new(s.clone()).with_stuck(Some(Stuck {
        batch_id: 2,
        others_loaded: false,
    }));
    for (b, ids) in [(1, &["a1"][..]), (2, &["a2", "b2"]), (3, &["a3"])] {
        p.push(load(b, ids)).await.unwrap();
    }
    let st = p.finish().await.unwrap();
    assert_eq!(
        (st.inserted, st.duplicates, st.quarantined),
        (2, 1, 1),
        "{st:?}"
    );
    assert_eq!(
        quarantine(&*s)
            .await
            .iter()
            .map(|q| q.0.as_str())
            .collect::<Vec<_>>(),
        vec!["b2"]
    );
}
