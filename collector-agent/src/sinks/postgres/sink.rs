//! The PostgreSQL sink: per load, one transaction that `COPY`s each kind's rows into a
//! temporary all-text staging table, registers the new `message_id`s
//! (`INSERT … ON CONFLICT DO NOTHING RETURNING`), and inserts exactly those rows into
//! the typed table, casting on the way.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use collector_core::timestamp::{format_ms, parse_ms};
use collector_core::EventKind;
use futures_util::SinkExt;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use super::config::PostgresConfig;
use crate::sinks::schema::{self, DeadLetter, LogicalType, Prepared, QuarantinedEvent, Row};
use crate::sinks::{LoadStats, QueryResult, Sink, SinkError};

/// PostgreSQL's type for a logical type.
fn sql_type(ty: LogicalType) -> &'static str {
    match ty {
        LogicalType::Text => "text",
        LogicalType::Timestamp => "timestamptz",
        LogicalType::Json => "jsonb",
    }
}

/// Quotes an identifier (column names such as `timestamp` are type names in SQL).
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Classifies a PostgreSQL error: data the warehouse will never take (class 22, data
/// exceptions such as invalid text or JSON; class 23, integrity constraints) is
/// permanent; everything else (connection, locks, a schema an operator must fix) is
/// transient and retried.
fn classify(e: tokio_postgres::Error) -> SinkError {
    let permanent = e.code().is_some_and(|c| {
        let code = c.code();
        code.starts_with("22") || code.starts_with("23")
    });
    let msg = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    };
    if permanent {
        SinkError::Permanent(msg)
    } else {
        SinkError::Transient(msg)
    }
}

fn create_table_sql(kind: EventKind) -> String {
    let mut cols = Vec::new();
    for c in schema::columns(kind) {
        let mut def = format!("{} {}", ident(c.name), sql_type(c.ty));
        if c == schema::MESSAGE_ID {
            def.push_str(" PRIMARY KEY");
        } else if c == schema::RAW {
            def.push_str(" NOT NULL");
        }
        cols.push(def);
    }
    cols.push(format!("{} timestamptz NOT NULL", ident(schema::LOADED_AT)));
    format!(
        "CREATE TABLE IF NOT EXISTS {} ({})",
        kind.table(),
        cols.join(", ")
    )
}

/// Numbered migrations, recorded in `collector_migrations` (the same numbers as the
/// DuckDB sink's, so a version means the same schema everywhere).
fn migrations() -> Vec<(i32, &'static str, String)> {
    let mut v1 = String::new();
    for kind in EventKind::ALL {
        v1.push_str(&create_table_sql(kind));
        v1.push_str(";\n");
    }
    let v2 = "CREATE TABLE IF NOT EXISTS dead_letters (shard integer NOT NULL, batch_id bigint NOT NULL, error text NOT NULL, blob bytea NOT NULL, loaded_at timestamptz NOT NULL, PRIMARY KEY (shard, batch_id));
CREATE TABLE IF NOT EXISTS message_ids (message_id text PRIMARY KEY, table_name text NOT NULL, load_id bigint NOT NULL);
CREATE INDEX IF NOT EXISTS message_ids_load_id ON message_ids (load_id);
CREATE SEQUENCE IF NOT EXISTS load_ids START 1;
CREATE TABLE IF NOT EXISTS quarantine (message_id text PRIMARY KEY, type text NOT NULL, shard integer, batch_id bigint, reason text NOT NULL, event text NOT NULL, quarantined_at timestamptz NOT NULL, attempts integer NOT NULL);
"
    .to_string();
    vec![
        (1, "segment tables", v1),
        (
            2,
            "message_ids registry (one message_id per warehouse), quarantine, dead letters keyed by (shard, batch_id)",
            v2,
        ),
    ]
}

/// A PostgreSQL warehouse: one connection, reopened when it breaks.
pub struct PostgresSink {
    cfg: PostgresConfig,
    client: Mutex<Option<Client>>,
}

