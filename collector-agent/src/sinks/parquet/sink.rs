//! The Parquet lake sink. DuckDB (in process) stages rows, keeps the lake's state file,
//! and writes the Parquet files with `COPY … TO … (FORMAT parquet)`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use collector_core::EventKind;
use duckdb::{params, Connection};

use crate::sinks::duckdb::sink::{
    apply_migrations, classify, create_staging, dead_letters, finish_load, quarantined, register,
    registered_rows_sql, run_query, sql_type, stage, transient, write_state, REGISTRY_SQL,
};
use crate::sinks::schema::{self, DeadLetter, Prepared, PreparedRow, QuarantinedEvent, Row};
use crate::sinks::{LoadStats, QueryResult, Sink, SinkError};

/// The lake's state folder, beside the table folders.
const STATE_DIR: &str = "_collector";

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
    ]
}

/// A Parquet lake in a folder.
pub struct ParquetSink {
    root: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

/// SQL string literal.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// FNV-1a of the message ids: a stable name for a replay's file.
fn ids_hash(rows: &[&PreparedRow]) -> String {
    let h = rows.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, r| {
        r.message_id()
            .bytes()
            .fold(h, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
    });
    format!("{h:016x}")
}

impl ParquetSink {
    /// Opens (creating if needed) the lake folder and its state file.
    pub fn open(root: &Path) -> Result<ParquetSink, SinkError> {
        let state = root.join(STATE_DIR);
        std::fs::create_dir_all(state.join("tmp"))
            .map_err(|e| SinkError::Permanent(format!("{}: {e}", state.display())))?;
        let mut conn = Connection::open(state.join("state.duckdb")).map_err(transient)?;
        apply_migrations(&mut conn, migrations())?;
        create_staging(&conn)?;
        Ok(ParquetSink {
            root: root.to_path_buf(),
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &Path) -> Result<T, SinkError> + Send + 'static,
    ) -> Result<T, SinkError> {
        let conn = self.conn.clone();
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| SinkError::Transient("lake lock poisoned".into()))?;
            f(&mut guard, &root)
        })
        .await
        .map_err(|e| SinkError::Transient(format!("lake task failed: {e}")))?
    }
}

/// The partition date of a row: the UTC date of its `timestamp` (else `receivedAt`).
fn date_of(row: &Row) -> String {
    let ts = row
        .get(3)
        .cloned()
        .flatten()
        .or_else(|| row.get(5).cloned().flatten());
    ts.map(|t| t.chars().take(10).collect())
        .unwrap_or_else(|| "unknown".into())
}

