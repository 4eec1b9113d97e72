//! Privacy requests: a person's erasure (GDPR Art. 17, CCPA delete), suppression
//! (CCPA opt-out of sale/sharing, or "stop collecting about me"), its lifting, and
//! access (Art. 15: an export of everything stored about them).
//!
//! A request names a subject by `user_id`, `anonymous_id` and/or email (matched
//! through the edge's keyed hash: only the hash is ever stored). It is stored in
//! `privacy_requests` with an id (the caller's, for idempotency, or a fresh one) and
//! who asked (the admin API key's name, or `cli:<user>`), then carried out by the
//! agent's loop between drain passes ([`process`]), never concurrently with a load:
//!
//! - **suppress**: the subject's ids go on the edge's suppression list over the signed
//!   drain API; the edge drops their new events before storing anything (counted as
//!   `suppressed`), and the agent drops those already queued at drain.
//! - **unsuppress**: the ids come off the list.
//! - **erase**: the subject is resolved through the identity graph to every id of
//!   their person(s); those ids are suppressed as above (so nothing queued or new
//!   comes back), each destination with a deletion endpoint is asked to delete them,
//!   and then every warehouse table loses their rows ([`stores`]) in one transaction;
//!   `activation_log` keeps a tombstone (what was sent or withheld, when, under which
//!   categories) without any identifier. The request completes on a later pass that
//!   finds nothing left of them anywhere (a late load, another agent's lease, is erased
//!   by that pass); until then, and while a destination fails transiently, it is
//!   retried every pass.
//! - **export**: one JSON document with every row of theirs, per table.
//!
//! Each store's outcome is kept in `privacy_request_stores` with the rows found before
//! and left after: the audit trail (`privacy request status ID`).

pub mod cli;
pub mod erase;

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::audiences::eval::at;
use crate::sinks::{list as lit_list, lit, Dialect, Relational, SinkError, SqlSession};

/// The tables (a migration of each SQL warehouse).
pub fn ddl(d: Relational) -> String {
    let (t, ts, j) = match d {
        Relational::DuckDb => ("VARCHAR", "TIMESTAMP", "JSON"),
        Relational::Postgres => ("text", "timestamptz", "jsonb"),
    };
    format!(
        "CREATE TABLE privacy_requests (id {t} PRIMARY KEY, kind {t} NOT NULL, subject {j} NOT NULL, resolved {j}, requested_by {t} NOT NULL, received_at {ts} NOT NULL, status {t} NOT NULL, runs INTEGER NOT NULL, completed_at {ts}, detail {t});
CREATE TABLE privacy_request_stores (request_id {t} NOT NULL, store {t} NOT NULL, status {t} NOT NULL, before_count BIGINT, after_count BIGINT, detail {t}, updated_at {ts} NOT NULL, PRIMARY KEY (request_id, store));
CREATE TABLE policy_versions (version {t} PRIMARY KEY, first_seen {ts} NOT NULL, policy {t} NOT NULL);
"
    )
}

/// What a request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Erase,
    Suppress,
    Unsuppress,
    Export,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Erase => "erase",
            Kind::Suppress => "suppress",
            Kind::Unsuppress => "unsuppress",
            Kind::Export => "export",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        [Kind::Erase, Kind::Suppress, Kind::Unsuppress, Kind::Export]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// Who a request is about. Emails are kept only as the edge's keyed hash.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anonymous_ids: Vec<String>,
    /// `hmac-sha256:v1:…` of each normalised address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub email_hashes: Vec<String>,
}

impl Subject {
    pub fn is_empty(&self) -> bool {
        self.user_ids.is_empty() && self.anonymous_ids.is_empty() && self.email_hashes.is_empty()
    }

    /// The ids as `(type, value)`, the identity graph's shape.
    pub fn ids(&self) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for (t, vs) in [
            ("user_id", &self.user_ids),
            ("anonymous_id", &self.anonymous_ids),
            ("email", &self.email_hashes),
        ] {
            for v in vs {
                out.insert((t.to_string(), v.clone()));
            }
        }
        out
    }
}

/// A request as submitted (the API's body): the emails in the clear, hashed on
/// arrival and never stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRequest {
    pub kind: Option<Kind>,
    /// The caller's id for it: submitting the same id again returns the stored
    /// request instead of making a second one.
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub user_ids: Vec<String>,
    #[serde(default)]
    pub anonymous_ids: Vec<String>,
    #[serde(default)]
    pub emails: Vec<String>,
    /// Only honoured from the local admin token (the CLI says `cli:<user>`); an API
    /// key's name is always its own.
    #[serde(default)]
    pub requested_by: Option<String>,
}

