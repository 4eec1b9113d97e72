//! `collector-agent`: drains the edge's durable queue into the warehouse.
//!
//! The drain loop, per shard: lease sealed batches → decode → load them into the
//! warehouse in one transaction (idempotent by `message_id`) → commit → ack the lease.
//! A crash anywhere before the ack leaves the lease to expire, and the batches come
//! back; loading them again changes nothing. So every event the edge acknowledged lands
//! exactly once. The next lease is taken while a full one loads (`HeldLease`), so
//! the edge's round trip is off the loop.
//!
//! Entry points: [`run`] (the daemon, also used by tests on `127.0.0.1:0`) and
//! [`drain_once`] (drain until the edge is empty, then return).

pub mod admin;
pub mod audiences;
pub mod config;
pub mod dashboard;
pub mod destinations;
pub mod edge;
pub mod identity;
pub mod memory;
pub mod metrics;
pub mod privacy;
pub mod privacy_cli;
pub mod sinks;
pub mod status;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use collector_core::codec::{decode_batch, Lease, BATCH_VERSION};
use collector_core::drain::{DrainInfo, Formats};
use collector_core::CodecError;
use tokio::sync::watch;

pub use crate::config::AgentConfig;
use crate::edge::{EdgeClient, EdgeError};
use crate::sinks::{Load, LoadBatch, LoadPipeline, LoadStats, Sink, SinkError};

/// What a drain did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainSummary {
    pub batches: u64,
    pub events: u64,
    pub inserted: u64,
    pub duplicates: u64,
    pub quarantined: u64,
    pub dead_letters: u64,
    /// Queued events of suppressed people, dropped (and acked) instead of loaded.
    pub suppressed: u64,
}

impl DrainSummary {
    fn add(&mut self, o: DrainSummary) {
        self.suppressed += o.suppressed;
        self.batches += o.batches;
        self.events += o.events;
        self.inserted += o.inserted;
        self.duplicates += o.duplicates;
        self.quarantined += o.quarantined;
        self.dead_letters += o.dead_letters;
    }
}

/// The most events one sink load takes: a lease is loaded in loads of about this many
/// (whole batches), so memory is bounded by a load, whatever `lease_batches` is.
pub const MAX_EVENTS_PER_LOAD: usize = 5_000;

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error(transparent)]
    Edge(#[from] EdgeError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("warehouse task failed: {0}")]
    Task(String),
    #[error("shard {shard} sent a batch in a format this agent cannot read ({error}); upgrade the agent")]
    NewerFormat { shard: u32, error: String },
    #[error("the edge writes formats {0:?}, newer than this agent reads; upgrade the agent")]
    EdgeTooNew(Formats),
}

impl DrainError {
    /// Whether trying again later can help (the edge or the warehouse is unreachable
    /// or busy), as opposed to a fault an operator must fix (a newer format, a bad
    /// answer); the loop retries both, but says which it is.
    pub fn retryable(&self) -> bool {
        match self {
            DrainError::Edge(e) => e.retryable(),
            DrainError::Sink(e) => e.retryable(),
            DrainError::Task(_) => true,
            DrainError::NewerFormat { .. } | DrainError::EdgeTooNew(_) => false,
        }
    }
}

/// A lease this agent holds: renewed every third of its length, so a large load
/// never outlives it and its batches are not handed to another agent, until it is
/// acked, given back after a failed load ([`HeldLease::give_back`]), or dropped.
struct HeldLease {
    lease: Lease,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

impl HeldLease {
    async fn take(
        client: EdgeClient,
        metrics: Arc<metrics::Metrics>,
        shard: u32,
        max_batches: u32,
        lease_ms: u64,
        flush: bool,
    ) -> Result<HeldLease, DrainError> {
        let mut lease = match client.lease(shard, max_batches, lease_ms, flush).await {
            Ok(l) => l,
            Err(e) => {
                metrics.failed("edge");
                return Err(e.into());
            }
        };
        if lease.batches.is_empty() {
            // Nothing is held: nothing to renew, ack or give back.
            lease.lease_id.clear();
            return Ok(HeldLease {
                lease,
                renewer: None,
            });
        }
        let lease_id = lease.lease_id.clone();
        let renewer = tokio::spawn(async move {
            let every = Duration::from_millis((lease_ms / 3).max(100));
            loop {
                tokio::time::sleep(every).await;
                match client.renew(shard, &lease_id, lease_ms).await {
                    Ok(0) => tracing::warn!(
                        shard,
                        "lease expired before it could be renewed; the load stays idempotent"
                    ),
                    Ok(_) => tracing::debug!(shard, "lease renewed"),
                    Err(e) => tracing::warn!(shard, error = %e, "lease renewal failed"),
                }
            }
        });
        Ok(HeldLease {
            lease,
            renewer: Some(renewer),
        })
    }

