//! Warehouse sinks. One folder per sink (`mod.rs` docs, `config.rs`, the sink), all
//! behind the async [`Sink`] trait, chosen by `[warehouse] kind`. The schema is data
//! ([`schema`]): a sink maps its logical types to its dialect and writes prepared rows.
//!
//! A sink must be idempotent by `message_id` (unique across the warehouse): the edge
//! delivers at least once, and the warehouse makes it exactly once. What a sink must do:
//! [`Sink::write`] a [`schema::Prepared`] load in one transaction (rows whose id is new,
//! quarantine entries, dead letters keyed by `(shard, batch_id)`), classify its errors
//! ([`SinkError::Transient`] is retried, [`SinkError::Permanent`] makes the caller
//! isolate and quarantine the event that causes it), list its quarantine, and run SQL
//! for `collector-agent sql`.

pub mod clickhouse;
pub mod duckdb;
pub mod parquet;
pub mod postgres;
pub mod schema;
pub mod tables;

use std::sync::Arc;

use async_trait::async_trait;
use collector_core::{EventKind, StoredEvent};

use crate::config::WarehouseConfig;
use crate::sinks::schema::{DeadLetter, Prepared, QuarantinedEvent};

/// What one load did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoadStats {
    /// Rows newly written.
    pub inserted: u64,
    /// Events skipped because their `message_id` was already loaded (in any table: a
    /// `message_id` is unique across the warehouse), in this load or an earlier one.
    pub duplicates: u64,
    /// Events the warehouse refused, kept in the quarantine with their reason.
    pub quarantined: u64,
    /// Batches that did not decode, kept as dead letters.
    pub dead_letters: u64,
    /// `inserted` by table, in [`EventKind::ALL`] order (`tracks`, `pages`, …; a track
    /// also lands in its per-event table, counted once, under `tracks`).
    #[serde(default)]
    pub by_table: [u64; 6],
}

/// Why the agent tells the warehouse it idles ([`Sink::idle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// A running agent found nothing to load and waits for more.
    Waiting,
    /// The agent exits after this call (`run --once`).
    Exiting,
}

/// What one idle call did beyond giving memory back: the lake's compaction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdleStats {
    /// Partitions compacted.
    pub compactions: u64,
    /// Small files merged, and the files written in their place.
    pub files_merged: u64,
    pub files_written: u64,
    /// A compaction failed (logged; tried again when the agent next idles).
    pub compaction_failed: bool,
}

impl LoadStats {
    /// Counts `n` rows newly written to the table of `kind`.
    pub fn inserted_into(&mut self, kind: EventKind, n: u64) {
        self.inserted += n;
        if let Some(i) = EventKind::ALL.iter().position(|k| *k == kind) {
            self.by_table[i] += n;
        }
    }

    /// Counts a load's rows: those of `fresh` (its rows new to the warehouse,
    /// [`schema::Prepared::new_rows`]) inserted into their kind's table, the rest of
    /// `p`'s duplicates.
    pub fn count_fresh(&mut self, p: &schema::Prepared, fresh: &schema::Prepared) {
        for r in &fresh.rows {
            self.inserted_into(r.kind, 1);
        }
        self.duplicates += (p.rows.len() - fresh.rows.len()) as u64;
    }

    pub fn add(&mut self, o: LoadStats) {
        for (a, b) in self.by_table.iter_mut().zip(o.by_table) {
            *a += b;
        }
        self.inserted += o.inserted;
        self.duplicates += o.duplicates;
        self.quarantined += o.quarantined;
        self.dead_letters += o.dead_letters;
    }
}

/// Why a write failed, and whether trying again can help: the drain loop decides with
/// [`SinkError::retryable`] alone.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The warehouse could not take the write now (locked, I/O, its schema needs an
    /// operator); the batch stays leased and comes back.
    #[error("warehouse temporarily unavailable: {0}")]
    Transient(String),
    /// This data can never be written as is (a conversion or constraint error). The
    /// sink isolates the event that causes it and quarantines it.
    #[error("warehouse rejected the load: {0}")]
    Permanent(String),
}