/// Longest request id a caller may choose.
pub const MAX_ID_BYTES: usize = 128;

impl NewRequest {
    /// Checks the request and turns its emails into their keyed hashes.
    pub fn subject(
        &self,
        hasher: Option<&collector_core::pii::PiiHasher>,
    ) -> Result<Subject, String> {
        if let Some(id) = &self.id {
            if id.is_empty()
                || id.len() > MAX_ID_BYTES
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
            {
                return Err(format!(
                    "id must be 1 to {MAX_ID_BYTES} characters of A-Z a-z 0-9 - _ . :"
                ));
            }
        }
        let clean = |v: &[String], what: &str| -> Result<Vec<String>, String> {
            let mut out: Vec<String> = Vec::new();
            for s in v {
                if s.is_empty() || s.len() > collector_core::drain::MAX_SUPPRESSED_ID_BYTES {
                    return Err(format!("{what} must have 1 to 1024 bytes"));
                }
                if !out.contains(s) {
                    out.push(s.clone());
                }
            }
            Ok(out)
        };
        let mut email_hashes = Vec::new();
        for e in &self.emails {
            let Some(h) = hasher else {
                return Err(
                    "--email needs the edge's PII key on the agent: set pii_key_env in agent.toml"
                        .into(),
                );
            };
            if !e.contains('@') {
                return Err(format!("{e:?} is not an email address"));
            }
            let hash = h.hash(collector_core::pii::PiiKind::Email, e, "");
            if !email_hashes.contains(&hash) {
                email_hashes.push(hash);
            }
        }
        let subject = Subject {
            user_ids: clean(&self.user_ids, "a user id")?,
            anonymous_ids: clean(&self.anonymous_ids, "an anonymous id")?,
            email_hashes,
        };
        if subject.is_empty() {
            return Err("name the person: at least one user id, anonymous id or email".into());
        }
        Ok(subject)
    }
}

/// A stored request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: String,
    pub kind: Kind,
    pub subject: Subject,
    /// Every id it was resolved to (erasure), kept so a later run erases the ids the
    /// identity graph no longer holds.
    #[serde(default)]
    pub resolved: Vec<(String, String)>,
    pub requested_by: String,
    pub received_at: String,
    /// `received`, `running`, `completed` or `failed`.
    pub status: String,
    pub runs: i64,
    pub completed_at: Option<String>,
    pub detail: Option<String>,
    #[serde(default)]
    pub stores: Vec<StoreStatus>,
}

/// One store's part of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStatus {
    /// A table (`tracks`), `edge`, or `destination:<name>`.
    pub store: String,
    /// `done`, `retrying`, `failed` or `not_supported`.
    pub status: String,
    pub before: Option<i64>,
    pub after: Option<i64>,
    pub detail: Option<String>,
    pub updated_at: String,
}

impl Request {
    pub fn is_finished(&self) -> bool {
        self.status == "completed" || self.status == "failed"
    }

    /// A human summary: the request, then one line per store.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = format!(
            "request {} ({}) by {}: {}\n  received  {}\n",
            self.id,
            self.kind.as_str(),
            self.requested_by,
            self.status,
            self.received_at
        );
        if let Some(c) = &self.completed_at {
            let _ = writeln!(out, "  completed {c}");
        }
        if let Some(d) = &self.detail {
            let _ = writeln!(out, "  {d}");
        }
        let _ = writeln!(
            out,
            "  subject   {}",
            serde_json::to_string(&self.subject).unwrap_or_default()
        );
        if !self.stores.is_empty() {
            let _ = writeln!(
                out,
                "  {:<34} {:<13} {:>7} {:>7}  detail",
                "store", "status", "before", "after"
            );
        }
        for s in &self.stores {
            let n = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "  {:<34} {:<13} {:>7} {:>7}  {}",
                s.store,
                s.status,
                n(s.before),
                n(s.after),
                s.detail.as_deref().unwrap_or("")
            );
        }
        out
    }
}

/// A fresh request id: `pr_` and 16 random hex digits.
fn new_id() -> String {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).expect("OS randomness is available");
    format!("pr_{}", hex::encode(b))
}

/// The caller of the CLI, for the audit trail.
pub fn cli_caller() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}

fn relational(s: &dyn SqlSession) -> Result<Dialect, SinkError> {
    Ok(s.dialect())
}