    /// Hands a lease that will not be loaded now back to the edge: shortened to the
    /// least length, its batches go out again in a second instead of `lease_ms`, so
    /// the retry after a failed load finds them (best effort: otherwise it expires).
    async fn give_back(mut self, client: &EdgeClient, shard: u32) {
        self.stop_renewing();
        if self.lease.lease_id.is_empty() {
            return;
        }
        let least = collector_core::drain::MIN_LEASE_MS as u64;
        match client.renew(shard, &self.lease.lease_id, least).await {
            Ok(n) => tracing::debug!(shard, batches = n, "lease given back"),
            Err(e) => {
                tracing::debug!(shard, error = %e, "lease not given back; it expires instead")
            }
        }
    }

    fn stop_renewing(&mut self) {
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        self.stop_renewing();
    }
}

/// Drains shards from one edge into one sink.
pub struct Drainer {
    client: EdgeClient,
    sink: Arc<dyn Sink>,
    audiences: Vec<audiences::Audience>,
    /// `[identity]` with the edge policy's block list.
    identity: identity::IdentityConfig,
    /// Each destination with the consent categories `privacy.toml` requires for it.
    destinations: Vec<(
        destinations::DestinationConfig,
        Box<dyn destinations::Destination>,
        Vec<String>,
    )>,
    /// Opens sealed contact fields (`seal_key_env`), when configured.
    contacts: Option<destinations::Contacts>,
    cfg: AgentConfig,
    metrics: Arc<metrics::Metrics>,
    /// The edge's suppression list (digests), refreshed every pass: queued
    /// events of these people are dropped at drain.
    suppressed: std::sync::RwLock<Arc<std::collections::HashSet<String>>>,
    /// Per shard, the load that has failed transiently since when (see
    /// `stuck_quarantine_after_ms`).
    stuck: std::sync::Mutex<std::collections::HashMap<u32, Failing>>,
    /// Leases committed with new rows, by any shard: whether the warehouse took other
    /// events while a shard's load kept failing.
    committed: std::sync::atomic::AtomicU64,
    /// The last identity run after a load failed: people are behind the events until a
    /// run succeeds, which the daemon also tries on the audience schedule (nothing may
    /// load for hours).
    identity_stale: std::sync::atomic::AtomicBool,
}

/// A shard's load that keeps failing transiently.
#[derive(Debug, Clone, Copy)]
struct Failing {
    batch_id: i64,
    since: std::time::Instant,
    /// [`Drainer::committed`] when it began to fail.
    committed: u64,
}

impl Drainer {
    pub fn new(cfg: AgentConfig, sink: Arc<dyn Sink>) -> anyhow::Result<Drainer> {
        Drainer::with_metrics(cfg, sink, Arc::default())
    }

