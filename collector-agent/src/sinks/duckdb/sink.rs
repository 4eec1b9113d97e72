use std::collections::HashSet;
use std::path::Path;

use collector_core::timestamp::format_ms;
use collector_core::{EventKind, StoredEvent};
use duckdb::types::{TimeUnit, ValueRef};
use duckdb::{params, Connection};
use serde_json::Value;

use crate::sinks::{LoadStats, Sink, SinkError};

/// Columns of one event table beyond the common ones, as `(column, event field, is_json)`.
fn specific_columns(kind: EventKind) -> &'static [(&'static str, &'static str, bool)] {
    match kind {
        EventKind::Track => &[
            ("event", "event", false),
            ("properties", "properties", true),
        ],
        EventKind::Page | EventKind::Screen => &[
            ("name", "name", false),
            ("category", "category", false),
            ("properties", "properties", true),
        ],
        EventKind::Identify => &[("traits", "traits", true)],
        EventKind::Group => &[("group_id", "groupId", false), ("traits", "traits", true)],
        EventKind::Alias => &[("previous_id", "previousId", false)],
    }
}

/// `(column, event field, type)` common to every event table, after `message_id`.
const COMMON: &[(&str, &str, &str)] = &[
    ("anonymous_id", "anonymousId", "VARCHAR"),
    ("user_id", "userId", "VARCHAR"),
    ("timestamp", "timestamp", "TIMESTAMP"),
    ("sent_at", "sentAt", "TIMESTAMP"),
    ("received_at", "receivedAt", "TIMESTAMP"),
    ("original_timestamp", "originalTimestamp", "TIMESTAMP"),
    ("context", "context", "JSON"),
    ("integrations", "integrations", "JSON"),
];

fn create_table_sql(kind: EventKind) -> String {
    let mut cols = vec!["message_id VARCHAR PRIMARY KEY".to_string()];
    for (col, _, ty) in COMMON {
        cols.push(format!("{col} {ty}"));
    }
    for (col, _, json) in specific_columns(kind) {
        cols.push(format!("{col} {}", if *json { "JSON" } else { "VARCHAR" }));
    }
    cols.push("raw JSON NOT NULL".into());
    cols.push("loaded_at TIMESTAMP NOT NULL".into());
    format!(
        "CREATE TABLE IF NOT EXISTS {} ({})",
        kind.table(),
        cols.join(", ")
    )
}

fn column_names(kind: EventKind) -> Vec<&'static str> {
    let mut cols = vec!["message_id"];
    cols.extend(COMMON.iter().map(|c| c.0));
    cols.extend(specific_columns(kind).iter().map(|c| c.0));
    cols.push("raw");
    cols
}

/// Rows of a query, every value rendered as text (`None` for NULL).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueryResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

pub struct DuckDbSink {
    conn: Connection,
}

fn transient(e: duckdb::Error) -> SinkError {
    SinkError::Transient(e.to_string())
}

impl DuckDbSink {
    /// Opens (creating if needed) the warehouse file and its tables.
    pub fn open(path: &Path) -> Result<DuckDbSink, SinkError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| SinkError::Permanent(format!("{}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path).map_err(transient)?;
        let mut ddl = String::new();
        for kind in EventKind::ALL {
            ddl.push_str(&create_table_sql(kind));
            ddl.push_str(";\n");
            // All-text staging table for the appender; cast on the way in.
            let stage_cols: Vec<String> = column_names(kind)
                .iter()
                .map(|c| format!("{c} VARCHAR"))
                .collect();
            ddl.push_str(&format!(
                "CREATE TEMP TABLE IF NOT EXISTS stage_{} ({});\n",
                kind.table(),
                stage_cols.join(", ")
            ));
        }
        ddl.push_str(
            "CREATE TABLE IF NOT EXISTS dead_letters (shard INTEGER, batch_id BIGINT, error VARCHAR, blob BLOB, loaded_at TIMESTAMP);\n",
        );
        conn.execute_batch(&ddl)
            .map_err(|e| SinkError::Permanent(e.to_string()))?;
        Ok(DuckDbSink { conn })
    }

    /// Opens an existing warehouse file read-only (for `collector-agent sql` when no
    /// agent runs).
    pub fn open_read_only(path: &Path) -> Result<Connection, SinkError> {
        let cfg = duckdb::Config::default()
            .access_mode(duckdb::AccessMode::ReadOnly)
            .map_err(transient)?;
        Connection::open_with_flags(path, cfg).map_err(transient)
    }

    pub fn query(&self, sql: &str) -> Result<QueryResult, SinkError> {
        run_query(&self.conn, sql)
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
        ValueRef::Timestamp(unit, n) => {
            let ms = match unit {
                TimeUnit::Second => n.saturating_mul(1000),
                TimeUnit::Millisecond => n,
                TimeUnit::Microsecond => n / 1000,
                TimeUnit::Nanosecond => n / 1_000_000,
            };
            format_ms(ms)
        }
        other => format!("{:?}", other.to_owned()),
    })
}

