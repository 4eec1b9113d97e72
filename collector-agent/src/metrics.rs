//! The agent's metrics, typed with constant names, served in Prometheus' text format on
//! `metrics_addr` (`GET /metrics`). Recorded by the drain loop; nothing else writes them.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use collector_core::EventKind;

use crate::sinks::{IdleStats, LoadStats};

pub const EVENTS_INSERTED: &str = "collector_agent_events_inserted_total";
pub const EVENTS_DUPLICATE: &str = "collector_agent_events_duplicate_total";
pub const EVENTS_QUARANTINED: &str = "collector_agent_events_quarantined_total";
pub const BATCHES_LOADED: &str = "collector_agent_batches_loaded_total";
pub const BATCHES_DEAD_LETTERED: &str = "collector_agent_batches_dead_lettered_total";
pub const EVENTS_SUPPRESSED: &str = "collector_agent_events_suppressed_total";
pub const DRAIN_FAILURES: &str = "collector_agent_drain_failures_total";
pub const LOAD_SECONDS: &str = "collector_agent_load_seconds";
pub const LAST_LOAD: &str = "collector_agent_last_load_timestamp_seconds";
pub const LAKE_COMPACTIONS: &str = "collector_agent_lake_compactions_total";
pub const LAKE_FILES_MERGED: &str = "collector_agent_lake_files_merged_total";
pub const LAKE_FILES_WRITTEN: &str = "collector_agent_lake_files_written_total";
pub const LAKE_COMPACTION_FAILURES: &str = "collector_agent_lake_compaction_failures_total";

/// Upper bounds of the load-latency histogram, in seconds.
const BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Debug, Default)]
pub struct Metrics {
    /// By table, in `EventKind::ALL` order.
    inserted: [AtomicU64; 6],
    duplicates: AtomicU64,
    quarantined: AtomicU64,
    batches: AtomicU64,
    dead_letters: AtomicU64,
    suppressed: AtomicU64,
    last_load_unix_ms: AtomicU64,
    /// The lake's compactions: partitions, files merged, files written, failures.
    compactions: [AtomicU64; 4],
    failures: Mutex<BTreeMap<&'static str, u64>>,
    /// Counts per bucket (the last is +Inf), sum of seconds in microseconds, count.
    latency: Mutex<([u64; BUCKETS.len() + 1], u64, u64)>,
}