/// A nullable text value as a ClickHouse expression.
fn ch_text(v: Option<&str>) -> String {
    v.map(|v| lit(Dialect::ClickHouse, v))
        .unwrap_or_else(|| "CAST(NULL AS Nullable(String))".into())
}

/// A rendered instant back as a ClickHouse expression.
fn ch_time(v: Option<&str>) -> String {
    match v.and_then(collector_core::timestamp::parse_ms) {
        Some(ms) => at(Dialect::ClickHouse, ms),
        None => "CAST(NULL AS Nullable(DateTime('UTC')))".into(),
    }
}

/// Writes a request's row as a new version (ClickHouse has no `UPDATE`).
async fn ch_write_request(s: &mut dyn SqlSession, r: &Request) -> Result<(), SinkError> {
    let resolved =
        (!r.resolved.is_empty()).then(|| serde_json::to_string(&r.resolved).unwrap_or_default());
    s.execute(&format!(
        "INSERT INTO collector_privacy_requests SELECT {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}",
        lit(Dialect::ClickHouse, &r.id),
        lit(Dialect::ClickHouse, r.kind.as_str()),
        lit(
            Dialect::ClickHouse,
            &serde_json::to_string(&r.subject).unwrap_or_default()
        ),
        ch_text(resolved.as_deref()),
        lit(Dialect::ClickHouse, &r.requested_by),
        ch_time(Some(&r.received_at)),
        lit(Dialect::ClickHouse, &r.status),
        r.runs,
        ch_time(r.completed_at.as_deref()),
        ch_text(r.detail.as_deref()),
        crate::sinks::clickhouse::version_now()
    ))
    .await?;
    Ok(())
}

/// Stores a new request (or returns the one stored under the caller's id).
pub async fn submit(
    s: &mut dyn SqlSession,
    kind: Kind,
    id: Option<&str>,
    subject: &Subject,
    requested_by: &str,
    now_ms: i64,
) -> Result<Request, SinkError> {
    let d = relational(s)?;
    if let Some(id) = id {
        if let Some(r) = get(s, id).await? {
            if r.kind != kind || r.subject != *subject {
                return Err(SinkError::Permanent(format!(
                    "request {id} exists with another kind or subject; choose a new id"
                )));
            }
            return Ok(r);
        }
    }
    let id = id.map(str::to_string).unwrap_or_else(new_id);
    if d == Dialect::ClickHouse {
        let r = Request {
            id: id.clone(),
            kind,
            subject: subject.clone(),
            resolved: Vec::new(),
            requested_by: requested_by.to_string(),
            received_at: collector_core::timestamp::format_ms(now_ms),
            status: "received".into(),
            runs: 0,
            completed_at: None,
            detail: None,
            stores: Vec::new(),
        };
        ch_write_request(s, &r).await?;
        return get(s, &id)
            .await?
            .ok_or_else(|| SinkError::Transient(format!("request {id} was not stored")));
    }
    let subject_json = serde_json::to_string(subject).unwrap_or_default();
    s.execute(&format!(
        "INSERT INTO privacy_requests (id, kind, subject, requested_by, received_at, status, runs) VALUES ({}, {}, {}, {}, {}, 'received', 0) ON CONFLICT (id) DO NOTHING",
        lit(d, &id),
        lit(d, kind.as_str()),
        lit(d, &subject_json),
        lit(d, requested_by),
        at(d, now_ms)
    ))
    .await?;
    get(s, &id)
        .await?
        .ok_or_else(|| SinkError::Transient(format!("request {id} was not stored")))
}

const REQUEST_COLUMNS: &str = "id, kind, CAST(subject AS VARCHAR), CAST(resolved AS VARCHAR), requested_by, received_at, status, runs, completed_at, detail";

fn request_columns(d: Dialect) -> String {
    match d {
        Dialect::Postgres => REQUEST_COLUMNS.replace("VARCHAR", "text"),
        Dialect::ClickHouse => REQUEST_COLUMNS
            .replace("CAST(subject AS VARCHAR)", "subject")
            .replace("CAST(resolved AS VARCHAR)", "resolved"),
        _ => REQUEST_COLUMNS.to_string(),
    }
}

fn from_row(r: &[Option<String>]) -> Option<Request> {
    let text = |i: usize| r.get(i).cloned().flatten();
    Some(Request {
        id: text(0)?,
        kind: Kind::parse(&text(1)?)?,
        subject: serde_json::from_str(&text(2)?).ok()?,
        resolved: text(3)
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default(),
        requested_by: text(4)?,
        received_at: text(5)?,
        status: text(6)?,
        runs: text(7)?.parse().ok()?,
        completed_at: text(8),
        detail: text(9),
        stores: Vec::new(),
    })
}