impl SinkError {
    pub fn retryable(&self) -> bool {
        matches!(self, SinkError::Transient(_))
    }

    /// This error as the answer to an operator's query (`collector-agent sql`), whose
    /// refusal is no load's.
    pub fn query_error(&self) -> String {
        match self {
            SinkError::Permanent(m) => format!("the query failed: {m}"),
            SinkError::Transient(m) => format!("warehouse unavailable: {m}"),
        }
    }

    /// This error as transient: for a failure that is the warehouse's, never the
    /// data's (opening its file again), so the load is retried and no event is
    /// quarantined for it.
    pub fn not_the_datas(self) -> SinkError {
        match self {
            SinkError::Permanent(m) => SinkError::Transient(m),
            e => e,
        }
    }
}

/// One leased batch, as the drain loop hands it to a sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadBatch {
    Decoded {
        batch_id: i64,
        events: Vec<StoredEvent>,
    },
    /// A batch that does not decode: kept whole as a dead letter, keyed by
    /// `(shard, batch_id)`.
    Undecodable {
        batch_id: i64,
        blob: Vec<u8>,
        error: String,
    },
}

/// Everything one lease brought from one shard: loaded in one transaction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Load {
    pub shard: u32,
    pub batches: Vec<LoadBatch>,
}

impl Load {
    /// A load of one decoded batch.
    pub fn events(shard: u32, batch_id: i64, events: Vec<StoredEvent>) -> Load {
        Load {
            shard,
            batches: vec![LoadBatch::Decoded { batch_id, events }],
        }
    }
}

/// Rows of a query, every value rendered as text (`None` for NULL; timestamps as
/// RFC 3339 UTC with milliseconds, the same in every sink).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueryResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

/// A warehouse the agent loads into. Shared by the drain loop and the admin endpoint,
/// so its methods take `&self`.
#[async_trait]
pub trait Sink: Send + Sync {
    /// `duckdb`, `postgres`, …
    fn kind(&self) -> &'static str;

    /// Writes a prepared load in one transaction: the rows whose `message_id` is new to
    /// the warehouse (the others count as duplicates), the quarantine entries (unless the
    /// id is already loaded) and the dead letters (once per `(shard, batch_id)`). All or
    /// nothing; writing the same load again changes nothing.
    async fn write(&self, load: Arc<Prepared>) -> Result<LoadStats, SinkError>;

    /// The quarantined events (all, or those with these ids), oldest first.
    async fn quarantined(&self, ids: &[String]) -> Result<Vec<QuarantinedEvent>, SinkError>;

    /// The dead letters, oldest first.
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, SinkError>;

    /// Runs one SQL statement and renders its rows as text.
    async fn query(&self, sql: &str) -> Result<QueryResult, SinkError>;