impl PostgresSink {
    /// Connects, creates the schema if needed and applies the migrations it lacks.
    pub async fn connect(cfg: &PostgresConfig) -> Result<PostgresSink, SinkError> {
        let sink = PostgresSink {
            cfg: cfg.clone(),
            client: Mutex::new(None),
        };
        let mut guard = sink.client().await?;
        migrate(guard.as_mut().expect("connected")).await?;
        drop(guard);
        Ok(sink)
    }

    async fn open(cfg: &PostgresConfig) -> Result<Client, SinkError> {
        let mut pg: tokio_postgres::Config = cfg
            .url
            .parse()
            .map_err(|e| SinkError::Permanent(format!("warehouse.url: {e}")))?;
        if let Some(p) = cfg.password() {
            pg.password(p);
        }
        pg.connect_timeout(Duration::from_millis(cfg.timeout_ms));
        pg.application_name("collector-agent");
        let (client, connection) = pg
            .connect(NoTls)
            .await
            .map_err(|e| SinkError::Transient(format!("connect to PostgreSQL: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "PostgreSQL connection closed");
            }
        });
        let schema = ident(&cfg.schema);
        let mut setup = format!(
            "SET TIME ZONE 'UTC'; SET statement_timeout = {}; CREATE SCHEMA IF NOT EXISTS {schema}; SET search_path TO {schema};",
            cfg.timeout_ms
        );
        for kind in EventKind::ALL {
            let cols: Vec<String> = schema::columns(kind)
                .iter()
                .map(|c| format!("{} text", ident(c.name)))
                .collect();
            setup.push_str(&format!(
                "CREATE TEMP TABLE IF NOT EXISTS stage_{} ({}) ON COMMIT DELETE ROWS;",
                kind.table(),
                cols.join(", ")
            ));
        }
        client.batch_execute(&setup).await.map_err(classify)?;
        Ok(client)
    }

    /// The connection, (re)opened if there is none or it broke.
    async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>, SinkError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(Self::open(&self.cfg).await?);
        }
        Ok(guard)
    }
}

/// Applies the missing migrations in one transaction, under an advisory lock, so
/// agents starting together (or a tool connecting beside a running agent) never race.
async fn migrate(client: &mut Client) -> Result<(), SinkError> {
    let tx = client.transaction().await.map_err(classify)?;
    // Any constant: the agents' own lock.
    tx.execute("SELECT pg_advisory_xact_lock(7415202611)", &[])
        .await
        .map_err(classify)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS collector_migrations (version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL)",
    )
    .await
    .map_err(classify)?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM collector_migrations", &[])
        .await
        .map_err(classify)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (version, name, sql) in migrations() {
        if applied.contains(&version) {
            continue;
        }
        tx.batch_execute(&sql).await.map_err(|e| {
            SinkError::Permanent(format!("migration {version} ({name}): {}", classify(e)))
        })?;
        tx.execute(
            "INSERT INTO collector_migrations VALUES ($1, $2, now())",
            &[&version, &name],
        )
        .await
        .map_err(classify)?;
        tracing::info!(version, name, "warehouse migrated");
    }
    tx.commit().await.map_err(classify)?;
    Ok(())
}

/// One row as a CSV line for `COPY … (FORMAT csv)`: every value quoted, NULL as an
/// unquoted empty field.
fn csv_line(row: &Row, out: &mut Vec<u8>) {
    for (i, v) in row.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        if let Some(v) = v {
            out.push(b'"');
            for b in v.bytes() {
                if b == b'"' {
                    out.push(b'"');
                }
                out.push(b);
            }
            out.push(b'"');
        }
    }
    out.push(b'\n');
}

