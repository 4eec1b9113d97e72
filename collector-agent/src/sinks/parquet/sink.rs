//! The Parquet lake sink. DuckDB (in process) stages rows, keeps the lake's state file,
//! and writes the Parquet files with `COPY … TO … (FORMAT parquet)`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use collector_core::{EventKind, StoredEvent};
use duckdb::{params, Connection};

use super::compact::{self, Compacted, Policy};
use super::config::ParquetConfig;
use crate::sinks::duckdb::config::DEFAULT_MEMORY_CAP;
use crate::sinks::duckdb::sink::{
    apply_migrations, apply_plan_ddl, classify, create_fixed_table_sql, dead_letters, finish_load,
    fit_default_memory, ident, in_utc, index_bytes, load_catalog, open_error, out_of_memory,
    quarantined, register_ids, release_when_idle, retry_after_raise, sql_type, stage, transient,
    write_rejected, write_state, write_users, DuckSession, LiveSessions, MemoryFit, CATALOG_SQL,
    REGISTRY_SQL, UNKEYED_REGISTRY_SQL,
};
use crate::sinks::schema::{self, DeadLetter, LogicalType, Prepared, QuarantinedEvent};
use crate::sinks::tables::{self, Catalog, TableKind, TableLoad, TableRow};
use crate::sinks::{IdleStats, Load, LoadStats, QueryResult, Relational, Sink, SinkError};

/// The lake's state folder, beside the table folders.
pub(super) const STATE_DIR: &str = "_collector";

/// The partition keys of the layout (`table=tracks/date=2026-11-25/…`). Readers that
/// discover partitions (Spark, BigQuery, DuckDB's `hive_partitioning`) take them as
/// columns of every table, so no file may hold a column of either name: Spark refuses
/// such a table, DuckDB shows the partition's value instead of the file's. A property
/// so named is recorded in `rejected_values` and stays in the event's JSON.
const PARTITION_COLUMNS: &[&str] = &["table", "date"];

fn migrations() -> Vec<(i32, &'static str, String)> {
    vec![
        (
            1,
            "loaded_batches manifest and dead letters",
            "CREATE TABLE loaded_batches (shard INTEGER NOT NULL, batch_id BIGINT NOT NULL, table_name VARCHAR NOT NULL, date VARCHAR NOT NULL, file VARCHAR NOT NULL, rows BIGINT NOT NULL, load_id BIGINT NOT NULL, loaded_at TIMESTAMP NOT NULL, PRIMARY KEY (file));
CREATE TABLE dead_letters (shard INTEGER NOT NULL, batch_id BIGINT NOT NULL, error VARCHAR NOT NULL, blob BLOB NOT NULL, loaded_at TIMESTAMP NOT NULL, PRIMARY KEY (shard, batch_id));"
                .to_string(),
        ),
        (
            2,
            "message_ids registry (one message_id per lake), quarantine",
            REGISTRY_SQL.to_string(),
        ),
        (
            3,
            "per-event tables, flattened columns, rejected_values",
            CATALOG_SQL.to_string(),
        ),
        (
            4,
            "privacy_requests, privacy_request_stores, policy_versions",
            crate::privacy::ddl(Relational::DuckDb),
        ),
        (
            5,
            "one file per table, date and load: the manifest lists its batches, and a file committed but not yet renamed into place",
            "ALTER TABLE loaded_batches ADD COLUMN batch_ids BIGINT[];
ALTER TABLE loaded_batches ADD COLUMN staged VARCHAR;"
                .to_string(),
        ),
        (
            6,
            "message_ids without an index (an id_hash column instead): memory and checkpoints no longer grow with every event loaded",
            UNKEYED_REGISTRY_SQL.to_string(),
        ),
        (
            7,
            "identity graph, identities, identity_merges, profiles, identity_dirty, identity_pending, audience_membership: identity and audiences over the lake's files",
            // With `ddl_pending`'s watermark, so the first run reads the events already
            // in the lake's files: an erasure resolves the person through this graph
            // (before, through the identify events), and a graph without the lake's
            // history would miss the ids only old events join.
            [
                crate::identity::ddl(Relational::DuckDb),
                crate::identity::run::ddl_dirty(Relational::DuckDb),
                crate::identity::run::ddl_pending(Relational::DuckDb),
                crate::audiences::ddl(Relational::DuckDb),
            ]
            .concat(),
        ),
        (
            8,
            "activation_outbox, activation_log: activation from the lake",
            crate::destinations::outbox::ddl(Relational::DuckDb),
        ),
        (
            9,
            "users as a table of the state file, written with each load (it was a view over identifies' columns, which lost traits named like them); filled from the lake's identifies at the next open",
            format!(
                "{};
{}CREATE TABLE {USERS_BACKFILL} (pending BOOLEAN);
",
                create_fixed_table_sql("users", TableKind::Users),
                crate::sinks::tables::user_traits_ddl(Relational::DuckDb),
            ),
        ),
        (
            10,
            "collector_id_activity, collector_id_traits, collector_id_consent: what each pair of ids did, so a profile is computed from it instead of from the lake's files",
            crate::identity::run::ddl_activity(Relational::DuckDb),
        ),
        (
            11,
            "files as loads write them now: instants marked as UTC (they were local date-times, which BigQuery loads as DATETIME and Spark as TIMESTAMP_NTZ), and no partition keys an erasure wrote into a file; older files are rewritten at the next open",
            format!("CREATE TABLE {FILES_REWRITE} (pending BOOLEAN);"),
        ),
        (
            12,
            "identity_pending.loaded_at, as in every SQL warehouse",
            crate::identity::run::ddl_pending_stamp(Relational::DuckDb),
        ),
        (
            13,
            "collector_compactions: an idle agent merges a partition's small files; loaded_batches.compacted_into",
            compact::MIGRATION_SQL.to_string(),
        ),
        (
            14,
            "loaded_batches.erased_rows: the rows privacy erasures removed from each file (all of them when the file is gone)",
            "ALTER TABLE loaded_batches ADD COLUMN erased_rows BIGINT DEFAULT 0;".to_string(),
        ),
    ]
}