    /// A session of its own on the warehouse, for work computed in SQL after loads
    /// (identity, profiles). `None` when the sink has no SQL warehouse to compute in.
    async fn session(&self) -> Result<Option<Box<dyn SqlSession + '_>>, SinkError> {
        Ok(None)
    }

    /// The session privacy requests run in (their ledger, and the tables erased in
    /// SQL): the SQL session where there is one; a lake's state database, with its
    /// tables as views over the files.
    async fn privacy_session(&self) -> Result<Option<Box<dyn SqlSession + '_>>, SinkError> {
        self.session().await
    }

    /// The agent has nothing to load for now (the edge was found empty after a load, or
    /// after the audiences' schedule ran): gives back the memory the warehouse keeps only
    /// to go faster, and does the upkeep that must not slow a load. An embedded DuckDB
    /// (the DuckDB sink, the lake's state file) checkpoints and evicts its cached
    /// blocks; the lake first compacts its small files; a server keeps its memory
    /// itself. What it did, for `/metrics`.
    ///
    /// [`Idle::Exiting`] (`run --once` after its drain): only the upkeep. The process
    /// gives its memory back when it exits, and a checkpoint here would fold the log
    /// into the file against `checkpoint_on_stop = false`, and at the peak that setting
    /// exists to avoid (BENCHMARKS.md, "Twenty-eighth round").
    async fn idle(&self, _why: Idle) -> Result<IdleStats, SinkError> {
        Ok(IdleStats::default())
    }

    /// Whether the event rows live in files (a lake), erased by [`Sink::erase_files`]
    /// rather than by SQL.
    fn rows_in_files(&self) -> bool {
        false
    }

    /// Removes every row of these ids from the files that hold event rows, rewriting
    /// each file that has some (temp + rename); per table, the rows removed. Nothing
    /// for a sink whose rows are in SQL tables.
    async fn erase_files(
        &self,
        _user_ids: &[String],
        _anonymous_ids: &[String],
    ) -> Result<Vec<(String, i64)>, SinkError> {
        Ok(Vec::new())
    }

    /// Loads one lease's batches, all or nothing: its events (each `message_id` once in
    /// the whole warehouse), the events the warehouse refuses (quarantined with their
    /// reason, never blocking the rest), and undecodable batches (dead letters). Loading
    /// the same `Load` again changes nothing. `Err` only when nothing was committed and
    /// the load must be retried.
    async fn load(&self, load: &Load) -> Result<LoadStats, SinkError> {
        load_isolating(self, schema::prepare(load.clone())).await
    }

    /// Loads the quarantined events again (all, or the given message ids), e.g. after
    /// the warehouse or the event (`UPDATE quarantine SET event = …`) was fixed. Those
    /// that load leave the quarantine; the others stay, with the new reason and one more
    /// attempt.
    async fn replay_quarantine(&self, ids: &[String]) -> Result<LoadStats, SinkError> {
        let mut stats = LoadStats::default();
        for q in self.quarantined(ids).await? {
            if let Some(p) = q.prepared() {
                stats.add(load_isolating(self, p).await?);
            }
        }
        Ok(stats)
    }
}

/// The SQL dialect of a warehouse session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    DuckDb,
    Postgres,
    /// ClickHouse (18.16 and later): no transactions, no `UPDATE`, versioned rows
    /// behind `FINAL` views; identity and audiences have their own steps there.
    ClickHouse,
}

/// The dialects with transactions, `UPDATE … FROM` and `ON CONFLICT`, where identity
/// and audiences share one SQL text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relational {
    DuckDb,
    Postgres,
}

impl Dialect {
    pub fn relational(self) -> Option<Relational> {
        match self {
            Dialect::DuckDb => Some(Relational::DuckDb),
            Dialect::Postgres => Some(Relational::Postgres),
            Dialect::ClickHouse => None,
        }
    }
}

/// One connection to the warehouse, used by one job at a time; the job opens and
/// commits its own transactions, each with a `batch` of `BEGIN`, `COMMIT` or
/// `ROLLBACK` alone (a sink may start its transactions its own way: PostgreSQL's with
/// its settings, ClickHouse has none). Values are inlined as literals ([`sql_lit`]).
#[async_trait]
pub trait SqlSession: Send {
    fn dialect(&self) -> Dialect;
    /// Runs one statement; the rows it changed.
    async fn execute(&mut self, sql: &str) -> Result<u64, SinkError>;
    /// Runs statements separated by `;`.
    async fn batch(&mut self, sql: &str) -> Result<(), SinkError>;
    /// Runs one query; its rows rendered as text (timestamps RFC 3339 UTC).
    async fn query(&mut self, sql: &str) -> Result<QueryResult, SinkError>;
    /// Bulk-inserts text rows into `table` (all its columns, in order; the warehouse
    /// casts): DuckDB's appender, PostgreSQL's `COPY`.
    async fn insert(
        &mut self,
        table: &str,
        rows: Vec<Vec<Option<String>>>,
    ) -> Result<(), SinkError>;
    /// A relation of the rows of `table` that the loads in the temp table
    /// `identity_loads` wrote (more is fine, fewer is not), when the warehouse can name
    /// them without reading the table whole: the lake's files of those loads. `None`:
    /// the table itself, filtered.
    async fn rows_of_loads(&mut self, _table: &str) -> Result<Option<String>, SinkError> {
        Ok(None)
    }
}