async fn write(client: &mut Client, p: &Prepared) -> Result<LoadStats, SinkError> {
    let tx = client.transaction().await.map_err(classify)?;
    let mut stats = LoadStats {
        duplicates: p.in_load_duplicates,
        ..LoadStats::default()
    };
    for d in &p.dead {
        stats.dead_letters += tx
            .execute(
                "INSERT INTO dead_letters VALUES ($1, $2, $3, $4, now()) ON CONFLICT DO NOTHING",
                &[&(d.shard as i32), &d.batch_id, &d.error, &d.blob],
            )
            .await
            .map_err(classify)?;
    }
    for (shard, batch_id) in &p.resolved_dead {
        tx.execute(
            "DELETE FROM dead_letters WHERE shard = $1 AND batch_id = $2",
            &[&(*shard as i32), batch_id],
        )
        .await
        .map_err(classify)?;
    }
    // An event already in the warehouse is a duplicate, not a poison; one already
    // quarantined is a duplicate too, unless this is a replay of it.
    let on_conflict = p.quarantine_on_conflict();
    for q in &p.quarantine {
        let n = tx
            .execute(
                &format!(
                    "INSERT INTO quarantine SELECT $1, $2, $3, $4, $5, $6, now(), 1
                     WHERE NOT EXISTS (SELECT 1 FROM message_ids WHERE message_id = $1)
                     ON CONFLICT (message_id) {on_conflict}"
                ),
                &[
                    &q.message_id,
                    &q.kind.as_str(),
                    &(q.shard as i32),
                    &q.batch_id,
                    &q.reason,
                    &q.event.replace('\0', "\\u0000"),
                ],
            )
            .await
            .map_err(classify)?;
        if n > 0 {
            stats.quarantined += 1;
        } else {
            stats.duplicates += 1;
        }
    }
    let load_id: i64 = tx
        .query_one("SELECT nextval('load_ids')", &[])
        .await
        .map_err(classify)?
        .get(0);
    for kind in EventKind::ALL {
        let mut csv = Vec::new();
        let mut n_rows = 0u64;
        for row in p.rows_of(kind) {
            csv_line(row, &mut csv);
            n_rows += 1;
        }
        if n_rows == 0 {
            continue;
        }
        let table = kind.table();
        let sink = tx
            .copy_in(&format!("COPY stage_{table} FROM STDIN (FORMAT csv)"))
            .await
            .map_err(classify)?;
        futures_util::pin_mut!(sink);
        sink.send(Bytes::from(csv)).await.map_err(classify)?;
        sink.as_mut().finish().await.map_err(classify)?;
        let cols = schema::columns(kind);
        let names: Vec<String> = cols.iter().map(|c| ident(c.name)).collect();
        let select: Vec<String> = cols
            .iter()
            .map(|c| format!("CAST(s.{} AS {})", ident(c.name), sql_type(c.ty)))
            .collect();
        let inserted = tx
            .execute(
                &format!(
                    "WITH new AS (
                        INSERT INTO message_ids SELECT message_id, '{table}', $1 FROM stage_{table}
                        ON CONFLICT (message_id) DO NOTHING RETURNING message_id)
                     INSERT INTO {table} ({}, {}) SELECT {}, now() FROM stage_{table} s JOIN new USING (message_id)
                     ON CONFLICT (message_id) DO NOTHING",
                    names.join(", "),
                    ident(schema::LOADED_AT),
                    select.join(", ")
                ),
                &[&load_id],
            )
            .await
            .map_err(classify)?;
        tx.execute(&format!("DELETE FROM stage_{table}"), &[])
            .await
            .map_err(classify)?;
        stats.inserted += inserted;
        stats.duplicates += n_rows - inserted;
    }
    // An event that was quarantined once and has now loaded leaves the quarantine.
    tx.execute(
        "DELETE FROM quarantine WHERE message_id IN (SELECT message_id FROM message_ids WHERE load_id = $1)",
        &[&load_id],
    )
    .await
    .map_err(classify)?;
    tx.commit().await.map_err(classify)?;
    Ok(stats)
}