    /// [`Drainer::new`], counting into `metrics` (the daemon's, served before the
    /// warehouse is open).
    pub fn with_metrics(
        cfg: AgentConfig,
        sink: Arc<dyn Sink>,
        metrics: Arc<metrics::Metrics>,
    ) -> anyhow::Result<Drainer> {
        let policy = if cfg.destinations.is_empty() {
            None
        } else {
            cfg.policy()?
        };
        let mut dests = Vec::new();
        for d in &cfg.destinations {
            // Deny by default: `config check` refuses a destination the policy does not
            // name; were one to slip through, it needs every category there is.
            let categories = policy
                .as_ref()
                .and_then(|p| p.destinations.get(&d.name).cloned())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "destinations.{}: privacy.toml has no [destinations.{}]",
                        d.name,
                        d.name
                    )
                })?;
            dests.push((d.clone(), destinations::open(d)?, categories));
        }
        Ok(Drainer {
            client: EdgeClient::new(&cfg)?,
            sink,
            audiences: cfg.load_audiences()?,
            identity: cfg.identity_config()?,
            destinations: dests,
            contacts: cfg.contacts()?,
            cfg,
            metrics,
            suppressed: Default::default(),
            stuck: Default::default(),
            committed: Default::default(),
            identity_stale: Default::default(),
        })
    }

    /// Reads the edge's suppression list into this agent's copy (kept as it was when
    /// the edge cannot be reached).
    pub async fn refresh_suppressions(&self) -> Result<usize, DrainError> {
        let set: std::collections::HashSet<String> =
            self.client.suppressions().await?.into_iter().collect();
        let n = set.len();
        *self.suppressed.write().expect("suppression lock") = Arc::new(set);
        Ok(n)
    }

    /// Adds ids to (or removes them from) this agent's copy of the suppression list.
    pub fn note_suppressed(&self, ids: &[collector_core::drain::SuppressedId], add: bool) {
        let mut guard = self.suppressed.write().expect("suppression lock");
        let mut set = (**guard).clone();
        for id in ids {
            if add {
                set.insert(id.digest());
            } else {
                set.remove(&id.digest());
            }
        }
        *guard = Arc::new(set);
    }

    /// Carries out the privacy requests not finished yet (SQL warehouses only; see
    /// [`privacy`]). Runs between drain passes, never during a load. Returns how many
    /// requests it worked on.
    pub async fn privacy_pass(&self, now_ms: i64) -> Result<usize, SinkError> {
        let pending = {
            let Some(mut session) = self.sink.privacy_session().await? else {
                return Ok(0);
            };
            privacy::pending(&mut *session).await?
        };
        if pending.is_empty() {
            return Ok(0);
        }
        // Erasure reads the identity graph: bring it up to date with what was loaded
        // (in a session of its own: one session at a time).
        if pending.iter().any(|r| r.kind == privacy::Kind::Erase) {
            self.resolve_identity().await?;
        }
        let Some(mut session) = self.sink.privacy_session().await? else {
            return Ok(0);
        };
        let on_suppress =
            |ids: &[collector_core::drain::SuppressedId], add: bool| self.note_suppressed(ids, add);
        let ctx = privacy::erase::Context {
            edge: &self.client,
            destinations: self
                .destinations
                .iter()
                .map(|(c, d, _)| (c, d.as_ref()))
                .collect(),
            contacts: self.contacts.as_ref(),
            on_suppress: &on_suppress,
            sink: &*self.sink,
        };
        for r in &pending {
            if let Err(e) = privacy::process(&mut *session, &ctx, r, now_ms).await {
                tracing::warn!(request = %r.id, error = %e, "privacy request failed this pass; retried at the next");
                continue;
            }
            if let Ok(Some(after)) = privacy::get(&mut *session, &r.id).await {
                tracing::info!(request = %r.id, kind = r.kind.as_str(), status = %after.status, "privacy request");
            }
        }
        Ok(pending.len())
    }

    /// Records the policy in force (`privacy`) once per version, for the consent
    /// dashboard's history (SQL warehouses only).
    pub async fn record_policy(&self, now_ms: i64) -> anyhow::Result<()> {
        let Some(path) = &self.cfg.privacy else {
            return Ok(());
        };
        let Some(policy) = self.cfg.policy()? else {
            return Ok(());
        };
        let text = std::fs::read_to_string(path)?;
        let Some(mut session) = self.sink.session().await? else {
            return Ok(());
        };
        if session.dialect().relational().is_none() {
            return Ok(());
        }
        privacy::record_policy(&mut *session, &policy.version, &text, now_ms).await?;
        Ok(())
    }

    /// Whether an event belongs to a suppressed person.
    fn drop_suppressed(&self, events: &mut Vec<collector_core::StoredEvent>) -> u64 {
        let list = self.suppressed.read().expect("suppression lock").clone();
        if list.is_empty() {
            return 0;
        }
        let before = events.len();
        events.retain(|e| {
            !collector_core::drain::is_suppressed(
                e.user_id.as_deref(),
                e.anonymous_id.as_deref(),
                |k| list.contains(k),
            )
        });
        (before - events.len()) as u64
    }

    pub fn client(&self) -> &EdgeClient {
        &self.client
    }

    pub fn metrics(&self) -> Arc<metrics::Metrics> {
        self.metrics.clone()
    }

    /// `/drain/info`, refusing an edge whose formats this agent cannot read (before it
    /// leases anything, so nothing is dead-lettered for being new).
    pub async fn info(&self) -> Result<DrainInfo, DrainError> {
        let info = self.client.info().await?;
        if !info.formats.readable() {
            return Err(DrainError::EdgeTooNew(info.formats));
        }
        Ok(info)
    }

    /// Leases once from `shard`: the lease is renewed from now until it is dropped.
    /// Borrows nothing of `self`, so it can run as a task beside a load.
    fn take_lease(
        &self,
        shard: u32,
        flush: bool,
    ) -> impl Future<Output = Result<HeldLease, DrainError>> + Send + 'static {
        HeldLease::take(
            self.client.clone(),
            self.metrics.clone(),
            shard,
            self.cfg.lease_batches,
            self.cfg.lease_ms,
            flush,
        )
    }

    /// Loads what a lease brought (events, quarantined events and dead letters, in
    /// loads of one transaction each), and acks it. Returns the batch count (0 when
    /// the shard had nothing sealed).
    async fn drain_round(
        &self,
        shard: u32,
        mut held: HeldLease,
    ) -> Result<DrainSummary, DrainError> {
        let batches = std::mem::take(&mut held.lease.batches);
        if batches.is_empty() {
            return Ok(DrainSummary::default());
        }
        let mut summary = DrainSummary {
            batches: batches.len() as u64,
            ..DrainSummary::default()
        };
        let started = std::time::Instant::now();
        let loaded = self.load_lease(shard, batches, &mut summary).await;
        held.stop_renewing();
        let stats: LoadStats = match loaded {
            Ok(s) => s,
            Err((e, failed_batch)) => {
                held.give_back(&self.client, shard).await;
                if let (DrainError::Sink(SinkError::Transient(_)), Some(b)) = (&e, failed_batch) {
                    self.note_failing(shard, b);
                }
                if let DrainError::Sink(e) = &e {
                    self.metrics.failed(if e.retryable() {
                        "warehouse_transient"
                    } else {
                        "warehouse_permanent"
                    });
                }
                return Err(e);
            }
        };
        let took = started.elapsed();
        summary.inserted = stats.inserted;
        summary.duplicates = stats.duplicates;
        summary.quarantined = stats.quarantined;
        summary.dead_letters = stats.dead_letters;
        // Committed: only now may the edge forget these batches.
        let acked = match self.client.ack(shard, &held.lease.lease_id).await {
            Ok(n) => n,
            Err(e) => {
                self.metrics.failed("ack");
                return Err(e.into());
            }
        };
        self.stuck.lock().expect("stuck lock").remove(&shard);
        if stats.inserted > 0 {
            self.committed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.metrics.loaded(summary.batches, &stats, took);
        tracing::info!(
            shard,
            batches = summary.batches,
            inserted = stats.inserted,
            duplicates = stats.duplicates,
            quarantined = stats.quarantined,
            dead_letters = stats.dead_letters,
            acked,
            "loaded"
        );
        Ok(summary)
    }

    /// Decodes and loads a lease's batches in loads of at most [`MAX_EVENTS_PER_LOAD`]
    /// events (a batch is never split), so the agent's memory is bounded by one load,
    /// not by the lease. Each load is idempotent, so a lease that fails halfway (or
    /// meets a batch in a newer format) is simply loaded again later: what was
    /// committed comes back as duplicates. The caller acks only after all of it.
    /// On an error, the first batch of the load that failed (when a write failed).
    async fn load_lease(
        &self,
        shard: u32,
        batches: Vec<collector_core::codec::LeasedBatch>,
        summary: &mut DrainSummary,
    ) -> Result<LoadStats, (DrainError, Option<i64>)> {
        // Decoding and preparing the next load overlap the write of the one before.
        let mut pipeline = LoadPipeline::new(self.sink.clone()).with_stuck(self.stuck(shard));
        let out = self
            .push_lease(shard, batches, summary, &mut pipeline)
            .await;
        out.map_err(|e| (e, pipeline.failed_batch()))
    }

    async fn push_lease(
        &self,
        shard: u32,
        batches: Vec<collector_core::codec::LeasedBatch>,
        summary: &mut DrainSummary,
        pipeline: &mut LoadPipeline,
    ) -> Result<LoadStats, DrainError> {
        let mut load = Load {
            shard,
            batches: Vec::new(),
        };
        let mut events = 0usize;
        let n = batches.len();
        for (i, b) in batches.into_iter().enumerate() {
            match decode_batch(&b.blob) {
                Ok(mut batch) => {
                    let dropped = self.drop_suppressed(&mut batch.events);
                    if dropped > 0 {
                        summary.suppressed += dropped;
                        self.metrics.suppressed(dropped);
                        tracing::info!(
                            shard,
                            batch_id = b.batch_id,
                            dropped,
                            "queued events of suppressed people dropped at drain"
                        );
                    }
                    summary.events += batch.events.len() as u64;
                    events += batch.events.len();
                    load.batches.push(LoadBatch::Decoded {
                        batch_id: b.batch_id,
                        events: batch.events,
                    });
                }
                // A newer edge: do not ack, do not dead-letter; this agent must be upgraded
                // (what was pushed is written first, and comes back as duplicates).
                Err(e @ CodecError::UnsupportedVersion(v)) if v > BATCH_VERSION => {
                    pipeline.finish().await.map_err(DrainError::Sink)?;
                    return Err(DrainError::NewerFormat {
                        shard,
                        error: e.to_string(),
                    });
                }
                Err(e) => {
                    tracing::error!(shard, batch_id = b.batch_id, error = %e, "batch does not decode; dead-lettering it");
                    load.batches.push(LoadBatch::Undecodable {
                        batch_id: b.batch_id,
                        blob: b.blob,
                        error: e.to_string(),
                    });
                }
            }
            if events >= MAX_EVENTS_PER_LOAD || i + 1 == n {
                let full = std::mem::replace(
                    &mut load,
                    Load {
                        shard,
                        batches: Vec::new(),
                    },
                );
                pipeline.push(full).await.map_err(DrainError::Sink)?;
                events = 0;
            }
        }
        pipeline.finish().await.map_err(DrainError::Sink)
    }

    /// Records that `shard`'s load holding `batch_id` failed transiently (since when it
    /// has been failing).
    fn note_failing(&self, shard: u32, batch_id: i64) {
        let mut stuck = self.stuck.lock().expect("stuck lock");
        let known = stuck.get(&shard).is_some_and(|f| f.batch_id == batch_id);
        if !known {
            stuck.insert(
                shard,
                Failing {
                    batch_id,
                    since: std::time::Instant::now(),
                    committed: self.committed.load(std::sync::atomic::Ordering::Relaxed),
                },
            );
        }
    }

    /// `shard`'s load that has failed for `stuck_quarantine_after_ms` or longer.
    fn stuck(&self, shard: u32) -> Option<sinks::Stuck> {
        let after = self.cfg.stuck_quarantine_after_ms;
        if after == 0 {
            return None;
        }
        let f = *self.stuck.lock().expect("stuck lock").get(&shard)?;
        (f.since.elapsed() >= Duration::from_millis(after)).then(|| sinks::Stuck {
            batch_id: f.batch_id,
            others_loaded: self.committed.load(std::sync::atomic::Ordering::Relaxed) > f.committed,
        })
    }

    /// Drains one shard until it has nothing sealed left (or `max_rounds` rounds).
    async fn drain_shard(
        &self,
        shard: u32,
        flush: bool,
        stop: &watch::Receiver<bool>,
    ) -> Result<DrainSummary, DrainError> {
        let mut total = DrainSummary::default();
        // The next lease is asked for while this one loads (when this one came full,
        // so more is likely waiting), which takes the edge's round trip out of the
        // loop. A lease in hand is loaded even after a stop is asked for, so a stop
        // leaves nothing leased; after a failed load it is given back with the failed
        // lease's own.
        let mut ahead: Option<tokio::task::JoinHandle<Result<HeldLease, DrainError>>> = None;
        loop {
            let held = match ahead.take() {
                Some(next) => next
                    .await
                    .map_err(|e| DrainError::Edge(EdgeError::Task(e.to_string())))??,
                None if *stop.borrow() => return Ok(total),
                None => self.take_lease(shard, flush).await?,
            };
            let full = held.lease.batches.len() >= self.cfg.lease_batches as usize;
            if full && !*stop.borrow() {
                ahead = Some(tokio::spawn(self.take_lease(shard, flush)));
            }
            match self.drain_round(shard, held).await {
                Ok(round) => total.add(round),
                Err(e) => {
                    // The lease taken ahead was never loaded: it goes back too.
                    if let Some(Ok(Ok(next))) = match ahead.take() {
                        Some(next) => Some(next.await),
                        None => None,
                    } {
                        next.give_back(&self.client, shard).await;
                    }
                    return Err(e);
                }
            }
            if !full {
                return Ok(total);
            }
        }
    }

    /// One pass over every shard. A shard that fails (the warehouse is down, the edge
    /// answered an error) is logged and left for the next pass; it never keeps the
    /// shards after it from draining. Returns the summary and the errors by shard.
    pub async fn drain_all(
        &self,
        shards: u32,
        flush: bool,
        stop: &watch::Receiver<bool>,
    ) -> (DrainSummary, Vec<(u32, DrainError)>) {
        let mut total = DrainSummary::default();
        let mut errors = Vec::new();
        if let Err(e) = self.refresh_suppressions().await {
            tracing::warn!(error = %e, "could not read the edge's suppression list; using the last one");
        }
        if let Err(e) = self.privacy_pass(now_ms()).await {
            tracing::warn!(error = %e, "privacy requests could not be read; retried at the next pass");
        }
        for shard in 0..shards {
            match self.drain_shard(shard, flush, stop).await {
                Ok(s) => total.add(s),
                Err(e) => {
                    tracing::warn!(shard, error = %e, "draining shard failed; continuing with the other shards");
                    errors.push((shard, e));
                }
            }
        }
        if total.inserted > 0 {
            // People are resolved after every round that loaded something; a run that
            // fails is simply done again after the next (it is idempotent). A transient
            // failure is tried once more at once: an embedded warehouse that ran out of
            // memory has just raised its limit, and nothing may load for a while.
            let mut resolved = self.resolve_identity().await;
            if let Err(e) = &resolved {
                if e.retryable() {
                    tracing::info!(error = %e, "identity resolution failed; trying once more now");
                    resolved = self.resolve_identity().await;
                }
            }
            self.identity_stale
                .store(resolved.is_err(), std::sync::atomic::Ordering::Relaxed);
            if let Err(e) = resolved {
                tracing::warn!(error = %e, "identity resolution failed; retried after the next load or on the audience schedule");
            } else if let Err(e) = self.evaluate_audiences(now_ms()).await {
                tracing::warn!(error = %e, "audience evaluation failed; retried on schedule");
            } else if let Err(e) = self.activate(now_ms()).await {
                tracing::warn!(error = %e, "activation failed; retried on schedule");
            }
        }
        (total, errors)
    }

    /// Resolves identity again if the last run after a load failed (see
    /// `identity_stale`); whether people are up to date now.
    pub async fn retry_stale_identity(&self) -> bool {
        use std::sync::atomic::Ordering;
        if !self.identity_stale.load(Ordering::Relaxed) {
            return true;
        }
        match self.resolve_identity().await {
            Ok(_) => {
                self.identity_stale.store(false, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "identity resolution failed again; retried on schedule");
                false
            }
        }
    }

    /// Evaluates the audiences at `now_ms` (SQL sinks only; nothing without audiences
    /// or with `[identity] enabled = false`).
    pub async fn evaluate_audiences(
        &self,
        now_ms: i64,
    ) -> Result<Vec<audiences::Evaluation>, SinkError> {
        if self.audiences.is_empty() || !self.identity.enabled {
            return Ok(Vec::new());
        }
        let Some(mut session) = self.sink.session().await? else {
            return Ok(Vec::new());
        };
        let out = audiences::evaluate(&mut *session, &self.audiences, now_ms).await?;
        for e in &out {
            if e.entered > 0 || e.exited > 0 {
                tracing::info!(audience = %e.audience, members = e.members, entered = e.entered, exited = e.exited, "audience changed");
            }
        }
        Ok(out)
    }

    /// Syncs every destination at `now_ms`: enqueues entries, exits and events, sends
    /// what is due (consent checked per attempt). Nothing with `[identity] enabled =
    /// false`: the agent that computes people sends to their destinations.
    pub async fn activate(
        &self,
        now_ms: i64,
    ) -> Result<Vec<(String, destinations::sync::SyncStats)>, SinkError> {
        let mut out = Vec::new();
        if !self.identity.enabled || self.destinations.is_empty() {
            return Ok(out);
        }
        let Some(mut session) = self.sink.session().await? else {
            return Ok(out);
        };
        for (cfg, dest, categories) in &self.destinations {
            let target = destinations::sync::Target {
                cfg,
                dest: dest.as_ref(),
                categories,
                contacts: self.contacts.as_ref(),
            };
            let st = destinations::sync::sync(&mut *session, &target, now_ms).await?;
            if st != destinations::sync::SyncStats::default() {
                tracing::info!(destination = %cfg.name, enqueued = st.enqueued, sent = st.sent, withheld = st.withheld, retried = st.retried, dead = st.dead, "destination synced");
            }
            out.push((cfg.name.clone(), st));
        }
        Ok(out)
    }

    /// What the next sync of destination `name` would do at `now_ms` (nothing is sent
    /// or written).
    pub async fn dry_run(
        &self,
        name: &str,
        now_ms: i64,
    ) -> Result<destinations::sync::DryRun, SinkError> {
        let Some((cfg, dest, categories)) = self.destinations.iter().find(|d| d.0.name == name)
        else {
            return Err(SinkError::Permanent(format!("no destination {name:?}")));
        };
        let Some(mut session) = self.sink.session().await? else {
            return Err(SinkError::Permanent("no SQL warehouse".into()));
        };
        let target = destinations::sync::Target {
            cfg,
            dest: dest.as_ref(),
            categories,
            contacts: self.contacts.as_ref(),
        };
        destinations::sync::dry_run(&mut *session, &target, now_ms).await
    }

    /// Tells the warehouse the agent has nothing to load for now ([`Sink::idle`]): an
    /// embedded DuckDB gives back the memory it keeps only to go faster, and a lake
    /// compacts its small files (it logs its own failures). A failure is
    /// logged, never fatal (the next load opens the warehouse again if it must).
    pub async fn idle(&self, why: sinks::Idle) {
        match self.sink.idle(why).await {
            Ok(stats) => self.metrics.idled(&stats),
            Err(e) => {
                tracing::warn!(error = %e, "the warehouse could not give its memory back while idle")
            }
        }
    }

    /// Resolves identity and profiles in the warehouse (SQL sinks only).
    /// `None` when the warehouse has no SQL or `[identity] enabled = false`.
    pub async fn resolve_identity(&self) -> Result<Option<identity::IdentityStats>, SinkError> {
        if !self.identity.enabled {
            return Ok(None);
        }
        let Some(mut session) = self.sink.session().await? else {
            return Ok(None);
        };
        let stats = identity::run(&mut *session, &self.identity).await?;
        tracing::info!(
            new_edges = stats.new_edges,
            region_ids = stats.region_ids,
            passes = stats.passes,
            merges = stats.merges,
            refused = stats.refused,
            profiles = stats.profiles,
            "identity resolved"
        );
        Ok(Some(stats))
    }
}