/// The migrations every SQL warehouse (DuckDB, PostgreSQL) applies after its own first
/// three, in its dialect (`text`: its text type): one list, so versions and names stay
/// the same in both.
pub(crate) fn sql_migrations(d: Relational, text: &str) -> Vec<(i32, &'static str, String)> {
    vec![
        (
            4,
            "identity graph, identities, identity_merges, profiles",
            crate::identity::ddl(d),
        ),
        (5, "audience_membership", crate::audiences::ddl(d)),
        (6, "identity_dirty", crate::identity::run::ddl_dirty(d)),
        (
            7,
            "tracks.event is the slug, tracks.event_text the name as sent (Segment's schema)",
            tables::track_event_text_sql(text),
        ),
        (
            8,
            "identity_pending: identity reads each load once (no time window)",
            crate::identity::run::ddl_pending(d),
        ),
        (
            9,
            "activation_outbox, activation_log",
            crate::destinations::outbox::ddl(d),
        ),
        (
            10,
            "privacy_requests, privacy_request_stores, policy_versions",
            crate::privacy::ddl(d),
        ),
        (
            11,
            "collector_user_traits: which identify each users value came from, so users holds each trait's latest value whatever order identifies arrive in",
            tables::user_traits_ddl(d),
        ),
        (
            12,
            "message_ids without an index in DuckDB (an id_hash column instead): memory and checkpoints no longer grow with every event loaded",
            match d {
                Relational::DuckDb => crate::sinks::duckdb::UNKEYED_REGISTRY_SQL.to_string(),
                // PostgreSQL's key is a B-tree on disk, read a page at a time.
                Relational::Postgres => String::new(),
            },
        ),
        (
            13,
            "collector_id_activity, collector_id_traits, collector_id_consent: what each pair of ids did, so a profile is computed from it instead of from every event its person sent",
            crate::identity::run::ddl_activity(d),
        ),
        (
            14,
            "identity_pending.loaded_at: an identity run reads the rows of its loads, not each event table whole",
            crate::identity::run::ddl_pending_stamp(d),
        ),
        (
            15,
            "collector_id_activity by user_id in PostgreSQL: a profile finds its pairs by either id without reading every pair",
            match d {
                // DuckDB joins by hashing; an index would only grow its memory.
                Relational::DuckDb => String::new(),
                // The key leads with anonymous_id; a person's pairs are also found
                // by user_id (without this, every identity run read the whole table).
                Relational::Postgres => {
                    "CREATE INDEX collector_id_activity_user ON collector_id_activity (user_id);\n"
                        .to_string()
                }
            },
        ),
    ]
}

/// A string literal of dialect `d`: standard SQL's ([`sql_lit`]) in DuckDB and
/// PostgreSQL; in ClickHouse, where a backslash in a literal is an escape, with
/// backslashes and quotes escaped. Ids are whatever clients send (`o'brien\`), and code
/// that runs in every warehouse builds its literals with this.
pub fn lit(d: Dialect, v: &str) -> String {
    match d {
        Dialect::ClickHouse => format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'")),
        Dialect::DuckDb | Dialect::Postgres => sql_lit(v),
    }
}

/// Values as the inside of a SQL `IN (…)` list of dialect `d` ([`lit`]; `NULL` when
/// empty, which matches nothing).
pub fn list<'a>(d: Dialect, v: impl Iterator<Item = &'a String>) -> String {
    let items: Vec<String> = v.map(|s| lit(d, s)).collect();
    if items.is_empty() {
        "NULL".into()
    } else {
        items.join(", ")
    }
}

/// [`list`] in standard SQL, for code that runs in DuckDB and PostgreSQL only.
pub fn sql_list<'a>(v: impl Iterator<Item = &'a String>) -> String {
    list(Dialect::DuckDb, v)
}

/// A SQL string literal (standard SQL: quotes doubled), as DuckDB and PostgreSQL (with
/// `standard_conforming_strings`, which the agent's sessions set) read it; not
/// ClickHouse ([`lit`]).
pub fn sql_lit(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

/// What a replay did: dead letters that decode now and were loaded (or are still
/// dead), and the quarantined events replayed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplayStats {
    pub dead_letters_loaded: u64,
    pub dead_letters_left: u64,
    pub loads: LoadStats,
}

