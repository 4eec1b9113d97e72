//! The ClickHouse sink: HTTP requests, `JSONEachRow` inserts, `ReplacingMergeTree`
//! tables behind `FINAL` views (see the module docs for what exactly once means here).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use collector_core::timestamp::{format_ms, parse_canonical_ms, parse_ms};
use collector_core::EventKind;
use serde_json::Value;
use tokio::sync::Mutex;

use super::config::ClickHouseConfig;
use super::rowbinary::{Field, Layout, MAX_INSTANT_MS};
use super::version_now;
use crate::sinks::schema::{self, DeadLetter, LogicalType, Prepared, QuarantinedEvent};
use crate::sinks::tables::{self, Catalog, Cell, NewColumn, TableKind, TableLoad};
use crate::sinks::{Dialect, LoadStats, QueryResult, Sink, SinkError, SqlSession};

/// ClickHouse error codes that mean "this data can never be inserted as is".
const DATA_ERRORS: &[u32] = &[6, 26, 27, 32, 38, 41, 53, 69, 70, 72, 117, 130, 131];

/// The columns of `collector_quarantine`, as inserted.
const QUARANTINE_COLUMNS: [&str; 10] = [
    "message_id",
    "type",
    "shard",
    "batch_id",
    "reason",
    "event",
    "quarantined_at",
    "attempts",
    "resolved",
    "_version",
];

/// Rows per granule of `message_ids`' primary index. Each load looks up its ids there,
/// and ClickHouse reads a whole granule for each id it may hold: with the default 8192
/// a lookup of 5,000 random ids reads the whole registry once it holds a few million
/// (10M ids on 18.16: 9.8M rows read, ~340 ms); with 256, at most ~1.3M rows however
/// large it grows (~80–130 ms at 10M), for a primary index of ~40k marks per 10M ids
/// in memory (BENCHMARKS.md).
const REGISTRY_GRANULARITY: u32 = 256;

/// How many bytes of ids one lookup sends at most (ClickHouse parses at most
/// `max_query_size`, 256 KiB by default, of a query).
const LOOKUP_BYTES: usize = 128 * 1024;

/// What separates the ids of a lookup in its one string (see [`id_set_sql`]).
const ID_SEPARATOR: char = '\u{1}';

/// The SQL of a set of ids, for `IN (…)`: one string split by ClickHouse, which it
/// parses about four times faster than a list of literals (2,000 ids: ~1.8 ms against
/// ~6.5 ms on 18.16), or that list when an id holds the separator.
fn id_set_sql(ids: &[&str]) -> String {
    if ids.iter().any(|i| i.contains(ID_SEPARATOR)) {
        let list: Vec<String> = ids.iter().map(|i| lit(i)).collect();
        return list.join(", ");
    }
    format!(
        "SELECT arrayJoin(splitByChar('\\x01', {}))",
        lit(&ids.join(&ID_SEPARATOR.to_string()))
    )
}