/// The mark migration 11 leaves until every file of the lake is as loads and
/// erasures write them now ([`rewrite_old_files`]).
const FILES_REWRITE: &str = "collector_files_rewrite";

/// Whether the state file holds the mark table `name`.
fn marked(conn: &Connection, name: &str) -> Result<bool, SinkError> {
    let n: i64 = conn
        .query_row(
            &format!("SELECT count(*) FROM duckdb_tables() WHERE table_name = {} AND database_name = current_database()", lit(name)),
            [],
            |r| r.get(0),
        )
        .map_err(transient)?;
    Ok(n > 0)
}

/// Once, after migration 11: rewrites each file of the lake written before it, so
/// every file reads the same in every engine. Its instants (`TIMESTAMP`, a local
/// date-time to Parquet) become `TIMESTAMPTZ` (adjusted to UTC: the same instants),
/// and an erasure's rewrite that copied the path's `table` and `date` into the file
/// (Spark and Arrow refuse such a table) loses them, when they hold nothing but the
/// path's values. Each file is rewritten to a temp file and renamed over it, with the
/// same rows: a reader sees one or the other. A crash midway leaves the mark; the
/// next open goes on, skipping the files already rewritten. Under the lake's lock (the
/// state file), so no load writes meanwhile.
fn rewrite_old_files(conn: &Connection, root: &Path) -> Result<(), SinkError> {
    if !marked(conn, FILES_REWRITE)? {
        return Ok(());
    }
    let mut files: Vec<(String, String, PathBuf)> = Vec::new();
    for (table, date, dir) in partitions(root) {
        for f in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if is_parquet(&f.path()) {
                files.push((table.clone(), date.clone(), f.path()));
            }
        }
    }
    files.sort();
    let mut rewritten = 0usize;
    for (table, date, path) in &files {
        let file = format!(
            "read_parquet({}, hive_partitioning = false)",
            lit(&path.display().to_string())
        );
        let columns: Vec<(String, String)> = {
            let mut stmt = conn
                .prepare(&format!("DESCRIBE SELECT * FROM {file}"))
                .map_err(transient)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(transient)?;
            rows.collect::<Result<_, _>>().map_err(transient)?
        };
        let zoned: Vec<String> = columns
            .iter()
            .filter(|(_, ty)| ty == "TIMESTAMP")
            .map(|(n, _)| format!("CAST({0} AS TIMESTAMPTZ) AS {0}", ident(n)))
            .collect();
        let mut path_keys: Vec<&str> = Vec::new();
        for (key, value) in [("table", table), ("date", date)] {
            if !columns.iter().any(|(n, _)| n == key) {
                continue;
            }
            let other: i64 = conn
                .query_row(
                    &format!(
                        "SELECT count(*) FROM {file} WHERE CAST({} AS VARCHAR) IS DISTINCT FROM {}",
                        ident(key),
                        lit(value)
                    ),
                    [],
                    |r| r.get(0),
                )
                .map_err(transient)?;
            if other == 0 {
                path_keys.push(key);
            }
        }
        if zoned.is_empty() && path_keys.is_empty() {
            continue;
        }
        let exclude = if path_keys.is_empty() {
            String::new()
        } else {
            format!(
                " EXCLUDE ({})",
                path_keys
                    .iter()
                    .map(|k| ident(k))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let replace = if zoned.is_empty() {
            String::new()
        } else {
            format!(" REPLACE ({})", zoned.join(", "))
        };
        let staged = root.join(STATE_DIR).join("tmp").join(format!(
            "rewrite-{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
        let _ = std::fs::remove_file(&staged);
        conn.execute_batch(&format!(
            "COPY (SELECT *{exclude}{replace} FROM {file}) TO {} (FORMAT parquet)",
            lit(&staged.display().to_string())
        ))
        .map_err(transient)?;
        std::fs::rename(&staged, path)
            .map_err(|e| SinkError::Transient(format!("rename into {}: {e}", path.display())))?;
        rewritten += 1;
    }
    conn.execute_batch(&format!("DROP TABLE {FILES_REWRITE}"))
        .map_err(transient)?;
    if rewritten > 0 {
        tracing::info!(
            files = rewritten,
            "lake: files written by an older release rewritten as loads write them now (once, after an upgrade)"
        );
    }
    Ok(())
}

/// The lake's partition folders: `(table, date, folder)` of each `table=…/date=…/`.
fn partitions(root: &Path) -> Vec<(String, String, PathBuf)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = t.file_name().to_string_lossy().to_string();
        let Some(table) = name.strip_prefix("table=") else {
            continue;
        };
        for d in std::fs::read_dir(t.path()).into_iter().flatten().flatten() {
            let dname = d.file_name().to_string_lossy().to_string();
            if let Some(date) = dname.strip_prefix("date=") {
                out.push((table.to_string(), date.to_string(), d.path()));
            }
        }
    }
    out
}

fn is_parquet(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some("parquet")
}

/// Whether the folder `dir` holds a Parquet file (`read_parquet` fails on a pattern
/// that matches none).
fn has_parquet(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|f| is_parquet(&f.path()))
}

/// The mark migration 9 leaves until `users` holds what the lake's identifies say
/// ([`backfill_users`]).
const USERS_BACKFILL: &str = "collector_users_backfill";