async fn open_sink(cfg: &AgentConfig) -> anyhow::Result<Arc<dyn Sink>> {
    sinks::open(&cfg.warehouse)
        .await
        .map_err(|e| anyhow::anyhow!("warehouse: {e}"))
}

/// Opens the warehouse for the daemon. A warehouse that cannot be opened yet (a
/// transient error: the database starts after the agent or is down, the DuckDB file is
/// held by another process, the disk is full) is waited for, with the drain's backoff,
/// while the edge keeps spooling (each attempt counts as a `warehouse_transient`
/// failure in `/metrics`); a permanent error (a setting the warehouse refuses) ends the
/// agent at once. `None` when `stop` came first.
async fn open_sink_waiting(
    cfg: &AgentConfig,
    stop: &mut watch::Receiver<bool>,
    metrics: &metrics::Metrics,
) -> anyhow::Result<Option<Arc<dyn Sink>>> {
    let mut backoff = Duration::from_millis(cfg.poll_interval_ms.max(100));
    loop {
        if *stop.borrow() {
            return Ok(None);
        }
        match sinks::open(&cfg.warehouse).await {
            Ok(sink) => return Ok(Some(sink)),
            Err(SinkError::Transient(e)) => {
                metrics.failed("warehouse_transient");
                let wait = jittered(backoff);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot open the warehouse yet; waiting for it (the edge keeps the events)");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => return Ok(None),
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => anyhow::bail!("warehouse: {e}"),
        }
    }
}

/// Drains every shard until none has anything left (sealing open batches first), then
/// returns. Used by `collector-agent run --once` and the tests. A shard that fails does
/// not stop the others; the first error is returned after every shard was tried.
pub async fn drain_once(cfg: &AgentConfig) -> anyhow::Result<DrainSummary> {
    let sink = open_sink(cfg).await?;
    let drainer = Drainer::new(cfg.clone(), sink)?;
    let info = drainer.info().await?;
    let (_never, stop) = watch::channel(false);
    let (total, errors) = drainer.drain_all(info.shards, true, &stop).await;
    // The upkeep an idle daemon does after loading, so a lake drained from cron is
    // compacted; not its memory release, which the exit does.
    if total.batches > 0 {
        drainer.idle(sinks::Idle::Exiting).await;
    }
    if let Some((shard, e)) = errors.into_iter().next() {
        anyhow::bail!("shard {shard}: {e} (other shards drained: {total:?})");
    }
    Ok(total)
}

/// An error and its causes on one line, each said once: a client often says only
/// "error connecting to server" or "error sending request", and its cause says why
/// (refused, timed out, a password the server refused); a cause whose words the text
/// already holds is not repeated.
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let t = c.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cause = c.source();
    }
    text
}