/// `ids` in runs of at most [`LOOKUP_BYTES`] as SQL (at least one id each), counted
/// as the longer form [`id_set_sql`] may write: each id escaped, quoted and followed
/// by `, `.
fn lookup_chunks<'a>(ids: &'a [&'a str]) -> impl Iterator<Item = &'a [&'a str]> + 'a {
    let mut rest = ids;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let n = rest
            .iter()
            .position(|id| {
                bytes += id.len() + id.matches(['\\', '\'']).count() + 4;
                bytes > LOOKUP_BYTES
            })
            .unwrap_or(rest.len())
            .max(1);
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

/// Up to this many quarantined events, a load reads the whole quarantine to see which
/// of its ids were there (see `quarantined_among`).
const QUARANTINE_READ_WHOLE: usize = 2_000;

/// The physical table behind a view.
fn rows_table(table: &str) -> String {
    format!("collector_rows_{table}")
}

fn ident(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

/// The rows tables' own columns, which their views leave out. A property's column
/// never has these names (Segment's snake_case starts no name with `_`; only a name
/// that would be empty, `_`, or start with a digit, `_123abc`, gets one).
const INTERNAL_COLUMNS: [&str; 3] = ["_version", "_received", "_mid"];

fn internal_column(name: &str) -> bool {
    INTERNAL_COLUMNS.contains(&name)
}

/// Whether the view of `table` is missing or lacks a column its rows table has, by
/// `physical` (columns per relation, from `system.columns`); a rows table not there
/// (not made yet) has no view to check.
fn stale_view(physical: &HashMap<String, HashMap<String, String>>, table: &str) -> bool {
    let Some(rows) = physical.get(&rows_table(table)) else {
        return false;
    };
    let view = physical.get(table);
    rows.keys()
        .filter(|c| !internal_column(c))
        .any(|c| !view.is_some_and(|v| v.contains_key(c)))
}

/// A ClickHouse string literal ([`crate::sinks::lit`]).
fn lit(s: &str) -> String {
    crate::sinks::lit(crate::sinks::Dialect::ClickHouse, s)
}

pub struct ClickHouseSink {
    cfg: ClickHouseConfig,
    http: reqwest::Client,
    /// `DateTime64(3)` exists (ClickHouse 20.1+); else instants are whole seconds.
    ms_precision: bool,
    /// The database is `Atomic` (the default from 20.10 on), so a view is swapped in
    /// with `EXCHANGE TABLES`, in one step; else (18.16's `Ordinary`) with a `RENAME`
    /// of two names.
    exchange: bool,
    /// Loads run one at a time per agent (the catalog is grown under this lock).
    catalog: Mutex<Catalog>,
}

/// Settings sent with every request, at the values the agent's SQL and its reading of
/// answers assume, whatever the server's profile says: a profile with
/// `join_use_nulls = 1` (NULL instead of a type's default for a row a `LEFT JOIN`
/// does not match) and unquoted 64-bit integers in JSON failed eight identity and
/// audience tests; `result_overflow_mode = 'break'` under a `max_result_rows` would cut
/// what the agent reads without an error; `uniq` for `count(DISTINCT …)` would make
/// its counts approximate. Each exists in ClickHouse 18.16 and in current releases
/// (an unknown setting fails the request). The tests' server has a profile with
/// every one of them set otherwise.
const PINNED_SETTINGS: &[(&str, &str)] = &[
    ("join_use_nulls", "0"),
    ("join_default_strictness", "ALL"),
    ("output_format_json_quote_64bit_integers", "1"),
    ("output_format_json_quote_denormals", "0"),
    ("input_format_skip_unknown_fields", "0"),
    ("max_result_rows", "0"),
    ("max_result_bytes", "0"),
    ("result_overflow_mode", "throw"),
    ("extremes", "0"),
    ("count_distinct_implementation", "uniqExact"),
    ("empty_result_for_aggregation_by_empty_set", "0"),
];

impl ClickHouseSink {
    /// Connects, creates the database and tables if needed, and reads the catalog.
    pub async fn connect(cfg: &ClickHouseConfig) -> Result<ClickHouseSink, SinkError> {
        // Each request has its own timeout (`Via`): a load's, or a query's.
        let mut http =
            reqwest::Client::builder().connect_timeout(Duration::from_millis(cfg.timeout_ms));
        for cert in cfg
            .ca_certificates()
            .map_err(|e| SinkError::Permanent(e.to_string()))?
        {
            http = http.add_root_certificate(cert);
        }
        if let Some(id) = cfg
            .identity()
            .map_err(|e| SinkError::Permanent(e.to_string()))?
        {
            http = http.identity(id);
        }
        let http = http
            .build()
            .map_err(|e| SinkError::Transient(e.to_string()))?;
        let mut sink = ClickHouseSink {
            cfg: cfg.clone(),
            http,
            ms_precision: false,
            exchange: false,
            catalog: Mutex::new(Catalog::default()),
        };
        let version = sink.request(None, "SELECT version()", None).await?;
        let major: u32 = version
            .trim()
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        sink.ms_precision = major >= 20;
        tracing::info!(version = version.trim(), "connected to ClickHouse");
        // The database is made only when it is missing: from 20.4 on, `CREATE DATABASE
        // IF NOT EXISTS` asks for the CREATE DATABASE grant before it looks whether the
        // database is there, and a least-privilege user (its own database, made for
        // it by an administrator) does not have it. `system.databases` lists what the
        // user may see, which includes a database it holds any grant on.
        let engine_sql = format!(
            "SELECT engine FROM system.databases WHERE name = {}",
            lit(&cfg.database)
        );
        let mut engine = sink.request(None, &engine_sql, None).await?;
        if engine.trim().is_empty() {
            sink.request(
                None,
                &format!("CREATE DATABASE IF NOT EXISTS {}", ident(&cfg.database)),
                None,
            )
            .await?;
            engine = sink.request(None, &engine_sql, None).await?;
        }
        sink.exchange = engine.trim() == "Atomic";
        sink.migrate().await?;
        sink.drop_stray_views().await?;
        let mut catalog = sink.load_catalog().await?;
        if sink.repair(&catalog).await? {
            catalog = sink.load_catalog().await?;
        }
        *sink.catalog.lock().await = catalog;
        super::raise_version_floor(sink.max_version().await?);
        Ok(sink)
    }

    /// The largest `_version` of the tables whose rows the agent rewrites with
    /// [`super::version_now`] (one scan of one column each).
    async fn max_version(&self) -> Result<u64, SinkError> {
        let sql = VERSIONED_TABLES
            .iter()
            .map(|t| format!("SELECT max(_version) AS v FROM {t}"))
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let out = self
            .request(
                Some(&self.cfg.database),
                &format!("SELECT max(v) FROM ({sql})"),
                None,
            )
            .await?;
        out.trim()
            .parse()
            .map_err(|e| SinkError::Transient(format!("max(_version): {out:?}: {e}")))
    }

    /// One HTTP request: `sql` as the query, `data` as the rows of an `INSERT`.
    async fn request(
        &self,
        database: Option<&str>,
        sql: &str,
        data: Option<Vec<u8>>,
    ) -> Result<String, SinkError> {
        self.request_in(Via::Load, database, sql, data).await
    }

    /// [`Self::request`] as part of a load or of a query (in an HTTP session, whose
    /// temporary tables outlive one request, or not), each with its own timeout.
    async fn request_in(
        &self,
        via: Via<'_>,
        database: Option<&str>,
        sql: &str,
        data: Option<Vec<u8>>,
    ) -> Result<String, SinkError> {
        let (session, timeout_ms) = match via {
            Via::Load => (None, self.cfg.timeout_ms),
            Via::Query(session) => (session, self.cfg.query_timeout_ms),
        };
        let mut params: Vec<(&str, String)> = vec![("user", self.cfg.user.clone())];
        if matches!(via, Via::Query(_)) && timeout_ms > 0 {
            // The server stops a query the agent no longer waits for.
            params.push(("max_execution_time", timeout_ms.div_ceil(1000).to_string()));
        }
        params.extend(PINNED_SETTINGS.iter().map(|(k, v)| (*k, v.to_string())));
        if let Some(p) = self.cfg.password() {
            params.push(("password", p));
        }
        if let Some(db) = database {
            params.push(("database", db.to_string()));
        }
        if let Some(id) = session {
            params.push(("session_id", id.to_string()));
        }
        let mut req = self.http.post(&self.cfg.url);
        if timeout_ms > 0 {
            req = req.timeout(Duration::from_millis(timeout_ms));
        }
        let req = match data {
            Some(body) => {
                params.push(("query", sql.to_string()));
                req.query(&params).body(body)
            }
            None => req.query(&params).body(sql.to_string()),
        };
        let resp = req.send().await.map_err(|e| {
            let why = crate::causes(&e);
            // rustls names the alert, not the setting that decides it.
            let hint = if why.contains("fatal alert: CertificateRequired") {
                " (the server asks for a client certificate: warehouse.cert_file and key_file)"
            } else if why.contains("fatal alert: UnknownCA")
                || why.contains("fatal alert: BadCertificate")
            {
                " (the server refused the client certificate: warehouse.cert_file)"
            } else if why.contains("invalid peer certificate") {
                " (the server's certificate, checked against the public CAs and warehouse.ca_file)"
            } else {
                ""
            };
            SinkError::Transient(format!("ClickHouse request: {why}{hint}"))
        })?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| SinkError::Transient(format!("ClickHouse response: {e}")))?;
        if status.is_success() {
            return Ok(text);
        }
        Err(classify(&text))
    }

    /// A request in the configured database.
    async fn exec(&self, sql: &str) -> Result<String, SinkError> {
        self.request(Some(&self.cfg.database.clone()), sql, None)
            .await
    }

    async fn insert(
        &self,
        table: &str,
        columns: &[String],
        rows: Vec<Value>,
    ) -> Result<(), SinkError> {
        let mut body = String::new();
        for r in rows {
            body.push_str(&r.to_string());
            body.push('\n');
        }
        self.insert_body(table, columns, body).await
    }

    /// Sends a `JSONEachRow` body (one object per line) into `table`.
    async fn insert_body(
        &self,
        table: &str,
        columns: &[String],
        body: String,
    ) -> Result<(), SinkError> {
        self.insert_format(table, columns, "JSONEachRow", body.into_bytes())
            .await
    }

    /// Sends a body in `format` into `table`'s `columns`.
    async fn insert_format(
        &self,
        table: &str,
        columns: &[String],
        format: &str,
        body: Vec<u8>,
    ) -> Result<(), SinkError> {
        if body.is_empty() {
            return Ok(());
        }
        let cols: Vec<String> = columns.iter().map(|c| ident(c)).collect();
        self.request(
            Some(&self.cfg.database.clone()),
            &format!(
                "INSERT INTO {} ({}) FORMAT {format}",
                ident(table),
                cols.join(", ")
            ),
            Some(body),
        )
        .await
        .map(|_| ())
    }

    /// Rows of a query as JSON arrays (`JSONCompact`), with the column names and types.
    async fn select(
        &self,
        sql: &str,
    ) -> Result<(Vec<(String, String)>, Vec<Vec<Value>>), SinkError> {
        self.select_in(Via::Load, sql).await
    }

    async fn select_in(
        &self,
        via: Via<'_>,
        sql: &str,
    ) -> Result<(Vec<(String, String)>, Vec<Vec<Value>>), SinkError> {
        let sql = sql.trim().trim_end_matches(';');
        // ClickHouse 18.16 fails a read of its catalog (`system.tables` with a table's
        // definition, `system.columns`) with "doesn't exist" (code 60) when a table it
        // listed is dropped before it is read: another agent's temporary view, swapped
        // in and dropped (seen failing agents started together). Read it again.
        let catalog = sql.contains("system.");
        let mut attempt = 0;
        let text = loop {
            match self
                .request_in(
                    via,
                    Some(&self.cfg.database.clone()),
                    &format!("{sql} FORMAT JSONCompact"),
                    None,
                )
                .await
            {
                Err(e) if catalog && attempt < 8 && has_code(&e, &[60]) => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(10 << attempt.min(5)))
                        .await;
                }
                other => break other?,
            }
        };
        if text.trim().is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| SinkError::Transient(format!("ClickHouse answer is not JSON: {e}")))?;
        let meta = v["meta"]
            .as_array()
            .map(|m| {
                m.iter()
                    .map(|c| {
                        (
                            c["name"].as_str().unwrap_or("").to_string(),
                            c["type"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let rows = v["data"]
            .as_array()
            .map(|d| {
                d.iter()
                    .map(|r| r.as_array().cloned().unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default();
        Ok((meta, rows))
    }

    /// ClickHouse's type for a logical type (always `Nullable`, but for keys).
    fn sql_type(&self, ty: LogicalType) -> &'static str {
        match ty {
            LogicalType::Text | LogicalType::Json => "String",
            LogicalType::Timestamp if self.ms_precision => "DateTime64(3, 'UTC')",
            LogicalType::Timestamp => "DateTime('UTC')",
            LogicalType::Double => "Float64",
            LogicalType::Boolean => "UInt8",
        }
    }

    fn nullable(&self, ty: LogicalType) -> String {
        format!("Nullable({})", self.sql_type(ty))
    }

    /// `CREATE TABLE` of a rows table and its `FINAL` view (or, for `users`, its
    /// latest-trait view).
    fn create_table_sql(&self, table: &str, kind: TableKind) -> Vec<String> {
        let mut cols = Vec::new();
        for c in tables::fixed_columns(kind) {
            let key = c == schema::MESSAGE_ID || (kind == TableKind::Users && c.name == "id");
            let ty = if key {
                self.sql_type(c.ty).to_string()
            } else {
                self.nullable(c.ty)
            };
            cols.push(format!("{} {ty}", ident(c.name)));
        }
        cols.push(format!(
            "{} {}",
            ident(schema::LOADED_AT),
            self.sql_type(LogicalType::Timestamp)
        ));
        cols.push("`_version` UInt64".into());
        let engine = match kind {
            TableKind::Users => {
                // The identify a row came from: ties of `_version` (one instant)
                // go to the later message id, as in every sink.
                cols.push("`_mid` String".into());
                "ENGINE = MergeTree() ORDER BY (`id`, `_version`)".to_string()
            }
            _ => {
                cols.push("`_received` Date".into());
                "ENGINE = ReplacingMergeTree(`_version`) PARTITION BY toYYYYMM(`_received`) ORDER BY `message_id`".to_string()
            }
        };
        vec![format!(
            "CREATE TABLE IF NOT EXISTS {} ({}) {engine}",
            ident(&rows_table(table)),
            cols.join(", ")
        )]
    }

    /// (Re)creates the view over a rows table with the columns the rows table has now
    /// (from `system.columns`, so agents growing it at once converge on all of them).
    async fn refresh_view(&self, table: &str, kind: TableKind) -> Result<(), SinkError> {
        let all = self.existing_columns(table).await?;
        let names: Vec<&str> = all
            .iter()
            .map(String::as_str)
            .filter(|n| !internal_column(n))
            .collect();
        let select = match kind {
            TableKind::Users => {
                let cols: Vec<String> = names
                    .iter()
                    .map(|n| match *n {
                        "id" => "`id`".to_string(),
                        "timestamp" | "received_at" | "loaded_at" => {
                            format!("max({0}) AS {0}", ident(n))
                        }
                        _ => format!("argMax({0}, (`_version`, `_mid`)) AS {0}", ident(n)),
                    })
                    .collect();
                format!(
                    "SELECT {} FROM {} GROUP BY `id`",
                    cols.join(", "),
                    ident(&rows_table(table))
                )
            }
            _ => {
                let cols: Vec<String> = names.iter().map(|n| ident(n)).collect();
                format!(
                    "SELECT {} FROM {} FINAL",
                    cols.join(", "),
                    ident(&rows_table(table))
                )
            }
        };
        self.replace_view(table, &select).await
    }

    /// Mends what agents of earlier releases could leave, at connect:
    /// - the views of the catalog's tables that are missing or lack a column of their
    ///   rows table (ClickHouse has no transactional DDL: an agent killed between a
    ///   view's `DROP` and `CREATE`, or between growing a rows table and its catalog
    ///   and remaking the view, left it so);
    /// - a catalog type that is not the column's (two agents adding one column at once
    ///   each recorded their own type, and the last one written stayed): the type the
    ///   column has is recorded again. Whether the catalog changed.
    async fn repair(&self, catalog: &Catalog) -> Result<bool, SinkError> {
        let mut names: Vec<(String, TableKind)> = EventKind::ALL
            .iter()
            .map(|k| (k.table().to_string(), TableKind::Base(*k)))
            .collect();
        names.push(("users".into(), TableKind::Users));
        names.extend(
            catalog
                .event_tables()
                .map(|t| (t.to_string(), TableKind::Event)),
        );
        let physical = self
            .column_types(names.iter().flat_map(|(t, _)| [t.clone(), rows_table(t)]))
            .await?;
        for (table, kind) in &names {
            if stale_view(&physical, table) {
                tracing::warn!(table, "view missing or behind its rows table: made again");
                self.refresh_view(table, *kind).await?;
            }
        }
        let mut retyped = false;
        for (table, _) in &names {
            let Some(cols) = physical.get(&rows_table(table)) else {
                continue;
            };
            for (name, ty) in catalog.columns(table) {
                let Some(actual) = cols
                    .get(name)
                    .filter(|p| **p != self.nullable(*ty))
                    .and_then(|p| self.logical_type(p))
                else {
                    continue;
                };
                tracing::warn!(
                    table,
                    column = name.as_str(),
                    recorded = ty.name(),
                    actual = actual.name(),
                    "the catalog had another type than the column's: recorded again"
                );
                self.exec(&format!(
                    "INSERT INTO collector_columns SELECT table_name, column_name, {}, position, now() FROM collector_columns FINAL WHERE table_name = {} AND column_name = {}",
                    lit(actual.name()),
                    lit(table),
                    lit(name)
                ))
                .await?;
                retyped = true;
            }
        }
        Ok(retyped)
    }

    /// Replaces a view without a moment in which it is missing (ClickHouse 18.16 has
    /// no `CREATE OR REPLACE VIEW`; dropping and creating it made an analyst's query
    /// fail now and then while the schema grew): the new view is made under a name of
    /// its own, then swapped in, and the old one dropped. In an `Atomic` database the
    /// swap is `EXCHANGE TABLES`, one step; in an `Ordinary` one (18.16's) a `RENAME`
    /// of both names, which 18.16 applies at once (newer servers apply such a
    /// `RENAME` one name after the other, but their databases are `Atomic`).
    /// Another agent swapping the same view uses names of its own; the last swap wins
    /// (a view it leaves behind its rows table is made again at the next load). The
    /// temporary views a crash leaves (`collector_next_…`, `collector_prev_…`) are
    /// dropped when an agent connects.
    async fn replace_view(&self, name: &str, select: &str) -> Result<(), SinkError> {
        let mut last = None;
        for _ in 0..5 {
            let tag = format!("{:016x}", new_load_id());
            let next = format!("collector_next_{tag}");
            let prev = format!("collector_prev_{tag}");
            self.exec(&format!("CREATE VIEW {} AS {select}", ident(&next)))
                .await?;
            let (swap, old) = if self.exchange {
                (
                    format!("EXCHANGE TABLES {} AND {}", ident(name), ident(&next)),
                    &next,
                )
            } else {
                (
                    format!(
                        "RENAME TABLE {} TO {}, {} TO {}",
                        ident(name),
                        ident(&prev),
                        ident(&next),
                        ident(name)
                    ),
                    &prev,
                )
            };
            let swapped = self.exec(&swap).await;
            let outcome = match swapped {
                Ok(_) => self.drop_if_exists(old).await,
                // No view of that name yet (code 60): the new one takes the name.
                Err(e) if has_code(&e, &[60]) => self
                    .exec(&format!("RENAME TABLE {} TO {}", ident(&next), ident(name)))
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(_) => return Ok(()),
                // Another agent made or swapped it meanwhile (code 57, 60): again.
                Err(e) if has_code(&e, &[57, 60]) => {
                    let _ = self
                        .exec(&format!("DROP TABLE IF EXISTS {}", ident(&next)))
                        .await;
                    last = Some(e);
                }
                Err(e) => {
                    let _ = self
                        .exec(&format!("DROP TABLE IF EXISTS {}", ident(&next)))
                        .await;
                    return Err(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| SinkError::Transient(format!("view {name}"))))
    }

    /// `DROP TABLE IF EXISTS`, done when the table is gone: ClickHouse 18.16 answers
    /// "doesn't exist" (code 60) even so when another agent drops it at the same time
    /// (an agent starting drops the views a crash left, while another agent swapping
    /// a view drops its own; seen failing an agent's start in `clickhouse_e2e.rs`).
    async fn drop_if_exists(&self, name: &str) -> Result<(), SinkError> {
        match self
            .exec(&format!("DROP TABLE IF EXISTS {}", ident(name)))
            .await
        {
            Err(e) if has_code(&e, &[60]) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Drops the temporary views of [`Self::replace_view`] that a crash left.
    async fn drop_stray_views(&self) -> Result<(), SinkError> {
        for n in self.all_relation_names().await? {
            if n.starts_with("collector_next_") || n.starts_with("collector_prev_") {
                self.drop_if_exists(&n).await?;
            }
        }
        Ok(())
    }

    async fn migrate(&self) -> Result<(), SinkError> {
        self.exec("CREATE TABLE IF NOT EXISTS collector_migrations (version UInt32, name String, applied_at DateTime('UTC')) ENGINE = ReplacingMergeTree() ORDER BY version").await?;
        let (_, applied) = self
            .select("SELECT version FROM collector_migrations FINAL")
            .await?;
        let has = |v: u64| {
            applied
                .iter()
                .any(|r| r.first().and_then(Value::as_u64) == Some(v))
        };
        if !has(3) {
            self.migrate_v3().await?;
        }
        if !has(4) {
            // `tracks.event` is the slug, `event_text` the name as sent (Segment's
            // schema). Tables made by version 3 of this release have it already; rows
            // loaded before keep their name in `event` and NULL in `event_text`
            // (ClickHouse 18.16 cannot update from a join).
            self.add_column_migration(
                4,
                "tracks.event is the slug, event_text the name as sent",
                ("tracks", TableKind::Base(EventKind::Track)),
                "event_text Nullable(String) AFTER event",
            )
            .await?;
        }
        if !has(5) {
            self.migrate_people().await?;
        }
        if !has(6) {
            self.migrate_privacy().await?;
        }
        if !has(7) {
            self.migrate_operator_views().await?;
        }
        if !has(8) {
            // `users` rows carry the identify they came from, so two of one instant
            // resolve as in every sink (the later message id). Rows from before have
            // '' and lose such ties.
            self.add_column_migration(
                8,
                "users rows carry their identify (_mid): ties of one instant go to the later message id",
                ("users", TableKind::Users),
                "`_mid` String",
            )
            .await?;
        }
        if !has(9) {
            // Before their names were reserved, a track event named like one of these
            // views (`Profiles`, `Audience Membership`, `Privacy Requests`) had its
            // per-event view replace it. Its rows stay in `collector_rows_<name>`; new
            // ones go to `event_<name>`.
            // Only the views a per-event view replaced (it reads `collector_rows_…`): a
            // view replaced needlessly would be missing, for a moment, to another
            // agent starting at once.
            let (_, defs) = self
                .select("SELECT name, create_table_query FROM system.tables WHERE database = currentDatabase()")
                .await?;
            let def = |name: &str| {
                defs.iter()
                    .find(|r| r.first().and_then(Value::as_str) == Some(name))
                    .and_then(|r| r.get(1).and_then(Value::as_str))
                    .map(str::to_string)
            };
            for (view, select) in PEOPLE_VIEWS.iter().chain(&PRIVACY_VIEWS) {
                if def(view).is_none_or(|d| d.contains("collector_rows_")) {
                    self.replace_view(view, select).await?;
                }
            }
            self.exec("INSERT INTO collector_migrations VALUES (9, 'the views of identity, audiences and privacy again (a per-event view named like one replaced it)', now())")
                .await?;
            tracing::info!(version = 9, "warehouse migrated");
        }
        if !has(10) {
            self.migrate_instants_to_utc().await?;
        }
        self.check_registry_granularity().await
    }

    /// Migration 10: the agent's instants in UTC. Older releases made them `DateTime`,
    /// which ClickHouse shows and parses in the server's time zone: on a server
    /// outside UTC, what the agent read back (its `sql` command, `users`' merge,
    /// identity, audiences) was off by the zone's offset. Every column of the agent's
    /// tables that is `DateTime` becomes `DateTime('UTC')` (the same stored seconds: the
    /// instants do not change, only the zone they read in). ClickHouse refuses that
    /// for a column of a table's key (`collector_audience_membership.entered_at`): it
    /// stays, and the agent says so when the server is not in UTC.
    async fn migrate_instants_to_utc(&self) -> Result<(), SinkError> {
        let (_, rows) = self
            .select(&format!(
                "SELECT table, name, type FROM system.columns WHERE database = {}
                 AND type IN ('DateTime', 'Nullable(DateTime)')
                 AND (startsWith(table, 'collector_') OR table = 'message_ids')",
                lit(&self.cfg.database)
            ))
            .await?;
        let mut kept = Vec::new();
        for r in &rows {
            let text = |i: usize| r.get(i).and_then(Value::as_str).unwrap_or_default();
            let (table, column, ty) = (text(0), text(1), text(2));
            let utc = ty.replace("DateTime", "DateTime('UTC')");
            match self
                .exec(&format!(
                    "ALTER TABLE {} MODIFY COLUMN {} {utc}",
                    ident(table),
                    ident(column)
                ))
                .await
            {
                Ok(_) => {}
                Err(e) if e.to_string().contains("key column") => {
                    kept.push(format!("{table}.{column}"));
                }
                Err(e) => return Err(e),
            }
        }
        if !kept.is_empty() {
            let (_, zone) = self.select("SELECT timezone()").await?;
            let zone = zone
                .first()
                .and_then(|r| r.first())
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if !matches!(zone.as_str(), "UTC" | "Etc/UTC" | "GMT" | "Etc/GMT") {
                tracing::warn!(
                    columns = kept.join(", "),
                    zone,
                    "ClickHouse: these columns of a table's key stay in the server's time zone (ClickHouse cannot change a key column's type); they read in that zone"
                );
            }
        }
        self.exec("INSERT INTO collector_migrations VALUES (10, 'the agent''s instants are DateTime(''UTC''): they read the same whatever the server''s time zone', now())")
            .await?;
        tracing::info!(version = 10, columns = rows.len(), "warehouse migrated");
        Ok(())
    }

    /// A migration that adds `column` (its definition) to the rows table of `table`
    /// (tables made by a later `migrate_v3` have it: then nothing to add), remakes its
    /// view and records `version`.
    async fn add_column_migration(
        &self,
        version: u32,
        name: &str,
        (table, kind): (&str, TableKind),
        column: &str,
    ) -> Result<(), SinkError> {
        match self
            .exec(&format!(
                "ALTER TABLE {} ADD COLUMN {column}",
                ident(&rows_table(table))
            ))
            .await
        {
            Err(e) if duplicate_column(&e) => {}
            other => {
                other?;
            }
        }
        self.refresh_view(table, kind).await?;
        self.exec(&format!(
            "INSERT INTO collector_migrations VALUES ({version}, {}, now())",
            lit(name)
        ))
        .await?;
        tracing::info!(version, "warehouse migrated");
        Ok(())
    }

    /// Says when `message_ids` was created before it had [`REGISTRY_GRANULARITY`]: its
    /// lookups then read the whole registry once it is large. ClickHouse 18.16 cannot
    /// change the setting of a table, and rebuilding it while other agents write could
    /// lose their ids, so the rebuild is the operator's (README, ClickHouse sink).
    async fn check_registry_granularity(&self) -> Result<(), SinkError> {
        let (_, rows) = self
            .select(&format!(
                "SELECT engine_full FROM system.tables WHERE database = {} AND name = 'message_ids'",
                lit(&self.cfg.database)
            ))
            .await?;
        let engine = rows
            .first()
            .and_then(|r| r.first())
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !engine.contains(&format!("index_granularity = {REGISTRY_GRANULARITY}")) {
            tracing::warn!(
                engine,
                "message_ids was created with a coarser index granularity than {REGISTRY_GRANULARITY}: each load's lookup reads ~8192 rows per id, the whole registry once it holds a few million ids; rebuild it with the agents stopped (README, ClickHouse sink)"
            );
        }
        Ok(())
    }

    /// `quarantine` and `dead_letters` as the other sinks have them (version 7):
    /// `dead_letters.blob` holds the batch's bytes (`blob_hex` stays, for readers of the
    /// JSON formats, which cannot carry bytes), and both filter their resolved rows
    /// outside the `FINAL` subquery, so the filter can never be applied before versions
    /// collapse (see [`Self::migrate_people`]).
    async fn migrate_operator_views(&self) -> Result<(), SinkError> {
        for (view, select) in OPERATOR_VIEWS {
            self.replace_view(view, select).await?;
        }
        self.exec("INSERT INTO collector_migrations VALUES (7, 'dead_letters.blob; quarantine and dead_letters filter after FINAL', now())")
            .await?;
        tracing::info!(version = 7, "warehouse migrated");
        Ok(())
    }

    /// Privacy requests (version 6): the ledger DuckDB and PostgreSQL keep, as
    /// versioned rows behind `FINAL` views of the same names.
    async fn migrate_privacy(&self) -> Result<(), SinkError> {
        for sql in [
            "CREATE TABLE IF NOT EXISTS collector_privacy_requests (id String, kind String, subject String, resolved Nullable(String), requested_by String, received_at DateTime('UTC'), status String, runs Int64, completed_at Nullable(DateTime('UTC')), detail Nullable(String), `_version` UInt64) ENGINE = ReplacingMergeTree(`_version`) ORDER BY id",
            "CREATE TABLE IF NOT EXISTS collector_privacy_request_stores (request_id String, store String, status String, before_count Nullable(Int64), after_count Nullable(Int64), detail Nullable(String), updated_at DateTime('UTC'), `_version` UInt64) ENGINE = ReplacingMergeTree(`_version`) ORDER BY (request_id, store)",
            "CREATE TABLE IF NOT EXISTS collector_policy_versions (version String, first_seen DateTime('UTC'), policy String) ENGINE = ReplacingMergeTree() ORDER BY version",
        ] {
            self.exec(sql)
                .await
                .map_err(|e| SinkError::Transient(format!("ClickHouse schema: {e}")))?;
        }
        for (view, select) in PRIVACY_VIEWS {
            self.replace_view(view, select).await?;
        }
        self.exec("INSERT INTO collector_migrations VALUES (6, 'privacy_requests, privacy_request_stores, policy_versions', now())")
            .await?;
        tracing::info!(version = 6, "warehouse migrated");
        Ok(())
    }

    /// Identity, profiles and audiences (version 5): the tables DuckDB and PostgreSQL
    /// have, as versioned `ReplacingMergeTree` rows behind `FINAL` views of the same
    /// names. A rewrite of a row is a new version; a row that goes away (a profile
    /// merged into another) is a version with `deleted = 1`, which the view hides.
    async fn migrate_people(&self) -> Result<(), SinkError> {
        let ddl = [
            "CREATE TABLE IF NOT EXISTS collector_identity_edges (a_type String, a_value String, b_type String, b_value String, message_id String, ts DateTime('UTC'), status String, reason Nullable(String), `_version` UInt64) ENGINE = ReplacingMergeTree(`_version`) ORDER BY (a_type, a_value, b_type, b_value)",
            "CREATE TABLE IF NOT EXISTS collector_identities (id_type String, id_value String, person_id String, first_seen DateTime('UTC'), `_version` UInt64) ENGINE = ReplacingMergeTree(`_version`) ORDER BY (id_type, id_value)",
            "CREATE TABLE IF NOT EXISTS collector_identity_merges (message_id String, a_type String, a_value String, b_type String, b_value String, kind String, from_person Nullable(String), into_person Nullable(String), reason Nullable(String), merged_at DateTime('UTC')) ENGINE = ReplacingMergeTree() ORDER BY (message_id, a_type, a_value, b_type, b_value, kind)",
            "CREATE TABLE IF NOT EXISTS collector_profiles (person_id String, user_ids String, anonymous_ids String, emails String, first_seen Nullable(DateTime('UTC')), last_seen Nullable(DateTime('UTC')), event_count UInt64, traits String, consent String, updated_at DateTime('UTC'), deleted UInt8, `_version` UInt64) ENGINE = ReplacingMergeTree(`_version`) ORDER BY person_id",
            "CREATE TABLE IF NOT EXISTS collector_identity_dirty (id_type String, id_value String, reason Nullable(String), resolved UInt8, `_version` UInt64) ENGINE = ReplacingMergeTree(`_version`) ORDER BY (id_type, id_value)",
            "CREATE TABLE IF NOT EXISTS collector_identity_read (load_id UInt64, read_at DateTime('UTC')) ENGINE = ReplacingMergeTree() ORDER BY load_id",
            "CREATE TABLE IF NOT EXISTS collector_audience_membership (audience String, person_id String, entered_at DateTime('UTC'), exited_at Nullable(DateTime('UTC')), `_version` UInt64) ENGINE = ReplacingMergeTree(`_version`) ORDER BY (audience, person_id, entered_at)",
        ];
        for sql in ddl {
            self.exec(sql)
                .await
                .map_err(|e| SinkError::Transient(format!("ClickHouse schema: {e}")))?;
        }
        // A filter goes outside the `FINAL` subquery: ClickHouse may move a `WHERE`
        // next to `FINAL` before rows are collapsed, which would bring back an old
        // version whose newer one the filter drops.
        for (view, select) in PEOPLE_VIEWS {
            self.replace_view(view, select).await?;
        }
        self.exec("INSERT INTO collector_migrations VALUES (5, 'identity graph, identities, identity_merges, profiles, identity_dirty, identity_pending, audience_membership', now())")
            .await?;
        tracing::info!(version = 5, "warehouse migrated");
        Ok(())
    }

    /// The schema of version 3 in every sink, in one step.
    async fn migrate_v3(&self) -> Result<(), SinkError> {
        let mut ddl = Vec::new();
        for kind in EventKind::ALL {
            ddl.extend(self.create_table_sql(kind.table(), TableKind::Base(kind)));
        }
        ddl.extend(self.create_table_sql("users", TableKind::Users));
        ddl.push(format!("CREATE TABLE IF NOT EXISTS message_ids (message_id String, table_name String, load_id UInt64) ENGINE = ReplacingMergeTree() ORDER BY message_id SETTINGS index_granularity = {REGISTRY_GRANULARITY}"));
        ddl.push("CREATE TABLE IF NOT EXISTS collector_loaded_batches (shard UInt32, batch_id Int64, rows UInt64, loaded_at DateTime('UTC')) ENGINE = ReplacingMergeTree() ORDER BY (shard, batch_id)".into());
        ddl.push("CREATE TABLE IF NOT EXISTS collector_quarantine (message_id String, type String, shard Nullable(UInt32), batch_id Nullable(Int64), reason String, event String, quarantined_at DateTime('UTC'), attempts UInt32, resolved UInt8, `_version` UInt64) ENGINE = ReplacingMergeTree(`_version`) ORDER BY message_id".into());
        ddl.push("CREATE TABLE IF NOT EXISTS collector_dead_letters (shard UInt32, batch_id Int64, error String, blob_hex String, loaded_at DateTime('UTC'), resolved UInt8, `_version` UInt64) ENGINE = ReplacingMergeTree(`_version`) ORDER BY (shard, batch_id)".into());
        ddl.push("CREATE TABLE IF NOT EXISTS collector_tables (table_name String, event_text String, created_at DateTime('UTC')) ENGINE = ReplacingMergeTree() ORDER BY table_name".into());
        ddl.push("CREATE TABLE IF NOT EXISTS collector_columns (table_name String, column_name String, type String, position UInt32, added_at DateTime('UTC')) ENGINE = ReplacingMergeTree() ORDER BY (table_name, column_name)".into());
        ddl.push("CREATE TABLE IF NOT EXISTS collector_rows_rejected_values (message_id String, table_name String, column_name String, value String, reason String, rejected_at DateTime('UTC')) ENGINE = ReplacingMergeTree() ORDER BY (message_id, table_name, column_name)".into());
        for sql in ddl {
            self.exec(&sql)
                .await
                .map_err(|e| SinkError::Transient(format!("ClickHouse schema: {e}")))?;
        }
        for (view, select) in [
            ("rejected_values", "SELECT message_id, table_name, column_name, value, reason, rejected_at FROM collector_rows_rejected_values FINAL"),
        ] {
            self.replace_view(view, select).await?;
        }
        for kind in EventKind::ALL {
            self.refresh_view(kind.table(), TableKind::Base(kind))
                .await?;
        }
        self.refresh_view("users", TableKind::Users).await?;
        self.exec(
            "INSERT INTO collector_migrations VALUES (3, 'segment tables, registry, ledger, per-event tables, users, rejected_values (the schema of version 3 in every sink)', now())",
        )
        .await?;
        tracing::info!(version = 3, "warehouse migrated");
        Ok(())
    }

    async fn load_catalog(&self) -> Result<Catalog, SinkError> {
        let (_, tables) = self
            .select("SELECT table_name FROM collector_tables FINAL")
            .await?;
        let (_, cols) = self
            .select("SELECT table_name, column_name, type, position FROM collector_columns FINAL")
            .await?;
        let s = |v: &Value| v.as_str().unwrap_or("").to_string();
        Ok(Catalog::from_rows(
            tables.iter().map(|r| s(&r[0])).collect(),
            cols.iter()
                .map(|r| (s(&r[0]), s(&r[1]), s(&r[2]), r[3].as_i64().unwrap_or(0)))
                .collect(),
        )
        .with_relations(self.relation_names().await?))
    }

    /// The names of the database's tables and views (the agent's and an analyst's).
    /// A per-event view takes none an analyst made: making it drops what has its name.
    async fn relation_names(&self) -> Result<Vec<String>, SinkError> {
        let names = self.all_relation_names().await?;
        // A view over one of the agent's rows tables is the agent's, even before
        // `collector_tables` lists it (a crash between the two leaves that).
        let ours = |n: &str| names.iter().any(|m| *m == rows_table(n));
        Ok(names.iter().filter(|n| !ours(n)).cloned().collect())
    }

    /// The names of every table and view of the database.
    async fn all_relation_names(&self) -> Result<Vec<String>, SinkError> {
        let (_, rows) = self
            .select(&format!(
                "SELECT name FROM system.tables WHERE database = {}",
                lit(&self.cfg.database)
            ))
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| r[0].as_str().map(str::to_string))
            .collect())
    }

    /// The answer of a `SELECT count() …`.
    async fn count(&self, sql: &str) -> Result<u64, SinkError> {
        let (_, rows) = self.select(sql).await?;
        Ok(rows
            .first()
            .and_then(|r| r[0].as_u64().or_else(|| r[0].as_str()?.parse().ok()))
            .unwrap_or(0))
    }

    /// Whether the catalog lists `column` of `table`.
    async fn column_recorded(&self, table: &str, column: &str) -> Result<bool, SinkError> {
        let sql = format!(
            "SELECT count() FROM collector_columns WHERE table_name = {} AND column_name = {}",
            lit(table),
            lit(column)
        );
        Ok(self.count(&sql).await? > 0)
    }

    /// The logical type of a column the sink made, from its ClickHouse type (`String`
    /// is text; JSON is stored as `String` too). `None` for a type the sink does not
    /// make (an operator's).
    fn logical_type(&self, physical: &str) -> Option<LogicalType> {
        [
            LogicalType::Text,
            LogicalType::Double,
            LogicalType::Boolean,
            LogicalType::Timestamp,
        ]
        .into_iter()
        .find(|ty| self.nullable(*ty) == physical)
    }

    /// The columns a rows table has now, in table order, from `system.columns`.
    async fn existing_columns(&self, table: &str) -> Result<Vec<String>, SinkError> {
        let (_, rows) = self
            .select(&format!(
                "SELECT name FROM system.columns WHERE database = {} AND table = {}",
                lit(&self.cfg.database),
                lit(&rows_table(table))
            ))
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| r[0].as_str().map(str::to_string))
            .collect())
    }

    /// Adds `columns` to `table`'s rows table, in `ALTER`s of at most 64 KiB of text
    /// (well under ClickHouse's `max_query_size`, 256 KiB by default, which a query
    /// must fit); the names of those this call added. A
    /// column another agent added meanwhile fails the whole `ALTER` (ClickHouse checks
    /// every command of one before it applies any: code 44 on 18.16, 15 later): then
    /// they are added one by one, and that column is not among the names.
    async fn add_columns(
        &self,
        table: &str,
        columns: &[&NewColumn],
    ) -> Result<HashSet<String>, SinkError> {
        const MAX_ALTER_BYTES: usize = 64 * 1024;
        let target = ident(&rows_table(table));
        let add = |c: &NewColumn| format!("ADD COLUMN {} {}", ident(&c.name), self.nullable(c.ty));
        let mut added = HashSet::new();
        let mut chunks: Vec<Vec<&NewColumn>> = Vec::new();
        let mut bytes = 0;
        for c in columns {
            let len = add(c).len() + 2;
            if chunks.is_empty() || bytes + len > MAX_ALTER_BYTES {
                chunks.push(Vec::new());
                bytes = 0;
            }
            bytes += len;
            chunks.last_mut().expect("pushed").push(c);
        }
        for chunk in chunks {
            let adds: Vec<String> = chunk.iter().map(|c| add(c)).collect();
            match self
                .exec(&format!("ALTER TABLE {target} {}", adds.join(", ")))
                .await
            {
                Ok(_) => added.extend(chunk.iter().map(|c| c.name.clone())),
                Err(e) if duplicate_column(&e) => {
                    for c in chunk {
                        match self.exec(&format!("ALTER TABLE {target} {}", add(c))).await {
                            Err(e) if duplicate_column(&e) => {}
                            other => {
                                other?;
                                added.insert(c.name.clone());
                            }
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(added)
    }

    /// Which of `batch_ids` (of shard `p.shard`) the ledger has: none for a replay,
    /// whose events are checked one by one.
    async fn loaded_batches(
        &self,
        p: &Prepared,
        batch_ids: &[i64],
    ) -> Result<HashSet<i64>, SinkError> {
        if p.replay || batch_ids.is_empty() {
            return Ok(HashSet::new());
        }
        let list: Vec<String> = batch_ids.iter().map(i64::to_string).collect();
        let (_, rows) = self
            .select(&format!(
                "SELECT batch_id FROM collector_loaded_batches FINAL WHERE shard = {} AND batch_id IN ({})",
                p.shard,
                list.join(", ")
            ))
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| r[0].as_i64().or_else(|| r[0].as_str()?.parse().ok()))
            .collect())
    }

    /// The ids among `ids` that a query (with `{ids}` for the list) returns.
    async fn ids_in(&self, sql: &str, ids: &[&str]) -> Result<HashSet<String>, SinkError> {
        Ok(self.rows_for(sql, ids).await?.into_keys().collect())
    }

    /// Which of `ids` are in the quarantine now. The quarantine is usually small (or
    /// empty): then it is read whole and matched here, one short query instead of one
    /// carrying every id of the load.
    async fn quarantined_among(&self, ids: &[&str]) -> Result<HashSet<String>, SinkError> {
        self.quarantined_among_reading_whole(ids, QUARANTINE_READ_WHOLE)
            .await
    }

    async fn quarantined_among_reading_whole(
        &self,
        ids: &[&str],
        read_whole: usize,
    ) -> Result<HashSet<String>, SinkError> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let (_, rows) = self
            .select(&format!(
                "SELECT message_id FROM quarantine LIMIT {}",
                read_whole + 1
            ))
            .await?;
        if rows.len() > read_whole {
            return self
                .ids_in(
                    // Filtered on the key inside `FINAL` (all versions of an id share
                    // it), so only those ids' granules are read; `resolved` after.
                    "SELECT message_id FROM (SELECT message_id, resolved FROM collector_quarantine FINAL WHERE message_id IN ({ids})) WHERE resolved = 0",
                    ids,
                )
                .await;
        }
        let all: HashSet<&str> = rows
            .iter()
            .filter_map(|r| r.first().and_then(Value::as_str))
            .collect();
        Ok(ids
            .iter()
            .filter(|id| all.contains(**id))
            .map(|id| id.to_string())
            .collect())
    }

    /// The rows a query (with `{ids}` for the list) returns for `ids`, by their first
    /// column, the second column beside it.
    async fn rows_for(&self, sql: &str, ids: &[&str]) -> Result<HashMap<String, Value>, SinkError> {
        let mut found = HashMap::new();
        for chunk in lookup_chunks(ids) {
            let (_, rows) = self
                .select(&sql.replace("{ids}", &id_set_sql(chunk)))
                .await?;
            for r in rows {
                if let Some(id) = r.first().and_then(Value::as_str) {
                    found.insert(id.to_string(), r.get(1).cloned().unwrap_or(Value::Null));
                }
            }
        }
        Ok(found)
    }

    /// A value as `JSONEachRow` wants it for a column of type `ty`.
    fn json_value(&self, v: &Cell<'_>, ty: LogicalType) -> Value {
        let Some(v) = v.as_deref() else {
            return Value::Null;
        };
        match ty {
            LogicalType::Double => v
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map_or(Value::Null, Value::Number),
            LogicalType::Boolean => Value::from(u8::from(v == "true")),
            LogicalType::Timestamp => self.instant(v),
            LogicalType::Text | LogicalType::Json => Value::String(v.to_string()),
        }
    }

    /// An RFC 3339 instant as ClickHouse parses it; NULL outside what `DateTime` holds
    /// (1970 to 2105; the value stays in `raw`).
    fn instant(&self, v: &str) -> Value {
        let Some(ms) = parse_ms(v) else {
            return Value::Null;
        };
        if !(0..MAX_INSTANT_MS).contains(&ms) {
            return Value::Null;
        }
        let iso = format_ms(ms);
        let text = if self.ms_precision {
            format!("{} {}", &iso[..10], &iso[11..23])
        } else {
            format!("{} {}", &iso[..10], &iso[11..19])
        };
        Value::String(text)
    }

    async fn write_prepared(
        &self,
        catalog: &mut Catalog,
        p: &Prepared,
    ) -> Result<LoadStats, SinkError> {
        let now_ms = now_ms();
        // `loaded_at` of the rows tables; the agent's own tables use whole seconds.
        let now = self.instant(&format_ms(now_ms));
        let now_s = self.instant_seconds(now_ms);
        let mut stats = LoadStats {
            duplicates: p.in_load_duplicates,
            ..LoadStats::default()
        };

        // Batches the ledger has are skipped whole; the rest is checked id by id.
        let batch_ids: Vec<i64> = p
            .rows
            .iter()
            .filter_map(|r| r.batch_id)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        // The tables the load writes, as far as its rows tell before it is planned.
        let views: HashSet<String> = p
            .rows
            .iter()
            .flat_map(|r| {
                let users = (r.kind == EventKind::Identify).then_some("users");
                [Some(r.kind.table()), r.event_table.as_deref(), users]
            })
            .flatten()
            .map(str::to_string)
            .collect();
        let tables: HashSet<String> = views.iter().map(|v| rows_table(v)).collect();
        // The lookups and the column types are asked for at once, and the load is
        // planned while the server answers (its rows are usually all new; when some
        // are not, the new ones are planned again).
        let ids: Vec<&str> = p
            .rows
            .iter()
            .map(|r| r.message_id())
            .chain(p.quarantine.iter().map(|q| q.message_id.as_str()))
            .collect();
        let (loaded_batches, known, physical, planned) = tokio::join!(
            self.loaded_batches(p, &batch_ids),
            self.ids_in(
                "SELECT message_id FROM message_ids FINAL WHERE message_id IN ({ids})",
                &ids,
            ),
            // With the views' (a view a crash left missing or behind is made again).
            self.column_types(tables.iter().cloned().chain(views.iter().cloned())),
            async { catalog.plan(p) },
        );
        let (loaded_batches, known, mut physical) = (loaded_batches?, known?, physical?);
        let is_new = |r: &schema::PreparedRow| {
            !r.batch_id.is_some_and(|b| loaded_batches.contains(&b))
                && !known.contains(r.message_id())
        };
        // The rows to plan and write: the load's own when all are new (the usual case),
        // else the new ones, planned again.
        let fresh = p.new_rows(is_new);
        let planned = matches!(fresh, std::borrow::Cow::Borrowed(_)).then_some(planned);
        stats.duplicates += (p.rows.len() - fresh.rows.len()) as u64;

        // Dead letters, and dead letters resolved by this load.
        let mut dead = Vec::new();
        for d in &p.dead {
            dead.push(serde_json::json!({
                "shard": d.shard, "batch_id": d.batch_id, "error": d.error,
                "blob_hex": hex::encode(&d.blob), "loaded_at": now_s, "resolved": 0, "_version": 0
            }));
        }
        if !p.dead.is_empty() {
            let keys: Vec<String> = p
                .dead
                .iter()
                .map(|d| format!("({}, {})", d.shard, d.batch_id))
                .collect();
            let existing = self
                .count(&format!(
                    "SELECT count() FROM collector_dead_letters FINAL WHERE (shard, batch_id) IN ({})",
                    keys.join(", ")
                ))
                .await?;
            stats.dead_letters += (p.dead.len() as u64).saturating_sub(existing);
        }
        for (shard, batch_id) in &p.resolved_dead {
            dead.push(serde_json::json!({
                "shard": shard, "batch_id": batch_id, "error": "", "blob_hex": "",
                "loaded_at": now_s, "resolved": 1, "_version": version_now()
            }));
        }

        // Quarantine: an id already loaded is a duplicate; one already quarantined is a
        // duplicate too, unless this is a replay of it.
        let q_ids: Vec<&str> = p.quarantine.iter().map(|q| q.message_id.as_str()).collect();
        // One lookup: which are quarantined now, and their attempts so far.
        let quarantined_now = self
            .rows_for(
                "SELECT message_id, attempts FROM (SELECT message_id, attempts, resolved FROM collector_quarantine FINAL WHERE message_id IN ({ids})) WHERE resolved = 0",
                &q_ids,
            )
            .await?;
        let attempts = |id: &str| {
            quarantined_now
                .get(id)
                .and_then(|a| a.as_u64().or_else(|| a.as_str()?.parse().ok()))
                .unwrap_or(0)
        };
        let mut quarantine = Vec::new();
        for q in &p.quarantine {
            if known.contains(&q.message_id)
                || (!p.replay && quarantined_now.contains_key(&q.message_id))
            {
                stats.duplicates += 1;
                continue;
            }
            stats.quarantined += 1;
            quarantine.push(serde_json::json!({
                "message_id": q.message_id, "type": q.kind.as_str(), "shard": q.shard,
                "batch_id": q.batch_id, "reason": q.reason, "event": q.event,
                "quarantined_at": now_s, "attempts": attempts(&q.message_id) + 1,
                "resolved": 0, "_version": version_now()
            }));
        }

        // Schema growth, then the rows.
        let mut plan = planned.unwrap_or_else(|| catalog.plan(&fresh));
        if !plan.new_tables.is_empty() {
            // An analyst may have made a table or view since the catalog was read: a
            // per-event view must not replace it.
            catalog.set_relations(self.relation_names().await?);
            plan = catalog.plan(&fresh);
        }
        if plan.changes_schema() {
            for (table, event_text) in &plan.new_tables {
                for sql in self.create_table_sql(table, TableKind::Event) {
                    self.exec(&sql).await?;
                }
                self.insert(
                    "collector_tables",
                    &["table_name".into(), "event_text".into(), "created_at".into()],
                    vec![serde_json::json!({"table_name": table, "event_text": event_text, "created_at": now_s})],
                )
                .await?;
            }
            // Per table: one read of its columns, the missing ones added by one
            // `ALTER` (a few when their text is long), and their catalog rows in one
            // insert. It was three requests per column: a first event with 1,000
            // properties took 3,000.
            let mut touched: Vec<String> = Vec::new();
            for c in &plan.new_columns {
                if !touched.contains(&c.table) {
                    touched.push(c.table.clone());
                }
            }
            for table in &touched {
                let columns: Vec<&NewColumn> = plan
                    .new_columns
                    .iter()
                    .filter(|c| &c.table == table)
                    .collect();
                let have = self.existing_columns(table).await?;
                let missing: Vec<&NewColumn> = columns
                    .iter()
                    .copied()
                    .filter(|c| !have.contains(&c.name))
                    .collect();
                let added = self.add_columns(table, &missing).await?;
                let mut records = Vec::new();
                for c in &columns {
                    // Another agent added the column, with the type of its own events:
                    // that type is the column's, and this load's values are cast to it
                    // or rejected, as against any column. (The catalog keeps one row
                    // per column, the last written: writing this load's type over it
                    // made every agent's later loads reject what the column holds.)
                    // Recorded here only if that agent has not (it died after its
                    // `ALTER`), with the type the column has.
                    let ty = if added.contains(&c.name) {
                        Some(c.ty)
                    } else if self.column_recorded(&c.table, &c.name).await? {
                        None
                    } else {
                        let physical = self
                            .column_types(std::iter::once(rows_table(&c.table)))
                            .await?;
                        Some(
                            physical
                                .get(&rows_table(&c.table))
                                .and_then(|cols| cols.get(&c.name))
                                .and_then(|t| self.logical_type(t))
                                .unwrap_or(c.ty),
                        )
                    };
                    if let Some(ty) = ty {
                        records.push(serde_json::json!({"table_name": c.table, "column_name": c.name, "type": ty.name(), "position": c.position, "added_at": now_s}));
                    }
                }
                if !records.is_empty() {
                    self.insert(
                        "collector_columns",
                        &[
                            "table_name".into(),
                            "column_name".into(),
                            "type".into(),
                            "position".into(),
                            "added_at".into(),
                        ],
                        records,
                    )
                    .await?;
                }
            }
            for (table, _) in &plan.new_tables {
                if !touched.contains(table) {
                    touched.push(table.clone());
                }
            }
            // The catalog as committed (another agent may have grown it too).
            let committed = self.load_catalog().await?;
            for table in &touched {
                let kind = plan
                    .loads
                    .iter()
                    .find(|l| &l.table == table)
                    .map(|l| l.kind)
                    .unwrap_or(TableKind::Event);
                self.refresh_view(table, kind).await?;
            }
            plan = committed.plan(&fresh);
        }

        let load_id = new_load_id();
        // Types of tables created or grown now, or not foreseen.
        if plan.changes_schema()
            || plan
                .loads
                .iter()
                .any(|l| !tables.contains(&rows_table(&l.table)))
        {
            physical = self
                .column_types(
                    plan.loads
                        .iter()
                        .flat_map(|l| [rows_table(&l.table), l.table.clone()]),
                )
                .await?;
        }
        for load in &plan.loads {
            if stale_view(&physical, &load.table) {
                tracing::warn!(
                    table = load.table.as_str(),
                    "view missing or behind its rows table: made again"
                );
                self.refresh_view(&load.table, load.kind).await?;
            }
        }
        // The rows tables' inserts run at once: ClickHouse parses and stores each in a
        // thread of its own. In `RowBinary` while the table has the sink's own types;
        // otherwise as `JSONEachRow`, which the server converts by name and type.
        let mut rows_inserts = Vec::with_capacity(plan.loads.len());
        for load in &plan.loads {
            let cols = insert_columns(load);
            let table = rows_table(&load.table);
            let (format, body) = match self.rows_binary(load, now_ms, physical.get(&table)) {
                Some(body) => ("RowBinary", body),
                None => ("JSONEachRow", self.rows_body(load, &now).into_bytes()),
            };
            rows_inserts.push(async move { self.insert_format(&table, &cols, format, body).await });
            if let TableKind::Base(kind) = load.kind {
                stats.inserted_into(kind, load.rows.len() as u64);
            }
        }
        let mut rejected: Vec<Value> = plan
            .rejected
            .iter()
            .map(|r| serde_json::json!({
                "message_id": r.message_id, "table_name": r.table_name, "column_name": r.column_name,
                "value": r.value, "reason": r.reason, "rejected_at": now_s
            }))
            .collect();
        rejected.extend(instants_out_of_range(&plan.loads, &now_s));
        let rejected_columns = [
            "message_id",
            "table_name",
            "column_name",
            "value",
            "reason",
            "rejected_at",
        ]
        .map(String::from);
        // Beside them (neither depends on the rows): the rejected values, and which of
        // the loaded ids were quarantined once.
        let loaded_ids: Vec<&str> = fresh.rows.iter().map(|r| r.message_id()).collect();
        let (rows_written, rejected_written, were_quarantined) = tokio::join!(
            all_of(rows_inserts),
            self.insert(
                "collector_rows_rejected_values",
                &rejected_columns,
                rejected
            ),
            self.quarantined_among(&loaded_ids),
        );
        rows_written?;
        rejected_written?;
        let were_quarantined = were_quarantined?;
        // Only now the ids are registered, then the ledger: a crash before either
        // makes the retry write the same rows, which `FINAL` collapses. The registry,
        // the quarantine and the dead letters do not depend on each other.
        let registry: Vec<Value> = fresh
            .rows
            .iter()
            .map(|r| serde_json::json!({"message_id": r.message_id(), "table_name": r.kind.table(), "load_id": load_id}))
            .collect();
        // Events once quarantined that loaded now leave the quarantine (their newer
        // `_version` wins over any entry written beside it).
        let resolved: Vec<Value> = were_quarantined
            .iter()
            .map(|id| serde_json::json!({
                "message_id": id, "type": "", "shard": null, "batch_id": null, "reason": "",
                "event": "", "quarantined_at": now_s, "attempts": 0, "resolved": 1, "_version": version_now()
            }))
            .collect();
        let registry_columns = ["message_id", "table_name", "load_id"].map(String::from);
        let quarantine_columns = QUARANTINE_COLUMNS.map(String::from);
        let dead_columns = [
            "shard",
            "batch_id",
            "error",
            "blob_hex",
            "loaded_at",
            "resolved",
            "_version",
        ]
        .map(String::from);
        let (registered, quarantined, resolved, dead) = tokio::join!(
            self.insert("message_ids", &registry_columns, registry),
            self.insert("collector_quarantine", &quarantine_columns, quarantine),
            self.insert("collector_quarantine", &quarantine_columns, resolved),
            self.insert("collector_dead_letters", &dead_columns, dead),
        );
        registered?;
        quarantined?;
        resolved?;
        dead?;
        if !p.replay {
            let ledger: Vec<Value> = batch_ids
                .iter()
                .filter(|b| !loaded_batches.contains(b))
                .map(|b| {
                    let n = fresh.rows.iter().filter(|r| r.batch_id == Some(*b)).count();
                    serde_json::json!({"shard": p.shard, "batch_id": b, "rows": n, "loaded_at": self.instant_seconds(now_ms)})
                })
                .collect();
            self.insert(
                "collector_loaded_batches",
                &["shard", "batch_id", "rows", "loaded_at"].map(String::from),
                ledger,
            )
            .await?;
        }
        *catalog = plan.catalog;
        Ok(stats)
    }

    fn instant_seconds(&self, ms: i64) -> Value {
        let iso = format_ms(ms);
        Value::String(format!("{} {}", &iso[..10], &iso[11..19]))
    }

    /// A table load in `RowBinary`, or `None` when the table's types in the database
    /// (`physical`, name → type) are not the sink's own or a row does not fit.
    fn rows_binary(
        &self,
        load: &TableLoad,
        now_ms: i64,
        physical: Option<&HashMap<String, String>>,
    ) -> Option<Vec<u8>> {
        let meta = RowMeta::of(load);
        let fields: Vec<(Field, &str)> = load
            .columns
            .iter()
            .map(|(name, ty)| {
                let key = name == schema::MESSAGE_ID.name || (meta.users && name == "id");
                (
                    if key { Field::Key } else { Field::Value(*ty) },
                    name.as_str(),
                )
            })
            .collect();
        let layout = Layout::new(
            &fields,
            !meta.users,
            meta.users,
            self.ms_precision,
            physical?,
            |ty, nullable| {
                if nullable {
                    self.nullable(ty)
                } else {
                    self.sql_type(ty).to_string()
                }
            },
        )?;
        let mut out = Vec::with_capacity(load.rows.len() * 256);
        for (i, row) in load.rows.iter().enumerate() {
            let (version, received_ms) = meta.of_row(row);
            let day = received_ms.map(|ms| ms / 86_400_000);
            let mid = meta
                .users
                .then(|| load.message_ids.get(i).copied().unwrap_or(""));
            if !layout.row(row, now_ms, version, day, mid, &mut out) {
                return None;
            }
        }
        Some(out)
    }

    /// The column types (name → type) of `tables`, from `system.columns`.
    async fn column_types(
        &self,
        tables: impl Iterator<Item = String>,
    ) -> Result<HashMap<String, HashMap<String, String>>, SinkError> {
        let list: Vec<String> = tables.map(|t| lit(&t)).collect();
        if list.is_empty() {
            return Ok(HashMap::new());
        }
        let (_, rows) = self
            .select(&format!(
                "SELECT table, name, type FROM system.columns WHERE database = {} AND table IN ({})",
                lit(&self.cfg.database),
                list.join(", ")
            ))
            .await?;
        let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
        for r in rows {
            if let (Some(t), Some(n), Some(ty)) = (
                r.first().and_then(Value::as_str),
                r.get(1).and_then(Value::as_str),
                r.get(2).and_then(Value::as_str),
            ) {
                out.entry(t.to_string())
                    .or_default()
                    .insert(n.to_string(), ty.to_string());
            }
        }
        Ok(out)
    }

    /// A table's rows as `JSONEachRow` objects, with `loaded_at`, the `_version` that
    /// makes the first-received copy win (the latest identify for `users`) and the
    /// partition day.
    /// A table load as a `JSONEachRow` body, written straight from the cells.
    fn rows_body(&self, load: &TableLoad, now: &Value) -> String {
        use std::io::Write as _;
        let meta = RowMeta::of(load);
        // Each column's key, quoted once.
        let keys: Vec<String> = load
            .columns
            .iter()
            .map(|(n, _)| Value::String(n.clone()).to_string())
            .collect();
        let mut body: Vec<u8> = Vec::with_capacity(load.rows.len() * 512);
        // Writing into a Vec cannot fail.
        for (i, row) in load.rows.iter().enumerate() {
            body.push(b'{');
            for ((key, (_, ty)), v) in keys.iter().zip(&load.columns).zip(row) {
                body.extend_from_slice(key.as_bytes());
                body.push(b':');
                match (ty, v.as_deref()) {
                    (LogicalType::Text | LogicalType::Json, Some(text)) => {
                        let _ = serde_json::to_writer(&mut body, text);
                    }
                    _ => {
                        let _ = serde_json::to_writer(&mut body, &self.json_value(v, *ty));
                    }
                }
                body.push(b',');
            }
            let (version, received_ms) = meta.of_row(row);
            let _ = write!(
                body,
                "\"{}\":{now},\"_version\":{version}",
                schema::LOADED_AT
            );
            if let Some(ms) = received_ms {
                let day = format_ms(ms);
                let _ = write!(body, ",\"_received\":\"{}\"", &day[..10]);
            }
            if meta.users {
                body.extend_from_slice(b",\"_mid\":");
                let mid = load.message_ids.get(i).copied().unwrap_or("");
                let _ = serde_json::to_writer(&mut body, mid);
            }
            body.extend_from_slice(b"}\n");
        }
        // Only JSON text was written.
        String::from_utf8(body).unwrap_or_default()
    }
}

/// Where a table load's rows keep what `_version` and `_received` are made of.
struct RowMeta {
    received: Option<usize>,
    timestamp: Option<usize>,
    users: bool,
}

impl RowMeta {
    fn of(load: &TableLoad) -> RowMeta {
        let at = |name: &str| load.columns.iter().position(|(n, _)| n == name);
        RowMeta {
            received: at("received_at"),
            timestamp: at("timestamp"),
            users: load.kind == TableKind::Users,
        }
    }

    /// A row's `_version` (the first-received copy wins; for `users`, the latest
    /// identify) and, but for `users`, its receipt time (Unix ms) for `_received`.
    fn of_row(&self, row: &[Cell<'_>]) -> (u64, Option<i64>) {
        let ms_of = |i: Option<usize>| {
            i.and_then(|i| row.get(i)?.as_deref())
                .and_then(|v| parse_canonical_ms(v).or_else(|| parse_ms(v)))
                .unwrap_or(0)
                .max(0)
        };
        if self.users {
            (ms_of(self.timestamp) as u64, None)
        } else {
            let received = ms_of(self.received);
            (u64::MAX - received as u64, Some(received))
        }
    }
}

/// Awaits every one of `inserts` at once; the first error, once all have finished
/// (none is left running behind the load).
async fn all_of(
    inserts: Vec<impl std::future::Future<Output = Result<(), SinkError>>>,
) -> Result<(), SinkError> {
    futures_util::future::join_all(inserts)
        .await
        .into_iter()
        .collect()
}

/// ClickHouse's answer to adding a column that exists (code 44 on 18.16, 15 later):
/// another agent, or an earlier attempt, added it.
fn duplicate_column(e: &SinkError) -> bool {
    has_code(e, &[15, 44]) || e.to_string().contains("already exists")
}

/// A load's id in `message_ids`: random, 63 bits. It was the load's millisecond, which
/// two agents loading in the same millisecond, or one whose clock stepped back, could
/// give two loads; an identity run that had read the first marked the id read
/// (`collector_identity_read`), and the second load's people were never resolved.
fn new_load_id() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        // No entropy (never seen on Linux): the time and a counter, unique in this
        // process.
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        return ((now_ms() as u64) << 20) | (NEXT.fetch_add(1, Ordering::Relaxed) & 0xF_FFFF);
    }
    u64::from_le_bytes(b) >> 1
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The tables whose rows the agent rewrites with a newer [`super::version_now`].
const VERSIONED_TABLES: [&str; 9] = [
    "collector_quarantine",
    "collector_dead_letters",
    "collector_identity_edges",
    "collector_identities",
    "collector_profiles",
    "collector_identity_dirty",
    "collector_audience_membership",
    "collector_privacy_requests",
    "collector_privacy_request_stores",
];

/// The exception code of a ClickHouse error answer: `Code: 60, e.displayText() = …`
/// on 18.16, `Code: 60. DB::Exception: …` on later servers (a comma, then a full
/// stop): match the number, never the punctuation after it.
fn error_code(text: &str) -> Option<u32> {
    let (_, rest) = text.split_once("Code: ")?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Whether `e` is ClickHouse's answer with one of `codes`.
fn has_code(e: &SinkError, codes: &[u32]) -> bool {
    error_code(&e.to_string()).is_some_and(|c| codes.contains(&c))
}

/// Classifies a ClickHouse error answer (`Code: 27, e.displayText() = …`).
fn classify(text: &str) -> SinkError {
    let code = text
        .trim()
        .starts_with("Code: ")
        .then(|| error_code(text))
        .flatten();
    let msg: String = text.trim().chars().take(600).collect();
    match code {
        Some(c) if DATA_ERRORS.contains(&c) => SinkError::Permanent(msg),
        _ => SinkError::Transient(msg),
    }
}

/// A JSON value of a `JSONCompact` answer as text; instants as RFC 3339 with ms, as
/// every sink renders them.
fn render(v: &Value, ty: &str) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) if ty.contains("DateTime") => {
            // ClickHouse 18.16 prints the epoch (the `DateTime` 0) as zeros.
            let s = if s.starts_with("0000-00-00") {
                "1970-01-01 00:00:00"
            } else {
                s
            };
            let iso = format!("{}T{}Z", s.get(..10)?, s.get(11..)?);
            Some(
                parse_ms(&iso)
                    .map(format_ms)
                    .unwrap_or_else(|| s.to_string()),
            )
        }
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

#[async_trait]
impl Sink for ClickHouseSink {
    fn kind(&self) -> &'static str {
        "clickhouse"
    }

    async fn write(&self, load: Arc<Prepared>) -> Result<LoadStats, SinkError> {
        let mut catalog = self.catalog.lock().await;
        self.write_prepared(&mut catalog, &load).await
    }

    async fn quarantined(&self, ids: &[String]) -> Result<Vec<QuarantinedEvent>, SinkError> {
        let filter = if ids.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = ids.iter().map(|i| lit(i)).collect();
            format!(" WHERE message_id IN ({})", list.join(", "))
        };
        let (_, rows) = self
            .select(&format!(
                "SELECT message_id, type, shard, batch_id, event FROM quarantine{filter} ORDER BY quarantined_at, message_id"
            ))
            .await?;
        let num = |v: &Value| v.as_i64().or_else(|| v.as_str()?.parse().ok());
        Ok(rows
            .iter()
            .map(|r| QuarantinedEvent {
                message_id: r[0].as_str().unwrap_or("").to_string(),
                kind: r[1].as_str().unwrap_or("").to_string(),
                shard: num(&r[2]).map(|s| s as u32),
                batch_id: num(&r[3]),
                event: r[4].as_str().unwrap_or("").to_string(),
            })
            .collect())
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, SinkError> {
        let (_, rows) = self
            .select("SELECT shard, batch_id, blob_hex, error FROM dead_letters ORDER BY loaded_at, shard, batch_id")
            .await?;
        let num = |v: &Value| v.as_i64().or_else(|| v.as_str()?.parse().ok()).unwrap_or(0);
        Ok(rows
            .iter()
            .map(|r| DeadLetter {
                shard: num(&r[0]) as u32,
                batch_id: num(&r[1]),
                blob: hex::decode(r[2].as_str().unwrap_or("")).unwrap_or_default(),
                error: r[3].as_str().unwrap_or("").to_string(),
            })
            .collect())
    }

    async fn query(&self, sql: &str) -> Result<QueryResult, SinkError> {
        self.query_in(None, sql).await
    }

    async fn session(&self) -> Result<Option<Box<dyn SqlSession + '_>>, SinkError> {
        Ok(Some(Box::new(ChSession {
            sink: self,
            id: session_id(),
        })))
    }
}

/// What a request is part of, which decides its timeout: a load (`timeout_ms`), or a
/// query over the warehouse (`query_timeout_ms`: identity, audiences, privacy, `sql`),
/// in an HTTP session or not.
#[derive(Debug, Clone, Copy)]
enum Via<'a> {
    Load,
    Query(Option<&'a str>),
}

impl ClickHouseSink {
    /// Rows of a query rendered as text (instants RFC 3339 UTC), in a session or not. A
    /// statement that answers no rows (`INSERT … SELECT`, `OPTIMIZE`, DDL) is sent as it
    /// is: ClickHouse refuses a `FORMAT` after it.
    async fn query_in(&self, session: Option<&str>, sql: &str) -> Result<QueryResult, SinkError> {
        if !answers_rows(sql) {
            let db = self.cfg.database.clone();
            self.request_in(
                Via::Query(session),
                Some(&db),
                sql.trim().trim_end_matches(';'),
                None,
            )
            .await
            .map_err(|e| match e {
                SinkError::Transient(m) if m.starts_with("Code: ") => SinkError::Permanent(m),
                other => other,
            })?;
            return Ok(QueryResult {
                columns: Vec::new(),
                rows: Vec::new(),
            });
        }
        let (meta, rows) = self
            .select_in(Via::Query(session), sql)
            .await
            .map_err(|e| match e {
                SinkError::Transient(m) if m.starts_with("Code: ") => SinkError::Permanent(m),
                other => other,
            })?;
        Ok(QueryResult {
            columns: meta.iter().map(|(n, _)| n.clone()).collect(),
            rows: rows
                .iter()
                .map(|r| {
                    r.iter()
                        .zip(&meta)
                        .map(|(v, (_, ty))| render(v, ty))
                        .collect()
                })
                .collect(),
        })
    }
}

/// A ClickHouse HTTP session: its temporary tables live as long as it is used (the
/// server drops them after `session_timeout`, 60 s by default, of silence). ClickHouse
/// has no transactions: `BEGIN`/`COMMIT` are not sent, and the jobs that use a session
/// write only new versions of rows, so an interrupted job leaves nothing half-done that
/// the next run does not redo.
struct ChSession<'a> {
    sink: &'a ClickHouseSink,
    id: String,
}

/// An id no other session of this or another agent has.
fn session_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "collector-{}-{}-{}",
        std::process::id(),
        now_ms(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// True unless `sql` is a statement ClickHouse answers with no rows (and refuses a
/// `FORMAT` after): `INSERT`, DDL, `OPTIMIZE`, `SET`, `SYSTEM`, `KILL`, `USE`.
fn answers_rows(sql: &str) -> bool {
    let mut rest = sql.trim_start();
    // Leading comments.
    loop {
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.split_once('\n').map_or("", |(_, r)| r).trim_start();
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.split_once("*/").map_or("", |(_, r)| r).trim_start();
        } else {
            break;
        }
    }
    let word: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase();
    !matches!(
        word.as_str(),
        "INSERT"
            | "CREATE"
            | "ALTER"
            | "DROP"
            | "RENAME"
            | "TRUNCATE"
            | "OPTIMIZE"
            | "ATTACH"
            | "DETACH"
            | "SET"
            | "SYSTEM"
            | "KILL"
            | "USE"
    )
}

/// A row of `rejected_values` for each instant of a fixed column (`timestamp`,
/// `original_timestamp`, `sent_at`, …) that `DateTime` cannot hold and is therefore
/// stored NULL: the other warehouses keep instants before 1970 and after 2105, so
/// here the value is kept in `raw` and said to be missing, not dropped silently.
/// (Per-event columns refuse such instants in every sink, in the plan.) `users` is
/// derived from `identifies`, whose row already says it.
fn instants_out_of_range(loads: &[TableLoad<'_>], now_s: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for load in loads.iter().filter(|l| l.kind != TableKind::Users) {
        for (i, (name, ty)) in load.columns.iter().enumerate() {
            if *ty != LogicalType::Timestamp {
                continue;
            }
            for row in &load.rows {
                let Some(v) = row.get(i).and_then(|c| c.as_deref()) else {
                    continue;
                };
                // Cells hold canonical instants: a year 1970 to 2104 is in range
                // without parsing the rest (this runs for every instant of a load).
                let in_range_year = v
                    .get(..4)
                    .and_then(|y| y.parse::<u16>().ok())
                    .is_some_and(|y| (1970..2105).contains(&y))
                    && v.as_bytes().get(4) == Some(&b'-');
                if !in_range_year
                    && parse_ms(v).is_some_and(|ms| !(0..MAX_INSTANT_MS).contains(&ms))
                {
                    out.push(serde_json::json!({
                        "message_id": row[0].as_deref().unwrap_or_default(),
                        "table_name": load.table, "column_name": name,
                        "value": Value::String(v.to_string()).to_string(),
                        "reason": "ClickHouse's DateTime holds instants from 1970 to 2105; stored NULL, the value stays in `raw`",
                        "rejected_at": now_s
                    }));
                }
            }
        }
    }
    out
}

/// The columns a rows table's insert writes: the load's, `loaded_at`, `_version`, and
/// `_mid` (`users`) or `_received` (the others).
fn insert_columns(load: &TableLoad<'_>) -> Vec<String> {
    let mut cols: Vec<String> = load.columns.iter().map(|(n, _)| n.clone()).collect();
    cols.push(schema::LOADED_AT.into());
    cols.push("_version".into());
    cols.push(
        if load.kind == TableKind::Users {
            "_mid"
        } else {
            "_received"
        }
        .into(),
    );
    cols
}

/// The views of the operator's tables (migration 7; version 3 made them without `blob`).
/// The views of identity, profiles and audiences (version 5).
const PEOPLE_VIEWS: [(&str, &str); 7] = [
    ("identity_edges", "SELECT a_type, a_value, b_type, b_value, message_id, ts, status, reason FROM collector_identity_edges FINAL"),
    ("identities", "SELECT id_type, id_value, person_id, first_seen FROM collector_identities FINAL"),
    ("identity_merges", "SELECT message_id, a_type, a_value, b_type, b_value, kind, from_person, into_person, reason, merged_at FROM collector_identity_merges FINAL"),
    ("profiles", "SELECT person_id, user_ids, anonymous_ids, emails, first_seen, last_seen, event_count, traits, consent, updated_at FROM (SELECT * FROM collector_profiles FINAL) WHERE deleted = 0"),
    ("identity_dirty", "SELECT id_type, id_value, reason FROM (SELECT * FROM collector_identity_dirty FINAL) WHERE resolved = 0"),
    ("identity_pending", "SELECT DISTINCT load_id FROM message_ids WHERE load_id NOT IN (SELECT load_id FROM collector_identity_read)"),
    ("audience_membership", "SELECT audience, person_id, entered_at, exited_at FROM collector_audience_membership FINAL"),
];

/// The views of the privacy ledger (version 6).
const PRIVACY_VIEWS: [(&str, &str); 3] = [
    ("privacy_requests", "SELECT id, kind, subject, resolved, requested_by, received_at, status, runs, completed_at, detail FROM collector_privacy_requests FINAL"),
    ("privacy_request_stores", "SELECT request_id, store, status, before_count, after_count, detail, updated_at FROM collector_privacy_request_stores FINAL"),
    ("policy_versions", "SELECT version, first_seen, policy FROM collector_policy_versions FINAL"),
];

const OPERATOR_VIEWS: [(&str, &str); 2] = [
    ("quarantine", "SELECT message_id, type, shard, batch_id, reason, event, quarantined_at, attempts FROM (SELECT * FROM collector_quarantine FINAL) WHERE resolved = 0"),
    ("dead_letters", "SELECT shard, batch_id, error, unhex(blob_hex) AS blob, blob_hex, loaded_at FROM (SELECT * FROM collector_dead_letters FINAL) WHERE resolved = 0"),
];

/// `sql` split into statements at the `;` outside quotes (ClickHouse takes one a request).
fn statements(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quote) = (0, None::<char>);
    let mut chars = sql.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match (quote, c) {
            (Some(_), '\\') => {
                chars.next();
            }
            (Some(q), c) if c == q => quote = None,
            (None, '\'' | '"' | '`') => quote = Some(c),
            (None, ';') => {
                out.push(&sql[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&sql[start..]);
    out.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

/// A text value in `TabSeparated` (`\N` is NULL).
fn tsv_field(v: &Option<String>, out: &mut String) {
    match v {
        None => out.push_str("\\N"),
        Some(t) => {
            for c in t.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\t' => out.push_str("\\t"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    c => out.push(c),
                }
            }
        }
    }
}

#[async_trait]
impl SqlSession for ChSession<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::ClickHouse
    }

    /// ClickHouse does not say how many rows a statement changed: always 0.
    async fn execute(&mut self, sql: &str) -> Result<u64, SinkError> {
        self.batch(sql).await.map(|()| 0)
    }

    async fn batch(&mut self, sql: &str) -> Result<(), SinkError> {
        let db = self.sink.cfg.database.clone();
        for st in statements(sql) {
            let st = st.trim();
            if matches!(
                st.to_ascii_uppercase().as_str(),
                "BEGIN" | "COMMIT" | "ROLLBACK"
            ) {
                continue;
            }
            self.sink
                .request_in(Via::Query(Some(&self.id)), Some(&db), st, None)
                .await?;
        }
        Ok(())
    }

    async fn query(&mut self, sql: &str) -> Result<QueryResult, SinkError> {
        self.sink.query_in(Some(&self.id), sql).await
    }

    /// Rows as `TabSeparated` text: instants as `YYYY-MM-DD hh:mm:ss` (UTC).
    async fn insert(
        &mut self,
        table: &str,
        rows: Vec<Vec<Option<String>>>,
    ) -> Result<(), SinkError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut body = String::new();
        for r in &rows {
            for (i, v) in r.iter().enumerate() {
                if i > 0 {
                    body.push('\t');
                }
                tsv_field(v, &mut body);
            }
            body.push('\n');
        }
        let db = self.sink.cfg.database.clone();
        self.sink
            .request_in(
                Via::Query(Some(&self.id)),
                Some(&db),
                &format!("INSERT INTO {} FORMAT TabSeparated", ident(table)),
                Some(body.into_bytes()),
            )
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod load_id_tests {
    use super::*;

    #[test]
    fn loads_in_one_millisecond_get_different_ids() {
        let ids: std::collections::HashSet<u64> = (0..10_000).map(|_| new_load_id()).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids.iter().all(|i| *i < 1 << 63));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_errors_are_permanent_and_the_rest_transient() {
        assert!(matches!(
            classify("Code: 27, e.displayText() = DB::Exception: Cannot parse input"),
            SinkError::Permanent(_)
        ));
        assert!(matches!(
            classify("Code: 241, e.displayText() = DB::Exception: Memory limit exceeded"),
            SinkError::Transient(_)
        ));
        assert!(matches!(
            classify("<html>bad gateway"),
            SinkError::Transient(_)
        ));
        // A later server's wording.
        assert!(matches!(
            classify("Code: 27. DB::Exception: Cannot parse input: expected '\"' before: 'x'. (CANNOT_PARSE_INPUT_ASSERTION_FAILED) (version 25.8.1.1)"),
            SinkError::Permanent(_)
        ));
    }

    // 18.16 follows the code with a comma, later servers with a full stop; a check
    // for "Code: 60," never matched a current server's answer (found running the
    // conformance suite on the current engine).
    #[test]
    fn error_codes_are_read_in_both_wordings() {
        for (text, code) in [
            ("Code: 60, e.displayText() = DB::Exception: Table analytics.x doesn't exist., e.what() = DB::Exception", 60),
            ("Code: 60. DB::Exception: Table `analytics`.`x` doesn't exist. (UNKNOWN_TABLE)", 60),
            ("ClickHouse said: Code: 57. DB::Exception: Table `a`.`b` already exists. (TABLE_ALREADY_EXISTS)", 57),
        ] {
            assert_eq!(error_code(text), Some(code), "{text}");
            assert!(has_code(&SinkError::Transient(text.into()), &[code]));
            assert!(!has_code(&SinkError::Transient(text.into()), &[6]));
        }
        assert_eq!(error_code("Code: x"), None);
        assert_eq!(error_code("no code"), None);
    }

    // The tables the sink creates take `RowBinary` (base, per-event with a property of
    // every type, `users`), and a table loaded in `RowBinary` holds exactly what the same
    // rows sent as `JSONEachRow` give.
    #[tokio::test]
    async fn rows_go_in_row_binary_and_read_back_as_json_rows_do() {
        let ch = collector_e2e::clickhouse::LocalClickHouse::start().unwrap();
        let sink = ClickHouseSink::connect(&ClickHouseConfig::at(&ch.url))
            .await
            .unwrap();
        let body = serde_json::json!({"batch": [
            {"type": "track", "messageId": "o1", "userId": "u1", "event": "Order Completed",
             "timestamp": "2026-11-24T13:54:00.250Z",
             "properties": {"revenue": 9.5, "currency": "EUR é\t\"q\"\\", "express": true,
                            "shipped_at": "2026-11-26T09:00:00Z", "tags": ["a"], "big": 1e300},
             "context": {"page": {"path": "/p"}}},
            {"type": "track", "messageId": "o2", "userId": "u2", "event": "Order Completed",
             "properties": {"revenue": 1, "express": false, "shipped_at": "1969-12-31T23:59:59Z"}},
            {"type": "identify", "messageId": "i1", "userId": "u1", "traits": {"plan": "pro"}}
        ]});
        let events = crate::sinks::test_events(body);
        let load = crate::sinks::Load::events(0, 1, events);
        assert_eq!(sink.load(&load).await.unwrap().inserted, 3);
        let prepared = schema::prepare(load);
        let catalog = sink.catalog.lock().await.clone();
        let plan = catalog.plan(&prepared);
        let order = plan
            .loads
            .iter()
            .find(|l| l.table == "order_completed")
            .unwrap();
        for ty in LogicalType::ALL {
            assert!(
                order.columns.iter().any(|(_, t)| *t == ty),
                "a {ty:?} property"
            );
        }
        let physical = sink
            .column_types(plan.loads.iter().map(|l| rows_table(&l.table)))
            .await
            .unwrap();
        let now_ms = 1_795_528_500_123;
        let now = sink.instant(&format_ms(now_ms));
        for load in &plan.loads {
            let table = rows_table(&load.table);
            let binary = sink
                .rows_binary(load, now_ms, physical.get(&table))
                .unwrap_or_else(|| panic!("{table} goes in RowBinary: {:?}", physical.get(&table)));
            // The same rows both ways, into two copies of the table.
            let cols = insert_columns(load);
            let mut read = Vec::new();
            for (copy, format, body) in [
                ("b", "RowBinary", binary),
                ("j", "JSONEachRow", sink.rows_body(load, &now).into_bytes()),
            ] {
                let name = format!("{table}_{copy}");
                sink.exec(&format!(
                    "CREATE TABLE {} AS {}",
                    ident(&name),
                    ident(&table)
                ))
                .await
                .unwrap();
                sink.insert_format(&name, &cols, format, body)
                    .await
                    .unwrap();
                let (_, rows) = sink
                    .select(&format!(
                        "SELECT * FROM {} ORDER BY {}",
                        ident(&name),
                        ident(&load.columns[0].0)
                    ))
                    .await
                    .unwrap();
                assert_eq!(rows.len(), load.rows.len(), "{name}");
                read.push(rows);
            }
            assert_eq!(read[0], read[1], "{table}");
        }
    }

    // An `Atomic` database (the current engine's default) swaps a view in with
    // `EXCHANGE TABLES`; 18.16's `Ordinary` one with a `RENAME` of both names. Either
    // way the grown view has the new column and no temporary view is left.
    #[tokio::test]
    async fn views_are_swapped_by_exchange_where_the_database_is_atomic() {
        for (ch, atomic) in [
            (
                collector_e2e::clickhouse::LocalClickHouse::start().unwrap(),
                false,
            ),
            (
                collector_e2e::clickhouse::LocalClickHouse::start_current().unwrap(),
                true,
            ),
        ] {
            let sink = ClickHouseSink::connect(&ClickHouseConfig::at(&ch.url))
                .await
                .unwrap();
            assert_eq!(sink.exchange, atomic, "{}", ch.url);
            for (i, prop) in ["a", "b", "c"].iter().enumerate() {
                let body = serde_json::json!({"batch": [{"type": "track", "messageId": format!("m{i}"),
                    "userId": "u", "event": "Grown", "properties": {*prop: 1}}]});
                let load =
                    crate::sinks::Load::events(0, i as i64 + 1, crate::sinks::test_events(body));
                sink.load(&load).await.unwrap();
            }
            let (_, rows) = sink
                .select("SELECT count(), countIf(isNotNull(c)) FROM grown")
                .await
                .unwrap();
            assert_eq!(rows[0][0].to_string(), "\"3\"");
            assert_eq!(rows[0][1].to_string(), "\"1\"");
            let (_, stray) = sink
                .select("SELECT name FROM system.tables WHERE database = currentDatabase() AND (name LIKE 'collector_next_%' OR name LIKE 'collector_prev_%')")
                .await
                .unwrap();
            assert!(stray.is_empty(), "{stray:?}");
        }
    }

    // A table's new columns go in one `ALTER` per 64 KiB of text; when another agent
    // added one of them meanwhile, the whole `ALTER` fails (nothing of it applied)
    // and each column is added on its own: that one is not reported as added here.
    #[tokio::test]
    async fn new_columns_are_added_together_and_one_by_one_after_a_race() {
        let ch = collector_e2e::clickhouse::LocalClickHouse::start().unwrap();
        let sink = ClickHouseSink::connect(&ClickHouseConfig::at(&ch.url))
            .await
            .unwrap();
        let col = |name: &str, position| NewColumn {
            table: "tracks".into(),
            name: name.into(),
            ty: LogicalType::Text,
            position,
        };
        // Long names: three `ALTER`s' worth.
        let wide: Vec<NewColumn> = (0..600)
            .map(|i| col(&format!("p{i}_{}", "x".repeat(200)), i))
            .collect();
        let added = sink
            .add_columns("tracks", &wide.iter().collect::<Vec<_>>())
            .await
            .unwrap();
        assert_eq!(added.len(), 600);
        let (a, b, c) = (col("a", 600), col("b", 601), col("c", 602));
        sink.exec("ALTER TABLE collector_rows_tracks ADD COLUMN b Nullable(String)")
            .await
            .unwrap();
        let added = sink.add_columns("tracks", &[&a, &b, &c]).await.unwrap();
        assert_eq!(
            added,
            HashSet::from(["a".to_string(), "c".to_string()]),
            "b was another agent's"
        );
        let have = sink.existing_columns("tracks").await.unwrap();
        for name in ["a", "b", "c", wide[599].name.as_str()] {
            assert!(have.iter().any(|h| h == name), "{name}");
        }
    }

    // Both ways of finding a load's quarantined ids (the quarantine read whole, or
    // looked up by the load's ids) give the same answer, resolved entries excluded.
    #[tokio::test]
    async fn quarantined_ids_are_found_whether_the_quarantine_is_small_or_large() {
        let ch = collector_e2e::clickhouse::LocalClickHouse::start().unwrap();
        let sink = ClickHouseSink::connect(&ClickHouseConfig::at(&ch.url))
            .await
            .unwrap();
        let entry = |id: &str, resolved: u8, version: u64| {
            serde_json::json!({
                "message_id": id, "type": "track", "shard": 0, "batch_id": 1, "reason": "r",
                "event": "{}", "quarantined_at": "2026-11-26 10:00:00", "attempts": 1,
                "resolved": resolved, "_version": version
            })
        };
        sink.insert(
            "collector_quarantine",
            &QUARANTINE_COLUMNS.map(String::from),
            vec![
                entry("q1", 0, 1),
                entry("q2", 0, 1),
                entry("q3", 0, 1),
                entry("q3", 1, 2),
                entry("elsewhere", 0, 1),
            ],
        )
        .await
        .unwrap();
        let ids = ["q1", "q2", "q3", "new"];
        let want: HashSet<String> = ["q1", "q2"].map(String::from).into();
        // The registry lookup by a set of ids, whatever the ids hold.
        let odd = ["it's", "back\\slash", "sep\u{1}arated", "ünï"];
        sink.insert(
            "message_ids",
            &["message_id", "table_name", "load_id"].map(String::from),
            odd.iter()
                .map(|id| serde_json::json!({"message_id": id, "table_name": "tracks", "load_id": 1}))
                .collect(),
        )
        .await
        .unwrap();
        let lookup = "SELECT message_id FROM message_ids FINAL WHERE message_id IN ({ids})";
        let mut asked: Vec<&str> = odd.to_vec();
        asked.push("absent");
        let found = sink.ids_in(lookup, &asked).await.unwrap();
        assert_eq!(found, odd.map(String::from).into());
        let found = sink.ids_in(lookup, &asked[..2]).await.unwrap();
        assert_eq!(found, odd[..2].iter().map(|s| s.to_string()).collect());
        // Three unresolved entries: read whole when up to 3 may be, by ids when 2.
        for read_whole in [3, 100, 2, 1] {
            assert_eq!(
                sink.quarantined_among_reading_whole(&ids, read_whole)
                    .await
                    .unwrap(),
                want,
                "read_whole = {read_whole}"
            );
        }
        assert!(sink.quarantined_among(&[]).await.unwrap().is_empty());
    }

    #[test]
    fn lookups_are_split_by_bytes_and_keep_every_id() {
        let long = "x".repeat(LOOKUP_BYTES / 3);
        let huge = "y".repeat(LOOKUP_BYTES * 2);
        let ids: Vec<&str> = vec![&long, &long, &long, "a", &huge, "b"];
        let chunks: Vec<&[&str]> = lookup_chunks(&ids).collect();
        // Two thirds fit, the third does not; an id longer than the limit goes alone.
        assert_eq!(
            chunks.iter().map(|c| c.len()).collect::<Vec<_>>(),
            vec![2, 2, 1, 1]
        );
        assert_eq!(chunks.concat(), ids);
        assert_eq!(lookup_chunks(&[]).count(), 0);
        // Escaped, an id of quotes takes twice its length: two fit no more.
        let quotes = "'".repeat(LOOKUP_BYTES / 3);
        let ids: Vec<&str> = vec![&quotes, &quotes];
        assert_eq!(lookup_chunks(&ids).count(), 2);
        // Tiny ids still fit once listed as quoted literals.
        let tiny: Vec<&str> = vec!["a"; LOOKUP_BYTES];
        let chunks: Vec<&[&str]> = lookup_chunks(&tiny).collect();
        assert!(chunks
            .iter()
            .all(|c| id_set_sql(&[&["\u{1}"], *c].concat()).len() <= LOOKUP_BYTES + 16));
        let many: Vec<String> = (0..5_000).map(|i| format!("message-{i:08}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(lookup_chunks(&many).count(), 1);
    }

    #[test]
    fn statements_without_rows_are_sent_without_a_format() {
        for sql in [
            "SELECT 1",
            "  select 1",
            "WITH 1 AS x SELECT x",
            "SHOW TABLES",
            "-- a note\nSELECT 1",
            "DESCRIBE tracks",
        ] {
            assert!(answers_rows(sql), "{sql}");
        }
        for sql in [
            "INSERT INTO t SELECT * FROM u",
            "  insert into t values (1)",
            "/* fix */ INSERT INTO collector_quarantine SELECT 1",
            "OPTIMIZE TABLE t FINAL",
            "ALTER TABLE t DELETE WHERE 1",
            "CREATE TABLE t (a UInt8) ENGINE = Memory",
            "DROP TABLE t",
        ] {
            assert!(!answers_rows(sql), "{sql}");
        }
    }

    #[test]
    fn an_id_holding_the_separator_falls_back_to_a_list() {
        assert_eq!(
            id_set_sql(&["a", "b'c"]),
            "SELECT arrayJoin(splitByChar('\\x01', 'a\u{1}b\\'c'))"
        );
        assert_eq!(id_set_sql(&["a", "b\u{1}c"]), "'a', 'b\u{1}c'");
    }

    #[test]
    fn instants_render_like_every_other_sink() {
        assert_eq!(
            render(
                &Value::String("2026-11-25 10:00:00".into()),
                "Nullable(DateTime('UTC'))"
            )
            .as_deref(),
            Some("2026-11-25T10:00:00.000Z")
        );
        assert_eq!(
            render(
                &Value::String("2026-11-25 10:00:00.123".into()),
                "DateTime64(3, 'UTC')"
            )
            .as_deref(),
            Some("2026-11-25T10:00:00.123Z")
        );
        assert_eq!(render(&Value::from(5), "UInt64").as_deref(), Some("5"));
        assert_eq!(render(&Value::Null, "Nullable(String)"), None);
    }
}