/// Fills `users` from the identifies already in the lake's files, once, after
/// migration 9 (a fresh lake has none: the mark just goes). The files are read one at
/// a time (each holds one load's identifies of one day, so memory stays bounded
/// whatever the lake's size); each identify's event (`raw`) is prepared again and
/// merged as its load's `users` rows would have been ([`write_users`]; the merge does
/// not depend on order or grouping). One transaction with the mark's removal: a crash
/// midway leaves the mark, and the next open starts again from nothing. Called after
/// the committed files are in place. Returns the catalog with `users`' columns.
fn backfill_users(
    conn: &mut Connection,
    mut catalog: Catalog,
    root: &Path,
) -> Result<Catalog, SinkError> {
    if !marked(conn, USERS_BACKFILL)? {
        return Ok(catalog);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("table=identifies"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|date| {
            std::fs::read_dir(date.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|f| f.path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("parquet"))
        .collect();
    files.sort();
    let tx = conn.transaction().map_err(transient)?;
    // The columns the catalog already lists for `users` (the view had them).
    for (name, ty) in catalog.columns("users") {
        tx.execute_batch(&format!(
            "ALTER TABLE users ADD COLUMN IF NOT EXISTS {} {}",
            ident(name),
            sql_type(*ty)
        ))
        .map_err(transient)?;
    }
    let (mut read, mut unprepared) = (0usize, 0usize);
    for file in &files {
        let events: Vec<StoredEvent> = {
            let mut stmt = tx
                .prepare(&format!(
                    "SELECT message_id, CAST(raw AS VARCHAR) FROM read_parquet({}) WHERE user_id IS NOT NULL",
                    lit(&file.display().to_string())
                ))
                .map_err(transient)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(StoredEvent {
                        message_id: r.get(0)?,
                        kind: EventKind::Identify,
                        anonymous_id: None,
                        user_id: None,
                        received_at_ms: 0,
                        timestamp_ms: 0,
                        json: r.get(1)?,
                    })
                })
                .map_err(transient)?;
            rows.collect::<Result<_, _>>().map_err(transient)?
        };
        read += events.len();
        let p = schema::prepare(Load::events(0, 0, events));
        // Each loaded once, so each prepares again; an agent that no longer can says so.
        unprepared += p.quarantine.len();
        let plan = catalog.plan(&p);
        apply_plan_ddl(&tx, &plan, |t| t == "users")?;
        if let Some(users) = plan.loads.iter().find(|l| l.kind == TableKind::Users) {
            // Every one of them is in the lake's `identifies`.
            write_users(&tx, users)?;
        }
        catalog = plan.catalog;
    }
    if unprepared > 0 {
        tracing::warn!(
            identifies = unprepared,
            "lake: identifies whose events no longer prepare are not in users"
        );
    }
    tx.execute_batch(&format!(
        "DROP TABLE IF EXISTS stage_users; DROP TABLE {USERS_BACKFILL};"
    ))
    .map_err(transient)?;
    tx.commit().map_err(transient)?;
    if read > 0 {
        tracing::info!(
            identifies = read,
            files = files.len(),
            "lake: users filled from the identifies already loaded (once, after an upgrade)"
        );
    }
    Ok(catalog)
}

/// A Parquet lake in a folder.
pub struct ParquetSink {
    root: PathBuf,
    state: Arc<Mutex<LakeState>>,
    /// Sessions open on the state file now (see [`LiveSessions`]).
    sessions: LiveSessions,
    /// `compact_min_files` when an idle agent compacts (`compact = true`); `None`
    /// when it does not, or the filesystem cannot (see [`compact`]).
    compaction: Arc<Mutex<Option<usize>>>,
}

/// The lake's DuckDB: its state file, and how its settings were made.
struct LakeState {
    /// `None` after DuckDB invalidated the database (a fatal error, such as a
    /// checkpoint that found no memory or disk): opened again at the next call.
    conn: Option<Connection>,
    catalog: Catalog,
    /// The configured `SET`s, applied at every open.
    settings: String,
    /// When `memory_limit` is not configured: the cap of the default one (`None`:
    /// DuckDB's own default, and no fitting).
    default_memory_cap: Option<u64>,
    /// The default `memory_limit` as it follows the indexes and DuckDB's running out
    /// of memory (see [`MemoryFit`]).
    memory: Option<MemoryFit>,
}

/// SQL string literal.
pub(super) fn lit(s: &str) -> String {
    crate::sinks::sql_lit(s)
}

/// Opens (creating if needed) the lake folder and its state file, applies `settings`
/// and caps the default memory limit at `memory_cap`, brings the state up to date and
/// finishes what a crash left (staged files, old files to rewrite).
fn open_state(
    root: &Path,
    settings: &str,
    memory_cap: Option<u64>,
) -> Result<(Connection, Catalog, Option<MemoryFit>), SinkError> {
    let state = root.join(STATE_DIR);
    std::fs::create_dir_all(state.join("tmp"))
        .map_err(|e| SinkError::Permanent(format!("{}: {e}", state.display())))?;
    let mut conn = Connection::open(state.join("state.duckdb")).map_err(open_error)?;
    in_utc(&conn)?;
    if !settings.is_empty() {
        conn.execute_batch(settings)
            .map_err(|e| SinkError::Permanent(format!("warehouse settings: {e}")))?;
    }
    let memory = memory_cap
        .map(|cap| fit_default_memory(&conn, cap))
        .transpose()?;
    apply_migrations(&mut conn, migrations())?;
    compact::finish_interrupted(&mut conn, root)?;
    publish_pending(&conn, root)?;
    remove_stale_staged(&conn, root)?;
    rewrite_old_files(&conn, root)?;
    let catalog = load_catalog(&conn)?.reserving_in_files(PARTITION_COLUMNS);
    let catalog = backfill_users(&mut conn, catalog, root)?;
    Ok((conn, catalog, memory))
}

impl LakeState {
    /// The connection, opened again if a fatal error closed it.
    fn conn(&mut self, root: &Path) -> Result<&mut Connection, SinkError> {
        if self.conn.is_none() {
            let (conn, catalog, memory) =
                open_state(root, &self.settings, self.default_memory_cap)?;
            tracing::warn!(path = %root.display(), "lake state opened again after a fatal error");
            self.catalog = catalog;
            self.memory = MemoryFit::reopened(&conn, memory, self.memory)?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just opened"))
    }

    /// After a call: fits a default limit to the indexes, or raises it after DuckDB
    /// ran out of memory (see [`MemoryFit`]). Whether the limit is higher now.
    fn fit(&mut self, out_of_memory: bool) -> bool {
        match (self.memory.as_mut(), self.conn.as_ref()) {
            (Some(fit), Some(conn)) => fit.fit(conn, index_bytes(conn), out_of_memory),
            _ => false,
        }
    }

    /// After an error: if DuckDB has invalidated the database, closes it, so the next
    /// call opens it again (DuckDB refuses every statement until it is).
    fn check(&mut self, root: &Path) -> bool {
        let invalid = self.conn.as_ref().is_some_and(|c| {
            c.execute_batch("SELECT version FROM collector_migrations LIMIT 1")
                .is_err()
        });
        if invalid {
            tracing::error!(path = %root.display(), "DuckDB invalidated the lake's state after a fatal error; it is opened again at the next call (nothing was acked)");
            self.conn = None;
        }
        invalid
    }
}

/// How long an idle agent goes on starting compactions before it drains again (the
/// rest waits for the next idle moment).
const IDLE_COMPACTION_BUDGET: std::time::Duration = std::time::Duration::from_secs(10);

fn log_compactions(done: &[Compacted]) {
    for c in done {
        tracing::info!(
            table = %c.table,
            date = %c.date,
            files = c.files_before,
            into = c.files_after,
            rows = c.rows,
            mb = format!("{:.1}", c.bytes_after as f64 / 1e6),
            "lake: small files compacted"
        );
    }
}

/// Logs a failed compaction; switches compaction off when the filesystem cannot do it.
fn compaction_failed(compaction: &Mutex<Option<usize>>, e: &SinkError) {
    if e.to_string().contains(compact::UNSUPPORTED) {
        tracing::warn!(error = %e, "lake: compaction switched off (the files stay as loads wrote them)");
        *compaction.lock().unwrap_or_else(|p| p.into_inner()) = None;
    } else {
        tracing::warn!(error = %e, "lake: compaction failed; tried again when the agent next idles");
    }
}

impl ParquetSink {
    /// Compacts the partitions due under `policy` now (with no session open; else
    /// nothing), whatever the configuration says; what was compacted. An idle agent
    /// does the same with today's date and a time budget (see [`compact`]).
    pub async fn compact(&self, policy: Policy) -> Result<Vec<Compacted>, SinkError> {
        let sessions = self.sessions.clone();
        self.with_conn(move |c, _, root| {
            if !sessions.none() {
                return Ok(Vec::new());
            }
            compact::compact_due(c, root, &policy)
        })
        .await
    }

    /// The partitions an idle agent would look at under `policy` (tests: what the
    /// manifest alone says, before any folder is listed).
    #[doc(hidden)]
    pub async fn compaction_candidates(
        &self,
        policy: Policy,
    ) -> Result<Vec<(String, String)>, SinkError> {
        self.with_conn(move |c, _, _| compact::candidates(c, &policy))
            .await
    }

    /// Opens (creating if needed) the lake folder and its state file, DuckDB's settings
    /// left to the agent.
    pub fn open(root: &Path) -> Result<ParquetSink, SinkError> {
        ParquetSink::open_config(&ParquetConfig::at(root))
    }

    /// Opens the configured lake with its DuckDB keys (`memory_limit`, `memory_cap`,
    /// `threads`).
    pub fn open_config(cfg: &ParquetConfig) -> Result<ParquetSink, SinkError> {
        let permanent = |e: anyhow::Error| SinkError::Permanent(e.to_string());
        let settings = cfg.settings_sql().map_err(permanent)?;
        let default_memory_cap = match cfg.memory_limit {
            Some(_) => None,
            None => Some(
                cfg.memory_cap_bytes()
                    .map_err(permanent)?
                    .unwrap_or(DEFAULT_MEMORY_CAP),
            ),
        };
        let compaction = match cfg.compact {
            true => Some(cfg.compact_min_files().map_err(permanent)? as usize),
            false => None,
        };
        let (conn, catalog, memory) = open_state(&cfg.path, &settings, default_memory_cap)?;
        Ok(ParquetSink {
            sessions: LiveSessions::default(),
            compaction: Arc::new(Mutex::new(compaction)),
            root: cfg.path.clone(),
            state: Arc::new(Mutex::new(LakeState {
                conn: Some(conn),
                catalog,
                settings,
                default_memory_cap,
                memory,
            })),
        })
    }

    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &mut Catalog, &Path) -> Result<T, SinkError> + Send + 'static,
    ) -> Result<T, SinkError> {
        let mut f = Some(f);
        self.with_conn_retrying(false, move |c, catalog, root| {
            f.take().expect("called once without retries")(c, catalog, root)
        })
        .await
    }

    /// Runs `f` with the state connection on the blocking pool; with
    /// `retry_out_of_memory`, again at once while it runs out of memory and that raised
    /// the limit (as the DuckDB sink's loads).
    async fn with_conn_retrying<T: Send + 'static>(
        &self,
        retry_out_of_memory: bool,
        mut f: impl FnMut(&mut Connection, &mut Catalog, &Path) -> Result<T, SinkError> + Send + 'static,
    ) -> Result<T, SinkError> {
        let state = self.state.clone();
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || loop {
            let mut guard = state.lock().unwrap_or_else(|poisoned| {
                // A panic while the state database was in use (its transaction rolled
                // back as it unwound): open it again, catalog and all, rather than
                // refuse every load after it.
                state.clear_poison();
                let mut st = poisoned.into_inner();
                st.conn = None;
                st
            });
            let st = &mut *guard;
            // A state file that cannot be opened again says nothing about the load's
            // events.
            st.conn(&root).map_err(SinkError::not_the_datas)?;
            let out = f(st.conn.as_mut().expect("open"), &mut st.catalog, &root);
            let out_of_memory = matches!(&out, Err(e) if out_of_memory(e));
            let raised = st.fit(out_of_memory);
            let out = match out {
                // A fatal error says nothing about the data: retry, never quarantine.
                Err(SinkError::Permanent(e)) if st.check(&root) => Err(SinkError::Transient(e)),
                Err(e) => {
                    st.check(&root);
                    Err(e)
                }
                ok => ok,
            };
            if !(retry_out_of_memory && retry_after_raise(&out, out_of_memory, raised)) {
                return out;
            }
        })
        .await
        .map_err(|e| SinkError::Transient(format!("lake task failed: {e}")))?
    }
}

