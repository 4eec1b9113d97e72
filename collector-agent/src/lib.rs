//! `collector-agent`: drains the edge's durable queue into the warehouse.
//!
//! The drain loop, per shard: lease sealed batches → decode → load them into the
//! warehouse in one transaction (idempotent by `message_id`) → commit → ack the lease.
//! A crash anywhere before the ack leaves the lease to expire, and the batches come
//! back; loading them again changes nothing. So every event the edge acknowledged lands
//! exactly once.
//!
//! Entry points: [`run`] (the daemon, also used by tests on `127.0.0.1:0`) and
//! [`drain_once`] (drain until the edge is empty, then return).

pub mod admin;
pub mod config;
pub mod edge;
pub mod privacy_cli;
pub mod sinks;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use collector_core::codec::decode_batch;
use collector_core::StoredEvent;
use tokio::sync::watch;

pub use crate::config::AgentConfig;
use crate::edge::{EdgeClient, EdgeError};
use crate::sinks::duckdb::DuckDbSink;
use crate::sinks::{LoadStats, Sink, SinkError};

/// What a drain did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainSummary {
    pub batches: u64,
    pub events: u64,
    pub inserted: u64,
    pub duplicates: u64,
    pub dead_letters: u64,
}

impl DrainSummary {
    fn add(&mut self, o: DrainSummary) {
        self.batches += o.batches;
        self.events += o.events;
        self.inserted += o.inserted;
        self.duplicates += o.duplicates;
        self.dead_letters += o.dead_letters;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error(transparent)]
    Edge(#[from] EdgeError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("warehouse task failed: {0}")]
    Task(String),
}

/// Drains shards from one edge into one sink.
pub struct Drainer {
    client: EdgeClient,
    sink: Arc<Mutex<DuckDbSink>>,
    cfg: AgentConfig,
}

impl Drainer {
    pub fn new(cfg: AgentConfig, sink: Arc<Mutex<DuckDbSink>>) -> anyhow::Result<Drainer> {
        Ok(Drainer {
            client: EdgeClient::new(&cfg)?,
            sink,
            cfg,
        })
    }

    pub fn client(&self) -> &EdgeClient {
        &self.client
    }

    /// Leases once from `shard`, loads what came, acks. Returns the batch count (0 when
    /// the shard had nothing sealed).
    pub async fn drain_round(&self, shard: u32, flush: bool) -> Result<DrainSummary, DrainError> {
        let lease = self
            .client
            .lease(shard, self.cfg.lease_batches, self.cfg.lease_ms, flush)
            .await?;
        if lease.batches.is_empty() {
            return Ok(DrainSummary::default());
        }
        let mut summary = DrainSummary {
            batches: lease.batches.len() as u64,
            ..DrainSummary::default()
        };
        let mut events: Vec<StoredEvent> = Vec::new();
        let mut dead = Vec::new();
        for b in lease.batches {
            match decode_batch(&b.blob) {
                Ok(batch) => events.extend(batch.events),
                Err(e) => {
                    tracing::error!(shard, batch_id = b.batch_id, error = %e, "batch does not decode; dead-lettering it");
                    dead.push((b.batch_id, b.blob, e.to_string()));
                }
            }
        }
        summary.events = events.len() as u64;
        summary.dead_letters = dead.len() as u64;
        let sink = self.sink.clone();
        let stats: LoadStats = tokio::task::spawn_blocking(move || {
            let mut sink = sink
                .lock()
                .map_err(|_| SinkError::Permanent("warehouse lock poisoned".into()))?;
            for (batch_id, blob, err) in &dead {
                sink.dead_letter(shard, *batch_id, blob, err)?;
            }
            sink.load(&events)
        })
        .await
        .map_err(|e| DrainError::Task(e.to_string()))??;
        summary.inserted = stats.inserted;
        summary.duplicates = stats.duplicates;
        // Committed: only now may the edge forget these batches.
        let acked = self.client.ack(shard, &lease.lease_id).await?;
        tracing::info!(
            shard,
            batches = summary.batches,
            inserted = stats.inserted,
            duplicates = stats.duplicates,
            acked,
            "loaded"
        );
        Ok(summary)
    }
}

fn open_sink(cfg: &AgentConfig) -> anyhow::Result<Arc<Mutex<DuckDbSink>>> {
    let sink = DuckDbSink::open(&cfg.warehouse.path)
        .map_err(|e| anyhow::anyhow!("warehouse {}: {e}", cfg.warehouse.path.display()))?;
    Ok(Arc::new(Mutex::new(sink)))
}

/// Drains every shard until none has anything left (sealing open batches first), then
/// returns. Used by `collector-agent run --once` and the tests.
pub async fn drain_once(cfg: &AgentConfig) -> anyhow::Result<DrainSummary> {
    let sink = open_sink(cfg)?;
    let drainer = Drainer::new(cfg.clone(), sink)?;
    let info = drainer.client.info().await?;
    let mut total = DrainSummary::default();
    for shard in 0..info.shards {
        loop {
            let round = drainer.drain_round(shard, true).await?;
            if round.batches == 0 {
                break;
            }
            total.add(round);
        }
    }
    Ok(total)
}

/// The daemon: serves the admin endpoint and drains every shard until `shutdown`
/// resolves, then finishes the batch in hand and returns.
pub async fn run(
    cfg: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let sink = open_sink(&cfg)?;
    let (stop_tx, mut stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let (state, listener) = admin::bind(&cfg.admin_addr).await?;
    let state_path = admin::state_file(&cfg.warehouse.path);
    admin::write_state(&state_path, &state)?;
    tracing::info!(admin = %state.addr, warehouse = %cfg.warehouse.path.display(), "agent started");
    let mut admin_stop = stop_rx.clone();
    let admin_task = tokio::spawn(admin::serve(
        listener,
        sink.clone(),
        state.token.clone(),
        async move {
            let _ = admin_stop.wait_for(|s| *s).await;
        },
    ));

    let drainer = Drainer::new(cfg.clone(), sink)?;
    let poll = Duration::from_millis(cfg.poll_interval_ms);
    let mut backoff = poll;
    let mut shards: Option<u32> = None;
    while !*stop_rx.borrow() {
        let result: Result<u64, DrainError> = async {
            let n = match shards {
                Some(n) => n,
                None => {
                    let n = drainer.client.info().await?.shards;
                    shards = Some(n);
                    n
                }
            };
            let mut batches = 0;
            for shard in 0..n {
                loop {
                    if *stop_rx.borrow() {
                        return Ok(batches);
                    }
                    let round = drainer.drain_round(shard, false).await?;
                    batches += round.batches;
                    if round.batches < u64::from(cfg.lease_batches) {
                        break;
                    }
                }
            }
            Ok(batches)
        }
        .await;
        let pause = match result {
            Ok(0) => {
                backoff = poll;
                poll
            }
            Ok(_) => {
                backoff = poll;
                Duration::ZERO
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "drain round failed");
                shards = None;
                let p = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                p
            }
        };
        if !pause.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop_rx.wait_for(|s| *s) => {}
            }
        }
    }
    let _ = admin_task.await;
    let _ = std::fs::remove_file(&state_path);
    tracing::info!("agent stopped");
    Ok(())
}
