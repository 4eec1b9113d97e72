//! The PostgreSQL sink: per load, one transaction that registers the load's
//! `message_id`s (one `COPY` into `message_ids`; `INSERT … ON CONFLICT DO NOTHING` when
//! some are there already) and `COPY`s exactly the rows whose id was new straight into
//! the typed tables, in binary (`copy.rs`); `users` is staged in a temporary table and
//! upserted.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use collector_core::timestamp::{format_us, parse_us};
use collector_core::EventKind;
use futures_util::SinkExt;
use tokio::sync::Mutex;
use tokio_postgres::{Client, IsolationLevel, SimpleQueryMessage, Transaction};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::config::PostgresConfig;
use super::copy;
use crate::sinks::schema::{self, DeadLetter, LogicalType, Prepared, QuarantinedEvent};
use crate::sinks::tables::{self, Catalog, Cell, TableKind};
use crate::sinks::{Dialect, LoadStats, QueryResult, Sink, SinkError, SqlSession};

/// PostgreSQL's type for a logical type.
fn sql_type(ty: LogicalType) -> &'static str {
    match ty {
        LogicalType::Text => "text",
        LogicalType::Timestamp => "timestamptz",
        LogicalType::Json => "jsonb",
        LogicalType::Double => "double precision",
        LogicalType::Boolean => "boolean",
    }
}

fn create_fixed_table_sql(table: &str, kind: TableKind) -> String {
    tables::create_fixed_table_sql(table, kind, sql_type)
}

use tables::quote as ident;