/// The partition date of a row: the UTC date the edge received it (`received_at`, the
/// 6th value of base and per-event tables alike), as Segment's data lakes partition.
/// Not the event's own `timestamp`, which a client chooses (anything from 2000 on
/// passes as history): partitioned by it, one load of 5,000 events could write 5,000
/// files per table (the small-files problem every lake engine pays per file), and a
/// late event would be written into a day a downstream job had already read.
fn date_of(row: &TableRow<'_>) -> String {
    row.get(5)
        .and_then(|c| c.as_deref())
        .map(|t| t.chars().take(10).collect())
        .unwrap_or_else(|| "unknown".into())
}

/// `SELECT` of a staged table's rows, cast to their types, with `loaded_at`, as the
/// files hold them. Instants are `TIMESTAMPTZ` (the connection is in UTC), which
/// Parquet marks as adjusted to UTC: BigQuery loads them as `TIMESTAMP`, Spark as
/// `TimestampType`, Snowflake and Arrow as instants. A plain `TIMESTAMP` is written as
/// a local date and time, which those engines read as `DATETIME`,
/// `TIMESTAMP_NTZ` or a naive time (lakes written before this hold such files: the
/// agent's views read both).
fn typed_rows_sql(load: &TableLoad) -> String {
    let select: Vec<String> = load
        .columns
        .iter()
        .map(|(n, ty)| {
            let ty = match ty {
                LogicalType::Timestamp => "TIMESTAMPTZ",
                ty => sql_type(*ty),
            };
            format!("CAST({0} AS {ty}) AS {0}", ident(n))
        })
        .collect();
    format!(
        "SELECT {}, now() AS {} FROM {}",
        select.join(", "),
        ident(schema::LOADED_AT),
        ident(&format!("stage_{}", load.table)),
    )
}

