use std::collections::HashSet;
use std::path::Path;

use collector_core::timestamp::{format_ms, parse_ms};
use collector_core::{EventKind, StoredEvent};
use duckdb::types::{TimeUnit, ValueRef};
use duckdb::{params, Connection};
use serde_json::Value;

use crate::sinks::{Load, LoadBatch, LoadStats, Sink, SinkError};

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

/// Classifies a DuckDB error: data the warehouse will never take (conversion,
/// constraint, out of range, invalid input) is permanent; everything else (I/O, locks,
/// a schema an operator must fix) is transient and retried.
fn classify(e: duckdb::Error) -> SinkError {
    let msg = e.to_string();
    let permanent = [
        "Conversion Error",
        "Constraint Error",
        "Out of Range Error",
        "Invalid Input Error",
    ]
    .iter()
    .any(|p| msg.contains(p));
    if permanent {
        SinkError::Permanent(msg)
    } else {
        SinkError::Transient(msg)
    }
}

fn transient(e: duckdb::Error) -> SinkError {
    SinkError::Transient(e.to_string())
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
CREATE TABLE message_ids (message_id VARCHAR PRIMARY KEY, table_name VARCHAR NOT NULL, load_id BIGINT NOT NULL);
CREATE SEQUENCE load_ids START 1;
CREATE TABLE quarantine (message_id VARCHAR PRIMARY KEY, type VARCHAR NOT NULL, shard INTEGER, batch_id BIGINT, reason VARCHAR NOT NULL, event VARCHAR NOT NULL, quarantined_at TIMESTAMP NOT NULL, attempts INTEGER NOT NULL);
",
    );
    for kind in EventKind::ALL {
        let t = kind.table();
        v2.push_str(&format!(
            "INSERT OR IGNORE INTO message_ids SELECT message_id, '{t}', 0 FROM {t};\n"
        ));
    }
    vec![
        (1, "segment tables and dead letters", v1),
        (
            2,
            "message_ids registry (one message_id per warehouse), quarantine, dead letters keyed by (shard, batch_id)",
            v2,
        ),
    ]
}

/// One event ready for the appender, or the reason the warehouse cannot take it.
type Row = Vec<Option<String>>;

/// An event the warehouse refuses, as kept in `quarantine`.
#[derive(Debug, Clone)]
struct Quarantined {
    message_id: String,
    kind: EventKind,
    shard: u32,
    batch_id: Option<i64>,
    reason: String,
    event: String,
}

/// A load, checked and turned into rows before any SQL runs.
#[derive(Debug, Default)]
struct Prepared {
    shard: u32,
    /// A replay of quarantined events: a refusal updates the quarantined row (reason,
    /// attempts) instead of leaving it as it was.
    replay: bool,
    rows: Vec<(EventKind, Row, usize)>,
    quarantine: Vec<Quarantined>,
    dead: Vec<(u32, i64, Vec<u8>, String)>,
    /// Duplicates within this load (the first occurrence wins).
    in_load_duplicates: u64,
    /// The events behind `rows` (same index as the third tuple field), to isolate a
    /// poison event.
    sources: Vec<(Option<i64>, StoredEvent)>,
}

