//! Compaction: an idle agent merges a partition's small files into a few large ones.
//!
//! A load writes one file per table and day, so a daemon at low traffic (a load every
//! few seconds) writes thousands of small files a day per table, and every reader pays
//! per file: the agent's own views (which read every footer when a session starts),
//! DuckDB, Spark, Snowflake and BigQuery alike.
//!
//! **What is merged.** In one partition (`table=…/date=…/`), the files smaller than
//! half of [`TARGET_FILE_BYTES`] that the lake wrote (listed in the manifest, or written
//! by an earlier compaction); anything else in the folder (a large file, a file put there
//! by hand) stays as it is. A day that is over (its UTC date is before today's) is
//! compacted once it has two such files; the day still receiving events (and the
//! `unknown` partition) once it has `compact_min_files` of them, so its files stay few
//! while a file is not rewritten after every load. One compaction reads at most
//! [`TARGET_FILE_BYTES`] of them, smallest first, so each step takes a bounded time
//! (and the idle agent's time budget is checked between steps); a larger partition is
//! merged in several steps. The partitions to look at are found in the state file, not
//! by listing every folder.
//!
//! **How a reader never sees a row twice or misses one.** The merged files are copied
//! into a new folder under `_collector/tmp/` (at most ~128 MiB per file); every other
//! entry of the partition is hard-linked into it; the new files and the folder are
//! synced. Then the two folders are exchanged in one atomic `rename`
//! (`renameat2(RENAME_EXCHANGE)`): a reader that lists the partition sees either every
//! old file or every new one. A reader that listed the old files and opens one after
//! the exchange gets "file not found" (and retries), never a duplicate. The old folder,
//! now under `_collector/tmp/`, is then removed. On a filesystem without the exchange
//! (some network filesystems) compaction is switched off with a warning.
//!
//! **Crash safety.** The compaction (its merged files and its new ones) is committed in
//! the state file, with the manifest's entries marked `compacted_into`, before the
//! exchange; until it is marked finished, the next open completes it: it exchanges the
//! folders if that did not happen yet (linking across anything that reached the
//! partition since), then removes the old files. A crash before the commit leaves a
//! folder under `_collector/tmp/` that nothing lists, removed at the next open.
//!
//! **Who reads the manifest.** An identity run reads the rows of the loads it has not
//! read yet (`rows_of_loads`): a load whose files were compacted is read from its
//! partition's files, through the `message_ids` its load registered.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use duckdb::{params, Connection};

use super::sink::{lit, publish_pending, STATE_DIR};
use crate::sinks::duckdb::sink::transient;
use crate::sinks::SinkError;

/// The size compaction aims at for each file it writes (DuckDB starts another file
/// once one is past it): large enough for every lake engine, small enough to be read
/// in parallel (Snowflake advises 100–250 MB compressed).
pub const TARGET_FILE_BYTES: u64 = 128 * 1024 * 1024;

/// A file at least this large is left as it is, so a file compaction wrote is not
/// rewritten again and again.
const SMALL_FILE_BYTES: u64 = TARGET_FILE_BYTES / 2;

/// The migration that adds compaction to the state file.
pub(super) const MIGRATION_SQL: &str = "ALTER TABLE loaded_batches ADD COLUMN compacted_into BIGINT;
CREATE TABLE collector_compactions (id BIGINT PRIMARY KEY, table_name VARCHAR NOT NULL, date VARCHAR NOT NULL, merged VARCHAR[] NOT NULL, outputs VARCHAR[] NOT NULL, rows BIGINT NOT NULL, bytes_before BIGINT NOT NULL, bytes_after BIGINT NOT NULL, started_at TIMESTAMP NOT NULL, finished_at TIMESTAMP);";

/// Where a test stops a compaction, as a crash (kill -9) there would.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// The new files are written, nothing is committed.
    Written,
    /// The compaction is committed; the folders are not exchanged.
    Committed,
    /// The folders are exchanged; the old files are still under `_collector/tmp/`.
    Exchanged,
    /// The old files are removed; the compaction is not marked finished.
    OldRemoved,
}

/// What one compaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compacted {
    pub table: String,
    pub date: String,
    /// The files merged, and the files written in their place.
    pub files_before: usize,
    pub files_after: usize,
    pub rows: i64,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// When partitions are due (see the module's documentation).