/// Writes a prepared load, one Parquet file per table and date (a file per batch made
/// files too small for the engines that read lakes, and cost a `COPY` each).
///
/// Exactly once: the files are written to `_collector/tmp/`; the ids, the manifest
/// (each file with its temp name in `staged`), the catalog, the quarantine and the dead
/// letters are committed in one transaction; only then are the files renamed into place
/// and `staged` cleared. A crash before the commit leaves temp files that nothing lists
/// (removed at open; the retry loads the rows again under new names); a crash after it
/// leaves `staged` entries that [`publish_pending`] renames at open or before the next
/// load. No reader ever sees a row whose id was not committed. `users` (one row per
/// user, updated in place) is a table of the state file, written in the same
/// transaction as in a DuckDB warehouse: a lake never rewrites a file.
fn write(
    conn: &mut Connection,
    catalog: &mut Catalog,
    root: &Path,
    p: &Prepared,
) -> Result<LoadStats, SinkError> {
    publish_pending(conn, root)?;
    let tx = conn.transaction().map_err(transient)?;
    let (mut stats, load_id) = write_state(&tx, p)?;
    // The ids new to the lake are registered first, and the load is planned and
    // written from their events only.
    let known = register_ids(&tx, &p.rows, load_id)?;
    let fresh = p.new_rows(|r| !known.contains(r.message_id()));
    stats.count_fresh(p, &fresh);
    let plan = catalog.plan(&fresh);
    apply_plan_ddl(&tx, &plan, |t| t == "users")?;
    let first_batch = p.rows.iter().filter_map(|r| r.batch_id).min().unwrap_or(0);
    let name = if p.replay {
        format!("part-s{}-replay-l{load_id}.parquet", p.shard)
    } else {
        format!("part-s{}-b{first_batch}-l{load_id}.parquet", p.shard)
    };
    let mut staged_files = StagedFiles {
        root,
        files: Vec::new(),
        committed: false,
    };
    for load in plan.loads.iter().filter(|l| l.kind != TableKind::Users) {
        let table = &load.table;
        stage(&tx, load)?;
        let typed_sql = typed_rows_sql(load);
        // Each date's batches, for the manifest.
        let mut dates: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
        for (row, batch) in load.rows.iter().zip(&load.batch_ids) {
            dates.entry(date_of(row)).or_default().extend(*batch);
        }
        for (date, batches) in dates {
            let rel = format!("table={table}/date={date}/{name}");
            let staged = format!("{STATE_DIR}/tmp/{load_id}-{table}-{date}-{name}");
            let in_date = if date == "unknown" {
                "received_at IS NULL".to_string()
            } else {
                format!(
                    "substr(CAST(received_at AS VARCHAR), 1, 10) = {}",
                    lit(&date)
                )
            };
            // Listed before it exists, so a COPY that fails halfway leaves nothing.
            staged_files.files.push((staged.clone(), rel.clone()));
            // COPY answers how many rows it wrote; a file of none is not kept.
            let n = tx
                .execute(
                    &format!(
                        "COPY (SELECT * FROM ({typed_sql}) WHERE {in_date}) TO {} (FORMAT parquet)",
                        lit(&root.join(&staged).display().to_string())
                    ),
                    [],
                )
                .map_err(classify)? as i64;
            if n == 0 {
                let _ = std::fs::remove_file(root.join(&staged));
                staged_files.files.pop();
                continue;
            }
            let batch_ids = batches
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            tx.execute(
                &format!("INSERT INTO loaded_batches (shard, batch_id, table_name, date, file, rows, load_id, loaded_at, batch_ids, staged) VALUES (?, ?, ?, ?, ?, ?, ?, now()::TIMESTAMP, [{batch_ids}], ?)"),
                params![p.shard, batches.first().copied().unwrap_or(first_batch), table, date, rel, n, load_id, staged],
            )
            .map_err(transient)?;
        }
        // The staged rows are in memory until dropped.
        tx.execute_batch(&format!("DROP TABLE {}", ident(&format!("stage_{table}"))))
            .map_err(transient)?;
    }
    if let Some(users) = plan.loads.iter().find(|l| l.kind == TableKind::Users) {
        write_users(&tx, users)?;
        tx.execute_batch("DROP TABLE stage_users")
            .map_err(transient)?;
    }
    write_rejected(&tx, &plan)?;
    finish_load(&tx, load_id)?;
    if stats.inserted > 0 {
        // For the next identity run.
        tx.execute(
            "INSERT INTO identity_pending (load_id, loaded_at) VALUES (?, now()::TIMESTAMP)",
            params![load_id],
        )
        .map_err(transient)?;
    }
    tx.commit().map_err(transient)?;
    staged_files.committed = true;
    *catalog = plan.catalog;
    // Committed: the load is done whatever happens next. A file that cannot be renamed
    // now stays listed in `staged` and is renamed before the next load.
    if let Err(e) = publish(conn, root, &staged_files.files) {
        tracing::warn!(error = %e, "lake: committed files not yet renamed into place; retried before the next load");
    }
    Ok(stats)
}