/// Classifies a PostgreSQL error: data the warehouse will never take (class 22, data
/// exceptions such as invalid text or JSON; class 23, integrity constraints) is
/// permanent; everything else (connection, locks, a schema an operator must fix) is
/// transient and retried. A binary `COPY` field the server could not read (22P03) is
/// the sink's mistake about a column's type, not the data's: transient, and the retry
/// reads the types again.
fn classify(e: tokio_postgres::Error) -> SinkError {
    // 22: data exceptions, 23: constraints, 54: limits a row reaches ("row is too
    // big" for a table of many short text columns): each is the event's, so retrying
    // would block the shard for good; the caller isolates and quarantines the event.
    let permanent = e.code().is_some_and(|c| {
        let code = c.code();
        (code.starts_with("22") && code != "22P03")
            || code.starts_with("23")
            || code.starts_with("54")
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

/// At start, a pooler that refuses transactions (PgBouncer's `pool_mode = statement`)
/// is a setting to change, not a warehouse to wait for: every statement of the agent
/// runs in a transaction (its `SET LOCAL`s, then the statement). Only at start: later,
/// a load's error is never called the data's for it.
fn statement_pooler(e: SinkError) -> SinkError {
    match e {
        SinkError::Transient(m) if m.contains("statement pooling mode") => SinkError::Permanent(format!(
            "{m}: the url reaches a connection pooler in statement mode, which refuses transactions, and the agent runs each statement in one; use the pooler in transaction mode (PgBouncer: pool_mode = transaction; Supabase: port 6543) or session mode, or the server's own port"
        )),
        e => e,
    }
}

/// PostgreSQL's system columns, which every table has hidden: `ADD COLUMN xmin` fails
/// ("conflicts with a system column name"), which blocked the shard of an event with
/// a property so named (a map's `xmin`) until it was reserved. A property so named is
/// recorded in `rejected_values` and stays in the event's JSON.
const SYSTEM_COLUMNS: &[&str] = &["tableoid", "xmin", "cmin", "xmax", "cmax", "ctid", "oid"];

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
    let v3 = format!(
        "{};
CREATE TABLE IF NOT EXISTS collector_tables (table_name text PRIMARY KEY, event_text text NOT NULL, created_at timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS collector_columns (table_name text NOT NULL, column_name text NOT NULL, type text NOT NULL, position integer NOT NULL, added_at timestamptz NOT NULL, PRIMARY KEY (table_name, column_name));
CREATE TABLE IF NOT EXISTS rejected_values (message_id text NOT NULL, table_name text NOT NULL, column_name text NOT NULL, value text NOT NULL, reason text NOT NULL, rejected_at timestamptz NOT NULL, PRIMARY KEY (message_id, table_name, column_name));
",
        create_fixed_table_sql("users", TableKind::Users)
    );
    let v3 = v3 + &tables::add_segment_id_sql(sql_type(LogicalType::Text));
    vec![
        (1, "segment tables", v1),
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
    .chain(crate::sinks::sql_migrations(crate::sinks::Relational::Postgres, sql_type(LogicalType::Text)))
    .collect()
}

/// The agents' own advisory lock: migrations and schema growth take it, so agents
/// sharing a database never race on DDL.
const SCHEMA_LOCK: &str = "SELECT pg_advisory_xact_lock(7415202611)";

/// Taken by a load that writes `users`, until it commits: the merge of a user's traits
/// reads the keys `collector_user_traits` holds, then writes new ones.
const USERS_LOCK: &str = "SELECT pg_advisory_xact_lock(7415202612)";

/// The settings every transaction of the agent starts with, `SET LOCAL`: they end with
/// the transaction, so they hold through a transaction-mode pooler (PgBouncer's
/// `pool_mode = transaction`, Supabase's port 6543, Neon's `-pooler` hosts), which
/// runs each transaction on whichever server connection is free, with whatever session
/// state its earlier clients left, and the agent leaves none behind for the pooler's
/// other clients. What the agent reads as text (instants, numbers) must not depend on
/// how the server or that connection was configured: UTC, ISO dates, backslashes in
/// literals as themselves (the agent's literals are standard SQL's: with
/// `standard_conforming_strings = off` an id holding `\'` ended one), and doubles as
/// the shortest text that reads back exactly (`extra_float_digits` above 0,
/// PostgreSQL 12+). A server with `DateStyle = 'SQL, DMY'` and `extra_float_digits = 0`
/// (the default before PostgreSQL 12) failed 14 tests; the tests' server has both. The
/// server's notices ("schema … already exists, skipping") are not passed on: warnings
/// and errors are. Sent on their own, before the transaction's statements: PostgreSQL
/// parses a whole query string before it runs any of it, so a literal in the same
/// string would be read under the connection's old `standard_conforming_strings`.
fn local_settings(schema: &str, timeout_ms: u64) -> String {
    format!(
        "SET LOCAL client_min_messages = warning; SET LOCAL TIME ZONE 'UTC'; SET LOCAL standard_conforming_strings = on; SET LOCAL DateStyle = 'ISO, YMD'; SET LOCAL IntervalStyle = 'postgres'; SET LOCAL extra_float_digits = 1; SET LOCAL statement_timeout = {timeout_ms}; SET LOCAL search_path TO {};",
        ident(schema)
    )
}

/// Starts a transaction, READ COMMITTED (the loads' exactness is designed for
/// PostgreSQL's default; a server whose default is SERIALIZABLE failed the schema check
/// of a second connection while an agent loaded), with [`local_settings`].
async fn begin<'c>(client: &'c mut Client, settings: &str) -> Result<Transaction<'c>, SinkError> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::ReadCommitted)
        .start()
        .await
        .map_err(classify)?;
    tx.batch_execute(settings).await.map_err(classify)?;
    Ok(tx)
}

/// Reads the catalog of added tables and columns.
async fn load_catalog(client: &impl tokio_postgres::GenericClient) -> Result<Catalog, SinkError> {
    let tables = client
        .query("SELECT table_name FROM collector_tables", &[])
        .await
        .map_err(classify)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let cols = client
        .query(
            "SELECT table_name, column_name, type, position::bigint FROM collector_columns",
            &[],
        )
        .await
        .map_err(classify)?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    // Every relation and free-standing type of the schema: a per-event table takes
    // none of their names (an analyst's table or view, a dbt model).
    let relations: Vec<String> = client
        .query(
            "SELECT relname::text FROM pg_class WHERE relnamespace = current_schema()::regnamespace
             UNION ALL SELECT typname::text FROM pg_type WHERE typnamespace = current_schema()::regnamespace
               AND typrelid = 0 AND typcategory <> 'A'",
            &[],
        )
        .await
        .map_err(classify)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Catalog::from_rows(tables, cols)
        .reserving(SYSTEM_COLUMNS)
        .with_relations(relations))
}

/// A PostgreSQL warehouse: one connection for loads and the agent's own sessions,
/// reopened when it breaks, and one for queries (`sql`, `status`, the dashboard),
/// opened when first needed, so that an analyst's long query never holds a load up.
pub struct PostgresSink {
    cfg: PostgresConfig,
    client: Mutex<Option<Client>>,
    query_client: Mutex<Option<Client>>,
    catalog: Mutex<Catalog>,
}

impl PostgresSink {
    /// Connects, creates the schema if needed and applies the migrations it lacks.
    pub async fn connect(cfg: &PostgresConfig) -> Result<PostgresSink, SinkError> {
        let sink = PostgresSink {
            cfg: cfg.clone(),
            client: Mutex::new(None),
            query_client: Mutex::new(None),
            catalog: Mutex::new(Catalog::default()),
        };
        // Opened here rather than through `client()`, whose errors are all the
        // warehouse's and retried: at start, a config the server can never accept (a
        // CA file that is not there) is reported as what it is.
        let mut client = Self::open(cfg).await.map_err(statement_pooler)?;
        *sink.catalog.lock().await = sink.ready(&mut client).await.map_err(statement_pooler)?;
        *sink.client.lock().await = Some(client);
        Ok(sink)
    }

    /// Brings a new loads' connection's server up to date (the migrations it lacks)
    /// and reads its catalog. At start, and again whenever the connection is opened
    /// anew: the server it reaches then may be another (a standby promoted after a
    /// failover, a server restored from a backup), whose schema and catalog are not
    /// necessarily the ones the agent knew.
    async fn ready(&self, client: &mut Client) -> Result<Catalog, SinkError> {
        let settings = self.settings();
        migrate(client, &settings).await?;
        let tx = begin(client, &settings).await?;
        let catalog = load_catalog(&tx).await?;
        tx.commit().await.map_err(classify)?;
        Ok(catalog)
    }

    /// [`local_settings`] for everything but loads: the limit for analytical
    /// statements.
    fn settings(&self) -> String {
        local_settings(&self.cfg.schema, self.cfg.query_timeout_ms)
    }

    async fn open(cfg: &PostgresConfig) -> Result<Client, SinkError> {
        let (mut pg, tls) = cfg.driver_config().map_err(SinkError::Permanent)?;
        if let Some(p) = cfg.password() {
            pg.password(p);
        }
        pg.connect_timeout(Duration::from_millis(cfg.timeout_ms));
        pg.application_name("collector-agent");
        let tls = MakeRustlsConnect::new(tls.client_config().map_err(SinkError::Permanent)?);
        let (client, connection) = pg.connect(tls).await.map_err(|e| {
            let why = crate::causes(&e);
            // rustls names what failed, not which setting decides it.
            let hint = if why.contains("invalid peer certificate") {
                " (the server's certificate, checked as warehouse.url's sslmode and sslrootcert say)"
            } else if why.contains("fatal alert: UnknownCA") || why.contains("fatal alert: BadCertificate") {
                " (the server refused the client certificate: warehouse.url's sslcert)"
            } else {
                ""
            };
            SinkError::Transient(format!("connect to PostgreSQL: {why}{hint}"))
        })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "PostgreSQL connection closed");
            }
        });
        // No session state is set: every statement runs in a transaction that sets its
        // own (`begin`), so a pooler may hand each to another server connection.
        // The schema is made only when it is missing: `CREATE SCHEMA IF NOT EXISTS`
        // needs the right to create schemas in the database even when the schema is
        // there, which a least-privilege role (its own schema, made for it by a DBA)
        // does not have.
        let mut client = client;
        let tx = begin(
            &mut client,
            &local_settings(&cfg.schema, cfg.query_timeout_ms),
        )
        .await?;
        let exists = tx
            .query_opt(
                "SELECT 1 FROM pg_namespace WHERE nspname = $1",
                &[&cfg.schema],
            )
            .await
            .map_err(classify)?
            .is_some();
        if !exists {
            tx.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}",
                ident(&cfg.schema)
            ))
            .await
            .map_err(classify)?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(client)
    }

    /// The connection, (re)opened if there is none or it broke.
    async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>, SinkError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            let mut client = Self::open(&self.cfg)
                .await
                .map_err(SinkError::not_the_datas)?;
            let catalog = self
                .ready(&mut client)
                .await
                .map_err(SinkError::not_the_datas)?;
            *self.catalog.lock().await = catalog;
            *guard = Some(client);
        }
        Ok(guard)
    }

    async fn connection<'a>(
        &self,
        slot: &'a Mutex<Option<Client>>,
    ) -> Result<tokio::sync::MutexGuard<'a, Option<Client>>, SinkError> {
        let mut guard = slot.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(
                Self::open(&self.cfg)
                    .await
                    .map_err(SinkError::not_the_datas)?,
            );
        }
        Ok(guard)
    }
}