fn text_of(v: Option<&Value>, json: bool) -> Option<String> {
    match v? {
        Value::Null => None,
        Value::String(s) if !json => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

impl Sink for DuckDbSink {
    fn load(&mut self, events: &[StoredEvent]) -> Result<LoadStats, SinkError> {
        let mut seen = HashSet::with_capacity(events.len());
        let mut by_kind: Vec<(EventKind, Vec<Vec<Option<String>>>)> =
            EventKind::ALL.iter().map(|k| (*k, Vec::new())).collect();
        let mut duplicates = 0u64;
        for ev in events {
            if !seen.insert(ev.message_id.as_str()) {
                duplicates += 1;
                continue;
            }
            let obj: Value = serde_json::from_str(&ev.json)
                .map_err(|e| SinkError::Permanent(format!("event {}: {e}", ev.message_id)))?;
            let mut row = vec![Some(ev.message_id.clone())];
            for (_, field, ty) in COMMON {
                row.push(text_of(obj.get(*field), *ty == "JSON"));
            }
            for (_, field, json) in specific_columns(ev.kind) {
                row.push(text_of(obj.get(*field), *json));
            }
            row.push(Some(ev.json.clone()));
            let slot = by_kind
                .iter_mut()
                .find(|(k, _)| *k == ev.kind)
                .map(|(_, rows)| rows);
            if let Some(rows) = slot {
                rows.push(row);
            }
        }
        let tx = self.conn.transaction().map_err(transient)?;
        let mut inserted = 0u64;
        for (kind, rows) in &by_kind {
            if rows.is_empty() {
                continue;
            }
            let table = kind.table();
            tx.execute(&format!("DELETE FROM stage_{table}"), [])
                .map_err(transient)?;
            {
                let mut app = tx.appender(&format!("stage_{table}")).map_err(transient)?;
                for row in rows {
                    app.append_row(duckdb::appender_params_from_iter(row.iter()))
                        .map_err(transient)?;
                }
                app.flush().map_err(transient)?;
            }
            let cols = column_names(*kind);
            let select: Vec<String> = cols
                .iter()
                .map(|c| {
                    let ty = COMMON
                        .iter()
                        .find(|x| x.0 == *c)
                        .map(|x| x.2)
                        .unwrap_or_else(|| {
                            if *c == "raw"
                                || specific_columns(*kind).iter().any(|s| s.0 == *c && s.2)
                            {
                                "JSON"
                            } else {
                                "VARCHAR"
                            }
                        });
                    format!("CAST({c} AS {ty})")
                })
                .collect();
            let n = tx
                .execute(
                    &format!(
                        "INSERT OR IGNORE INTO {table} ({}, loaded_at) SELECT {}, now()::TIMESTAMP FROM stage_{table}",
                        cols.join(", "),
                        select.join(", ")
                    ),
                    [],
                )
                .map_err(transient)? as u64;
            inserted += n;
            duplicates += rows.len() as u64 - n;
        }
        tx.commit().map_err(transient)?;
        Ok(LoadStats {
            inserted,
            duplicates,
        })
    }

    fn dead_letter(
        &mut self,
        shard: u32,
        batch_id: i64,
        blob: &[u8],
        error: &str,
    ) -> Result<(), SinkError> {
        self.conn
            .execute(
                "INSERT INTO dead_letters VALUES (?, ?, ?, ?, now()::TIMESTAMP)",
                params![shard, batch_id, error, blob],
            )
            .map_err(transient)?;
        Ok(())
    }
}