impl Metrics {
    /// One committed load of `batches` batches that took `took`.
    pub fn loaded(&self, batches: u64, stats: &LoadStats, took: Duration) {
        for (a, n) in self.inserted.iter().zip(stats.by_table) {
            a.fetch_add(n, Ordering::Relaxed);
        }
        self.duplicates
            .fetch_add(stats.duplicates, Ordering::Relaxed);
        self.quarantined
            .fetch_add(stats.quarantined, Ordering::Relaxed);
        self.batches.fetch_add(batches, Ordering::Relaxed);
        self.dead_letters
            .fetch_add(stats.dead_letters, Ordering::Relaxed);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.last_load_unix_ms.store(now_ms, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        if let Ok(mut h) = self.latency.lock() {
            let i = BUCKETS
                .iter()
                .position(|b| secs <= *b)
                .unwrap_or(BUCKETS.len());
            h.0[i] += 1;
            h.1 += took.as_micros() as u64;
            h.2 += 1;
        }
    }

    /// An idle moment's upkeep (the lake's compaction).
    pub fn idled(&self, stats: &IdleStats) {
        let n = [
            stats.compactions,
            stats.files_merged,
            stats.files_written,
            u64::from(stats.compaction_failed),
        ];
        for (a, n) in self.compactions.iter().zip(n) {
            a.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Queued events of suppressed people dropped at drain.
    pub fn suppressed(&self, n: u64) {
        self.suppressed.fetch_add(n, Ordering::Relaxed);
    }

    /// A failed drain round, by reason (`edge`, `warehouse_transient`, …).
    pub fn failed(&self, reason: &'static str) {
        if let Ok(mut f) = self.failures.lock() {
            *f.entry(reason).or_default() += 1;
        }
    }

    /// Prometheus' text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP {EVENTS_INSERTED} Events written to the warehouse, by table (a track is also in its per-event table).\n# TYPE {EVENTS_INSERTED} counter"
        );
        for (kind, n) in EventKind::ALL.iter().zip(&self.inserted) {
            let _ = writeln!(
                out,
                "{EVENTS_INSERTED}{{table=\"{}\"}} {}",
                kind.table(),
                get(n)
            );
        }
        counter(
            &mut out,
            EVENTS_DUPLICATE,
            "Events skipped because their message_id was already loaded.",
            get(&self.duplicates),
        );
        counter(
            &mut out,
            EVENTS_QUARANTINED,
            "Events the warehouse refused, kept in quarantine.",
            get(&self.quarantined),
        );
        counter(
            &mut out,
            BATCHES_LOADED,
            "Leased batches committed and acked.",
            get(&self.batches),
        );
        counter(
            &mut out,
            BATCHES_DEAD_LETTERED,
            "Batches that did not decode, kept as dead letters.",
            get(&self.dead_letters),
        );
        counter(
            &mut out,
            EVENTS_SUPPRESSED,
            "Queued events of suppressed people (privacy requests) dropped at drain, not loaded.",
            get(&self.suppressed),
        );
        for (name, help, a) in [
            (LAKE_COMPACTIONS, "Partitions of the Parquet lake whose small files were compacted.", &self.compactions[0]),
            (LAKE_FILES_MERGED, "Small files of the Parquet lake merged by compactions.", &self.compactions[1]),
            (LAKE_FILES_WRITTEN, "Files the Parquet lake's compactions wrote in their place.", &self.compactions[2]),
            (LAKE_COMPACTION_FAILURES, "Compactions of the Parquet lake that failed (tried again when the agent next idles).", &self.compactions[3]),
        ] {
            counter(&mut out, name, help, get(a));
        }
        let _ = writeln!(out, "# HELP {DRAIN_FAILURES} Failed drain rounds by reason.\n# TYPE {DRAIN_FAILURES} counter");
        if let Ok(f) = self.failures.lock() {
            for (reason, n) in f.iter() {
                let _ = writeln!(out, "{DRAIN_FAILURES}{{reason=\"{reason}\"}} {n}");
            }
        }
        let last = get(&self.last_load_unix_ms);
        let _ = writeln!(
            out,
            "# HELP {LAST_LOAD} When the last load committed (0: none yet).\n# TYPE {LAST_LOAD} gauge\n{LAST_LOAD} {}",
            last as f64 / 1000.0
        );
        let _ = writeln!(out, "# HELP {LOAD_SECONDS} Time to load one lease into the warehouse.\n# TYPE {LOAD_SECONDS} histogram");
        if let Ok(h) = self.latency.lock() {
            let mut cumulative = 0;
            for (i, bound) in BUCKETS.iter().enumerate() {
                cumulative += h.0[i];
                let _ = writeln!(out, "{LOAD_SECONDS}_bucket{{le=\"{bound}\"}} {cumulative}");
            }
            cumulative += h.0[BUCKETS.len()];
            let _ = writeln!(out, "{LOAD_SECONDS}_bucket{{le=\"+Inf\"}} {cumulative}");
            let _ = writeln!(out, "{LOAD_SECONDS}_sum {}", h.1 as f64 / 1e6);
            let _ = writeln!(out, "{LOAD_SECONDS}_count {}", h.2);
        }
        out
    }
}

/// Serves `GET /metrics` on `addr` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move { ([("content-type", "text/plain; version=0.0.4")], m.render()) }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_failures_and_a_cumulative_histogram() {
        let m = Metrics::default();
        let mut stats = LoadStats {
            duplicates: 2,
            quarantined: 1,
            ..LoadStats::default()
        };
        stats.inserted_into(EventKind::Track, 5);
        stats.inserted_into(EventKind::Identify, 2);
        m.loaded(3, &stats, Duration::from_millis(30));
        m.loaded(1, &stats, Duration::from_secs(20));
        m.failed("edge");
        m.failed("edge");
        m.idled(&IdleStats {
            compactions: 2,
            files_merged: 70,
            files_written: 2,
            compaction_failed: false,
        });
        m.idled(&IdleStats {
            compaction_failed: true,
            ..IdleStats::default()
        });
        let text = m.render();
        assert!(text.contains("collector_agent_lake_compactions_total 2\n"));
        assert!(text.contains("collector_agent_lake_files_merged_total 70\n"));
        assert!(text.contains("collector_agent_lake_files_written_total 2\n"));
        assert!(text.contains("collector_agent_lake_compaction_failures_total 1\n"));
        assert!(
            text.contains("collector_agent_events_inserted_total{table=\"tracks\"} 10\n"),
            "{text}"
        );
        assert!(text.contains("collector_agent_events_inserted_total{table=\"identifies\"} 4\n"));
        assert!(text.contains("collector_agent_events_inserted_total{table=\"pages\"} 0\n"));
        assert!(text.contains("collector_agent_batches_loaded_total 4\n"));
        assert!(text.contains("collector_agent_drain_failures_total{reason=\"edge\"} 2\n"));
        assert!(text.contains("collector_agent_load_seconds_bucket{le=\"0.05\"} 1\n"));
        assert!(text.contains("collector_agent_load_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("collector_agent_load_seconds_count 2\n"));
    }
}