/// Applies the missing migrations in one transaction, under an advisory lock, so
/// agents starting together (or a tool connecting beside a running agent) never race.
async fn migrate(client: &mut Client, settings: &str) -> Result<(), SinkError> {
    let tx = begin(client, settings).await?;
    // Any constant: the agents' own lock.
    tx.execute(SCHEMA_LOCK, &[]).await.map_err(classify)?;
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

/// How much of a `COPY` is sent at a time: the server parses one chunk while the next
/// is on its way.
const COPY_CHUNK: usize = 256 * 1024;

/// Streams CSV rows into a `COPY … FROM STDIN`.
async fn copy_in(
    tx: &tokio_postgres::Transaction<'_>,
    sql: &str,
    csv: Vec<u8>,
) -> Result<(), SinkError> {
    let sink = tx.copy_in(sql).await.map_err(classify)?;
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from(csv)).await.map_err(classify)?;
    sink.as_mut().finish().await.map_err(classify)?;
    Ok(())
}

/// `COPY`s `rows` (`copy_sql` is `COPY table (columns)`), streamed in chunks as they
/// are encoded, so the server parses one while the next is made and no table's whole
/// body is held: in binary (`types`, when the table has the sink's own) while the
/// values have an exact binary form, and from a row that has none, the rest as CSV,
/// cast by the server. `now` is `loaded_at`, binary and as text.
async fn copy_rows<'r, 'a: 'r>(
    tx: &tokio_postgres::Transaction<'_>,
    copy_sql: &str,
    rows: impl Iterator<Item = &'r Vec<Cell<'a>>>,
    types: Option<&[copy::PgType]>,
    now: ([u8; 8], &str),
) -> Result<(), SinkError> {
    let mut rows = rows.peekable();
    if let Some(types) = types {
        let sink = tx
            .copy_in(&format!("{copy_sql} FROM STDIN (FORMAT binary)"))
            .await
            .map_err(classify)?;
        futures_util::pin_mut!(sink);
        let mut buf = copy::HEADER.to_vec();
        while let Some(row) = rows.peek() {
            if !copy::row(types, row, now.0, &mut buf) {
                break;
            }
            rows.next();
            if buf.len() >= COPY_CHUNK {
                sink.send(Bytes::from(std::mem::take(&mut buf)))
                    .await
                    .map_err(classify)?;
            }
        }
        buf.extend_from_slice(copy::TRAILER);
        sink.send(Bytes::from(buf)).await.map_err(classify)?;
        sink.as_mut().finish().await.map_err(classify)?;
    }
    if rows.peek().is_none() {
        return Ok(());
    }
    let sink = tx
        .copy_in(&format!("{copy_sql} FROM STDIN (FORMAT csv)"))
        .await
        .map_err(classify)?;
    futures_util::pin_mut!(sink);
    let mut buf = Vec::new();
    for row in rows {
        csv_line(row, Some(now.1), &mut buf);
        if buf.len() >= COPY_CHUNK {
            sink.send(Bytes::from(std::mem::take(&mut buf)))
                .await
                .map_err(classify)?;
        }
    }
    sink.send(Bytes::from(buf)).await.map_err(classify)?;
    sink.as_mut().finish().await.map_err(classify)?;
    Ok(())
}