#[derive(Debug, Clone)]
pub struct Policy {
    /// Small files the open day collects before it is compacted.
    pub min_files: usize,
    /// Today's UTC date (`YYYY-MM-DD`): earlier days are over.
    pub today: String,
    /// Stop starting compactions after this long (the drain waits meanwhile).
    pub budget: Option<Duration>,
    /// The most one compaction reads (its small files, smallest first; at least two),
    /// so one step takes a bounded time however much a partition holds: the rest is
    /// merged by the next step. [`TARGET_FILE_BYTES`] unless a test says otherwise.
    pub max_input_bytes: u64,
    /// Tests only: stop there, as a crash would.
    pub crash_at: Option<CrashPoint>,
}

impl Policy {
    /// The idle agent's policy: today's UTC date, at most `budget` per idle call.
    pub fn idle(min_files: usize, budget: Duration) -> Policy {
        Policy {
            min_files,
            today: Policy::today(),
            budget: Some(budget),
            max_input_bytes: TARGET_FILE_BYTES,
            crash_at: None,
        }
    }

    /// Today's UTC date.
    pub fn today() -> String {
        collector_core::timestamp::format_ms(crate::now_ms())[..10].to_string()
    }

    fn due(&self, date: &str, small: usize) -> bool {
        let over = date != "unknown" && date < self.today.as_str();
        small >= if over { 2 } else { self.min_files }
    }
}

/// A due partition, as listed now.
struct Partition {
    table: String,
    date: String,
    dir: PathBuf,
    /// The small Parquet files the lake wrote there, (name, size), smallest first.
    small: Vec<(String, u64)>,
}

/// The partitions that may be due, from the state file alone (no folder is listed):
/// those with enough manifest files not compacted yet, and those compacted before
/// that received a file since (the earlier compaction's file may be small too).
/// Oldest day first. An old lake's thousands of compacted days cost an idle agent
/// nothing.
pub(super) fn candidates(
    conn: &Connection,
    policy: &Policy,
) -> Result<Vec<(String, String)>, SinkError> {
    let mut stmt = conn
        .prepare(
            "SELECT p.table_name, p.date, p.n, EXISTS (SELECT 1 FROM collector_compactions c
                     WHERE c.table_name = p.table_name AND c.date = p.date
                       AND c.finished_at IS NOT NULL)
             FROM (
                 SELECT table_name, date, count(*) AS n FROM loaded_batches
                 WHERE staged IS NULL AND compacted_into IS NULL AND rows > COALESCE(erased_rows, 0)
                 GROUP BY table_name, date
             ) p
             ORDER BY p.date, p.table_name",
        )
        .map_err(transient)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, bool>(3)?,
            ))
        })
        .map_err(transient)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(transient)?;
    // The same rule as the folder's listing ([`Policy::due`]), on the manifest's count.
    Ok(rows
        .into_iter()
        .filter(|(_, date, n, compacted)| *compacted || policy.due(date, *n as usize))
        .map(|(table, date, _, _)| (table, date))
        .collect())
}

/// The partition `table`/`date`, listed now, when its small files that the lake wrote
/// are enough to be due. A partition that holds a folder (nothing the lake writes) is
/// left alone.
fn due_partition(
    conn: &Connection,
    root: &Path,
    policy: &Policy,
    table: &str,
    date: &str,
) -> Result<Option<Partition>, SinkError> {
    let rel = partition_rel(table, date);
    let dir = root.join(&rel);
    let mut small = Vec::new();
    for f in fs::read_dir(&dir).into_iter().flatten().flatten() {
        let Ok(meta) = f.metadata() else { continue };
        if meta.is_dir() {
            return Ok(None);
        }
        let fname = f.file_name().to_string_lossy().to_string();
        if fname.ends_with(".parquet") && meta.len() < SMALL_FILE_BYTES {
            small.push((fname, meta.len()));
        }
    }
    if !policy.due(date, small.len()) {
        return Ok(None);
    }
    let known = known_files(conn, table, date)?;
    small.retain(|(name, _)| known.contains(&format!("{rel}/{name}")));
    if !policy.due(date, small.len()) {
        return Ok(None);
    }
    small.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    Ok(Some(Partition {
        table: table.to_string(),
        date: date.to_string(),
        dir,
        small,
    }))
}