/// PostgreSQL renders `timestamptz` as `2026-11-25 10:00:00.123+00` (the session is in
/// UTC); every sink renders instants as `2026-11-25T10:00:00.123Z`.
fn render(v: &str) -> String {
    let b = v.as_bytes();
    let looks_like_instant = b.len() >= 22
        && b.len() <= 35
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b' '
        && b[13] == b':'
        && v.ends_with("+00");
    if looks_like_instant {
        let iso = format!("{}T{}Z", &v[..10], &v[11..v.len() - 3]);
        if let Some(ms) = parse_ms(&iso) {
            return format_ms(ms);
        }
    }
    v.to_string()
}

#[async_trait]
impl Sink for PostgresSink {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn write(&self, load: Arc<Prepared>) -> Result<LoadStats, SinkError> {
        let mut guard = self.client().await?;
        let client = guard.as_mut().expect("connected");
        write(client, &load).await
    }

    async fn quarantined(&self, ids: &[String]) -> Result<Vec<QuarantinedEvent>, SinkError> {
        let guard = self.client().await?;
        let client = guard.as_ref().expect("connected");
        let ids: Option<Vec<String>> = (!ids.is_empty()).then(|| ids.to_vec());
        let rows = client
            .query(
                "SELECT message_id, type, shard, batch_id, event FROM quarantine
                 WHERE $1::text[] IS NULL OR message_id = ANY($1)
                 ORDER BY quarantined_at, message_id",
                &[&ids],
            )
            .await
            .map_err(classify)?;
        Ok(rows
            .iter()
            .map(|r| QuarantinedEvent {
                message_id: r.get(0),
                kind: r.get(1),
                shard: r.get::<_, Option<i32>>(2).map(|s| s as u32),
                batch_id: r.get(3),
                event: r.get(4),
            })
            .collect())
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, SinkError> {
        let guard = self.client().await?;
        let client = guard.as_ref().expect("connected");
        let rows = client
            .query(
                "SELECT shard, batch_id, blob, error FROM dead_letters ORDER BY loaded_at, shard, batch_id",
                &[],
            )
            .await
            .map_err(classify)?;
        Ok(rows
            .iter()
            .map(|r| DeadLetter {
                shard: r.get::<_, i32>(0) as u32,
                batch_id: r.get(1),
                blob: r.get(2),
                error: r.get(3),
            })
            .collect())
    }

    async fn query(&self, sql: &str) -> Result<QueryResult, SinkError> {
        let guard = self.client().await?;
        let client = guard.as_ref().expect("connected");
        let messages = client
            .simple_query(sql)
            .await
            .map_err(|e| SinkError::Permanent(classify(e).to_string()))?;
        let mut result = QueryResult {
            columns: Vec::new(),
            rows: Vec::new(),
        };
        for m in messages {
            match m {
                SimpleQueryMessage::RowDescription(cols) => {
                    result.columns = cols.iter().map(|c| c.name().to_string()).collect();
                    result.rows.clear();
                }
                SimpleQueryMessage::Row(row) => {
                    if result.columns.is_empty() {
                        result.columns =
                            row.columns().iter().map(|c| c.name().to_string()).collect();
                    }
                    result
                        .rows
                        .push((0..row.len()).map(|i| row.get(i).map(render)).collect());
                }
                _ => {}
            }
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_values_and_leaves_null_empty() {
        let mut out = Vec::new();
        csv_line(
            &vec![Some("a\"b,c".into()), None, Some(String::new())],
            &mut out,
        );
        assert_eq!(String::from_utf8(out).unwrap(), "\"a\"\"b,c\",,\"\"\n");
    }

    #[test]
    fn instants_render_like_every_other_sink() {
        assert_eq!(render("2026-11-25 10:00:00+00"), "2026-11-25T10:00:00.000Z");
        assert_eq!(
            render("2026-11-25 10:00:00.12+00"),
            "2026-11-25T10:00:00.120Z"
        );
        assert_eq!(render("hello"), "hello");
        assert_eq!(render("2026-11-25"), "2026-11-25");
    }
}