/// The system clock, in ms since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Longest pause between failed drain rounds.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A pause between half and all of `d`, at random.
fn jittered(d: Duration) -> Duration {
    let mut b = [0u8; 8];
    let r = if getrandom::getrandom(&mut b).is_ok() {
        u64::from_le_bytes(b) as f64 / u64::MAX as f64
    } else {
        1.0
    };
    d.mul_f64(0.5 + 0.5 * r)
}

/// The daemon: serves the admin endpoint and drains every shard until `shutdown`
/// resolves, then finishes the batch in hand and returns.
pub async fn run(
    cfg: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_tx, mut stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    // /metrics first, so a warehouse the agent waits for shows there as failures.
    let metrics = Arc::new(metrics::Metrics::default());
    let metrics_task = match &cfg.metrics_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            tracing::info!(metrics = %listener.local_addr()?, "serving /metrics");
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(metrics::serve(
                listener,
                metrics.clone(),
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            )))
        }
        None => None,
    };
    let Some(sink) = open_sink_waiting(&cfg, &mut stop_rx, &metrics).await? else {
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
        return Ok(());
    };

    let wake = Arc::new(tokio::sync::Notify::new());
    let ops = Arc::new(admin::Ops::from_config(&cfg, wake.clone())?);
    let (state, listener) = admin::bind(&cfg.admin_addr, ops.dashboard_token.is_some()).await?;
    let state_path = cfg.warehouse.state_file();
    // Only the CLI reads it (to reach this agent); a disk too full to write it must not
    // stop the drain.
    if let Err(e) = admin::write_state(&state_path, &state) {
        tracing::warn!(path = %state_path.display(), error = %e, "cannot write the agent's state file; CLI commands will not find this agent (draining anyway)");
    }
    tracing::info!(admin = %state.addr, warehouse = sink.kind(), "agent started");
    let mut admin_stop = stop_rx.clone();
    let admin_task = tokio::spawn(admin::serve(
        listener,
        sink.clone(),
        state.token.clone(),
        ops,
        async move {
            let _ = admin_stop.wait_for(|s| *s).await;
        },
    ));

    let drainer = Drainer::with_metrics(cfg.clone(), sink, metrics)?;
    if let Err(e) = drainer.record_policy(now_ms()).await {
        tracing::warn!(error = %e, "could not record the policy version for the dashboard");
    }
    let poll = Duration::from_millis(cfg.poll_interval_ms);
    let audience_interval = Duration::from_millis(cfg.audience_interval_ms);
    let mut audiences_at = tokio::time::Instant::now();
    let mut backoff = poll;
    let mut shards: Option<u32> = None;
    // Whether the warehouse did work since it was last told the agent idles.
    let mut busy = false;
    while !*stop_rx.borrow() {
        let result: Result<u64, DrainError> = async {
            let n = match shards {
                Some(n) => n,
                None => {
                    let n = drainer.info().await?.shards;
                    shards = Some(n);
                    n
                }
            };
            let (total, errors) = drainer.drain_all(n, false, &stop_rx).await;
            match errors.into_iter().next() {
                // The other shards were drained; back off before trying this one again.
                Some((_, e)) if total.batches == 0 => Err(e),
                Some((_, e)) => {
                    tracing::warn!(error = %e, "a shard failed; the others were drained");
                    Ok(total.batches)
                }
                None => Ok(total.batches),
            }
        }
        .await;
        // Time windows move on even when nothing loads.
        if audiences_at.elapsed() >= audience_interval {
            audiences_at = tokio::time::Instant::now();
            busy = true;
            // People first, when the run after the last load failed.
            drainer.retry_stale_identity().await;
            if let Err(e) = drainer.evaluate_audiences(now_ms()).await {
                tracing::warn!(error = %e, "audience evaluation failed; retried on schedule");
            }
            // Retries come due and consent changes even when nothing loads.
            if let Err(e) = drainer.activate(now_ms()).await {
                tracing::warn!(error = %e, "activation failed; retried on schedule");
            }
        }
        let pause = match result {
            Ok(0) => {
                backoff = poll;
                // The edge is empty: what the warehouse kept for the loads (and the
                // identity and audience runs after them) is given back until the next.
                if std::mem::take(&mut busy) {
                    drainer.idle(sinks::Idle::Waiting).await;
                }
                poll
            }
            Ok(_) => {
                backoff = poll;
                busy = true;
                Duration::ZERO
            }
            Err(e) => {
                // Exponential, capped, with jitter so agents that failed together do
                // not retry together; the edge keeps spooling meanwhile.
                let p = jittered(backoff);
                tracing::warn!(error = %e, retryable = e.retryable(), retry_in_ms = p.as_millis() as u64, "drain round failed");
                shards = None;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                p
            }
        };
        if !pause.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop_rx.wait_for(|s| *s) => {}
                // A privacy request arrived: carry it out now.
                _ = wake.notified() => {}
            }
        }
    }
    let _ = admin_task.await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    let _ = std::fs::remove_file(&state_path);
    tracing::info!("agent stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_pauses_are_jittered_within_half_to_all_of_the_step() {
        let d = Duration::from_millis(1_000);
        let pauses: Vec<Duration> = (0..200).map(|_| jittered(d)).collect();
        assert!(pauses.iter().all(|p| *p >= d / 2 && *p <= d));
        assert!(
            pauses.iter().any(|p| *p != pauses[0]),
            "jitter varies the pause"
        );
    }
}