/// A load's temp files (path under the lake, path in place): removed when the load
/// fails before its commit, so a retried load leaves no garbage behind.
struct StagedFiles<'a> {
    root: &'a Path,
    files: Vec<(String, String)>,
    committed: bool,
}

impl Drop for StagedFiles<'_> {
    fn drop(&mut self) {
        if !self.committed {
            for (staged, _) in &self.files {
                let _ = std::fs::remove_file(self.root.join(staged));
            }
        }
    }
}

/// Renames committed files from their temp names into place (a file already in place
/// was renamed before a crash), then clears their `staged` entries.
fn publish(conn: &Connection, root: &Path, files: &[(String, String)]) -> Result<(), SinkError> {
    if files.is_empty() {
        return Ok(());
    }
    for (staged, rel) in files {
        let (from, to) = (root.join(staged), root.join(rel));
        if !from.exists() {
            if to.exists() {
                continue;
            }
            // Neither: removed by hand. Nothing can bring the rows back; say so loudly
            // and stop listing the file as pending.
            tracing::error!(file = %rel, staged = %staged, "lake: a committed file is in neither place");
            continue;
        }
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| SinkError::Transient(format!("{}: {e}", dir.display())))?;
        }
        std::fs::rename(&from, &to)
            .map_err(|e| SinkError::Transient(format!("rename into {}: {e}", to.display())))?;
    }
    let list = files
        .iter()
        .map(|(_, rel)| lit(rel))
        .collect::<Vec<_>>()
        .join(", ");
    conn.execute_batch(&format!(
        "UPDATE loaded_batches SET staged = NULL WHERE file IN ({list})"
    ))
    .map_err(transient)
}

/// The manifest's files committed but not yet in place: (temp path, path in place).
fn staged_entries(conn: &Connection) -> Result<Vec<(String, String)>, SinkError> {
    let mut stmt = conn
        .prepare("SELECT staged, file FROM loaded_batches WHERE staged IS NOT NULL ORDER BY file")
        .map_err(transient)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(transient)?
        .collect::<Result<_, _>>()
        .map_err(transient);
    rows
}

/// Publishes what a crash (or a failed rename) left committed but not in place.
pub(super) fn publish_pending(conn: &Connection, root: &Path) -> Result<(), SinkError> {
    let pending = staged_entries(conn)?;
    if !pending.is_empty() {
        tracing::info!(
            files = pending.len(),
            "lake: renaming committed files into place"
        );
    }
    publish(conn, root, &pending)
}