/// Replays every dead letter that decodes now, then the quarantine (all, or `ids`).
/// `progress(done, total)` is called as it goes.
pub async fn replay_all(
    sink: &dyn Sink,
    ids: &[String],
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<ReplayStats, SinkError> {
    let mut r = ReplayStats::default();
    let dead = if ids.is_empty() {
        sink.dead_letters().await?
    } else {
        Vec::new()
    };
    let total = dead.len() as u64;
    for (i, d) in dead.iter().enumerate() {
        match d.prepared() {
            Some(p) => {
                r.loads.add(load_isolating(sink, p).await?);
                r.dead_letters_loaded += 1;
            }
            None => r.dead_letters_left += 1,
        }
        progress(i as u64 + 1, total);
    }
    r.loads.add(sink.replay_quarantine(ids).await?);
    Ok(r)
}

/// A load that has failed transiently, attempt after attempt, for
/// `stuck_quarantine_after_ms`: the drain loop asks the pipeline to try it once more in
/// parts ([`load_stuck`]), so an event the warehouse refuses with an error it does not
/// call a data error cannot block its shard for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stuck {
    /// A batch of the load that keeps failing.
    pub batch_id: i64,
    /// Whether the warehouse committed other loads (other shards') since it began to
    /// fail: then it is up, and takes events.
    pub others_loaded: bool,
}

impl LoadBatch {
    pub fn batch_id(&self) -> i64 {
        match self {
            LoadBatch::Decoded { batch_id, .. } | LoadBatch::Undecodable { batch_id, .. } => {
                *batch_id
            }
        }
    }
}

/// Loads in order, preparing each load (parsing and flattening: the agent's CPU work)
/// on the blocking pool while the sink writes the one before (mostly the database's
/// work), so a drain uses two cores. At most one write runs and one prepared load
/// waits, so memory stays bounded by two loads. Loads are written in the order pushed,
/// each all or nothing, as [`Sink::load`] would.
pub struct LoadPipeline {
    sink: Arc<dyn Sink>,
    /// The write in flight, and the first batch of its load.
    writing: Option<(i64, tokio::task::JoinHandle<Result<LoadStats, SinkError>>)>,
    stats: LoadStats,
    stuck: Option<Stuck>,
    failed_batch: Option<i64>,
}

impl LoadPipeline {
    pub fn new(sink: Arc<dyn Sink>) -> LoadPipeline {
        LoadPipeline {
            sink,
            writing: None,
            stats: LoadStats::default(),
            stuck: None,
            failed_batch: None,
        }
    }

    /// The load holding `stuck.batch_id` is written by [`load_stuck`].
    pub fn with_stuck(mut self, stuck: Option<Stuck>) -> LoadPipeline {
        self.stuck = stuck;
        self
    }

    /// Prepares `load`, waits for the write before it, then starts writing it. An error
    /// is the earlier write's; nothing after it is written.
    pub async fn push(&mut self, load: Load) -> Result<(), SinkError> {
        let first = load.batches.first().map(LoadBatch::batch_id).unwrap_or(0);
        let stuck = self
            .stuck
            .filter(|s| load.batches.iter().any(|b| b.batch_id() == s.batch_id));
        let prepared = tokio::task::spawn_blocking(move || schema::prepare(load))
            .await
            .map_err(|e| SinkError::Transient(format!("prepare task failed: {e}")))?;
        self.wait().await?;
        let sink = self.sink.clone();
        let write = tokio::spawn(async move {
            match stuck {
                Some(s) => load_stuck(&*sink, prepared, s.others_loaded).await,
                None => load_isolating(&*sink, prepared).await,
            }
        });
        self.writing = Some((first, write));
        Ok(())
    }