/// One request with its stores.
pub async fn get(s: &mut dyn SqlSession, id: &str) -> Result<Option<Request>, SinkError> {
    let d = relational(s)?;
    let r = s
        .query(&format!(
            "SELECT {} FROM privacy_requests WHERE id = {}",
            request_columns(d),
            lit(d, id)
        ))
        .await?;
    let Some(mut req) = r.rows.first().and_then(|r| from_row(r)) else {
        return Ok(None);
    };
    let stores = s
        .query(&format!(
            "SELECT store, status, before_count, after_count, detail, updated_at FROM privacy_request_stores WHERE request_id = {} ORDER BY store",
            lit(d, id)
        ))
        .await?;
    req.stores = stores
        .rows
        .into_iter()
        .map(|r| StoreStatus {
            store: r[0].clone().unwrap_or_default(),
            status: r[1].clone().unwrap_or_default(),
            before: r[2].as_deref().and_then(|v| v.parse().ok()),
            after: r[3].as_deref().and_then(|v| v.parse().ok()),
            detail: r[4].clone(),
            updated_at: r[5].clone().unwrap_or_default(),
        })
        .collect();
    Ok(Some(req))
}

/// Every request, newest first (without their stores).
pub async fn list(s: &mut dyn SqlSession) -> Result<Vec<Request>, SinkError> {
    let d = relational(s)?;
    let r = s
        .query(&format!(
            "SELECT {} FROM privacy_requests ORDER BY received_at DESC, id",
            request_columns(d)
        ))
        .await?;
    Ok(r.rows.iter().filter_map(|r| from_row(r)).collect())
}

/// The requests not finished yet, oldest first.
pub async fn pending(s: &mut dyn SqlSession) -> Result<Vec<Request>, SinkError> {
    let d = relational(s)?;
    // On ClickHouse a filter on a column outside the key could meet an older version
    // of a row: filter here.
    let filter = if d == Dialect::ClickHouse {
        ""
    } else {
        "WHERE status IN ('received', 'running')"
    };
    let r = s
        .query(&format!(
            "SELECT {} FROM privacy_requests {filter} ORDER BY received_at, id",
            request_columns(d)
        ))
        .await?;
    Ok(r.rows
        .iter()
        .filter_map(|r| from_row(r))
        .filter(|r| !r.is_finished())
        .collect())
}

/// Records one store's outcome. `add_before`: the rows found this run are added to
/// those found by earlier runs (the audit trail counts everything erased).
pub(crate) async fn set_store(
    s: &mut dyn SqlSession,
    request: &str,
    store: &str,
    status: &str,
    counts: Option<(i64, i64)>,
    detail: Option<&str>,
    now_ms: i64,
) -> Result<(), SinkError> {
    let d = s.dialect();
    if d == Dialect::ClickHouse {
        let r = s
            .query(&format!(
                "SELECT before_count FROM privacy_request_stores WHERE request_id = {} AND store = {}",
                lit(d, request),
                lit(d, store)
            ))
            .await?;
        let prior: i64 = r
            .rows
            .first()
            .and_then(|r| r[0].as_deref())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (before, after) = match counts {
            Some((b, a)) => ((prior + b).to_string(), a.to_string()),
            None => (
                prior.to_string(),
                "CAST(NULL AS Nullable(Int64))".to_string(),
            ),
        };
        s.execute(&format!(
            "INSERT INTO collector_privacy_request_stores SELECT {}, {}, {}, {before}, {after}, {}, {}, {}",
            lit(d, request),
            lit(d, store),
            lit(d, status),
            ch_text(detail),
            at(d, now_ms),
            crate::sinks::clickhouse::version_now()
        ))
        .await?;
        return Ok(());
    }
    let (before, after) = match counts {
        Some((b, a)) => (b.to_string(), a.to_string()),
        None => ("NULL".into(), "NULL".into()),
    };
    let detail = detail.map(|v| lit(d, v)).unwrap_or_else(|| "NULL".into());
    s.execute(&format!(
        "INSERT INTO privacy_request_stores VALUES ({}, {}, {}, {before}, {after}, {detail}, {})
         ON CONFLICT (request_id, store) DO UPDATE SET status = excluded.status,
           before_count = COALESCE(privacy_request_stores.before_count, 0) + COALESCE(excluded.before_count, 0),
           after_count = excluded.after_count, detail = excluded.detail, updated_at = excluded.updated_at",
        lit(d, request),
        lit(d, store),
        lit(d, status),
        at(d, now_ms)
    ))
    .await?;
    Ok(())
}