/// The files of `table` and `date` the lake wrote and knows where they are: the
/// manifest's (in place) and earlier compactions' (as paths under the lake).
fn known_files(conn: &Connection, table: &str, date: &str) -> Result<BTreeSet<String>, SinkError> {
    let mut stmt = conn
        .prepare(
            "SELECT file FROM loaded_batches WHERE table_name = ? AND date = ? AND staged IS NULL
             UNION ALL
             SELECT unnest(outputs) FROM collector_compactions WHERE table_name = ? AND date = ? AND finished_at IS NOT NULL",
        )
        .map_err(transient)?;
    let rows = stmt
        .query_map(params![table, date, table, date], |r| r.get::<_, String>(0))
        .map_err(transient)?;
    rows.collect::<Result<_, _>>().map_err(transient)
}

/// The relative folder of a partition.
fn partition_rel(table: &str, date: &str) -> String {
    format!("table={table}/date={date}")
}

/// The folder a compaction writes its files into (and where the old files go).
fn staged_dir(root: &Path, id: i64) -> PathBuf {
    root.join(STATE_DIR)
        .join("tmp")
        .join(format!("compact-{id}"))
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> SinkError {
    let (what, path) = (what.to_string(), path.display().to_string());
    move |e| SinkError::Transient(format!("lake compaction: {what} {path}: {e}"))
}

/// Flushes a file or a folder (its entries) to disk.
fn sync(path: &Path) -> Result<(), SinkError> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io("sync", path))
}

/// Exchanges two folders in one atomic rename.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    use rustix::io::Errno;
    match renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE) {
        Ok(()) => Ok(()),
        // A kernel or filesystem without the flag.
        Err(e) if e == Errno::INVAL || e == Errno::NOSYS => Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            std::io::Error::from(e),
        )),
        Err(e) => Err(e.into()),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "an atomic exchange of two folders is implemented on Linux only",
    ))
}

/// Hard-links into `to` every entry of `from` that is neither merged nor already there.
fn link_the_rest(from: &Path, to: &Path, merged: &BTreeSet<String>) -> Result<(), SinkError> {
    for e in fs::read_dir(from).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if merged.contains(&name) || to.join(&name).exists() {
            continue;
        }
        fs::hard_link(e.path(), to.join(&name)).map_err(io("link", &e.path()))?;
    }
    Ok(())
}