    async fn wait(&mut self) -> Result<(), SinkError> {
        if let Some((batch, w)) = self.writing.take() {
            let out = match w.await {
                Ok(r) => r,
                Err(e) => Err(SinkError::Transient(format!("write task failed: {e}"))),
            };
            match out {
                Ok(stats) => self.stats.add(stats),
                Err(e) => {
                    self.failed_batch = Some(batch);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Waits for the last write; the stats of every load pushed.
    pub async fn finish(&mut self) -> Result<LoadStats, SinkError> {
        self.wait().await?;
        Ok(self.stats)
    }

    /// The first batch of the load whose write failed, after an error.
    pub fn failed_batch(&self) -> Option<i64> {
        self.failed_batch
    }
}

/// One write, a panic in it (a bug the data reached) an error like any other, so the
/// isolation around it goes on.
async fn write_caught<S: Sink + ?Sized>(
    sink: &S,
    p: Arc<Prepared>,
) -> Result<LoadStats, SinkError> {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(sink.write(p))
        .catch_unwind()
        .await
    {
        Ok(r) => r,
        Err(panic) => Err(SinkError::Transient(format!(
            "the write panicked: {}",
            panic_text(&*panic)
        ))),
    }
}

/// A panic's message.
pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

impl Prepared {
    /// These rows of the load, alone (no quarantine entries or dead letters).
    fn part(&self, rows: std::ops::Range<usize>) -> Prepared {
        Prepared {
            shard: self.shard,
            replay: self.replay,
            rows: self.rows[rows].to_vec(),
            ..Prepared::default()
        }
    }

    /// The load's quarantine entries (with `more`), dead letters and counts, without
    /// its rows.
    fn rest(&self, quarantine: Vec<schema::Quarantined>) -> Prepared {
        Prepared {
            shard: self.shard,
            replay: self.replay,
            quarantine,
            dead: self.dead.clone(),
            in_load_duplicates: self.in_load_duplicates,
            resolved_dead: self.resolved_dead.clone(),
            ..Prepared::default()
        }
    }
}

/// Writes a prepared load; after a permanent error, writes its events one at a time and
/// quarantines each one the warehouse refuses on its own, then the rest of the load.
pub async fn load_isolating<S: Sink + ?Sized>(
    sink: &S,
    prepared: Prepared,
) -> Result<LoadStats, SinkError> {
    let p = Arc::new(prepared);
    let first = match sink.write(p.clone()).await {
        Err(e @ SinkError::Permanent(_)) => e,
        other => return other,
    };
    tracing::warn!(error = %first, events = p.rows.len(), sink = sink.kind(), "load refused; isolating the event(s) the warehouse rejects");
    let mut stats = LoadStats::default();
    let mut quarantine = p.quarantine.clone();
    for i in 0..p.rows.len() {
        match sink.write(Arc::new(p.part(i..i + 1))).await {
            Ok(s) => stats.add(s),
            Err(e @ SinkError::Permanent(_)) => {
                quarantine.push(p.quarantined(&p.rows[i], e.to_string()))
            }
            Err(e) => return Err(e),
        }
    }
    stats.add(sink.write(Arc::new(p.rest(quarantine))).await?);
    Ok(stats)
}

/// How many parts [`load_stuck`] first splits a load into.
const STUCK_PARTS: usize = 16;

/// Writes a load that has failed transiently for long (see [`Stuck`]), once whole, then
/// in parts: [`STUCK_PARTS`] parts, and each part that fails in halves, down to single
/// events, so every event the warehouse takes commits. An event it refuses on its own
/// with a permanent error is quarantined, as [`load_isolating`] does; one it refuses
/// alone, twice, with a transient error, is quarantined with that error only when the
/// warehouse took other events meanwhile (a part of this load, or `others_loaded`). When
/// it took none, the error is the warehouse's (down, locked, full), not the events':
/// the load fails as before and nothing is quarantined. A panic in a write counts as a
/// transient error of what it wrote.
pub async fn load_stuck<S: Sink + ?Sized>(
    sink: &S,
    prepared: Prepared,
    others_loaded: bool,
) -> Result<LoadStats, SinkError> {
    let p = Arc::new(prepared);
    let n = p.rows.len();
    let first = match write_caught(sink, p.clone()).await {
        Err(e) if n > 0 => e,
        other => return other,
    };
    tracing::warn!(error = %first, events = n, sink = sink.kind(), "load stuck; writing it in parts to find the event(s) the warehouse refuses");
    let mut stats = LoadStats::default();
    let mut taken = false;
    // Each part that failed, with its error.
    let mut failed: Vec<(std::ops::Range<usize>, SinkError)> = Vec::new();
    let step = n.div_ceil(STUCK_PARTS);
    for start in (0..n).step_by(step) {
        let r = start..(start + step).min(n);
        match write_caught(sink, Arc::new(p.part(r.clone()))).await {
            Ok(s) => {
                taken = true;
                stats.add(s);
            }
            Err(e) => failed.push((r, e)),
        }
    }
    if !taken && !others_loaded {
        tracing::warn!(error = %first, "the warehouse took no part of the stuck load and no other load; retrying it later, nothing quarantined");
        return Err(first);
    }
    // Halve each failed part down to single events.
    let mut refused: Vec<(usize, SinkError)> = Vec::new();
    while let Some((r, e)) = failed.pop() {
        if r.len() == 1 {
            refused.push((r.start, e));
            continue;
        }
        let mid = r.start + r.len() / 2;
        for half in [r.start..mid, mid..r.end] {
            match write_caught(sink, Arc::new(p.part(half.clone()))).await {
                Ok(s) => stats.add(s),
                Err(e) => failed.push((half, e)),
            }
        }
    }
    refused.sort_by_key(|(i, _)| *i);
    let mut quarantine = p.quarantine.clone();
    for (i, e) in refused {
        let row = &p.rows[i];
        let e = match e {
            e @ SinkError::Permanent(_) => e,
            // Once more alone: an error that went away was not the event's.
            SinkError::Transient(_) => match write_caught(sink, Arc::new(p.part(i..i + 1))).await {
                Ok(s) => {
                    stats.add(s);
                    continue;
                }
                Err(e) => e,
            },
        };
        let reason = match &e {
            SinkError::Permanent(_) => e.to_string(),
            SinkError::Transient(_) => format!("{e} (the load kept failing; the warehouse refused this event alone, twice, while it took others)"),
        };
        tracing::warn!(message_id = row.message_id(), reason = %reason, "quarantining an event of a stuck load");
        quarantine.push(p.quarantined(row, reason));
    }
    stats.add(sink.write(Arc::new(p.rest(quarantine))).await?);
    Ok(stats)
}

/// A server sink's `password_env`: the variable must be set when named (checked by
/// `config check`), and the password is read from it, never from the config.
pub(crate) struct PasswordEnv<'a>(pub &'a Option<String>);

impl PasswordEnv<'_> {
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(var) = self.0 {
            if std::env::var_os(var).is_none() {
                anyhow::bail!("config: warehouse.password_env names {var}, which is not set");
            }
        }
        Ok(())
    }

    pub fn password(&self) -> Option<String> {
        self.0.as_ref().and_then(|v| std::env::var(v).ok())
    }
}

/// Opens the warehouse the config names, bringing its schema up to date.
pub async fn open(cfg: &WarehouseConfig) -> Result<Arc<dyn Sink>, SinkError> {
    Ok(match cfg {
        WarehouseConfig::DuckDb(c) => Arc::new(duckdb::DuckDbSink::open_config(c)?),
        WarehouseConfig::Postgres(c) => Arc::new(postgres::PostgresSink::connect(c).await?),
        WarehouseConfig::Parquet(c) => Arc::new(parquet::ParquetSink::open_config(c)?),
        WarehouseConfig::ClickHouse(c) => Arc::new(clickhouse::ClickHouseSink::connect(c).await?),
    })
}

/// Events as the edge stores them, from a `/v1/batch` body (for the sinks' own tests;
/// the integration tests have `tests/common::events`).
#[cfg(test)]
pub(crate) fn test_events(body: serde_json::Value) -> Vec<collector_core::StoredEvent> {
    let mut n = 0;
    collector_core::ingest::parse_body(
        collector_core::ingest::Endpoint::Batch,
        body.to_string().as_bytes(),
        1_795_528_444_000,
        &mut || {
            n += 1;
            format!("gen-{n}")
        },
    )
    .expect("a valid body")
    .accepted
}