/// A table's column name → type (as `format_type` prints it), as the `COPY` into it
/// will find them: the table is locked first in the mode `COPY` takes (inserters do not
/// wait for each other), so no `ALTER TABLE` can change a type between this read and
/// the commit. Binary rows read with another type would be refused, or worse, taken
/// as something else (a `float8` read as an `int8`).
async fn table_types(
    tx: &tokio_postgres::Transaction<'_>,
    table: &str,
) -> Result<HashMap<String, String>, SinkError> {
    tx.batch_execute(&format!(
        "LOCK TABLE {} IN ROW EXCLUSIVE MODE",
        ident(table)
    ))
    .await
    .map_err(classify)?;
    Ok(tx
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
            &[&ident(table)],
        )
        .await
        .map_err(classify)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Registers `ids` of `table` under `load_id`; how many were new. Usually all are: one
/// `COPY`, in a savepoint; when some id is already there (a replay, a concurrent
/// agent's insert of the same id, which the `COPY` waits for), the savepoint is rolled
/// back and the ids go in with `ON CONFLICT DO NOTHING`.
async fn register(
    tx: &tokio_postgres::Transaction<'_>,
    ids: &[&str],
    table: &str,
    load_id: i64,
) -> Result<u64, SinkError> {
    if ids.is_empty() {
        return Ok(0);
    }
    // In one order for every agent: two agents registering the same ids wait for each
    // other in the same order, never in a cycle.
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    let ids = sorted.as_slice();
    tx.batch_execute("SAVEPOINT register_ids")
        .await
        .map_err(classify)?;
    let mut csv = Vec::with_capacity(ids.len() * 48);
    let load = load_id.to_string();
    let cells: [Cell<'_>; 2] = [Some(table.into()), Some(load.as_str().into())];
    for id in ids {
        csv_line(&[Some((*id).into())], None, &mut csv);
        csv.pop();
        csv.push(b',');
        csv_line(&cells, None, &mut csv);
    }
    let copied = async {
        let sink = tx
            .copy_in("COPY message_ids (message_id, table_name, load_id) FROM STDIN (FORMAT csv)")
            .await?;
        futures_util::pin_mut!(sink);
        sink.send(Bytes::from(csv)).await?;
        sink.as_mut().finish().await
    }
    .await;
    match copied {
        Ok(_) => {
            tx.batch_execute("RELEASE SAVEPOINT register_ids")
                .await
                .map_err(classify)?;
            Ok(ids.len() as u64)
        }
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT register_ids")
                .await
                .map_err(classify)?;
            tx.execute(
                "INSERT INTO message_ids SELECT id, $2, $3 FROM unnest($1::text[]) AS id
                 ON CONFLICT (message_id) DO NOTHING",
                &[&ids, &table, &load_id],
            )
            .await
            .map_err(classify)
        }
        Err(e) => Err(classify(e)),
    }
}

/// One row as a CSV line for `COPY … (FORMAT csv)`: every value quoted, NULL as an
/// unquoted empty field; `last`, if any, appended as one more value.
fn csv_line(row: &[Cell<'_>], last: Option<&str>, out: &mut Vec<u8>) {
    let values = row.iter().map(|c| c.as_deref()).chain(last.map(Some));
    for (i, v) in values.enumerate() {
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

/// Why a value was stored changed (see [`without_nul`]).
const NUL_REASON: &str =
    "PostgreSQL cannot store the NUL character (U+0000): stored with U+FFFD in its place";

/// PostgreSQL's `text` and `jsonb` cannot hold U+0000, which every other warehouse
/// stores. Rather than refuse the whole event for one character, the character becomes
/// U+FFFD (the replacement character) in text and JSON values, and `rejected_values`
/// names the event, the column and the value as sent. Keys are left alone: a
/// `message_id` holding NUL is still refused, and quarantined, since changing it would
/// change which event it is.
fn without_nul(plan: &mut tables::Plan<'_>) {
    let mut rejected = Vec::new();
    for load in &mut plan.loads {
        let record = load.kind != TableKind::Users;
        for (i, (name, ty)) in load.columns.iter().enumerate() {
            let json = match ty {
                LogicalType::Json => true,
                LogicalType::Text => false,
                _ => continue,
            };
            let key = name == schema::MESSAGE_ID.name || (!record && name == "id");
            if key {
                continue;
            }
            for row in &mut load.rows {
                let Some(v) = row.get(i).and_then(|c| c.as_deref()) else {
                    continue;
                };
                let fixed = if json {
                    json_without_nul(v)
                } else {
                    v.contains('\0').then(|| v.replace('\0', "\u{FFFD}"))
                };
                let Some(fixed) = fixed else { continue };
                if record {
                    let sent = if json {
                        v.to_string()
                    } else {
                        serde_json::Value::String(v.to_string()).to_string()
                    };
                    rejected.push(tables::Rejected {
                        message_id: row
                            .first()
                            .and_then(|c| c.as_deref())
                            .unwrap_or_default()
                            .to_string(),
                        table_name: load.table.clone(),
                        column_name: name.clone(),
                        value: tables::cut(sent),
                        reason: NUL_REASON.into(),
                    });
                }
                row[i] = Some(fixed.into());
            }
        }
    }
    plan.rejected.extend(rejected);
}

/// JSON text with each `\u0000` escape replaced by `\ufffd`, or `None` when it has none
/// (an escaped backslash followed by `u0000` is text, not the escape).
fn json_without_nul(v: &str) -> Option<String> {
    if !v.contains("\\u0000") {
        return None;
    }
    let b = v.as_bytes();
    let (mut out, mut i, mut from) = (String::with_capacity(v.len()), 0, 0);
    while i < b.len() {
        if b[i] != b'\\' {
            i += 1;
            continue;
        }
        if b[i + 1..].starts_with(b"u0000") {
            out.push_str(&v[from..i]);
            out.push_str("\\ufffd");
            i += 6;
            from = i;
        } else {
            i += 2;
        }
    }
    out.push_str(&v[from.min(v.len())..]);
    (from > 0).then_some(out)
}

/// Writes a prepared load in one transaction. When it grows the schema, it takes the
/// agents' lock first and plans again against the catalog as committed (another agent
/// may have grown it meanwhile); the in-memory catalog changes only after the commit.
async fn write(
    client: &mut Client,
    catalog: &mut Catalog,
    p: &Prepared,
    cfg: &PostgresConfig,
) -> Result<LoadStats, SinkError> {
    // A load's statements are short: one that waits longer (on another session's
    // lock) fails and the load is retried, instead of holding the shard for as long as
    // the limit for analytical statements (`query_timeout_ms`) allows.
    let tx = begin(client, &local_settings(&cfg.schema, cfg.timeout_ms)).await?;
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
    // The ids new to the warehouse, registered first (`register`: a concurrent agent's
    // insert of the same id waits for its commit, then counts as a duplicate here).
    // The load is planned from their events only, and their rows are then `COPY`d,
    // straight into the typed tables: one pass, PostgreSQL's own bulk path. (The
    // agents' lock below is taken after the registry's: no agent holds it while it
    // waits for another's ids, so the two never wait on each other in a cycle.)
    let mut known: HashSet<String> = HashSet::new();
    for kind in EventKind::ALL {
        let ids: Vec<&str> = p
            .rows
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| r.message_id())
            .collect();
        let fresh = register(&tx, &ids, kind.table(), load_id).await?;
        if fresh < ids.len() as u64 {
            // Some were loaded before: which ones are this load's (by key).
            let mine: HashSet<String> = tx
                .query(
                    "SELECT message_id FROM message_ids WHERE message_id = ANY($1::text[]) AND load_id = $2",
                    &[&ids, &load_id],
                )
                .await
                .map_err(classify)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            known.extend(
                ids.iter()
                    .filter(|id| !mine.contains(**id))
                    .map(|id| id.to_string()),
            );
        }
    }
    let fresh = p.new_rows(|r| !known.contains(r.message_id()));
    stats.count_fresh(p, &fresh);
    // When it grows the schema, the agents' lock is taken and the load planned again
    // against the catalog as committed (another agent may have grown it meanwhile).
    let mut plan = catalog.plan(&fresh);
    if plan.changes_schema() {
        tx.execute(SCHEMA_LOCK, &[]).await.map_err(classify)?;
        plan = load_catalog(&tx).await?.plan(&fresh);
    }
    without_nul(&mut plan);
    for (table, event_text) in &plan.new_tables {
        tx.batch_execute(&create_fixed_table_sql(table, TableKind::Event))
            .await
            .map_err(classify)?;
        tx.execute(
            "INSERT INTO collector_tables VALUES ($1, $2, now()) ON CONFLICT DO NOTHING",
            &[table, event_text],
        )
        .await
        .map_err(classify)?;
    }
    for c in &plan.new_columns {
        tx.batch_execute(&format!(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}",
            ident(&c.table),
            ident(&c.name),
            sql_type(c.ty)
        ))
        .await
        .map_err(classify)?;
        tx.execute(
            "INSERT INTO collector_columns VALUES ($1, $2, $3, $4, now()) ON CONFLICT DO NOTHING",
            &[&c.table, &c.name, &c.ty.name(), &(c.position as i32)],
        )
        .await
        .map_err(classify)?;
    }
    let now_row = tx
        .query_one(
            "SELECT now()::text, (extract(epoch FROM now()) * 1000000)::int8",
            &[],
        )
        .await
        .map_err(classify)?;
    let now: String = now_row.get(0);
    let now_binary = copy::timestamptz(now_row.get(1));
    for load in &plan.loads {
        let table = &load.table;
        let names: Vec<String> = load.columns.iter().map(|(n, _)| ident(n)).collect();
        let loaded = ident(schema::LOADED_AT);
        if load.kind == TableKind::Users {
            // One row per identify, merged with the keys the warehouse holds: the
            // agents' lock is taken first, so two agents never merge one user against
            // the same keys at once.
            tx.execute(USERS_LOCK, &[]).await.map_err(classify)?;
            let ids: Vec<&str> = load
                .rows
                .iter()
                .filter_map(|r| r.first().and_then(|c| c.as_deref()))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let mut stored = tables::StoredKeys::new();
            for r in tx
                .query(
                    "SELECT id, keys FROM collector_user_traits WHERE id = ANY($1)",
                    &[&ids],
                )
                .await
                .map_err(classify)?
            {
                tables::read_user_keys(r.get(0), r.get(1), &mut stored);
            }
            let merged = tables::merge_users(load, &stored);
            let (k_ids, k_json): (Vec<String>, Vec<String>) =
                tables::user_keys_rows(&stored, &merged.keys)
                    .into_iter()
                    .unzip();
            tx.execute(
                "INSERT INTO collector_user_traits SELECT * FROM unnest($1::text[], $2::text[])
                 ON CONFLICT (id) DO UPDATE SET keys = excluded.keys",
                &[&k_ids, &k_json],
            )
            .await
            .map_err(classify)?;
            // Upserted, so staged: a temporary table, then `INSERT … ON CONFLICT`.
            let stage = ident(&format!("stage_{table}"));
            let stage_cols: Vec<String> = load
                .columns
                .iter()
                .map(|(n, _)| format!("{} text", ident(n)))
                .collect();
            tx.batch_execute(&format!(
                "CREATE TEMP TABLE {stage} ({}) ON COMMIT DROP",
                stage_cols.join(", ")
            ))
            .await
            .map_err(classify)?;
            let mut csv = Vec::new();
            for row in &merged.rows {
                csv_line(row, None, &mut csv);
            }
            copy_in(&tx, &format!("COPY {stage} FROM STDIN (FORMAT csv)"), csv).await?;
            let select: Vec<String> = load
                .columns
                .iter()
                .map(|(n, ty)| format!("CAST(s.{} AS {})", ident(n), sql_type(*ty)))
                .collect();
            tx.batch_execute(&format!(
                "INSERT INTO users ({}, {loaded}) SELECT {}, now() FROM {stage} s
                 ON CONFLICT (id) DO UPDATE SET {}",
                names.join(", "),
                select.join(", "),
                tables::users_merge_set(&load.columns, "excluded", "users")
            ))
            .await
            .map_err(classify)?;
            continue;
        }
        // In binary while the table's types are the sink's own and the values have an
        // exact binary form; from a row that has none, the rest as CSV, cast by the
        // server. Streamed in chunks as they are encoded: the server parses one while
        // the next is made, and no table's whole body is held.
        let physical = table_types(&tx, table).await?;
        let binary = (physical.get(schema::LOADED_AT).map(String::as_str)
            == Some(copy::PgType::Timestamptz.name()))
        .then(|| copy::binary_types(&load.columns, &physical))
        .flatten();
        let copy_sql = format!("COPY {} ({}, {loaded})", ident(table), names.join(", "));
        copy_rows(
            &tx,
            &copy_sql,
            load.rows.iter(),
            binary.as_deref(),
            (now_binary, &now),
        )
        .await?;
    }
    for r in &plan.rejected {
        tx.execute(
            "INSERT INTO rejected_values VALUES ($1, $2, $3, $4, $5, now()) ON CONFLICT DO NOTHING",
            &[
                &r.message_id,
                &r.table_name,
                &r.column_name,
                &r.value.replace('\0', "\\u0000"),
                &r.reason,
            ],
        )
        .await
        .map_err(classify)?;
    }
    // An event that was quarantined once and has now loaded leaves the quarantine
    // (looked up by key: the registry is never scanned).
    let loaded: Vec<&str> = fresh.rows.iter().map(|r| r.message_id()).collect();
    tx.execute(
        "DELETE FROM quarantine WHERE message_id = ANY($1::text[])",
        &[&loaded],
    )
    .await
    .map_err(classify)?;
    if stats.inserted > 0 {
        // For the next identity run.
        tx.execute(
            "INSERT INTO identity_pending (load_id, loaded_at) VALUES ($1, now())",
            &[&load_id],
        )
        .await
        .map_err(classify)?;
    }
    tx.commit().await.map_err(classify)?;
    *catalog = plan.catalog;
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
        if let Some(us) = parse_us(&iso) {
            return format_us(us);
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
        let mut catalog = self.catalog.lock().await;
        write(client, &mut catalog, &load, &self.cfg).await
    }

    async fn quarantined(&self, ids: &[String]) -> Result<Vec<QuarantinedEvent>, SinkError> {
        let mut guard = self.client().await?;
        let tx = begin(guard.as_mut().expect("connected"), &self.settings()).await?;
        let ids: Option<Vec<String>> = (!ids.is_empty()).then(|| ids.to_vec());
        let rows = tx
            .query(
                "SELECT message_id, type, shard, batch_id, event FROM quarantine
                 WHERE $1::text[] IS NULL OR message_id = ANY($1)
                 ORDER BY quarantined_at, message_id",
                &[&ids],
            )
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
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
        let mut guard = self.client().await?;
        let tx = begin(guard.as_mut().expect("connected"), &self.settings()).await?;
        let rows = tx
            .query(
                "SELECT shard, batch_id, blob, error FROM dead_letters ORDER BY loaded_at, shard, batch_id",
                &[],
            )
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
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
        let guard = self.connection(&self.query_client).await?;
        let mut s = PgSession {
            guard,
            settings: self.settings(),
            in_tx: false,
        };
        s.query(sql)
            .await
            .map_err(|e| SinkError::Permanent(e.to_string()))
    }

    async fn session(&self) -> Result<Option<Box<dyn SqlSession + '_>>, SinkError> {
        Ok(Some(Box::new(PgSession {
            guard: self.client().await?,
            settings: self.settings(),
            in_tx: false,
        })))
    }
}

/// Runs one query by the simple protocol; its rows rendered as text.
async fn simple_rows(client: &Client, sql: &str) -> Result<QueryResult, SinkError> {
    let messages = client.simple_query(sql).await.map_err(classify)?;
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
                    result.columns = row.columns().iter().map(|c| c.name().to_string()).collect();
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

/// The sink's connection, held for one job (loads wait meanwhile). The job's own
/// `BEGIN` starts a transaction with the agent's settings (`begin`); a statement
/// outside the job's transactions runs in one of its own, so none runs without them.
struct PgSession<'a> {
    guard: tokio::sync::MutexGuard<'a, Option<Client>>,
    settings: String,
    /// Inside the job's `BEGIN` … `COMMIT`.
    in_tx: bool,
}

impl PgSession<'_> {
    fn client(&self) -> &Client {
        self.guard.as_ref().expect("connected")
    }

    /// Starts a transaction for one statement, unless the job's is open: whether it
    /// did.
    async fn enter(&mut self) -> Result<bool, SinkError> {
        if self.in_tx {
            return Ok(false);
        }
        self.begin().await?;
        Ok(true)
    }

    /// Ends what [`PgSession::enter`] started: committed when the statement succeeded.
    async fn leave<T>(&mut self, own: bool, r: Result<T, SinkError>) -> Result<T, SinkError> {
        if own {
            self.in_tx = false;
            let end = if r.is_ok() { "COMMIT" } else { "ROLLBACK" };
            let ended = self.client().batch_execute(end).await.map_err(classify);
            if r.is_ok() {
                ended?;
            }
        }
        r
    }

    async fn begin(&mut self) -> Result<(), SinkError> {
        let begin = format!("BEGIN ISOLATION LEVEL READ COMMITTED; {}", self.settings);
        if let Err(e) = self.client().batch_execute(&begin).await {
            // `BEGIN` may have run before a setting failed: end what it started, so
            // the connection is not left in a failed transaction.
            let _ = self.client().batch_execute("ROLLBACK").await;
            return Err(classify(e));
        }
        self.in_tx = true;
        Ok(())
    }
}

