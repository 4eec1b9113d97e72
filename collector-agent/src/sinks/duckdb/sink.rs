//! The DuckDB sink: one embedded file. Per load, one transaction: the ids are
//! registered in `message_ids` first (an unindexed registry: see
//! [`UNKEYED_REGISTRY_SQL`]), then only the new rows are appended by the
//! appender (which types them) straight into their tables; `users` is staged and
//! upserted. The Parquet lake reuses the staging helpers.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use collector_core::timestamp::{format_ms, format_us};
use collector_core::EventKind;
use duckdb::types::{TimeUnit, ValueRef};
use duckdb::{params, Connection};

use crate::sinks::schema::{
    self, DeadLetter, LogicalType, Prepared, PreparedRow, QuarantinedEvent,
};
use crate::sinks::tables::{self, Catalog, Plan, TableKind, TableLoad};
use crate::sinks::{sql_lit, Dialect, LoadStats, QueryResult, Sink, SinkError, SqlSession};

/// DuckDB's type for a logical type.
pub(crate) fn sql_type(ty: LogicalType) -> &'static str {
    match ty {
        LogicalType::Text => "VARCHAR",
        // UTC; `TIMESTAMPTZ` would need the ICU extension.
        LogicalType::Timestamp => "TIMESTAMP",
        LogicalType::Json => "JSON",
        LogicalType::Double => "DOUBLE",
        LogicalType::Boolean => "BOOLEAN",
    }
}

pub(crate) use tables::quote as ident;

pub(crate) fn create_fixed_table_sql(table: &str, kind: TableKind) -> String {
    tables::create_fixed_table_sql(table, kind, sql_type)
}

fn create_table_sql(kind: EventKind) -> String {
    let mut cols = Vec::new();
    for c in schema::columns(kind) {
        let mut def = format!("{} {}", c.name, sql_type(c.ty));
        // No index: `message_ids` (keyed) decides which rows are new, and DuckDB
        // rewrites every index at each checkpoint. (Warehouses created before kept
        // their primary key; it never conflicts.)
        if c == schema::MESSAGE_ID || c == schema::RAW {
            def.push_str(" NOT NULL");
        }
        cols.push(def);
    }
    cols.push(format!("{} TIMESTAMP NOT NULL", schema::LOADED_AT));
    format!(
        "CREATE TABLE IF NOT EXISTS {} ({})",
        kind.table(),
        cols.join(", ")
    )
}

/// The embedded DuckDB warehouse. DuckDB's API is blocking: every call runs on the
/// blocking pool, one at a time (DuckDB lets one process write the file).
pub struct DuckDbSink {
    state: Arc<Mutex<State>>,
    /// Sessions open now (see [`LiveSessions`]).
    sessions: LiveSessions,
}

/// The open warehouse, and what it takes to open it again.
struct State {
    /// `None` after DuckDB invalidated the database (a fatal error, e.g. a checkpoint
    /// that found no memory or no disk): the next use opens the file again, replaying
    /// its write-ahead log, until that succeeds.
    conn: Option<Connection>,
    catalog: Catalog,
    path: std::path::PathBuf,
    /// The configured `SET`s, applied at every open.
    settings: String,
    /// The configured `row_group_size` (an option of the file's `ATTACH`).
    row_group_size: Option<u32>,
    /// Which settings were not configured, and follow the indexes.
    defaults: Defaults,
    /// The default `memory_limit` as it follows the indexes (`None`: a configured
    /// limit, or DuckDB's own).
    memory: Option<MemoryFit>,
    /// The default `checkpoint_threshold` as it follows the indexes (`None`: a
    /// configured one, or DuckDB's own).
    checkpoint: Option<CheckpointFit>,
}

/// Which of DuckDB's settings the sink sets itself, because the operator did not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Defaults {
    /// `memory_limit`: DuckDB's default, capped (see
    /// [`super::config::DEFAULT_MEMORY_CAP`]), plus room for the indexes.
    pub memory_limit: bool,
    /// The cap (`[warehouse] memory_cap`) instead of the default one.
    pub memory_cap: Option<u64>,
    /// `checkpoint_threshold`: DuckDB's default, raised as the indexes grow.
    pub checkpoint_threshold: bool,
}

/// DuckDB's own `checkpoint_threshold`.
const DEFAULT_CHECKPOINT_THRESHOLD: u64 = 16 << 20;

/// The most a default `checkpoint_threshold` grows to (see [`CheckpointFit`]).
const MAX_CHECKPOINT_THRESHOLD: u64 = 1 << 30;

/// A default `checkpoint_threshold` that follows the indexes. Each checkpoint writes
/// every index whole, not what changed (duckdb/duckdb#24848, open for 1.5). The
/// registry has none (see [`UNKEYED_REGISTRY_SQL`]), but `users`, the identity
/// tables and the quarantine are keyed and grow with the people seen: the threshold
/// is twice the indexes' size as measured after each call, so a checkpoint comes once
/// per as many bytes loaded as it writes, up to 1 GiB of log. More log also means
/// more to replay when the agent starts after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CheckpointFit {
    /// The threshold set now.
    threshold: u64,
}

impl CheckpointFit {
    /// The threshold for indexes that measure `index_bytes` now.
    fn target(&self, index_bytes: u64) -> u64 {
        index_bytes
            .saturating_mul(2)
            .clamp(DEFAULT_CHECKPOINT_THRESHOLD, MAX_CHECKPOINT_THRESHOLD)
    }
}

/// A default `memory_limit` that follows the indexes. DuckDB keeps every index whole
/// in memory and fails each commit once they outgrow the limit, so the limit is the
/// cap plus twice what they measure (`duckdb_memory()`, which shows them only until a
/// checkpoint writes them out; a checkpoint loads them whole again); never above
/// DuckDB's own default (80% of RAM), never lowered. (The registry of loaded ids,
/// which grows with every event, has no index: [`UNKEYED_REGISTRY_SQL`].)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MemoryFit {
    /// Room for everything but the indexes (cached blocks, queries, checkpoints).
    cap: u64,
    /// DuckDB's own default: the most the limit grows to.
    ceiling: u64,
    /// The limit set now.
    limit: u64,
}

impl MemoryFit {
    /// The limit for indexes that measure `index_bytes` now.
    fn target(&self, index_bytes: u64) -> u64 {
        self.cap
            .saturating_add(index_bytes.saturating_mul(2))
            .min(self.ceiling)
    }

    /// The fit of a database opened again (`new`), which keeps a limit the one before
    /// it (`old`) raised after running out of memory.
    pub(crate) fn reopened(
        conn: &Connection,
        new: Option<MemoryFit>,
        old: Option<MemoryFit>,
    ) -> Result<Option<MemoryFit>, SinkError> {
        Ok(match (new, old) {
            (Some(new), Some(old)) if old.limit > new.limit => {
                set_size(conn, "memory_limit", old.limit)?;
                Some(MemoryFit {
                    limit: old.limit,
                    ..new
                })
            }
            (new, _) => new,
        })
    }

    /// Raises the limit of `conn`'s database to what indexes of `index` bytes need;
    /// after DuckDB ran out of memory (`out_of_memory`), to twice the limit at least,
    /// so the retry finds room. Whether the limit is higher now.
    pub(crate) fn fit(&mut self, conn: &Connection, index: u64, out_of_memory: bool) -> bool {
        let mut target = self.target(index);
        if out_of_memory {
            target = target.max(self.limit.saturating_mul(2)).min(self.ceiling);
        }
        if target <= self.limit {
            if out_of_memory {
                tracing::error!(limit = self.limit, "DuckDB ran out of memory at its most (DuckDB's own default, 80% of RAM): the warehouse's indexes need a larger host, or another warehouse (README, DuckDB sink)");
            }
            return false;
        }
        // When it cannot be set now, opening the warehouse again sets it.
        let raised = if out_of_memory {
            raise(
                conn,
                "memory_limit",
                self.limit,
                target,
                "after running out of memory",
            );
            true
        } else {
            raise(conn, "memory_limit", self.limit, target, "for its indexes")
        };
        if raised {
            self.limit = target;
        }
        raised
    }
}