/// Removes the temp files no committed load lists: what a crash before a commit (or
/// during an erasure) left, and the folders of compactions a crash stopped before
/// their commit (the interrupted ones committed are finished before). Only at open,
/// when nothing else writes.
fn remove_stale_staged(conn: &Connection, root: &Path) -> Result<(), SinkError> {
    let listed: BTreeSet<String> = staged_entries(conn)?.into_iter().map(|(s, _)| s).collect();
    for e in std::fs::read_dir(root.join(STATE_DIR).join("tmp"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let rel = format!("{STATE_DIR}/tmp/{}", e.file_name().to_string_lossy());
        if listed.contains(&rel) {
            continue;
        }
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_dir_all(e.path());
        } else {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

/// Points one temporary view per table at its Parquet files (an empty typed view when
/// there are none yet), so SQL reads the lake like any warehouse. (`users` is a table of
/// the state file, written with each load.)
fn refresh_views(conn: &Connection, catalog: &Catalog, root: &Path) -> Result<(), SinkError> {
    let mut tables: Vec<(String, TableKind)> = EventKind::ALL
        .iter()
        .map(|k| (k.table().to_string(), TableKind::Base(*k)))
        .collect();
    // A per-event table named like one of the state file's own (`profiles`, from an
    // event `Profiles` loaded before such names were reserved) gets no view: the view
    // would hide that table. Its files stay where they are, under `table=profiles/`.
    for t in catalog
        .event_tables()
        .filter(|t| !tables::is_reserved_table(t))
    {
        tables.push((t.to_string(), TableKind::Event));
    }
    for (table, kind) in tables {
        let dir = root.join(format!("table={table}"));
        // A partition folder can be empty (made just before a crash, or left by hand):
        // `read_parquet` fails on a pattern that matches no file.
        let has_files = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|d| has_parquet(&d.path()));
        let sql = if has_files {
            format!(
                "CREATE OR REPLACE TEMP VIEW {} AS {}",
                ident(&table),
                files_select(conn, &lit(&format!("{}/*/*.parquet", dir.display())), true)?
            )
        } else {
            let mut cols: Vec<String> = tables::fixed_columns(kind)
                .iter()
                .map(|c| format!("CAST(NULL AS {}) AS {}", sql_type(c.ty), ident(c.name)))
                .collect();
            cols.extend(
                catalog
                    .columns(&table)
                    .iter()
                    .map(|(n, ty)| format!("CAST(NULL AS {}) AS {}", sql_type(*ty), ident(n))),
            );
            format!(
                "CREATE OR REPLACE TEMP VIEW {} AS SELECT {}, CAST(NULL AS TIMESTAMP) AS {}, CAST(NULL AS VARCHAR) AS date WHERE false",
                ident(&table),
                cols.join(", "),
                schema::LOADED_AT
            )
        };
        conn.execute_batch(&sql).map_err(transient)?;
    }
    Ok(())
}

/// The rows of the Parquet files `files` (a pattern or a list, as SQL) as a table's view
/// reads them: with the path's `date` (when `hive`), and instants as `TIMESTAMP`.
/// Instants are `TIMESTAMPTZ` in the files written since they were marked as UTC,
/// `TIMESTAMP` in older ones; SQL reads them as every DuckDB warehouse holds them,
/// `TIMESTAMP` in UTC.
fn files_select(conn: &Connection, files: &str, hive: bool) -> Result<String, SinkError> {
    let files = format!("read_parquet({files}, hive_partitioning = {hive}, union_by_name = true)");
    let mut zoned: Vec<String> = Vec::new();
    let mut described = conn
        .prepare(&format!("DESCRIBE SELECT * FROM {files}"))
        .map_err(transient)?;
    let mut rows = described.query([]).map_err(transient)?;
    while let Some(r) = rows.next().map_err(transient)? {
        let (name, ty): (String, String) =
            (r.get(0).map_err(transient)?, r.get(1).map_err(transient)?);
        if ty == "TIMESTAMP WITH TIME ZONE" {
            zoned.push(format!("CAST({0} AS TIMESTAMP) AS {0}", ident(&name)));
        }
    }
    let replace = if zoned.is_empty() {
        String::new()
    } else {
        format!(" REPLACE ({})", zoned.join(", "))
    };
    let exclude = if hive { " EXCLUDE (\"table\")" } else { "" };
    Ok(format!("SELECT *{exclude}{replace} FROM {files}"))
}

/// The rows the loads listed in `identity_loads` wrote into `table`: a relation over
/// their files only, from the manifest (a file committed but not yet renamed is read
/// where it is, so without the path's `date`, which identity does not read), so an
/// identity run reads what its loads wrote, not the lake's whole history. A load whose
/// files were compacted is read from its partitions' files, keeping the rows whose
/// `message_id` these loads registered (identity also keeps only its loads'
/// `loaded_at`; the ids make this relation exact on its own). Files an erasure emptied and removed are
/// skipped; with no file left, the table's view, empty.
fn rows_of_loads(conn: &Connection, root: &Path, table: &str) -> Result<String, SinkError> {
    let mut stmt = conn
        .prepare(
            "SELECT file, staged, date, compacted_into IS NOT NULL FROM loaded_batches WHERE table_name = ? AND load_id IN (SELECT load_id FROM identity_loads) ORDER BY file",
        )
        .map_err(transient)?;
    let entries: Vec<(String, Option<String>, String, bool)> = stmt
        .query_map(params![table], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .map_err(transient)?
        .collect::<Result<_, _>>()
        .map_err(transient)?;
    // The partitions read whole (filtered by id): their compacted loads' rows are
    // somewhere among their files.
    let compacted: BTreeSet<PathBuf> = entries
        .iter()
        .filter(|e| e.3)
        .map(|(_, _, date, _)| root.join(format!("table={table}/date={date}")))
        .collect();
    let mut files: Vec<String> = entries
        .into_iter()
        .filter(|e| !e.3)
        .filter_map(|(file, staged, _, _)| {
            [Some(file), staged]
                .into_iter()
                .flatten()
                .map(|f| root.join(f))
                .find(|p| p.exists())
        })
        // A file in a partition read whole is read once.
        .filter(|p| !p.parent().is_some_and(|d| compacted.contains(d)))
        .map(|p| lit(&p.display().to_string()))
        .collect();
    for dir in &compacted {
        if has_parquet(dir) {
            files.push(lit(&format!("{}/*.parquet", dir.display())));
        }
    }
    if files.is_empty() {
        return Ok(format!("(SELECT * FROM {} WHERE false)", ident(table)));
    }
    let select = files_select(conn, &format!("[{}]", files.join(", ")), false)?;
    if compacted.is_empty() {
        return Ok(format!("({select})"));
    }
    Ok(format!(
        "(SELECT * FROM ({select}) WHERE message_id IN (SELECT message_id FROM message_ids WHERE load_id IN (SELECT load_id FROM identity_loads)))"
    ))
}

/// Rewrites every Parquet file under `root` that holds rows of these ids without them
/// (temp file in the state folder, then rename over it; a file left empty is removed).
/// Per table, the rows removed. Idempotent: a second run finds nothing.
fn erase_files(
    conn: &Connection,
    root: &Path,
    users: &[String],
    anons: &[String],
) -> Result<Vec<(String, i64)>, SinkError> {
    let list = |v: &[String]| {
        if v.is_empty() {
            "NULL".to_string()
        } else {
            v.iter().map(|s| lit(s)).collect::<Vec<_>>().join(", ")
        }
    };
    let (u, a) = (list(users), list(anons));
    let both: Vec<String> = users.iter().chain(anons).cloned().collect();
    let mut out: Vec<(String, i64)> = Vec::new();
    let Ok(tables) = std::fs::read_dir(root) else {
        return Ok(out);
    };
    let count = |sql: &str| -> Result<i64, SinkError> {
        conn.query_row(sql, [], |r| r.get::<_, i64>(0))
            .map_err(transient)
    };
    for t in tables.flatten() {
        let name = t.file_name().to_string_lossy().to_string();
        let Some(table) = name.strip_prefix("table=").map(str::to_string) else {
            continue;
        };
        let mut pred = format!("(user_id IN ({u}) OR anonymous_id IN ({a}))");
        if table == "aliases" {
            pred = format!("({pred} OR previous_id IN ({}))", list(&both));
        }
        let mut removed = 0i64;
        for date in std::fs::read_dir(t.path()).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(date.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let path = f.path();
                if path.extension().and_then(|e| e.to_str()) != Some("parquet") {
                    continue;
                }
                // The file's own columns: DuckDB would add the path's `table` and
                // `date` (it detects Hive partitions), and a rewrite would write them
                // into the file, which Spark and Arrow then refuse to read.
                let file = format!(
                    "{}, hive_partitioning = false",
                    lit(&path.display().to_string())
                );
                let n = count(&format!(
                    "SELECT count(*) FROM read_parquet({file}) WHERE {pred}"
                ))?;
                if n == 0 {
                    continue;
                }
                let total = count(&format!("SELECT count(*) FROM read_parquet({file})"))?;
                // The manifest's entry (none for a compaction's file) says what went,
                // so a file removed whole is no longer counted where compaction looks.
                // A crash between the file and this leaves the entry as it was: the
                // file is already without the rows, and compaction lists the folder.
                let rel = path
                    .strip_prefix(root)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .to_string();
                if total == n {
                    std::fs::remove_file(&path).map_err(|e| {
                        SinkError::Transient(format!("remove {}: {e}", path.display()))
                    })?;
                } else {
                    let staged = root.join(STATE_DIR).join("tmp").join(format!(
                        "erase-{}",
                        path.file_name().unwrap_or_default().to_string_lossy()
                    ));
                    let _ = std::fs::remove_file(&staged);
                    conn.execute_batch(&format!(
                        "COPY (SELECT * FROM read_parquet({file}) WHERE NOT COALESCE({pred}, false)) TO {} (FORMAT parquet)",
                        lit(&staged.display().to_string())
                    ))
                    .map_err(transient)?;
                    std::fs::rename(&staged, &path).map_err(|e| {
                        SinkError::Transient(format!("rename into {}: {e}", path.display()))
                    })?;
                }
                conn.execute(
                    "UPDATE loaded_batches SET erased_rows = COALESCE(erased_rows, 0) + ? WHERE file = ?",
                    params![n, rel],
                )
                .map_err(transient)?;
                removed += n;
            }
            // A partition left without files goes (its views read `*/*.parquet`).
            let _ = std::fs::remove_dir(date.path());
        }
        let _ = std::fs::remove_dir(t.path());
        out.push((table, removed));
    }
    out.sort();
    Ok(out)
}

#[async_trait]
impl Sink for ParquetSink {
    /// The lake's state database on a connection of its own, with the tables as views
    /// over the files: identity, audiences and privacy requests run in it (their
    /// tables are in the state file; the events are read from the files).
    async fn session(&self) -> Result<Option<Box<dyn crate::sinks::SqlSession + '_>>, SinkError> {
        let sessions = self.sessions.clone();
        let (conn, live) = self
            .with_conn(move |c, catalog, root| {
                let clone = c.try_clone().map_err(transient)?;
                refresh_views(&clone, catalog, root)?;
                // Counted under the lock that `idle` takes.
                Ok((clone, sessions.open()))
            })
            .await?;
        let state = self.state.clone();
        let root = self.root.clone();
        Ok(Some(Box::new(
            DuckSession::new(
                conn,
                Arc::new(move || {
                    if let Ok(mut st) = state.lock() {
                        st.fit(true);
                    }
                }),
            )
            .reading_loads(Arc::new(move |c, table| rows_of_loads(c, &root, table)))
            .counted(live),
        )))
    }

    async fn idle(&self, why: crate::sinks::Idle) -> Result<IdleStats, SinkError> {
        let sessions = self.sessions.clone();
        let compaction = self.compaction.clone();
        let state = self.state.clone();
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let mut stats = IdleStats::default();
            // A poisoned lock: the next call opens the state file again.
            let Ok(mut guard) = state.lock() else {
                return Ok(stats);
            };
            let st = &mut *guard;
            let min_files = *compaction.lock().unwrap_or_else(|p| p.into_inner());
            if let (Some(min_files), Some(conn)) = (min_files, st.conn.as_mut()) {
                if sessions.none() {
                    let policy = Policy::idle(min_files, IDLE_COMPACTION_BUDGET);
                    match compact::compact_due(conn, &root, &policy) {
                        Ok(done) => {
                            log_compactions(&done);
                            for c in &done {
                                stats.compactions += 1;
                                stats.files_merged += c.files_before as u64;
                                stats.files_written += c.files_after as u64;
                            }
                        }
                        Err(e) => {
                            stats.compaction_failed = true;
                            compaction_failed(&compaction, &e);
                            st.check(&root);
                        }
                    }
                }
            }
            if why == crate::sinks::Idle::Exiting {
                return Ok(stats);
            }
            let out = release_when_idle(
                st.conn.as_ref(),
                &sessions,
                st.memory,
                &st.settings,
                "parquet",
            );
            if out.is_err() {
                st.check(&root);
            }
            out.map(|()| stats)
        })
        .await
        .map_err(|e| SinkError::Transient(format!("lake task failed: {e}")))?
    }

    fn rows_in_files(&self) -> bool {
        true
    }

    async fn erase_files(
        &self,
        user_ids: &[String],
        anonymous_ids: &[String],
    ) -> Result<Vec<(String, i64)>, SinkError> {
        let (u, a) = (user_ids.to_vec(), anonymous_ids.to_vec());
        // Under the lake's lock: no load writes a file meanwhile.
        self.with_conn(move |c, _, root| {
            // A committed file not yet in place is erased like the others.
            publish_pending(c, root)?;
            erase_files(c, root, &u, &a)
        })
        .await
    }

    fn kind(&self) -> &'static str {
        "parquet"
    }

    async fn write(&self, load: Arc<Prepared>) -> Result<LoadStats, SinkError> {
        self.with_conn_retrying(true, move |c, catalog, root| write(c, catalog, root, &load))
            .await
    }

    async fn quarantined(&self, ids: &[String]) -> Result<Vec<QuarantinedEvent>, SinkError> {
        let ids = ids.to_vec();
        self.with_conn(move |c, _, _| quarantined(c, &ids)).await
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, SinkError> {
        self.with_conn(|c, _, _| dead_letters(c)).await
    }

    async fn query(&self, sql: &str) -> Result<QueryResult, SinkError> {
        // In a session, as the DuckDB sink's: loads go on while an analyst's query
        // runs, and no compaction or memory release happens under it.
        let mut session = self.session().await?.expect("the lake has sessions");
        session.query(sql).await
    }
}