/// Writes a prepared load: Parquet files first (temp + rename, deterministic names),
/// then the ids, the manifest, the quarantine and the dead letters in one transaction.
fn write(conn: &mut Connection, root: &Path, p: &Prepared) -> Result<LoadStats, SinkError> {
    let tx = conn.transaction().map_err(transient)?;
    let (mut stats, load_id) = write_state(&tx, p)?;
    let tmp = root.join(STATE_DIR).join("tmp");
    let mut renames: Vec<(PathBuf, PathBuf)> = Vec::new();
    for kind in EventKind::ALL {
        let table = kind.table();
        let rows: Vec<&PreparedRow> = p.rows.iter().filter(|r| r.kind == kind).collect();
        // One file per batch and date, named after them.
        let groups: BTreeSet<(Option<i64>, String)> = rows
            .iter()
            .map(|r| (r.batch_id, date_of(&r.values)))
            .collect();
        let batches: BTreeSet<Option<i64>> = groups.iter().map(|g| g.0).collect();
        for batch in batches {
            let in_batch: Vec<&PreparedRow> = rows
                .iter()
                .copied()
                .filter(|r| r.batch_id == batch)
                .collect();
            let values: Vec<&Row> = in_batch.iter().map(|r| &r.values).collect();
            stage(&tx, kind, &values)?;
            register(&tx, kind, load_id)?;
            let registered_sql = registered_rows_sql(kind);
            let mut batch_inserted = 0u64;
            for (_, date) in groups.iter().filter(|g| g.0 == batch) {
                let name = match (p.replay, batch) {
                    (false, Some(b)) => format!("part-s{}-b{b}.parquet", p.shard),
                    (_, b) => format!(
                        "part-s{}-b{}-replay-{}.parquet",
                        p.shard,
                        b.unwrap_or(0),
                        ids_hash(&in_batch)
                    ),
                };
                let rel = format!("table={table}/date={date}/{name}");
                let staged = tmp.join(format!("{load_id}-{table}-{date}-{name}"));
                let n: i64 = tx
                    .query_row(
                        &format!(
                            "SELECT count(*) FROM ({registered_sql}) WHERE substr(CAST(coalesce(timestamp, received_at) AS VARCHAR), 1, 10) = ?"
                        ),
                        params![load_id, date],
                        |r| r.get(0),
                    )
                    .map_err(classify)?;
                if n == 0 {
                    continue;
                }
                tx.execute(
                    &format!(
                        "COPY (SELECT * FROM ({registered_sql}) WHERE substr(CAST(coalesce(timestamp, received_at) AS VARCHAR), 1, 10) = {} ORDER BY message_id) TO {} (FORMAT parquet)",
                        lit(date),
                        lit(&staged.display().to_string())
                    ),
                    params![load_id],
                )
                .map_err(classify)?;
                tx.execute(
                    "INSERT INTO loaded_batches VALUES (?, ?, ?, ?, ?, ?, ?, now()::TIMESTAMP)
                     ON CONFLICT (file) DO UPDATE SET rows = excluded.rows, load_id = excluded.load_id",
                    params![p.shard, batch.unwrap_or(0), table, date, rel, n, load_id],
                )
                .map_err(transient)?;
                batch_inserted += n as u64;
                renames.push((staged, root.join(&rel)));
            }
            // Every staged row is new (written) or a duplicate.
            stats.inserted += batch_inserted;
            stats.duplicates += values.len() as u64 - batch_inserted;
        }
    }
    finish_load(&tx, load_id)?;
    for (from, to) in &renames {
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| SinkError::Transient(format!("{}: {e}", dir.display())))?;
        }
        std::fs::rename(from, to)
            .map_err(|e| SinkError::Transient(format!("rename into {}: {e}", to.display())))?;
    }
    tx.commit().map_err(transient)?;
    Ok(stats)
}

/// Points one temporary view per table at its Parquet files (an empty typed view when
/// there are none yet), so SQL reads the lake like any warehouse.
fn refresh_views(conn: &Connection, root: &Path) -> Result<(), SinkError> {
    for kind in EventKind::ALL {
        let table = kind.table();
        let dir = root.join(format!("table={table}"));
        let has_files = std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some());
        let sql = if has_files {
            format!(
                "CREATE OR REPLACE TEMP VIEW {table} AS SELECT * EXCLUDE (\"table\") FROM read_parquet({}, hive_partitioning = true, union_by_name = true)",
                lit(&format!("{}/*/*.parquet", dir.display()))
            )
        } else {
            let cols: Vec<String> = schema::columns(kind)
                .iter()
                .map(|c| format!("CAST(NULL AS {}) AS {}", sql_type(c.ty), c.name))
                .collect();
            format!(
                "CREATE OR REPLACE TEMP VIEW {table} AS SELECT {}, CAST(NULL AS TIMESTAMP) AS {}, CAST(NULL AS VARCHAR) AS date WHERE false",
                cols.join(", "),
                schema::LOADED_AT
            )
        };
        conn.execute_batch(&sql).map_err(transient)?;
    }
    Ok(())
}

#[async_trait]
impl Sink for ParquetSink {
    fn kind(&self) -> &'static str {
        "parquet"
    }

    async fn write(&self, load: Arc<Prepared>) -> Result<LoadStats, SinkError> {
        self.with_conn(move |c, root| write(c, root, &load)).await
    }

    async fn quarantined(&self, ids: &[String]) -> Result<Vec<QuarantinedEvent>, SinkError> {
        let ids = ids.to_vec();
        self.with_conn(move |c, _| quarantined(c, &ids)).await
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, SinkError> {
        self.with_conn(|c, _| dead_letters(c)).await
    }

    async fn query(&self, sql: &str) -> Result<QueryResult, SinkError> {
        let sql = sql.to_string();
        self.with_conn(move |c, root| {
            refresh_views(c, root)?;
            run_query(c, &sql)
        })
        .await
    }
}