impl DuckDbSink {
    /// Opens (creating if needed) the warehouse file and brings its schema up to date.
    pub fn open(path: &Path) -> Result<DuckDbSink, SinkError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| SinkError::Permanent(format!("{}: {e}", dir.display())))?;
        }
        let mut conn = Connection::open(path).map_err(transient)?;
        migrate(&mut conn)?;
        let mut ddl = String::new();
        for kind in EventKind::ALL {
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

/// Applies the migrations the warehouse has not seen yet.
fn migrate(conn: &mut Connection) -> Result<(), SinkError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS collector_migrations (version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL)",
    )
    .map_err(transient)?;
    let applied: Vec<i32> = {
        let mut stmt = conn
            .prepare("SELECT version FROM collector_migrations")
            .map_err(transient)?;
        let rows = stmt.query_map([], |r| r.get(0)).map_err(transient)?;
        rows.collect::<Result<_, _>>().map_err(transient)?
    };
    for (version, name, sql) in migrations() {
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

/// Turns one event into a row, or says why the warehouse cannot take it. Everything
/// that could make the insert fail for this event alone is checked here, so one bad
/// event never fails the others' SQL.
fn prepare_row(ev: &StoredEvent) -> Result<Row, String> {
    if ev.message_id.is_empty() {
        return Err("event has an empty messageId".into());
    }
    let obj: Value =
        serde_json::from_str(&ev.json).map_err(|e| format!("event is not JSON: {e}"))?;
    if !obj.is_object() {
        return Err("event is not a JSON object".into());
    }
    let mut row = vec![Some(ev.message_id.clone())];
    for (_, field, ty) in COMMON {
        let v = obj.get(*field);
        let text = match (*ty, v) {
            ("TIMESTAMP", Some(Value::String(s))) => Some(
                parse_ms(s)
                    .map(format_ms)
                    .ok_or_else(|| format!("`{field}` is not a date-time: {:?}", truncate(s)))?,
            ),
            ("TIMESTAMP", Some(Value::Null) | None) => None,
            ("TIMESTAMP", Some(other)) => {
                return Err(format!(
                    "`{field}` is not a date-time: {}",
                    truncate(&other.to_string())
                ))
            }
            (ty, v) => text_of(v, ty == "JSON"),
        };
        row.push(text);
    }
    for (_, field, json) in specific_columns(ev.kind) {
        row.push(text_of(obj.get(*field), *json));
    }
    row.push(Some(ev.json.clone()));
    Ok(row)
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

impl DuckDbSink {
    fn prepare(load: &Load) -> Prepared {
        let mut p = Prepared {
            shard: load.shard,
            ..Prepared::default()
        };
        let mut seen: HashSet<&str> = HashSet::new();
        for b in &load.batches {
            match b {
                LoadBatch::Undecodable {
                    batch_id,
                    blob,
                    error,
                } => p
                    .dead
                    .push((load.shard, *batch_id, blob.clone(), error.clone())),
                LoadBatch::Decoded { batch_id, events } => {
                    for ev in events {
                        if !seen.insert(ev.message_id.as_str()) {
                            p.in_load_duplicates += 1;
                            continue;
                        }
                        match prepare_row(ev) {
                            Ok(row) => {
                                p.rows.push((ev.kind, row, p.sources.len()));
                                p.sources.push((Some(*batch_id), ev.clone()));
                            }
                            Err(reason) => p.quarantine.push(Quarantined {
                                message_id: ev.message_id.clone(),
                                kind: ev.kind,
                                shard: load.shard,
                                batch_id: Some(*batch_id),
                                reason,
                                event: ev.json.clone(),
                            }),
                        }
                    }
                }
            }
        }
        p
    }

    /// Writes a prepared load in one transaction.
    fn write(&mut self, p: &Prepared) -> Result<LoadStats, SinkError> {
        let tx = self.conn.transaction().map_err(transient)?;
        let mut stats = LoadStats {
            duplicates: p.in_load_duplicates,
            ..LoadStats::default()
        };
        for (shard, batch_id, blob, error) in &p.dead {
            stats.dead_letters += tx
                .execute(
                    "INSERT OR IGNORE INTO dead_letters VALUES (?, ?, ?, ?, now()::TIMESTAMP)",
                    params![shard, batch_id, error, blob],
                )
                .map_err(transient)? as u64;
        }
        for q in &p.quarantine {
            // An event already in the warehouse is a duplicate, not a poison; one already
            // quarantined is a duplicate too, unless this is a replay of it.
            let on_conflict = if p.replay {
                "DO UPDATE SET reason = excluded.reason, attempts = quarantine.attempts + 1"
            } else {
                "DO NOTHING"
            };
            let n = tx
                .execute(
                    &format!(
                        "INSERT INTO quarantine SELECT ?, ?, ?, ?, ?, ?, now()::TIMESTAMP, 1
                     WHERE NOT EXISTS (SELECT 1 FROM message_ids WHERE message_id = ?)
                     ON CONFLICT (message_id) {on_conflict}"
                    ),
                    params![
                        q.message_id,
                        q.kind.as_str(),
                        q.shard,
                        q.batch_id,
                        q.reason,
                        q.event,
                        q.message_id
                    ],
                )
                .map_err(transient)? as u64;
            if n > 0 {
                stats.quarantined += 1;
            } else {
                stats.duplicates += 1;
            }
        }
        let load_id: i64 = tx
            .query_row("SELECT nextval('load_ids')", [], |r| r.get(0))
            .map_err(transient)?;
        for kind in EventKind::ALL {
            let rows: Vec<&Row> = p
                .rows
                .iter()
                .filter(|(k, _, _)| *k == kind)
                .map(|(_, r, _)| r)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let n = insert_kind(&tx, kind, &rows, load_id)?;
            stats.inserted += n;
            stats.duplicates += rows.len() as u64 - n;
        }
        // An event that was quarantined once and has now loaded leaves the quarantine.
        tx.execute(
            "DELETE FROM quarantine WHERE message_id IN (SELECT message_id FROM message_ids WHERE load_id = ?)",
            params![load_id],
        )
        .map_err(transient)?;
        tx.commit().map_err(transient)?;
        Ok(stats)
    }

    /// After a permanent error: writes the events one at a time, quarantining each one
    /// the warehouse refuses on its own, then the rest of the load.
    fn isolate(&mut self, p: Prepared, first_error: &SinkError) -> Result<LoadStats, SinkError> {
        tracing::warn!(error = %first_error, events = p.rows.len(), "load refused; isolating the event(s) the warehouse rejects");
        let mut stats = LoadStats::default();
        let mut quarantine = p.quarantine;
        for (kind, row, src) in p.rows {
            let one = Prepared {
                shard: p.shard,
                rows: vec![(kind, row, 0)],
                ..Prepared::default()
            };
            match self.write(&one) {
                Ok(s) => stats.add(s),
                Err(e @ SinkError::Permanent(_)) => {
                    let (batch_id, ev) = &p.sources[src];
                    quarantine.push(Quarantined {
                        message_id: ev.message_id.clone(),
                        kind: ev.kind,
                        shard: p.shard,
                        batch_id: *batch_id,
                        reason: e.to_string(),
                        event: ev.json.clone(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        let rest = Prepared {
            shard: p.shard,
            replay: p.replay,
            quarantine,
            dead: p.dead,
            in_load_duplicates: p.in_load_duplicates,
            ..Prepared::default()
        };
        stats.add(self.write(&rest)?);
        Ok(stats)
    }

    /// Loads the quarantined events again (all, or the given message ids), e.g. after
    /// the warehouse or the event (`UPDATE quarantine SET event = …`) was fixed. Those
    /// that load leave the quarantine; the others stay, with the new reason and one more
    /// attempt.
    pub fn replay_quarantine(&mut self, ids: &[String]) -> Result<LoadStats, SinkError> {
        let mut sql = "SELECT message_id, type, shard, batch_id, event FROM quarantine".to_string();
        if !ids.is_empty() {
            sql.push_str(" WHERE message_id IN (SELECT unnest(?::VARCHAR[]))");
        }
        sql.push_str(" ORDER BY quarantined_at, message_id");
        let mut stmt = self.conn.prepare(&sql).map_err(transient)?;
        let list = format!(
            "[{}]",
            ids.iter()
                .map(|i| format!("'{}'", i.replace('\'', "''")))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let map = |r: &duckdb::Row<'_>| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<u32>>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, String>(4)?,
            ))
        };
        let rows: Vec<_> = if ids.is_empty() {
            stmt.query_map([], map)
        } else {
            stmt.query_map(params![list], map)
        }
        .map_err(transient)?
        .collect::<Result<_, _>>()
        .map_err(transient)?;
        drop(stmt);
        let mut stats = LoadStats::default();
        for (message_id, kind, shard, batch_id, json) in rows {
            let Some(kind) = EventKind::parse(&kind) else {
                continue;
            };
            let ev = StoredEvent {
                message_id,
                kind,
                anonymous_id: None,
                user_id: None,
                received_at_ms: 0,
                timestamp_ms: 0,
                json,
            };
            let load = Load::events(shard.unwrap_or(0), batch_id.unwrap_or(0), vec![ev]);
            let mut prepared = Self::prepare(&load);
            prepared.replay = true;
            stats.add(self.write_or_isolate(prepared)?);
        }
        Ok(stats)
    }
}

/// Stages one kind's rows and inserts those whose `message_id` is new to the warehouse
/// (registered in `message_ids` under this load); returns how many were inserted.
fn insert_kind(
    tx: &duckdb::Transaction<'_>,
    kind: EventKind,
    rows: &[&Row],
    load_id: i64,
) -> Result<u64, SinkError> {
    let table = kind.table();
    tx.execute(&format!("DELETE FROM stage_{table}"), [])
        .map_err(transient)?;
    {
        let mut app = tx.appender(&format!("stage_{table}")).map_err(transient)?;
        for row in rows {
            app.append_row(duckdb::appender_params_from_iter(row.iter()))
                .map_err(classify)?;
        }
        app.flush().map_err(classify)?;
    }
    tx.execute(
        &format!(
            "INSERT OR IGNORE INTO message_ids SELECT message_id, '{table}', ? FROM stage_{table}"
        ),
        params![load_id],
    )
    .map_err(classify)?;
    let cols = column_names(kind);
    let select: Vec<String> = cols
        .iter()
        .map(|c| {
            let ty = COMMON
                .iter()
                .find(|x| x.0 == *c)
                .map(|x| x.2)
                .unwrap_or_else(|| {
                    if *c == "raw" || specific_columns(kind).iter().any(|s| s.0 == *c && s.2) {
                        "JSON"
                    } else {
                        "VARCHAR"
                    }
                });
            format!("CAST(s.{c} AS {ty})")
        })
        .collect();
    // Zone maps on the ever-growing `load_id` keep this lookup to the newest rows.
    let n = tx
        .execute(
            &format!(
                "INSERT OR IGNORE INTO {table} ({}, loaded_at) SELECT {}, now()::TIMESTAMP FROM stage_{table} s
                 WHERE s.message_id IN (SELECT message_id FROM message_ids WHERE load_id = ? AND table_name = '{table}')",
                cols.join(", "),
                select.join(", ")
            ),
            params![load_id],
        )
        .map_err(classify)? as u64;
    Ok(n)
}

impl DuckDbSink {
    fn write_or_isolate(&mut self, prepared: Prepared) -> Result<LoadStats, SinkError> {
        match self.write(&prepared) {
            Err(e @ SinkError::Permanent(_)) => self.isolate(prepared, &e),
            other => other,
        }
    }
}

impl Sink for DuckDbSink {
    fn load(&mut self, load: &Load) -> Result<LoadStats, SinkError> {
        self.write_or_isolate(Self::prepare(load))
    }
}