/// What DuckDB's buffer pool holds now, by tag (`BASE_TABLE 12.0MB, …`), for the log
/// when a statement ran out of memory; empty when the database refuses the query (on
/// a connection whose transaction failed: ask on another).
pub(crate) fn memory_by_tag(conn: &Connection) -> String {
    let rows: Result<Vec<(String, i64, i64)>, _> = conn
        .prepare(
            "SELECT tag, memory_usage_bytes, temporary_storage_bytes FROM duckdb_memory()
             WHERE memory_usage_bytes > 0 OR temporary_storage_bytes > 0 ORDER BY memory_usage_bytes DESC",
        )
        .and_then(|mut st| {
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
        });
    let mb = |b: i64| b as f64 / 1e6;
    rows.unwrap_or_default()
        .into_iter()
        .map(|(tag, mem, tmp)| {
            if tmp > 0 {
                format!("{tag} {:.1}MB (+{:.1}MB spilled)", mb(mem), mb(tmp))
            } else {
                format!("{tag} {:.1}MB", mb(mem))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What DuckDB's indexes (the keys of `users`, identity, quarantine) hold in memory now,
/// in bytes; 0 after a fatal error, when the database refuses even this query.
pub(crate) fn index_bytes(conn: &Connection) -> u64 {
    let index: Result<i64, _> = conn.query_row(
        "SELECT coalesce(sum(memory_usage_bytes), 0)::BIGINT FROM duckdb_memory() WHERE tag = 'ART_INDEX'",
        [],
        |r| r.get(0),
    );
    index.unwrap_or(0).max(0) as u64
}

impl State {
    /// The connection, opened again if a fatal error closed it.
    fn conn(&mut self) -> Result<&mut Connection, SinkError> {
        if self.conn.is_none() {
            let (conn, catalog, memory, checkpoint) = open_file(
                &self.path,
                &self.settings,
                self.row_group_size,
                self.defaults,
            )?;
            tracing::warn!(path = %self.path.display(), "warehouse opened again after a fatal error");
            self.catalog = catalog;
            self.memory = MemoryFit::reopened(&conn, memory, self.memory)?;
            self.checkpoint = checkpoint;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just opened"))
    }

    /// After a call: raises a default limit to what the indexes now need (see
    /// [`MemoryFit`]); after DuckDB ran out of memory (`out_of_memory`), to twice
    /// that at least, so the retry finds room. Whether the memory limit is higher now.
    fn fit_to_indexes(&mut self, out_of_memory: bool) -> bool {
        if self.memory.is_none() && self.checkpoint.is_none() {
            return false;
        }
        let Some(conn) = self.conn.as_ref() else {
            return false;
        };
        let index = index_bytes(conn);
        if let Some(fit) = self.checkpoint.as_mut() {
            let target = fit.target(index);
            if target > fit.threshold
                && raise(
                    conn,
                    "checkpoint_threshold",
                    fit.threshold,
                    target,
                    "for its indexes",
                )
            {
                fit.threshold = target;
            }
        }
        self.fit_memory(index, out_of_memory)
    }

    fn fit_memory(&mut self, index: u64, out_of_memory: bool) -> bool {
        match (self.memory.as_mut(), self.conn.as_ref()) {
            (Some(fit), Some(conn)) => fit.fit(conn, index, out_of_memory),
            _ => false,
        }
    }

    /// After an error: if DuckDB has invalidated the database, closes it, so the next
    /// use opens it again (DuckDB refuses every statement until it is).
    fn check(&mut self) -> bool {
        // A statement that reads the warehouse itself: with `row_group_size` the file
        // is attached beside DuckDB's in-memory default database, where `SELECT 1`
        // still runs after the warehouse was invalidated ("Detach and reattach it").
        let invalid = self.conn.as_ref().is_some_and(|c| {
            c.execute_batch("SELECT version FROM collector_migrations LIMIT 1")
                .is_err()
        });
        if invalid {
            tracing::error!(path = %self.path.display(), "DuckDB invalidated the warehouse after a fatal error; it is opened again at the next load (nothing was acked)");
            self.conn = None;
        }
        invalid
    }
}

/// Sets the time zone of every connection of `conn`'s database to UTC. Instants are
/// stored as `TIMESTAMP`, in UTC; with ICU (which this DuckDB build loads) a session's
/// zone is the host's, and `now()::TIMESTAMP` (`loaded_at`, and every time the agent
/// stamps), like any cast between `TIMESTAMP` and `TIMESTAMPTZ`, is that zone's wall
/// clock: on a host in New York `loaded_at` was five hours behind, and went back an
/// hour when daylight saving time ended. A build without ICU has no zone to set (and
/// is in UTC).
pub(crate) fn in_utc(conn: &Connection) -> Result<(), SinkError> {
    match conn.execute_batch("SET GLOBAL TimeZone = 'UTC'") {
        Ok(()) => Ok(()),
        Err(e) => {
            let icu: bool = conn
                .query_row(
                    "SELECT count(*) > 0 FROM duckdb_extensions() WHERE extension_name = 'icu' AND loaded",
                    [],
                    |r| r.get(0),
                )
                .map_err(transient)?;
            if icu {
                Err(transient(e))
            } else {
                Ok(())
            }
        }
    }
}

/// Opens the warehouse file. DuckDB takes a row group size only as an option of
/// `ATTACH`: the file is then attached to an in-memory instance and made the
/// connection's default database (`USE`; [`DuckDbSink::session`] does the same for
/// its connections), named as DuckDB names a file it opens (its stem), with DuckDB's
/// spill folder where it is for a file opened plainly (`<file>.tmp`).
fn open_connection(path: &Path, row_group_size: Option<u32>) -> Result<Connection, SinkError> {
    let Some(rows) = row_group_size else {
        let conn = Connection::open(path).map_err(open_error)?;
        in_utc(&conn)?;
        return Ok(conn);
    };
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .map(|s| s.split('.').next().unwrap_or(s))
        .unwrap_or("");
    // The in-memory instance's own databases keep their names.
    let alias = if stem.is_empty()
        || ["memory", "system", "temp", "main"].contains(&stem.to_ascii_lowercase().as_str())
    {
        "warehouse"
    } else {
        stem
    };
    let file = path.to_string_lossy();
    let conn = Connection::open_in_memory().map_err(transient)?;
    in_utc(&conn)?;
    conn.execute_batch(&format!(
        "SET temp_directory = {}; ATTACH {} AS {alias} (ROW_GROUP_SIZE {rows}); USE {alias};",
        sql_lit(&format!("{file}.tmp")),
        sql_lit(&file),
        alias = ident(alias),
    ))
    .map_err(open_error)?;
    Ok(conn)
}

/// Opens (creating if needed) a warehouse file, applies `settings` (and, with
/// `defaults`, sets what the operator did not configure) and brings its schema up to
/// date.
fn open_file(
    path: &Path,
    settings: &str,
    row_group_size: Option<u32>,
    defaults: Defaults,
) -> Result<
    (
        Connection,
        Catalog,
        Option<MemoryFit>,
        Option<CheckpointFit>,
    ),
    SinkError,
> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| SinkError::Permanent(format!("{}: {e}", dir.display())))?;
    }
    let mut conn = open_connection(path, row_group_size)?;
    if !settings.is_empty() {
        conn.execute_batch(settings)
            .map_err(|e| SinkError::Permanent(format!("warehouse settings: {e}")))?;
    }
    // The cap first: a migration that rebuilds a table (the registry, migration 12)
    // then keeps DuckDB's cache of the blocks it reads under it.
    let memory = if defaults.memory_limit {
        Some(fit_default_memory(
            &conn,
            defaults
                .memory_cap
                .unwrap_or(super::config::DEFAULT_MEMORY_CAP),
        )?)
    } else {
        None
    };
    migrate(&mut conn)?;
    let catalog = load_catalog(&conn)?;
    let checkpoint = defaults.checkpoint_threshold.then_some(CheckpointFit {
        threshold: DEFAULT_CHECKPOINT_THRESHOLD,
    });
    Ok((conn, catalog, memory, checkpoint))
}

/// Caps DuckDB's default `memory_limit` at `cap` (see [`MemoryFit`]); the room for
/// the indexes is made as they are measured.
pub(crate) fn fit_default_memory(conn: &Connection, cap: u64) -> Result<MemoryFit, SinkError> {
    let current: String = conn
        .query_row("SELECT current_setting('memory_limit')", [], |r| r.get(0))
        .map_err(transient)?;
    let ceiling = super::config::size_bytes(&current).unwrap_or(u64::MAX);
    let mut fit = MemoryFit {
        cap,
        ceiling,
        limit: ceiling,
    };
    let limit = fit.target(0);
    if limit < ceiling {
        set_size(conn, "memory_limit", limit)?;
        fit.limit = limit;
    }
    Ok(fit)
}

/// Raises one of DuckDB's size settings (`why`, for the log); whether it took.
fn raise(conn: &Connection, setting: &str, from: u64, to: u64, why: &str) -> bool {
    match set_size(conn, setting, to) {
        Ok(()) => {
            tracing::info!(setting, from, to, "warehouse setting raised {why}");
            true
        }
        Err(e) => {
            tracing::warn!(setting, error = %e, "could not raise a warehouse setting now");
            false
        }
    }
}

/// Sets one of DuckDB's size settings, in bytes.
fn set_size(conn: &Connection, setting: &str, bytes: u64) -> Result<(), SinkError> {
    conn.execute_batch(&format!("SET {setting} = '{bytes}B'"))
        .map_err(transient)
}

/// The statements that set `memory_limit` back to what the sink runs with: the default
/// limit as it was fitted (`memory`), or else the configured one (in `settings`, the
/// configured `SET`s, applied again) or DuckDB's own default.
fn memory_limit_sql(memory: Option<MemoryFit>, settings: &str) -> String {
    match memory {
        Some(fit) => format!("SET memory_limit = '{}B';", fit.limit),
        None => format!("RESET memory_limit;{settings}"),
    }
}

/// Gives back the memory DuckDB keeps only to go faster, for an agent with nothing to
/// load: a `CHECKPOINT` folds the rows committed since the last one (held uncompressed
/// in memory until then) into the file, and the blocks cached from the file are
/// evicted: DuckDB evicts what it can on the way to a lower `memory_limit`, and keeps
/// it evicted when that limit cannot be reached (it then refuses the limit), so a
/// limit of one byte evicts every block it can; `restore` (see [`memory_limit_sql`])
/// then sets the limit back. Nothing else may use the database meanwhile (a query
/// would find no memory): call it under the sink's lock, with no session open. What
/// DuckDB held before and after, in bytes.
fn release_memory(conn: &Connection, restore: &str) -> Result<(u64, u64), SinkError> {
    let held = |c: &Connection| -> u64 {
        c.query_row(
            "SELECT coalesce(sum(memory_usage_bytes), 0)::BIGINT FROM duckdb_memory()",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_or(0, |b| b.max(0) as u64)
    };
    let before = held(conn);
    conn.execute_batch("CHECKPOINT").map_err(transient)?;
    let evicted = conn
        .execute_batch("SET memory_limit = '1B'")
        .map_err(transient);
    // Should this fail, the check after the error finds the database refusing queries
    // under the one-byte limit and opens it again, with its limit.
    conn.execute_batch(restore).map_err(transient)?;
    match evicted {
        Err(e) if !out_of_memory(&e) => {
            tracing::debug!(error = %e, "DuckDB refused the eviction limit for another reason than memory")
        }
        _ => {}
    }
    Ok((before, held(conn)))
}

/// How many [`DuckSession`]s of one database are open: [`release_memory`] runs only when
/// none is, since a statement of theirs would find no memory while the limit is down.
/// A session counts from the moment the sink made it (under its lock) until dropped.
#[derive(Debug, Clone, Default)]
pub(crate) struct LiveSessions(Arc<std::sync::atomic::AtomicUsize>);

impl LiveSessions {
    /// Counts one more session, until the returned guard is dropped.
    pub(crate) fn open(&self) -> LiveSession {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        LiveSession(self.0.clone())
    }

    /// Whether no session is open.
    pub(crate) fn none(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst) == 0
    }
}

/// One open session, counted in [`LiveSessions`] until dropped.
#[derive(Debug)]
pub(crate) struct LiveSession(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for LiveSession {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// `Sink::idle` of an embedded DuckDB (the warehouse, `what`, or the lake's state
/// file): [`release_memory`] on `conn`, with the limit set back to what `memory` and
/// `settings` make it ([`memory_limit_sql`]); nothing while the database is closed
/// (reopened at the next call) or a session is open. Call under the sink's lock; on an
/// error, the caller checks whether DuckDB invalidated the database.
pub(crate) fn release_when_idle(
    conn: Option<&Connection>,
    sessions: &LiveSessions,
    memory: Option<MemoryFit>,
    settings: &str,
    what: &str,
) -> Result<(), SinkError> {
    let Some(conn) = conn.filter(|_| sessions.none()) else {
        return Ok(());
    };
    let (before, after) = release_memory(conn, &memory_limit_sql(memory, settings))?;
    tracing::debug!(
        warehouse = what,
        held_mb = format!("{:.1}", before as f64 / 1e6),
        now_mb = format!("{:.1}", after as f64 / 1e6),
        "idle: DuckDB checkpointed and evicted its cached blocks"
    );
    Ok(())
}

/// Classifies a DuckDB error: data the warehouse will never take (conversion,
/// constraint, out of range, invalid input) is permanent; everything else (I/O, locks,
/// a schema an operator must fix) is transient and retried.
pub(crate) fn classify(e: duckdb::Error) -> SinkError {
    permanent_if_it_says(
        e,
        &[
            "Conversion Error",
            "Constraint Error",
            "Out of Range Error",
            "Invalid Input Error",
            // The appender's words for the same errors.
            "constraint failed",
            "Could not convert",
        ],
    )
}

/// `e` as a permanent error when its message holds one of `words`, else transient.
fn permanent_if_it_says(e: duckdb::Error, words: &[&str]) -> SinkError {
    let msg = e.to_string();
    if words.iter().any(|w| msg.contains(w)) {
        SinkError::Permanent(msg)
    } else {
        SinkError::Transient(msg)
    }
}

/// DuckDB's words for a limit reached (an allocation, pinning a block, or a
/// checkpoint's block: "Checkpoint failed … could not allocate block of size 256.0
/// KiB", a fatal error that invalidates the database).
pub(crate) fn out_of_memory(e: &SinkError) -> bool {
    let text = e.to_string();
    text.contains("Out of Memory Error")
        || text.contains("failed to pin block")
        || text.contains("could not allocate block")
}

/// Whether a load that failed (`out`) is written again at once: it ran out of memory
/// and that raised the limit. Each retry follows a raise, and the limit stops at
/// DuckDB's own default, so the retries end. Shared by the DuckDB sink and the lake.
pub(crate) fn retry_after_raise<T>(
    out: &Result<T, SinkError>,
    out_of_memory: bool,
    raised: bool,
) -> bool {
    match out {
        Err(e) if out_of_memory && raised => {
            tracing::info!(error = %e, "the load ran out of memory; its limit is raised, trying it again now");
            true
        }
        _ => false,
    }
}

pub(crate) fn transient(e: duckdb::Error) -> SinkError {
    SinkError::Transient(e.to_string())
}

/// Classifies an error opening a database file: a file DuckDB can never open as it is
/// (not a DuckDB file, a corrupt one, a folder, a storage version this DuckDB cannot
/// read: the words of DuckDB 1.5's messages) is permanent, so the agent stops and says
/// so instead of waiting for it forever; anything else (a lock another process holds,
/// a full disk) is transient and waited for.
pub(crate) fn open_error(e: duckdb::Error) -> SinkError {
    permanent_if_it_says(
        e,
        &[
            "not a valid DuckDB database file",
            "Corrupt database file",
            "Is a directory",
            "Trying to read a database file with version number",
            "storage version greater than the latest version supported",
        ],
    )
}

/// Numbered schema migrations, recorded in `collector_migrations`. Each runs once, in
/// a transaction; a warehouse created by any earlier release is brought up to date.
fn migrations() -> Vec<(i32, &'static str, String)> {
    let mut v1 = String::new();
    for kind in EventKind::ALL {
        v1.push_str(&create_table_sql(kind));
        v1.push_str(";\n");
    }
    v1.push_str(
        "CREATE TABLE IF NOT EXISTS dead_letters (shard INTEGER, batch_id BIGINT, error VARCHAR, blob BLOB, loaded_at TIMESTAMP);\n",
    );
    let mut v2 = String::from(
        "CREATE TABLE dead_letters_keyed (shard INTEGER NOT NULL, batch_id BIGINT NOT NULL, error VARCHAR NOT NULL, blob BLOB NOT NULL, loaded_at TIMESTAMP NOT NULL, PRIMARY KEY (shard, batch_id));
INSERT INTO dead_letters_keyed SELECT shard, batch_id, any_value(error), any_value(blob), min(loaded_at) FROM dead_letters WHERE shard IS NOT NULL AND batch_id IS NOT NULL GROUP BY shard, batch_id;
DROP TABLE dead_letters;
ALTER TABLE dead_letters_keyed RENAME TO dead_letters;
",
    );
    v2.push_str(REGISTRY_SQL);
    for kind in EventKind::ALL {
        let t = kind.table();
        v2.push_str(&format!(
            "INSERT OR IGNORE INTO message_ids SELECT message_id, '{t}', 0 FROM {t};\n"
        ));
    }
    let mut v3 = format!("{};\n", create_fixed_table_sql("users", TableKind::Users));
    v3.push_str(CATALOG_SQL);
    v3.push_str(&tables::add_segment_id_sql(sql_type(LogicalType::Text)));
    vec![
        (1, "segment tables and dead letters", v1),
        (
            2,
            "message_ids registry (one message_id per warehouse), quarantine, dead letters keyed by (shard, batch_id)",
            v2,
        ),
        (
            3,
            "per-event tables, flattened columns, users, rejected_values",
            v3,
        ),
    ]
    .into_iter()
    .chain(crate::sinks::sql_migrations(crate::sinks::Relational::DuckDb, sql_type(LogicalType::Text)))
    .collect()
}

/// The catalog of per-event tables and added columns, and the values that did not fit
/// (every DuckDB-backed sink keeps them).
pub(crate) const CATALOG_SQL: &str = "CREATE TABLE collector_tables (table_name VARCHAR PRIMARY KEY, event_text VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL);
CREATE TABLE collector_columns (table_name VARCHAR NOT NULL, column_name VARCHAR NOT NULL, type VARCHAR NOT NULL, position INTEGER NOT NULL, added_at TIMESTAMP NOT NULL, PRIMARY KEY (table_name, column_name));
CREATE TABLE rejected_values (message_id VARCHAR NOT NULL, table_name VARCHAR NOT NULL, column_name VARCHAR NOT NULL, value VARCHAR NOT NULL, reason VARCHAR NOT NULL, rejected_at TIMESTAMP NOT NULL, PRIMARY KEY (message_id, table_name, column_name));
";

/// The first column of a query's rows.
fn first_column<T: duckdb::types::FromSql, C: FromIterator<T>>(
    conn: &Connection,
    sql: &str,
    params: impl duckdb::Params,
) -> Result<C, SinkError> {
    let mut stmt = conn.prepare(sql).map_err(transient)?;
    let rows = stmt
        .query_map(params, |r| r.get::<_, T>(0))
        .map_err(transient)?
        .collect::<Result<C, _>>()
        .map_err(transient);
    rows
}

/// Reads the catalog of added tables and columns.
pub(crate) fn load_catalog(conn: &Connection) -> Result<Catalog, SinkError> {
    let tables: Vec<String> = first_column(conn, "SELECT table_name FROM collector_tables", [])?;
    let mut stmt = conn
        .prepare("SELECT table_name, column_name, type, position FROM collector_columns")
        .map_err(transient)?;
    let cols: Vec<(String, String, String, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .map_err(transient)?
        .collect::<Result<_, _>>()
        .map_err(transient)?;
    Ok(Catalog::from_rows(tables, cols))
}

/// Records a plan's new tables and columns in the catalog tables, and creates and
/// alters the tables for which `ddl` holds (in the Parquet lake, only `users` is a
/// table: the others are folders of files).
pub(crate) fn apply_plan_ddl(
    tx: &duckdb::Transaction<'_>,
    plan: &Plan,
    ddl: impl Fn(&str) -> bool,
) -> Result<(), SinkError> {
    for (table, event_text) in &plan.new_tables {
        if ddl(table) {
            tx.execute_batch(&create_fixed_table_sql(table, TableKind::Event))
                .map_err(transient)?;
        }
        tx.execute(
            "INSERT INTO collector_tables VALUES (?, ?, now()::TIMESTAMP)",
            params![table, event_text],
        )
        .map_err(transient)?;
    }
    for c in &plan.new_columns {
        if ddl(&c.table) {
            tx.execute_batch(&format!(
                "ALTER TABLE {} ADD COLUMN {} {}",
                ident(&c.table),
                ident(&c.name),
                sql_type(c.ty)
            ))
            .map_err(transient)?;
        }
        tx.execute(
            "INSERT INTO collector_columns VALUES (?, ?, ?, ?, now()::TIMESTAMP)",
            params![c.table, c.name, c.ty.name(), c.position as i64],
        )
        .map_err(transient)?;
    }
    Ok(())
}

/// Records the rejected values of the events this load registered.
pub(crate) fn write_rejected(tx: &duckdb::Transaction<'_>, plan: &Plan) -> Result<(), SinkError> {
    if plan.rejected.is_empty() {
        return Ok(());
    }
    tx.execute_batch(
        "CREATE OR REPLACE TEMP TABLE collector_stage_rejected (seq INTEGER, message_id VARCHAR, table_name VARCHAR, column_name VARCHAR, value VARCHAR, reason VARCHAR)",
    )
    .map_err(transient)?;
    {
        let mut app = tx.appender("collector_stage_rejected").map_err(transient)?;
        for (seq, r) in plan.rejected.iter().enumerate() {
            app.append_row(params![
                seq as i32,
                r.message_id,
                r.table_name,
                r.column_name,
                r.value,
                r.reason
            ])
            .map_err(classify)?;
        }
        app.flush().map_err(classify)?;
    }
    // The plan's events are all new to the warehouse (it was made from those only).
    tx.execute_batch(
        "INSERT INTO rejected_values
         SELECT DISTINCT ON (message_id, table_name, column_name) message_id, table_name, column_name, value, reason, now()::TIMESTAMP
         FROM collector_stage_rejected
         ORDER BY message_id, table_name, column_name, seq
         ON CONFLICT DO NOTHING",
    )
    .map_err(transient)?;
    Ok(())
}

/// The registry of loaded ids, its load sequence and the quarantine: the state every
/// DuckDB-backed sink keeps (the warehouse file, or the Parquet lake's state file).
pub(crate) const REGISTRY_SQL: &str = "CREATE TABLE message_ids (message_id VARCHAR PRIMARY KEY, table_name VARCHAR NOT NULL, load_id BIGINT NOT NULL);
CREATE SEQUENCE load_ids START 1;
CREATE TABLE quarantine (message_id VARCHAR PRIMARY KEY, type VARCHAR NOT NULL, shard INTEGER, batch_id BIGINT, reason VARCHAR NOT NULL, event VARCHAR NOT NULL, quarantined_at TIMESTAMP NOT NULL, attempts INTEGER NOT NULL);
";

/// Applies the migrations the warehouse has not seen yet.
fn migrate(conn: &mut Connection) -> Result<(), SinkError> {
    apply_migrations(conn, migrations())
}

/// Applies the given numbered migrations that `collector_migrations` does not list.
pub(crate) fn apply_migrations(
    conn: &mut Connection,
    migrations: Vec<(i32, &'static str, String)>,
) -> Result<(), SinkError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS collector_migrations (version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL)",
    )
    .map_err(transient)?;
    let applied: Vec<i32> = first_column(conn, "SELECT version FROM collector_migrations", [])?;
    for (version, name, sql) in migrations {
        if applied.contains(&version) {
            continue;
        }
        let tx = conn.transaction().map_err(transient)?;
        tx.execute_batch(&sql)
            .map_err(|e| SinkError::Permanent(format!("migration {version} ({name}): {e}")))?;
        tx.execute(
            "INSERT INTO collector_migrations VALUES (?, ?, now()::TIMESTAMP)",
            params![version, name],
        )
        .map_err(transient)?;
        tx.commit().map_err(transient)?;
        tracing::info!(version, name, "warehouse migrated");
    }
    Ok(())
}

impl DuckDbSink {
    /// Opens (creating if needed) the warehouse file and brings its schema up to date.
    pub fn open(path: &Path) -> Result<DuckDbSink, SinkError> {
        DuckDbSink::open_with(path, String::new(), None, Defaults::default())
    }

    /// Opens the configured warehouse with its tuning keys (`memory_limit`, `threads`,
    /// `checkpoint_threshold`, `row_group_size`).
    pub fn open_config(cfg: &super::config::DuckDbConfig) -> Result<DuckDbSink, SinkError> {
        let settings = cfg
            .settings_sql()
            .map_err(|e| SinkError::Permanent(e.to_string()))?;
        let defaults = Defaults {
            memory_limit: cfg.memory_limit.is_none(),
            memory_cap: cfg
                .memory_cap_bytes()
                .map_err(|e| SinkError::Permanent(e.to_string()))?,
            checkpoint_threshold: cfg.checkpoint_threshold.is_none(),
        };
        DuckDbSink::open_with(&cfg.path, settings, cfg.row_group_size, defaults)
    }

    fn open_with(
        path: &Path,
        settings: String,
        row_group_size: Option<u32>,
        defaults: Defaults,
    ) -> Result<DuckDbSink, SinkError> {
        let (conn, catalog, memory, checkpoint) =
            open_file(path, &settings, row_group_size, defaults)?;
        Ok(DuckDbSink {
            sessions: LiveSessions::default(),
            state: Arc::new(Mutex::new(State {
                conn: Some(conn),
                catalog,
                path: path.to_path_buf(),
                settings,
                row_group_size,
                defaults,
                memory,
                checkpoint,
            })),
        })
    }

    /// Opens an existing warehouse file read-only (for `collector-agent sql` when no
    /// agent runs).
    pub fn open_read_only(path: &Path) -> Result<Connection, SinkError> {
        let cfg = duckdb::Config::default()
            .access_mode(duckdb::AccessMode::ReadOnly)
            .map_err(transient)?;
        let conn = Connection::open_with_flags(path, cfg).map_err(open_error)?;
        in_utc(&conn)?;
        Ok(conn)
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &mut Catalog) -> Result<T, SinkError> + Send + 'static,
    ) -> Result<T, SinkError> {
        let mut f = Some(f);
        self.with_conn_retrying(false, move |c, catalog| {
            f.take().expect("called once without retries")(c, catalog)
        })
        .await
    }

    /// Runs `f` with the connection on the blocking pool; with `retry_out_of_memory`,
    /// again at once while it runs out of memory and that raised the limit (a load is
    /// one transaction, rolled back whole: the retry finds room, where waiting for the
    /// drain loop's backoff would leave the shard behind and fail `run --once`).
    async fn with_conn_retrying<T: Send + 'static>(
        &self,
        retry_out_of_memory: bool,
        mut f: impl FnMut(&mut Connection, &mut Catalog) -> Result<T, SinkError> + Send + 'static,
    ) -> Result<T, SinkError> {
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || loop {
            let mut guard = state.lock().unwrap_or_else(|poisoned| {
                // A panic while the connection was in use (its transaction rolled
                // back as it unwound): open the warehouse again, catalog and all,
                // rather than refuse every load after it.
                state.clear_poison();
                let mut st = poisoned.into_inner();
                st.conn = None;
                st
            });
            let st = &mut *guard;
            // A file that cannot be opened again says nothing about the load's events.
            st.conn().map_err(SinkError::not_the_datas)?;
            let out = f(st.conn.as_mut().expect("open"), &mut st.catalog);
            let out_of_memory = matches!(&out, Err(e) if out_of_memory(e));
            let raised = st.fit_to_indexes(out_of_memory);
            let out = match out {
                // A fatal error says nothing about the data: retry, never quarantine.
                Err(SinkError::Permanent(e)) if st.check() => Err(SinkError::Transient(e)),
                Err(e) => {
                    st.check();
                    Err(e)
                }
                ok => ok,
            };
            if !(retry_out_of_memory && retry_after_raise(&out, out_of_memory, raised)) {
                return out;
            }
        })
        .await
        .map_err(|e| SinkError::Transient(format!("warehouse task failed: {e}")))?
    }
}

/// Runs one SQL statement and renders its rows as text.
pub fn run_query(conn: &Connection, sql: &str) -> Result<QueryResult, SinkError> {
    let perm = |e: duckdb::Error| SinkError::Permanent(e.to_string());
    let mut stmt = conn.prepare(sql).map_err(perm)?;
    let mut rows = stmt.query([]).map_err(perm)?;
    let columns: Vec<String> = rows
        .as_ref()
        .map(|s| {
            s.column_names()
                .into_iter()
                .map(|c| c.to_string())
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(perm)? {
        let mut values = Vec::with_capacity(columns.len());
        for i in 0..columns.len() {
            values.push(render(row.get_ref(i).map_err(perm)?));
        }
        out.push(values);
    }
    Ok(QueryResult { columns, rows: out })
}

fn render(v: ValueRef<'_>) -> Option<String> {
    Some(match v {
        ValueRef::Null => return None,
        ValueRef::Boolean(b) => b.to_string(),
        ValueRef::TinyInt(n) => n.to_string(),
        ValueRef::SmallInt(n) => n.to_string(),
        ValueRef::Int(n) => n.to_string(),
        ValueRef::BigInt(n) => n.to_string(),
        ValueRef::HugeInt(n) => n.to_string(),
        ValueRef::UTinyInt(n) => n.to_string(),
        ValueRef::USmallInt(n) => n.to_string(),
        ValueRef::UInt(n) => n.to_string(),
        ValueRef::UBigInt(n) => n.to_string(),
        ValueRef::Float(n) => n.to_string(),
        ValueRef::Double(n) => n.to_string(),
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
        ValueRef::Blob(b) => format!("\\x{}", hex::encode(b)),
        // With microseconds only when an instant has some.
        ValueRef::Timestamp(unit, n) => {
            let us = match unit {
                TimeUnit::Second => n.saturating_mul(1_000_000),
                TimeUnit::Millisecond => n.saturating_mul(1000),
                TimeUnit::Microsecond => n,
                TimeUnit::Nanosecond => n.div_euclid(1000),
            };
            format_us(us)
        }
        // A date (the lake's `date` partition) as `YYYY-MM-DD`.
        ValueRef::Date32(days) => {
            let mut t = format_ms(i64::from(days).saturating_mul(86_400_000));
            t.truncate(10);
            t
        }
        other => format!("{:?}", other.to_owned()),
    })
}

/// Writes a prepared load in one transaction; the catalog changes only once it
/// committed.
fn write(
    conn: &mut Connection,
    catalog: &mut Catalog,
    p: &Prepared,
) -> Result<LoadStats, SinkError> {
    let tx = conn.transaction().map_err(transient)?;
    let (mut stats, load_id) = write_state(&tx, p)?;
    // The ids new to the warehouse are registered first (one pass over the registry);
    // the load is planned from their events only, and their rows are appended, typed
    // by the appender, straight into their tables (no staging pass).
    let known = register_ids(&tx, &p.rows, load_id)?;
    let fresh = p.new_rows(|r| !known.contains(r.message_id()));
    stats.count_fresh(p, &fresh);
    let mut plan = catalog.plan(&fresh);
    if !plan.new_tables.is_empty() {
        // An analyst may have made a table or view since (through `collector-agent
        // sql`): no new per-event table takes its name. Read only when the load makes
        // a table (it cost ~3 ms of every load).
        catalog.set_relations(relation_names(&tx)?);
        plan = catalog.plan(&fresh);
    }
    apply_plan_ddl(&tx, &plan, |_| true)?;
    let now: String = tx
        .query_row("SELECT CAST(now()::TIMESTAMP AS VARCHAR)", [], |r| r.get(0))
        .map_err(transient)?;
    for load in &plan.loads {
        match load.kind {
            TableKind::Users => write_users(&tx, load)?,
            _ => append_rows(&tx, load, &now)?,
        }
    }
    write_rejected(&tx, &plan)?;
    finish_load(&tx, load_id)?;
    if stats.inserted > 0 {
        // For the next identity run.
        tx.execute(
            "INSERT INTO identity_pending (load_id, loaded_at) VALUES (?, CAST(? AS TIMESTAMP))",
            params![load_id, now],
        )
        .map_err(transient)?;
    }
    tx.commit().map_err(transient)?;
    *catalog = plan.catalog;
    Ok(stats)
}

/// The names of the warehouse's tables, views and indexes (the agent's and an
/// analyst's alike; see [`Catalog::set_relations`]).
pub(crate) fn relation_names(conn: &Connection) -> Result<Vec<String>, SinkError> {
    first_column(
        conn,
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() AND schema_name = current_schema()
         UNION ALL SELECT view_name FROM duckdb_views() WHERE NOT internal AND database_name = current_database() AND schema_name = current_schema()
         UNION ALL SELECT index_name FROM duckdb_indexes() WHERE database_name = current_database() AND schema_name = current_schema()",
        [],
    )
}

/// Registers under `load_id` the ids of a load's rows that are new to the warehouse
/// (each under its kind's table); returns the ids the registry held already.
pub(crate) fn register_ids(
    tx: &duckdb::Transaction<'_>,
    rows: &[PreparedRow],
    load_id: i64,
) -> Result<std::collections::HashSet<String>, SinkError> {
    tx.execute_batch(
        "CREATE OR REPLACE TEMP TABLE collector_stage_ids (message_id VARCHAR, table_name VARCHAR)",
    )
    .map_err(transient)?;
    {
        let mut app = tx.appender("collector_stage_ids").map_err(transient)?;
        for row in rows {
            app.append_row(params![row.message_id(), row.kind.table()])
                .map_err(classify)?;
        }
        app.flush().map_err(classify)?;
    }
    register_new(tx, "collector_stage_ids", "table_name", load_id)
}

/// The registry of loaded ids has no index. DuckDB keeps an index whole in memory and
/// writes it whole at every checkpoint (duckdb/duckdb#24848): `message_ids`' primary
/// key, which grows with every event ever loaded, took tens of bytes of memory per id
/// and, at 4M ids, ~2 s per checkpoint. Instead each id carries `id_hash` (the low 64
/// bits of its MD5, DuckDB's `md5_number_lower`): a load finds the ids the registry
/// holds by scanning that one column (8 bytes per id, ~4 ns per id, in DuckDB's
/// buffer pool, which the memory limit bounds), then compares the whole ids of the
/// hashes that matched. Every write to the registry is a load of this process
/// (DuckDB lets one process open the file; the sink writes one load at a time), so no
/// key is needed to keep an id unique.
pub(crate) const UNKEYED_REGISTRY_SQL: &str = "CREATE TABLE message_ids_unkeyed (message_id VARCHAR NOT NULL, table_name VARCHAR NOT NULL, load_id BIGINT NOT NULL, id_hash UBIGINT NOT NULL);
INSERT INTO message_ids_unkeyed SELECT message_id, table_name, load_id, md5_number_lower(message_id) FROM message_ids;
DROP TABLE message_ids;
ALTER TABLE message_ids_unkeyed RENAME TO message_ids;
";

/// The ids of `stage` (a table with a `message_id` column) that `message_ids` holds.
pub(crate) fn registered_before(
    tx: &duckdb::Transaction<'_>,
    stage: &str,
) -> Result<std::collections::HashSet<String>, SinkError> {
    let hashes: Vec<u64> = first_column(
        tx,
        &format!(
            "SELECT DISTINCT id_hash FROM message_ids WHERE id_hash IN (SELECT md5_number_lower(message_id) FROM {stage})"
        ),
        [],
    )?;
    if hashes.is_empty() {
        return Ok(Default::default());
    }
    let list = hashes
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    first_column(
        tx,
        &format!(
            "SELECT DISTINCT message_id FROM message_ids WHERE id_hash IN ({list}) AND message_id IN (SELECT message_id FROM {stage})"
        ),
        [],
    )
}

/// Registers under `load_id` the ids of `stage` (a table with a `message_id` column,
/// each id once) that `message_ids` does not hold (`table_name`: a SQL expression for
/// each id's table); returns the ids it held.
pub(crate) fn register_new(
    tx: &duckdb::Transaction<'_>,
    stage: &str,
    table_name: &str,
    load_id: i64,
) -> Result<std::collections::HashSet<String>, SinkError> {
    let known = registered_before(tx, stage)?;
    let unknown = if known.is_empty() {
        String::new()
    } else {
        tx.execute_batch("CREATE OR REPLACE TEMP TABLE collector_stage_known (message_id VARCHAR)")
            .map_err(transient)?;
        let mut app = tx.appender("collector_stage_known").map_err(transient)?;
        for id in &known {
            app.append_row(params![id]).map_err(classify)?;
        }
        app.flush().map_err(classify)?;
        " WHERE message_id NOT IN (SELECT message_id FROM collector_stage_known)".to_string()
    };
    tx.execute(
        &format!(
            "INSERT INTO message_ids SELECT message_id, {table_name}, ?, md5_number_lower(message_id) FROM {stage}{unknown}"
        ),
        params![load_id],
    )
    .map_err(classify)?;
    Ok(known)
}

/// Appends a load's rows (all new: the load was planned from new events only)
/// straight into their table, in the table's own column order (columns the load does
/// not have are NULL; `loaded_at` is `now`).
fn append_rows(tx: &duckdb::Transaction<'_>, load: &TableLoad, now: &str) -> Result<(), SinkError> {
    let physical: Vec<String> = first_column(
        tx,
        "SELECT column_name FROM duckdb_columns() WHERE table_name = ? AND schema_name = current_schema() AND database_name = current_database() ORDER BY column_index",
        params![load.table],
    )?;
    // For each physical column: where its value is in a load row (`None`: NULL).
    let source: Vec<Option<usize>> = physical
        .iter()
        .map(|c| load.columns.iter().position(|(n, _)| n == c))
        .collect();
    let loaded_at = physical.iter().position(|c| c == schema::LOADED_AT);
    let mut app = tx.appender(&load.table).map_err(transient)?;
    for row in &load.rows {
        let values = source.iter().enumerate().map(|(i, src)| match src {
            Some(j) => row[*j].as_deref(),
            None if Some(i) == loaded_at => Some(now),
            None => None,
        });
        app.append_row(duckdb::appender_params_from_iter(values))
            .map_err(classify)?;
    }
    app.flush().map_err(classify)
}

/// The part of a load every DuckDB-backed sink writes the same way: dead letters (once
/// per `(shard, batch_id)`) and quarantine entries (unless the id is already loaded).
/// Returns the stats so far and this load's id in `message_ids`.
pub(crate) fn write_state(
    tx: &duckdb::Transaction<'_>,
    p: &Prepared,
) -> Result<(LoadStats, i64), SinkError> {
    let mut stats = LoadStats {
        duplicates: p.in_load_duplicates,
        ..LoadStats::default()
    };
    for d in &p.dead {
        stats.dead_letters += tx
            .execute(
                "INSERT OR IGNORE INTO dead_letters VALUES (?, ?, ?, ?, now()::TIMESTAMP)",
                params![d.shard, d.batch_id, d.error, d.blob],
            )
            .map_err(transient)? as u64;
    }
    for (shard, batch_id) in &p.resolved_dead {
        tx.execute(
            "DELETE FROM dead_letters WHERE shard = ? AND batch_id = ?",
            params![shard, batch_id],
        )
        .map_err(transient)?;
    }
    // An event already in the warehouse is a duplicate, not a poison; one already
    // quarantined is a duplicate too, unless this is a replay of it.
    let on_conflict = p.quarantine_on_conflict();
    let loaded = if p.quarantine.is_empty() {
        Default::default()
    } else {
        tx.execute_batch(
            "CREATE OR REPLACE TEMP TABLE collector_stage_quarantine (message_id VARCHAR)",
        )
        .map_err(transient)?;
        let mut app = tx
            .appender("collector_stage_quarantine")
            .map_err(transient)?;
        for q in &p.quarantine {
            app.append_row(params![q.message_id]).map_err(classify)?;
        }
        app.flush().map_err(classify)?;
        registered_before(tx, "collector_stage_quarantine")?
    };
    for q in &p.quarantine {
        let n = if loaded.contains(&q.message_id) {
            0
        } else {
            tx.execute(
                &format!(
                    "INSERT INTO quarantine VALUES (?, ?, ?, ?, ?, ?, now()::TIMESTAMP, 1)
                     ON CONFLICT (message_id) {on_conflict}"
                ),
                params![
                    q.message_id,
                    q.kind.as_str(),
                    q.shard,
                    q.batch_id,
                    q.reason,
                    q.event
                ],
            )
            .map_err(transient)?
        };
        if n > 0 {
            stats.quarantined += 1;
        } else {
            stats.duplicates += 1;
        }
    }
    let load_id: i64 = tx
        .query_row("SELECT nextval('load_ids')", [], |r| r.get(0))
        .map_err(transient)?;
    Ok((stats, load_id))
}

/// An event that was quarantined once and has now loaded leaves the quarantine.
pub(crate) fn finish_load(tx: &duckdb::Transaction<'_>, load_id: i64) -> Result<(), SinkError> {
    tx.execute(
        "DELETE FROM quarantine WHERE message_id IN (SELECT message_id FROM message_ids WHERE load_id = ?)",
        params![load_id],
    )
    .map_err(transient)?;
    Ok(())
}

/// Stages a table's rows: a temporary all-text table of its current columns, filled
/// by the appender (rows are cast on the way into the typed table).
pub(crate) fn stage(tx: &duckdb::Transaction<'_>, load: &TableLoad) -> Result<(), SinkError> {
    let cols: Vec<String> = load
        .columns
        .iter()
        .map(|(n, _)| format!("{} VARCHAR", ident(n)))
        .collect();
    tx.execute_batch(&format!(
        "CREATE OR REPLACE TEMP TABLE {} ({})",
        ident(&format!("stage_{}", load.table)),
        cols.join(", ")
    ))
    .map_err(transient)?;
    let mut app = tx
        .appender(&format!("stage_{}", load.table))
        .map_err(transient)?;
    for row in &load.rows {
        app.append_row(duckdb::appender_params_from_iter(
            row.iter().map(|c| c.as_deref()),
        ))
        .map_err(classify)?;
    }
    app.flush().map_err(classify)
}

/// Writes a `users` load (one row per identify new to the warehouse): merged with the
/// keys the warehouse holds ([`tables::merge_users`]), upserted, and the keys of what
/// won recorded.
pub(crate) fn write_users(tx: &duckdb::Transaction<'_>, load: &TableLoad) -> Result<(), SinkError> {
    // The keys of the load's users.
    tx.execute_batch("CREATE OR REPLACE TEMP TABLE stage_user_ids (id VARCHAR)")
        .map_err(transient)?;
    {
        let mut app = tx.appender("stage_user_ids").map_err(transient)?;
        let ids: std::collections::BTreeSet<&str> = load
            .rows
            .iter()
            .filter_map(|r| r.first().and_then(|c| c.as_deref()))
            .collect();
        for id in ids {
            app.append_row(params![id]).map_err(classify)?;
        }
        app.flush().map_err(classify)?;
    }
    let mut stored = tables::StoredKeys::new();
    {
        let mut stmt = tx
            .prepare(
                "SELECT k.id, k.keys FROM collector_user_traits k JOIN stage_user_ids s ON s.id = k.id",
            )
            .map_err(transient)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(transient)?;
        for row in rows {
            let (id, keys) = row.map_err(transient)?;
            tables::read_user_keys(&id, &keys, &mut stored);
        }
    }
    let merged = tables::merge_users(load, &stored);
    let users = TableLoad {
        table: load.table.clone(),
        kind: load.kind,
        columns: load.columns.clone(),
        rows: merged.rows,
        batch_ids: Vec::new(),
        message_ids: Vec::new(),
    };
    stage(tx, &users)?;
    upsert_users(tx, &users)?;
    tx.execute_batch("CREATE OR REPLACE TEMP TABLE stage_user_traits (id VARCHAR, keys VARCHAR)")
        .map_err(transient)?;
    {
        let mut app = tx.appender("stage_user_traits").map_err(transient)?;
        for (id, keys) in tables::user_keys_rows(&stored, &merged.keys) {
            app.append_row(params![id, keys]).map_err(classify)?;
        }
        app.flush().map_err(classify)?;
    }
    tx.execute_batch(
        "INSERT INTO collector_user_traits SELECT * FROM stage_user_traits
         ON CONFLICT (id) DO UPDATE SET keys = excluded.keys",
    )
    .map_err(classify)
}

/// Upserts `users` (see [`tables::users_merge_set`]).
fn upsert_users(tx: &duckdb::Transaction<'_>, load: &TableLoad) -> Result<(), SinkError> {
    let names: Vec<String> = load.columns.iter().map(|(n, _)| ident(n)).collect();
    let select: Vec<String> = load
        .columns
        .iter()
        .map(|(n, ty)| format!("CAST({} AS {})", ident(n), sql_type(*ty)))
        .collect();
    tx.execute_batch(&format!(
        "INSERT INTO users ({cols}, {loaded}) SELECT {select}, now()::TIMESTAMP FROM stage_users
         ON CONFLICT (id) DO UPDATE SET {set}",
        cols = names.join(", "),
        loaded = ident(schema::LOADED_AT),
        select = select.join(", "),
        set = tables::users_merge_set(&load.columns, "excluded", "users")
    ))
    .map_err(classify)
}

pub(crate) fn dead_letters(conn: &Connection) -> Result<Vec<DeadLetter>, SinkError> {
    let mut stmt = conn
        .prepare("SELECT shard, batch_id, blob, error FROM dead_letters ORDER BY loaded_at, shard, batch_id")
        .map_err(transient)?;
    let rows = stmt
        .query_map([], |r| {
            Ok(DeadLetter {
                shard: r.get(0)?,
                batch_id: r.get(1)?,
                blob: r.get(2)?,
                error: r.get(3)?,
            })
        })
        .map_err(transient)?;
    rows.collect::<Result<_, _>>().map_err(transient)
}

pub(crate) fn quarantined(
    conn: &Connection,
    ids: &[String],
) -> Result<Vec<QuarantinedEvent>, SinkError> {
    let mut sql = "SELECT message_id, type, shard, batch_id, event FROM quarantine".to_string();
    if !ids.is_empty() {
        sql.push_str(" WHERE list_contains(?::VARCHAR[], message_id)");
    }
    sql.push_str(" ORDER BY quarantined_at, message_id");
    let mut stmt = conn.prepare(&sql).map_err(transient)?;
    let list = format!(
        "[{}]",
        ids.iter()
            .map(|i| format!("'{}'", i.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let map = |r: &duckdb::Row<'_>| {
        Ok(QuarantinedEvent {
            message_id: r.get(0)?,
            kind: r.get(1)?,
            shard: r.get(2)?,
            batch_id: r.get(3)?,
            event: r.get(4)?,
        })
    };
    let rows = if ids.is_empty() {
        stmt.query_map([], map)
    } else {
        stmt.query_map(params![list], map)
    }
    .map_err(transient)?;
    rows.collect::<Result<_, _>>().map_err(transient)
}

#[async_trait]
impl Sink for DuckDbSink {
    fn kind(&self) -> &'static str {
        "duckdb"
    }

    async fn write(&self, load: Arc<Prepared>) -> Result<LoadStats, SinkError> {
        self.with_conn_retrying(true, move |c, catalog| write(c, catalog, &load))
            .await
    }

    async fn quarantined(&self, ids: &[String]) -> Result<Vec<QuarantinedEvent>, SinkError> {
        let ids = ids.to_vec();
        self.with_conn(move |c, _| quarantined(c, &ids)).await
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, SinkError> {
        self.with_conn(|c, _| dead_letters(c)).await
    }

    async fn query(&self, sql: &str) -> Result<QueryResult, SinkError> {
        // In a session, on a connection of its own as PostgreSQL's: an analyst's long
        // query through a running agent (`collector-agent sql`, the dashboard) would
        // otherwise hold the loads up until it ends (DuckDB's MVCC keeps the two
        // apart). Counted as a session, so `idle` does not take the memory from under
        // it; running out of memory raises the limit, as a load's does.
        let mut session = self.session().await?.expect("DuckDB has sessions");
        session.query(sql).await
    }

    async fn session(&self) -> Result<Option<Box<dyn SqlSession + '_>>, SinkError> {
        let sessions = self.sessions.clone();
        let (conn, live) = self
            .with_conn(move |c, _| {
                let clone = second_connection(c)?;
                // Counted under the lock that `idle` takes.
                Ok((clone, sessions.open()))
            })
            .await?;
        let state = self.state.clone();
        Ok(Some(Box::new(
            DuckSession::new(
                conn,
                Arc::new(move || {
                    if let Ok(mut st) = state.lock() {
                        st.fit_to_indexes(true);
                    }
                }),
            )
            .counted(live),
        )))
    }

    async fn idle(&self, why: crate::sinks::Idle) -> Result<crate::sinks::IdleStats, SinkError> {
        if why == crate::sinks::Idle::Exiting {
            return Ok(Default::default());
        }
        let sessions = self.sessions.clone();
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || {
            // A poisoned lock: the next load opens the warehouse again.
            let Ok(mut guard) = state.lock() else {
                return Ok(Default::default());
            };
            let st = &mut *guard;
            let out = release_when_idle(
                st.conn.as_ref(),
                &sessions,
                st.memory,
                &st.settings,
                "duckdb",
            );
            if out.is_err() {
                st.check();
            }
            out.map(|()| Default::default())
        })
        .await
        .map_err(|e| SinkError::Transient(format!("warehouse task failed: {e}")))?
    }
}

/// Another connection to the database `c` is connected to, in the same database: a new
/// connection starts in the instance's default database, which is not the warehouse
/// when it was attached (`row_group_size`).
fn second_connection(c: &Connection) -> Result<Connection, SinkError> {
    let clone = c.try_clone().map_err(transient)?;
    let db: String = c
        .query_row("SELECT current_database()", [], |r| r.get(0))
        .map_err(transient)?;
    clone
        .execute_batch(&format!("USE {}", ident(&db)))
        .map_err(transient)?;
    Ok(clone)
}

/// A second connection to the same database (DuckDB's MVCC keeps its transactions
/// apart from the loads'); every call runs on the blocking pool.
pub(crate) struct DuckSession {
    conn: Arc<Mutex<Connection>>,
    /// Called when a statement ran out of memory: raises the sink's memory limit as a
    /// load's error does (identity, audiences and activation run in sessions).
    on_out_of_memory: OnOutOfMemory,
    /// [`SqlSession::rows_of_loads`], where the warehouse has it (the lake).
    rows_of_loads: Option<RowsOfLoads>,
    /// Counts this session among its database's open ones until dropped.
    _live: Option<LiveSession>,
}

/// What a session calls when DuckDB ran out of memory.
pub(crate) type OnOutOfMemory = Arc<dyn Fn() + Send + Sync>;

/// How a session names the rows its pending loads wrote into a table.
pub(crate) type RowsOfLoads =
    Arc<dyn Fn(&Connection, &str) -> Result<String, SinkError> + Send + Sync>;

impl DuckSession {
    /// A session on this connection (a clone of the sink's); `on_out_of_memory` runs
    /// after a statement ran out of memory, without the session's connection held (so
    /// a load waiting for this session cannot deadlock).
    pub(crate) fn new(conn: Connection, on_out_of_memory: OnOutOfMemory) -> DuckSession {
        DuckSession {
            conn: Arc::new(Mutex::new(conn)),
            on_out_of_memory,
            rows_of_loads: None,
            _live: None,
        }
    }

    /// This session, counted in its database's [`LiveSessions`] until dropped.
    pub(crate) fn counted(mut self, live: LiveSession) -> DuckSession {
        self._live = Some(live);
        self
    }

    /// This session, naming the rows of loads with `f`.
    pub(crate) fn reading_loads(mut self, f: RowsOfLoads) -> DuckSession {
        self.rows_of_loads = Some(f);
        self
    }

    /// Runs `f` on the blocking pool; `what` names the statement in the log when it
    /// runs out of memory.
    async fn run<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&Connection) -> Result<T, SinkError> + Send + 'static,
    ) -> Result<T, SinkError> {
        let conn = self.conn.clone();
        let on_out_of_memory = self.on_out_of_memory.clone();
        let what: String = what
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .take(200)
            .collect();
        tokio::task::spawn_blocking(move || {
            let c = conn
                .lock()
                .map_err(|_| SinkError::Transient("session lock poisoned".into()))?;
            let out = f(&c);
            if matches!(&out, Err(e) if out_of_memory(e)) {
                tracing::info!(statement = %what, memory = %c.try_clone().map(|c| memory_by_tag(&c)).unwrap_or_default(), "a warehouse statement ran out of memory");
                drop(c);
                on_out_of_memory();
            }
            out
        })
        .await
        .map_err(|e| SinkError::Transient(format!("warehouse task failed: {e}")))?
    }
}

#[async_trait]
impl SqlSession for DuckSession {
    fn dialect(&self) -> Dialect {
        Dialect::DuckDb
    }

    async fn execute(&mut self, sql: &str) -> Result<u64, SinkError> {
        let owned = sql.to_string();
        self.run(sql, move |c| {
            c.execute(&owned, []).map(|n| n as u64).map_err(classify)
        })
        .await
    }

    async fn batch(&mut self, sql: &str) -> Result<(), SinkError> {
        let owned = sql.to_string();
        self.run(sql, move |c| c.execute_batch(&owned).map_err(classify))
            .await
    }

    async fn query(&mut self, sql: &str) -> Result<QueryResult, SinkError> {
        let owned = sql.to_string();
        self.run(sql, move |c| run_query(c, &owned)).await
    }

    async fn insert(
        &mut self,
        table: &str,
        rows: Vec<Vec<Option<String>>>,
    ) -> Result<(), SinkError> {
        let table = table.to_string();
        self.run(&format!("append to {table}"), move |c| {
            let mut app = c.appender(&table).map_err(transient)?;
            for row in &rows {
                app.append_row(duckdb::appender_params_from_iter(
                    row.iter().map(|v| v.as_deref()),
                ))
                .map_err(classify)?;
            }
            app.flush().map_err(classify)
        })
        .await
    }

    async fn rows_of_loads(&mut self, table: &str) -> Result<Option<String>, SinkError> {
        let Some(f) = self.rows_of_loads.clone() else {
            return Ok(None);
        };
        let table = table.to_string();
        self.run(&format!("rows of loads in {table}"), move |c| {
            f(c, &table).map(Some)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::{schema, test_events, Load, LoadBatch};

    #[test]
    fn the_default_limit_makes_room_for_the_indexes_up_to_duckdbs_own() {
        let fit = MemoryFit {
            cap: 1000,
            ceiling: 1_000_000,
            limit: 1000,
        };
        assert_eq!(fit.target(0), 1000);
        assert_eq!(fit.target(300), 1600);
        assert_eq!(fit.target(10_000_000), 1_000_000);
    }

    /// Only the memory limit follows the indexes.
    const MEMORY: Defaults = Defaults {
        memory_limit: true,
        memory_cap: None,
        checkpoint_threshold: false,
    };

    #[test]
    fn the_default_checkpoint_threshold_is_twice_the_indexes_within_bounds() {
        let fit = CheckpointFit {
            threshold: DEFAULT_CHECKPOINT_THRESHOLD,
        };
        assert_eq!(fit.target(0), DEFAULT_CHECKPOINT_THRESHOLD);
        assert_eq!(fit.target(100 << 20), 200 << 20);
        assert_eq!(fit.target(10 << 30), MAX_CHECKPOINT_THRESHOLD);
    }

    // Each checkpoint writes every index whole, so the default threshold grows with
    // the keyed tables (here `collector_user_traits`, one row per user), as measured
    // after each call (before a checkpoint writes them out); the registry of loaded ids, which has no index, does not move
    // it. A sink opened without the agent's config keeps DuckDB's own.
    #[tokio::test]
    async fn the_default_checkpoint_threshold_follows_the_indexes_not_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.duckdb");
        let checkpoint = Defaults {
            memory_limit: false,
            memory_cap: None,
            checkpoint_threshold: true,
        };
        let threshold = |sink: &DuckDbSink| {
            let st = sink.state.lock().unwrap();
            let setting: String = st
                .conn
                .as_ref()
                .unwrap()
                .query_row("SELECT current_setting('checkpoint_threshold')", [], |r| {
                    r.get(0)
                })
                .unwrap();
            (setting, st.checkpoint.map(|c| c.threshold))
        };
        let sink = DuckDbSink::open_with(&path, String::new(), None, checkpoint).unwrap();
        assert_eq!(threshold(&sink), ("16.0 MiB".into(), Some(16 << 20)));
        // A query runs in a session; the fit follows the next call on the loads'
        // connection (here one that does nothing else).
        let fitted = || sink.with_conn(|_, _| Ok(()));
        sink.query(
            "INSERT INTO message_ids SELECT uuid()::VARCHAR, 'tracks', 0, 0 FROM range(400000)",
        )
        .await
        .unwrap();
        fitted().await.unwrap();
        assert_eq!(threshold(&sink), ("16.0 MiB".into(), Some(16 << 20)));
        sink.query(
            "INSERT INTO collector_user_traits SELECT uuid()::VARCHAR, '{}' FROM range(110000)",
        )
        .await
        .unwrap();
        fitted().await.unwrap();
        let raised = threshold(&sink).1.unwrap();
        assert!(raised > 16 << 20, "{raised}");
        drop(sink);
        let plain = DuckDbSink::open(&path).unwrap();
        assert_eq!(threshold(&plain), ("16.0 MiB".into(), None));
    }

    /// A random-looking id in a UUID's shape (as SDKs send them: no shared prefixes
    /// for the index to fold), from `n` (splitmix64).
    fn uuid_like(n: usize) -> String {
        let mix = |mut z: u64| {
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
            z ^ (z >> 31)
        };
        let (a, b) = (mix(n as u64 * 2 + 1), mix(n as u64 * 2 + 2));
        let h = format!("{a:016x}{b:016x}");
        format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    }

    // The registry grows with every id loaded; it has no index, so under a fixed
    // limit of 24 MB, 200k ids load (with the old primary key, whose index DuckDB
    // keeps whole in memory, commits failed from about 125k ids) and the default
    // limit never has to rise for it.
    #[tokio::test]
    async fn the_registry_loads_within_a_fixed_memory_limit() {
        let dir = tempfile::tempdir().unwrap();
        let sink = DuckDbSink::open_with(&dir.path().join("w.duckdb"), String::new(), None, MEMORY)
            .unwrap();
        let cap = 24_000_000;
        {
            let mut st = sink.state.lock().unwrap();
            let fit = fit_default_memory(st.conn.as_ref().unwrap(), cap).unwrap();
            assert_eq!(fit.limit, cap);
            st.memory = Some(fit);
        }
        let (loads, per_load) = (25, 8000);
        for l in 0..loads {
            let batches = (0..per_load / 500)
                .map(|b| {
                    let batch: Vec<serde_json::Value> = (0..500)
                        .map(|i| {
                            serde_json::json!({
                                "type": "alias", "previousId": "p", "userId": "u",
                                "messageId": uuid_like((l * 100 + b) * 1000 + i),
                            })
                        })
                        .collect();
                    LoadBatch::Decoded {
                        batch_id: (l * 100 + b) as i64,
                        events: test_events(serde_json::json!({ "batch": batch })),
                    }
                })
                .collect();
            let prepared = schema::prepare(Load { shard: 0, batches });
            let stats = sink.write(Arc::new(prepared)).await.unwrap();
            assert_eq!(stats.inserted, per_load as u64, "load {l}");
        }
        let count = sink.query("SELECT count(*) FROM aliases").await.unwrap();
        assert_eq!(count.rows[0][0].as_deref(), Some("200000"));
        // (The other tables' small indexes take a few MB; with the old key the
        // registry alone needed 128 bytes per id, 25.6 MB.)
        let limit = sink.state.lock().unwrap().memory.unwrap().limit;
        assert!(limit < cap + 8_000_000, "{limit}");
        // The same ids again: every one a duplicate, found without an index.
        let batch: Vec<serde_json::Value> = (0..500)
            .map(|i| serde_json::json!({"type": "alias", "previousId": "p", "userId": "u", "messageId": uuid_like(i)}))
            .collect();
        let prepared = schema::prepare(Load {
            shard: 0,
            batches: vec![LoadBatch::Decoded {
                batch_id: 0,
                events: test_events(serde_json::json!({ "batch": batch })),
            }],
        });
        let stats = sink.write(Arc::new(prepared)).await.unwrap();
        assert_eq!((stats.inserted, stats.duplicates), (0, 500));
    }

    fn one_load(batch_id: i64, batch: serde_json::Value) -> Arc<Prepared> {
        Arc::new(schema::prepare(Load {
            shard: 0,
            batches: vec![LoadBatch::Decoded {
                batch_id,
                events: test_events(serde_json::json!({ "batch": batch })),
            }],
        }))
    }

    // Two ids whose hashes are equal are still two ids: the registry compares whole
    // ids where the hashes matched. (An MD5 collision cannot be found here, so the
    // registry is given a row that claims the hash of an id it does not hold.)
    #[tokio::test]
    async fn ids_that_share_a_hash_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let sink = DuckDbSink::open(&dir.path().join("w.duckdb")).unwrap();
        sink.query("INSERT INTO message_ids VALUES ('other', 'tracks', 0, md5_number_lower('x'))")
            .await
            .unwrap();
        let ev = |id: &str| serde_json::json!([{"type": "track", "messageId": id, "userId": "u", "event": "E"}]);
        let st = sink.write(one_load(1, ev("x"))).await.unwrap();
        assert_eq!((st.inserted, st.duplicates), (1, 0));
        let st = sink.write(one_load(3, ev("x"))).await.unwrap();
        assert_eq!((st.inserted, st.duplicates), (0, 1));
        let n = sink.query("SELECT count(*) FROM tracks").await.unwrap();
        assert_eq!(n.rows[0][0].as_deref(), Some("1"));
    }

    // A warehouse whose registry still has its primary key (migration 2, before 12)
    // is rebuilt without it, keeping every id: the ids loaded before are still
    // duplicates, and a new id loads.
    #[tokio::test]
    async fn a_keyed_registry_is_rebuilt_without_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.duckdb");
        let sink = DuckDbSink::open(&path).unwrap();
        let ev = |ids: &[&str]| {
            serde_json::Value::Array(
                ids.iter()
                    .map(|id| serde_json::json!({"type": "track", "messageId": id, "userId": "u", "event": "E"}))
                    .collect(),
            )
        };
        sink.write(one_load(1, ev(&["a", "b"]))).await.unwrap();
        for sql in [
            "DROP TABLE message_ids",
            "CREATE TABLE message_ids (message_id VARCHAR PRIMARY KEY, table_name VARCHAR NOT NULL, load_id BIGINT NOT NULL)",
            "INSERT INTO message_ids VALUES ('a', 'tracks', 1), ('b', 'tracks', 1)",
            "DELETE FROM collector_migrations WHERE version = 12",
        ] {
            sink.query(sql).await.unwrap();
        }
        drop(sink);
        let sink = DuckDbSink::open(&path).unwrap();
        let keys = sink
            .query("SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'message_ids' AND constraint_type IN ('PRIMARY KEY', 'UNIQUE')")
            .await
            .unwrap();
        assert_eq!(keys.rows[0][0].as_deref(), Some("0"));
        let hashed = sink
            .query("SELECT count(*) FROM message_ids WHERE id_hash = md5_number_lower(message_id)")
            .await
            .unwrap();
        assert_eq!(hashed.rows[0][0].as_deref(), Some("2"));
        let st = sink.write(one_load(2, ev(&["a", "b", "c"]))).await.unwrap();
        assert_eq!((st.inserted, st.duplicates), (1, 2));
    }

    // A panic while the connection is in use (a bug some event reaches) leaves the
    // mutex poisoned; the sink opens the warehouse again instead of refusing every
    // load after it (which would stop the drain for good).
    #[tokio::test]
    async fn a_panic_in_a_write_does_not_stop_the_loads_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let sink = DuckDbSink::open(&dir.path().join("w.duckdb")).unwrap();
        let load = |id: &str, batch| {
            Load::events(
                0,
                batch,
                test_events(
                    serde_json::json!({"batch": [{"type": "track", "event": "E", "messageId": id, "userId": "u"}]}),
                ),
            )
        };
        sink.load(&load("a", 1)).await.unwrap();
        let r = sink
            .with_conn(|conn, _| -> Result<(), SinkError> {
                conn.execute_batch("BEGIN; DELETE FROM tracks").unwrap();
                panic!("a planted bug");
            })
            .await;
        assert!(matches!(r, Err(SinkError::Transient(_))), "{r:?}");
        assert!(sink.state.is_poisoned());
        let st = sink.load(&load("b", 2)).await.unwrap();
        assert_eq!(st.inserted, 1);
        // What the panicking transaction did was rolled back.
        let ids = sink
            .query("SELECT string_agg(message_id, ',' ORDER BY message_id) FROM tracks")
            .await
            .unwrap();
        assert_eq!(ids.rows[0][0].as_deref(), Some("a,b"));
    }

    // A panic preparing one event (a bug it reaches) quarantines that event with the
    // panic's message; the events beside it load.
    #[test]
    fn a_panic_preparing_an_event_quarantines_that_event() {
        let events = test_events(serde_json::json!({"batch": [
            {"type": "track", "event": "E", "messageId": "ok", "userId": "u"},
            {"type": "track", "event": "E", "messageId": schema::PANIC_IN_PREPARE, "userId": "u"},
        ]}));
        let p = schema::prepare(Load::events(0, 1, events));
        assert_eq!(p.rows.len(), 1);
        assert_eq!(p.rows[0].message_id(), "ok");
        assert_eq!(p.quarantine.len(), 1);
        assert_eq!(p.quarantine[0].message_id, schema::PANIC_IN_PREPARE);
        assert!(
            p.quarantine[0].reason.contains("a test's planted bug"),
            "{}",
            p.quarantine[0].reason
        );
    }
}