/// Sets a request's status (and `completed_at` when it is finished).
pub(crate) async fn set_status(
    s: &mut dyn SqlSession,
    id: &str,
    status: &str,
    detail: Option<&str>,
    now_ms: i64,
) -> Result<(), SinkError> {
    let d = s.dialect();
    let finished = status == "completed" || status == "failed";
    if d == Dialect::ClickHouse {
        let Some(mut r) = get(s, id).await? else {
            return Ok(());
        };
        r.status = status.to_string();
        r.detail = detail.map(str::to_string);
        r.completed_at = finished.then(|| collector_core::timestamp::format_ms(now_ms));
        if finished {
            r.resolved.clear();
        }
        return ch_write_request(s, &r).await;
    }
    let completed = if finished {
        at(d, now_ms)
    } else {
        "NULL".into()
    };
    // The ids a finished request resolved to are not kept: the subject (as the person
    // named themselves) is what the audit trail needs.
    let resolved = if finished { ", resolved = NULL" } else { "" };
    s.execute(&format!(
        "UPDATE privacy_requests SET status = {}, completed_at = {completed}{resolved}, detail = {} WHERE id = {}",
        lit(d, status),
        detail.map(|v| lit(d, v)).unwrap_or_else(|| "NULL".into()),
        lit(d, id)
    ))
    .await?;
    Ok(())
}

/// Counts one more run and keeps the ids resolved so far.
pub(crate) async fn record_run(
    s: &mut dyn SqlSession,
    id: &str,
    resolved: &BTreeSet<(String, String)>,
) -> Result<(), SinkError> {
    if s.dialect() == Dialect::ClickHouse {
        let Some(mut r) = get(s, id).await? else {
            return Ok(());
        };
        r.runs += 1;
        r.status = "running".into();
        r.resolved = resolved.iter().cloned().collect();
        return ch_write_request(s, &r).await;
    }
    let d = s.dialect();
    let ids: Vec<&(String, String)> = resolved.iter().collect();
    s.execute(&format!(
        "UPDATE privacy_requests SET runs = runs + 1, status = 'running', resolved = {} WHERE id = {}",
        lit(d, &serde_json::to_string(&ids).unwrap_or_default()),
        lit(d, id)
    ))
    .await?;
    Ok(())
}

/// Records the policy in force, once per version (the dashboard shows when each was
/// first seen and what changed).
pub async fn record_policy(
    s: &mut dyn SqlSession,
    version: &str,
    text: &str,
    now_ms: i64,
) -> Result<(), SinkError> {
    let d = relational(s)?;
    if d == Dialect::ClickHouse {
        let r = s
            .query(&format!(
                "SELECT count() FROM policy_versions WHERE version = {}",
                lit(d, version)
            ))
            .await?;
        if r.rows.first().and_then(|r| r[0].as_deref()) != Some("0") {
            return Ok(());
        }
        s.execute(&format!(
            "INSERT INTO collector_policy_versions SELECT {}, {}, {}",
            lit(d, version),
            at(d, now_ms),
            lit(d, text)
        ))
        .await?;
        return Ok(());
    }
    s.execute(&format!(
        "INSERT INTO policy_versions VALUES ({}, {}, {}) ON CONFLICT (version) DO NOTHING",
        lit(d, version),
        at(d, now_ms),
        lit(d, text)
    ))
    .await?;
    Ok(())
}

/// Ids of a type among `(type, value)` pairs, as a SQL list.
pub(crate) fn values_of(d: Dialect, ids: &BTreeSet<(String, String)>, id_type: &str) -> String {
    lit_list(d, ids.iter().filter(|(t, _)| t == id_type).map(|(_, v)| v))
}

/// A JSON value from a column rendered as text: objects and arrays parsed, the rest
/// kept as strings.
pub(crate) fn cell(v: &Option<String>) -> Value {
    match v {
        None => Value::Null,
        Some(t) if t.starts_with('{') || t.starts_with('[') => {
            serde_json::from_str(t).unwrap_or_else(|_| Value::String(t.clone()))
        }
        Some(t) => Value::String(t.clone()),
    }
}

pub use erase::{export, process, resolve, stores, Person};