/// A compaction's folder under `_collector/tmp/`, removed on an error before the
/// compaction is committed.
struct Staged {
    dir: PathBuf,
    armed: bool,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The error compaction gives when the filesystem cannot exchange two folders:
/// compaction is then switched off.
pub(super) const UNSUPPORTED: &str =
    "the lake's filesystem cannot exchange two folders atomically (renameat2 RENAME_EXCHANGE)";

/// Compacts the due partitions, oldest first, until none is left or the budget is
/// spent. Under the lake's lock, with no session open (a session's views list files).
pub(super) fn compact_due(
    conn: &mut Connection,
    root: &Path,
    policy: &Policy,
) -> Result<Vec<Compacted>, SinkError> {
    // A file committed but not in place would be missed by the listing.
    publish_pending(conn, root)?;
    let started = Instant::now();
    let mut done = Vec::new();
    let over_budget = || policy.budget.is_some_and(|b| started.elapsed() >= b);
    for (table, date) in candidates(conn, policy)? {
        // A partition larger than one compaction reads is merged in steps, each
        // listing the folder again.
        while let Some(part) = due_partition(conn, root, policy, &table, &date)? {
            if over_budget() {
                return Ok(done);
            }
            let mut merge = Vec::new();
            let mut bytes = 0u64;
            for (name, len) in &part.small {
                if merge.len() >= 2 && bytes + len > policy.max_input_bytes {
                    break;
                }
                bytes += len;
                merge.push((name.clone(), *len));
            }
            match compact_partition(conn, root, &part, &merge, policy.crash_at)? {
                Some(c) => done.push(c),
                // A test's crash.
                None => return Ok(done),
            }
        }
    }
    Ok(done)
}

/// Compacts one partition's `merge` files (see the module's documentation). `None`
/// when it stopped at `crash_at`.
fn compact_partition(
    conn: &mut Connection,
    root: &Path,
    part: &Partition,
    merge: &[(String, u64)],
    crash_at: Option<CrashPoint>,
) -> Result<Option<Compacted>, SinkError> {
    let id: i64 = conn
        .query_row(
            "SELECT COALESCE(max(id), 0) + 1 FROM collector_compactions",
            [],
            |r| r.get(0),
        )
        .map_err(transient)?;
    let rel = partition_rel(&part.table, &part.date);
    let dir = staged_dir(root, id);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(io("create", &dir))?;
    let mut staged = Staged {
        dir: dir.clone(),
        armed: true,
    };
    let sources = merge
        .iter()
        .map(|(n, _)| lit(&part.dir.join(n).display().to_string()))
        .collect::<Vec<_>>()
        .join(", ");
    // The files' own columns (not the path's partition keys), each file's columns
    // where another lacks them (a property that appeared during the day).
    let read =
        format!("read_parquet([{sources}], hive_partitioning = false, union_by_name = true)");
    let count = |sql: &str| -> Result<i64, SinkError> {
        conn.query_row(sql, [], |r| r.get::<_, i64>(0))
            .map_err(transient)
    };
    let rows = count(&format!("SELECT count(*) FROM {read}"))?;
    conn.execute_batch(&format!(
        "COPY (SELECT * FROM {read}) TO {} (FORMAT parquet, FILE_SIZE_BYTES {TARGET_FILE_BYTES}, FILENAME_PATTERN 'part-c{id}-{{i}}')",
        lit(&dir.display().to_string())
    ))
    .map_err(transient)?;
    let mut outputs: Vec<(String, u64)> = Vec::new();
    for e in fs::read_dir(&dir).map_err(io("list", &dir))?.flatten() {
        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
        outputs.push((e.file_name().to_string_lossy().to_string(), len));
    }
    outputs.sort();
    // The new files hold exactly the old files' rows, or nothing changes.
    let written = if outputs.is_empty() {
        0
    } else {
        count(&format!(
            "SELECT count(*) FROM read_parquet([{}], hive_partitioning = false, union_by_name = true)",
            outputs
                .iter()
                .map(|(n, _)| lit(&dir.join(n).display().to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        ))?
    };
    if written != rows {
        return Err(SinkError::Transient(format!(
            "lake compaction of {rel}: the new files hold {written} rows, the old ones {rows}; nothing was changed"
        )));
    }
    for (n, _) in &outputs {
        sync(&dir.join(n))?;
    }
    let merged: BTreeSet<String> = merge.iter().map(|(n, _)| n.clone()).collect();
    link_the_rest(&part.dir, &dir, &merged)?;
    sync(&dir)?;
    if crash_at == Some(CrashPoint::Written) {
        staged.armed = false;
        return Ok(None);
    }
    let rels = |names: &mut dyn Iterator<Item = &String>| {
        names
            .map(|n| lit(&format!("{rel}/{n}")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let bytes_before: u64 = merge.iter().map(|(_, b)| b).sum();
    let bytes_after: u64 = outputs.iter().map(|(_, b)| b).sum();
    let tx = conn.transaction().map_err(transient)?;
    tx.execute(
        &format!(
            "INSERT INTO collector_compactions VALUES (?, ?, ?, [{}], [{}], ?, ?, ?, now()::TIMESTAMP, NULL)",
            rels(&mut merge.iter().map(|(n, _)| n)),
            rels(&mut outputs.iter().map(|(n, _)| n)),
        ),
        params![
            id,
            part.table,
            part.date,
            rows,
            bytes_before as i64,
            bytes_after as i64
        ],
    )
    .map_err(transient)?;
    tx.execute(
        "UPDATE loaded_batches SET compacted_into = ? WHERE table_name = ? AND date = ? AND compacted_into IS NULL AND file IN (SELECT unnest(merged) FROM collector_compactions WHERE id = ?)",
        params![id, part.table, part.date, id],
    )
    .map_err(transient)?;
    tx.commit().map_err(transient)?;
    // Committed: from here on the next open finishes it.
    staged.armed = false;
    if crash_at == Some(CrashPoint::Committed) {
        return Ok(None);
    }
    if let Err(e) = exchange(&dir, &part.dir) {
        // Nothing moved: the compaction is taken back.
        undo(conn, id, &dir)?;
        return Err(if is_unsupported(&e) {
            SinkError::Permanent(format!("{UNSUPPORTED}: {e}"))
        } else {
            SinkError::Transient(format!("lake compaction of {rel}: exchange: {e}"))
        });
    }
    finish(conn, root, id, &dir, &part.dir, crash_at)?;
    if crash_at.is_some() {
        return Ok(None);
    }
    Ok(Some(Compacted {
        table: part.table.clone(),
        date: part.date.clone(),
        files_before: merge.len(),
        files_after: outputs.len(),
        rows,
        bytes_before,
        bytes_after,
    }))
}

fn is_unsupported(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::Unsupported
}

/// Takes back a committed compaction whose folders were not exchanged.
fn undo(conn: &mut Connection, id: i64, dir: &Path) -> Result<(), SinkError> {
    let tx = conn.transaction().map_err(transient)?;
    tx.execute(
        "UPDATE loaded_batches SET compacted_into = NULL WHERE compacted_into = ?",
        params![id],
    )
    .map_err(transient)?;
    tx.execute(
        "DELETE FROM collector_compactions WHERE id = ?",
        params![id],
    )
    .map_err(transient)?;
    tx.commit().map_err(transient)?;
    let _ = fs::remove_dir_all(dir);
    Ok(())
}

/// After the exchange: syncs both parents, removes the old files (now in `dir`) and
/// marks the compaction finished.
fn finish(
    conn: &Connection,
    root: &Path,
    id: i64,
    dir: &Path,
    live: &Path,
    crash_at: Option<CrashPoint>,
) -> Result<(), SinkError> {
    if let Some(parent) = live.parent() {
        sync(parent)?;
    }
    sync(&root.join(STATE_DIR).join("tmp"))?;
    if crash_at == Some(CrashPoint::Exchanged) {
        return Ok(());
    }
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove", dir)(e)),
    }
    if crash_at == Some(CrashPoint::OldRemoved) {
        return Ok(());
    }
    conn.execute(
        "UPDATE collector_compactions SET finished_at = now()::TIMESTAMP WHERE id = ?",
        params![id],
    )
    .map_err(transient)?;
    Ok(())
}

/// At open: completes the compactions a crash interrupted after their commit (see
/// the module's documentation).
pub(super) fn finish_interrupted(conn: &mut Connection, root: &Path) -> Result<(), SinkError> {
    // (id, table, date, merged, outputs)
    type Interrupted = (i64, String, String, Vec<String>, Vec<String>);
    let pending: Vec<Interrupted> = {
        let mut stmt = conn
            .prepare(
                "SELECT id, table_name, date, CAST(to_json(merged) AS VARCHAR), CAST(to_json(outputs) AS VARCHAR) FROM collector_compactions WHERE finished_at IS NULL ORDER BY id",
            )
            .map_err(transient)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })
            .map_err(transient)?;
        let rows: Vec<_> = rows.collect::<Result<_, _>>().map_err(transient)?;
        rows.into_iter()
            .map(|(id, t, d, m, o)| {
                let list = |s: &str| serde_json::from_str::<Vec<String>>(s).unwrap_or_default();
                (id, t, d, list(&m), list(&o))
            })
            .collect()
    };
    for (id, table, date, merged, outputs) in pending {
        let live = root.join(partition_rel(&table, &date));
        let dir = staged_dir(root, id);
        let name = |rel: &String| rel.rsplit('/').next().unwrap_or(rel).to_string();
        let in_place = !outputs.is_empty() && outputs.iter().all(|o| root.join(o).exists());
        let ready = !outputs.is_empty() && outputs.iter().all(|o| dir.join(name(o)).exists());
        if in_place {
            tracing::info!(table = %table, date = %date, "lake: removing the files a compaction replaced before a crash");
            finish(conn, root, id, &dir, &live, None)?;
        } else if ready {
            tracing::info!(table = %table, date = %date, "lake: completing a compaction a crash interrupted");
            fs::create_dir_all(&live).map_err(io("create", &live))?;
            let merged: BTreeSet<String> = merged.iter().map(name).collect();
            link_the_rest(&live, &dir, &merged)?;
            sync(&dir)?;
            exchange(&dir, &live).map_err(io("exchange", &live))?;
            finish(conn, root, id, &dir, &live, None)?;
        } else {
            // Its new files are in neither place (removed by hand): if the old ones
            // are where they were, nothing happened; else say so, loudly.
            if !merged.iter().all(|m| root.join(m).exists()) {
                tracing::error!(table = %table, date = %date, compaction = id, "lake: a compaction's files are in neither place; rows may be missing from this partition");
            }
            undo(conn, id, &dir)?;
        }
    }
    Ok(())
}