impl Drop for PgSession<'_> {
    fn drop(&mut self) {
        // A job that ends inside its transaction (its future dropped at shutdown, an
        // error path that did not roll back) would hand the loads' connection back in
        // that transaction, and the next load's COMMIT would commit the job's half-done
        // work with its own. The connection is closed instead, which rolls the
        // transaction back; the next use opens a new one.
        if self.in_tx {
            *self.guard = None;
        }
    }
}

#[async_trait]
impl SqlSession for PgSession<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    async fn execute(&mut self, sql: &str) -> Result<u64, SinkError> {
        let own = self.enter().await?;
        let r = self.client().execute(sql, &[]).await.map_err(classify);
        self.leave(own, r).await
    }

    async fn batch(&mut self, sql: &str) -> Result<(), SinkError> {
        // The jobs' own transactions (identity, audiences, privacy, activation) are
        // `BEGIN` / `COMMIT` / `ROLLBACK` batches, as in every sink's session.
        let word = sql.trim().trim_end_matches(';').trim();
        if word.eq_ignore_ascii_case("BEGIN") {
            return self.begin().await;
        }
        if word.eq_ignore_ascii_case("COMMIT") {
            // A job's working tables (identity's, the audiences') go with its
            // transaction: through a transaction-mode pooler they would stay on a
            // server connection that the pooler's other clients use next.
            self.in_tx = false;
            return self
                .client()
                .batch_execute("DISCARD TEMP; COMMIT")
                .await
                .map_err(classify);
        }
        if word.eq_ignore_ascii_case("ROLLBACK") {
            self.in_tx = false;
            return self.client().batch_execute(word).await.map_err(classify);
        }
        let own = self.enter().await?;
        let r = self.client().batch_execute(sql).await.map_err(classify);
        self.leave(own, r).await
    }

    async fn query(&mut self, sql: &str) -> Result<QueryResult, SinkError> {
        let own = self.enter().await?;
        let r = simple_rows(self.client(), sql).await;
        self.leave(own, r).await
    }

    async fn insert(
        &mut self,
        table: &str,
        rows: Vec<Vec<Option<String>>>,
    ) -> Result<(), SinkError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut csv = Vec::new();
        for row in &rows {
            let cells: Vec<Cell<'_>> = row
                .iter()
                .map(|v| v.as_deref().map(std::borrow::Cow::Borrowed))
                .collect();
            csv_line(&cells, None, &mut csv);
        }
        let own = self.enter().await?;
        let copied = async {
            let sink = self
                .client()
                .copy_in(&format!("COPY {} FROM STDIN (FORMAT csv)", ident(table)))
                .await?;
            futures_util::pin_mut!(sink);
            sink.send(Bytes::from(csv)).await?;
            sink.as_mut().finish().await
        }
        .await
        .map(drop)
        .map_err(classify);
        self.leave(own, copied).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_escapes_in_json_become_the_replacement_character() {
        assert_eq!(json_without_nul(r#"{"a":"x"}"#), None);
        assert_eq!(
            json_without_nul(r#"{"a\u0000":"x\u0000y\u0000"}"#).as_deref(),
            Some(r#"{"a\ufffd":"x\ufffdy\ufffd"}"#)
        );
        // An escaped backslash followed by `u0000` is text, not a NUL.
        assert_eq!(json_without_nul(r#"{"a":"\\u0000"}"#), None);
        assert_eq!(
            json_without_nul(r#"["\\\u0000"]"#).as_deref(),
            Some(r#"["\\\ufffd"]"#)
        );
    }

    /// A server on loopback for the test, and a sink connected to it.
    async fn local_sink() -> (collector_e2e::postgres::LocalPostgres, PostgresSink) {
        let pg = collector_e2e::postgres::LocalPostgres::start().expect("PostgreSQL starts");
        let cfg = PostgresConfig {
            url: pg.url.clone(),
            password_env: None,
            schema: "public".into(),
            timeout_ms: 30_000,
            query_timeout_ms: 3_600_000,
        };
        let sink = PostgresSink::connect(&cfg).await.unwrap();
        (pg, sink)
    }

    // Rows stream in binary until one has no exact binary form (here an instant not
    // in the canonical form), then the rest as CSV; every row lands, in chunks far
    // smaller than the table's body.
    #[tokio::test]
    async fn a_copy_goes_binary_then_csv_from_the_first_row_that_needs_it() {
        let (_pg, sink) = local_sink().await;
        let mut guard = sink.client().await.unwrap();
        let client = guard.as_mut().unwrap();
        let tx = client.transaction().await.unwrap();
        tx.batch_execute("CREATE TABLE t (n text, ts timestamptz, loaded_at timestamptz)")
            .await
            .unwrap();
        let big = "x".repeat(1000);
        let mut rows: Vec<Vec<Cell<'_>>> = (0..2000)
            .map(|i| {
                vec![
                    Some(format!("{i:04}{big}").into()),
                    Some("2026-11-24T13:54:00.250Z".into()),
                ]
            })
            .collect();
        rows[1500][1] = Some("2026-11-24 14:54:00.250+01".into());
        let types = [copy::PgType::Text, copy::PgType::Timestamptz];
        let now = copy::timestamptz(1_795_528_500_000_000);
        assert!(copy::row(&types, &rows[1499], now, &mut Vec::new()));
        assert!(!copy::row(&types, &rows[1500], now, &mut Vec::new()));
        copy_rows(
            &tx,
            "COPY t (n, ts, loaded_at)",
            rows.iter(),
            Some(&types),
            (
                copy::timestamptz(1_795_528_500_000_000),
                "2026-11-25 00:00:00+00",
            ),
        )
        .await
        .unwrap();
        let got = tx
            .query_one(
                "SELECT count(*), count(DISTINCT ts), min(left(n, 4)), max(left(n, 4)), count(*) FILTER (WHERE length(n) = 1004) FROM t",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(got.get::<_, i64>(0), 2000);
        assert_eq!(got.get::<_, i64>(1), 1, "the CSV rows' instant is the same");
        assert_eq!(
            (got.get::<_, String>(2), got.get::<_, String>(3)),
            ("0000".into(), "1999".into())
        );
        assert_eq!(got.get::<_, i64>(4), 2000);
    }

    // Registration's fast path (one COPY) and its fallback when some ids are already
    // there, against a real server: the counts, and the registry, are exact either way.
    #[tokio::test]
    async fn ids_register_by_copy_and_fall_back_when_some_are_known() {
        let (_pg, sink) = local_sink().await;
        let mut guard = sink.client().await.unwrap();
        let client = guard.as_mut().unwrap();
        let tx = client.transaction().await.unwrap();
        assert_eq!(register(&tx, &["a", "b"], "tracks", 1).await.unwrap(), 2);
        assert_eq!(
            register(&tx, &["b", "c", "a", "d"], "pages", 2)
                .await
                .unwrap(),
            2
        );
        assert_eq!(register(&tx, &[], "pages", 3).await.unwrap(), 0);
        let rows: Vec<(String, String, i64)> = tx
            .query(
                "SELECT message_id, table_name, load_id FROM message_ids ORDER BY message_id",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let row = |id: &str, t: &str, l: i64| (id.to_string(), t.to_string(), l);
        assert_eq!(
            rows,
            vec![
                row("a", "tracks", 1),
                row("b", "tracks", 1),
                row("c", "pages", 2),
                row("d", "pages", 2)
            ]
        );
    }

    // The tables the sink creates have exactly the types its binary `COPY` writes, so a
    // warehouse the sink made loads in binary: base, per-event (a property of every
    // type) and `loaded_at`. A column an operator retyped sends its table as CSV.
    #[tokio::test]
    async fn the_sinks_own_tables_take_binary_rows() {
        let (_pg, sink) = local_sink().await;
        let body = serde_json::json!({"batch": [
            {"type": "track", "messageId": "o1", "userId": "u1", "event": "Order Completed",
             "properties": {"revenue": 9.5, "currency": "EUR", "express": true,
                            "shipped_at": "2026-11-26T09:00:00Z", "tags": ["a"]},
             "context": {"page": {"path": "/p"}}},
            {"type": "page", "messageId": "p1", "anonymousId": "a1", "name": "Home"}
        ]});
        let events = crate::sinks::test_events(body);
        let st = sink
            .load(&crate::sinks::Load::events(0, 1, events))
            .await
            .unwrap();
        assert_eq!(st.inserted, 2);
        let catalog = sink.catalog.lock().await.clone();
        let mut guard = sink.client().await.unwrap();
        let client = guard.as_mut().unwrap();
        let tx = client.transaction().await.unwrap();
        let columns = |table: &str, kind: TableKind| -> Vec<(String, LogicalType)> {
            tables::fixed_columns(kind)
                .iter()
                .map(|c| (c.name.to_string(), c.ty))
                .chain(catalog.columns(table).iter().cloned())
                .collect()
        };
        let order = columns("order_completed", TableKind::Event);
        for ty in LogicalType::ALL {
            assert!(order.iter().any(|(_, t)| *t == ty), "a {ty:?} property");
        }
        for (table, cols) in [
            (
                "tracks",
                columns("tracks", TableKind::Base(EventKind::Track)),
            ),
            ("pages", columns("pages", TableKind::Base(EventKind::Page))),
            ("order_completed", order.clone()),
        ] {
            let physical = table_types(&tx, table).await.unwrap();
            assert!(
                copy::binary_types(&cols, &physical).is_some(),
                "{table}: {physical:?}"
            );
            assert_eq!(
                physical[schema::LOADED_AT],
                copy::PgType::Timestamptz.name()
            );
        }
        tx.batch_execute("ALTER TABLE order_completed ALTER COLUMN revenue TYPE numeric")
            .await
            .unwrap();
        let physical = table_types(&tx, "order_completed").await.unwrap();
        assert_eq!(copy::binary_types(&order, &physical), None);
    }

    #[test]
    fn csv_quotes_values_and_leaves_null_empty() {
        let mut out = Vec::new();
        csv_line(&[Some("a\"b,c".into()), None], Some(""), &mut out);
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
