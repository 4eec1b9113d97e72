//! `QueueShard`: the durable queue, one Durable Object per shard (SQLite storage,
//! migration `v1` in `wrangler.toml`).
//!
//! Accepted events are appended to `open_events`, one framed row each. The open batch
//! is sealed into one encoded `Batch` blob per `batches` row when it reaches
//! `BATCH_MAX_EVENTS` or `BATCH_MAX_BYTES`, or when the alarm fires `BATCH_MAX_AGE_MS`
//! after its first event. The drain API leases sealed batches (lease id + expiry) and
//! deletes them on ack; a lease that is not acked in time expires and its batches are
//! handed out again.
//!
//! Every handler does its SQL synchronously (no `await` between statements), so each is
//! one atomic unit, and the runtime's output gate holds the response until the writes
//! are durable: a 200 from `/append` means the events are on disk.

use collector_core::codec::{
    decode_append, decode_event, encode_batch, encode_event, encode_lease, Batch, Lease,
    LeasedBatch,
};
use std::cell::RefCell;
use std::collections::HashSet;

use collector_core::drain::{
    is_suppressed, AckRequest, AckResponse, LeaseRequest, RenewRequest, RenewResponse, ShardStats,
    SuppressRequest, Suppressions, MAX_SUPPRESSED,
};
use serde::Deserialize;
use serde_json::json;
use worker::{
    durable_object, Date, DurableObject, Env, Request, Response, Result, SqlStorage,
    SqlStorageValue, State,
};

use crate::config::ShardConfig;
use crate::http;
use crate::shard_client::{self, new_uuid, SHARD_HEADER};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS open_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event BLOB NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    blob BLOB NOT NULL,
    events INTEGER NOT NULL,
    sealed_ms INTEGER NOT NULL,
    lease_id TEXT,
    lease_expires_ms INTEGER
);
CREATE INDEX IF NOT EXISTS batches_lease ON batches(lease_id);
CREATE TABLE IF NOT EXISTS drops (reason TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS notes (key TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS suppressed (key TEXT PRIMARY KEY, added_ms INTEGER NOT NULL);
";

#[durable_object]
pub struct QueueShard {
    state: State,
    env: Env,
    /// The suppression list (digests of `user_id` / `anonymous_id` values), read from
    /// storage on first use and kept in step with it by `/suppress` (one instance
    /// serves the object at a time).
    suppressed: RefCell<Option<HashSet<String>>>,
}

#[derive(Deserialize)]
struct OpenStats {
    n: i64,
    bytes: Option<i64>,
}

fn now_ms() -> i64 {
    Date::now().as_millis() as i64
}

impl QueueShard {
    fn sql(&self) -> SqlStorage {
        self.state.storage().sql()
    }

    fn shard_number(&self) -> Result<u32> {
        #[derive(Deserialize)]
        struct V {
            value: i64,
        }
        let rows: Vec<V> = self
            .sql()
            .exec("SELECT value FROM meta WHERE key = 'shard'", None)?
            .to_array()?;
        Ok(rows.first().map(|v| v.value as u32).unwrap_or(0))
    }

    /// Seals every open event into one batch row. Synchronous: one atomic unit.
    fn seal(&self) -> Result<usize> {
        let sql = self.sql();
        let mut events = Vec::new();
        let mut max_seq = 0i64;
        for row in sql
            .exec("SELECT seq, event FROM open_events ORDER BY seq", None)?
            .raw()
        {
            let row = row?;
            let (Some(SqlStorageValue::Integer(seq)), Some(SqlStorageValue::Blob(bytes))) =
                (row.first(), row.get(1))
            else {
                return Err(worker::Error::RustError(
                    "open_events row has an unexpected shape".into(),
                ));
            };
            max_seq = *seq;
            match decode_event(bytes) {
                Ok(ev) => events.push(ev),
                Err(e) => {
                    // Never silently: count it, and keep going with the rest.
                    worker::console_error!("open event {seq} does not decode: {e}");
                    self.count_drop(&sql, "corrupt_open_event", 1)?;
                }
            }
        }
        if max_seq == 0 {
            return Ok(0);
        }
        let n = events.len();
        if n > 0 {
            let batch = Batch {
                shard: self.shard_number()?,
                sealed_at_ms: now_ms(),
                events,
            };
            let blob = encode_batch(&batch).map_err(|e| worker::Error::RustError(e.to_string()))?;
            sql.exec(
                "INSERT INTO batches (blob, events, sealed_ms) VALUES (?, ?, ?)",
                vec![blob.into(), (n as i64).into(), batch.sealed_at_ms.into()],
            )?;
        }
        sql.exec(
            "DELETE FROM open_events WHERE seq <= ?",
            vec![max_seq.into()],
        )?;
        Ok(n)
    }

    fn count_drop(&self, sql: &SqlStorage, reason: &str, n: u64) -> Result<()> {
        sql.exec(
            "INSERT INTO drops (reason, count) VALUES (?, ?) ON CONFLICT(reason) DO UPDATE SET count = count + excluded.count",
            vec![reason.into(), (n as i64).into()],
        )?;
        Ok(())
    }

    fn count_note(&self, sql: &SqlStorage, key: &str, n: u64) -> Result<()> {
        sql.exec(
            "INSERT INTO notes (key, count) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET count = count + excluded.count",
            vec![key.into(), (n as i64).into()],
        )?;
        Ok(())
    }

    async fn append(&self, mut req: Request, cfg: ShardConfig) -> Result<Response> {
        let body = req.bytes().await?;
        let append = match decode_append(&body) {
            Ok(a) => a,
            Err(e) => return http::error(400, "bad_append", &e.to_string()),
        };
        let shard: i64 = req
            .headers()
            .get(SHARD_HEADER)?
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let sql = self.sql();
        sql.exec(
            "INSERT INTO meta (key, value) VALUES ('shard', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            vec![shard.into()],
        )?;
        for (reason, n) in &append.drops {
            self.count_drop(&sql, reason, *n)?;
        }
        for (key, n) in &append.notes {
            self.count_note(&sql, key, *n)?;
        }
        self.load_suppressed(&sql)?;
        let dropped = self.store_events(&sql, &append.events)?;
        if dropped > 0 {
            self.count_drop(&sql, "suppressed", dropped)?;
        }
        let stats: OpenStats = sql
            .exec(
                "SELECT COUNT(*) AS n, SUM(bytes) AS bytes FROM open_events",
                None,
            )?
            .one()?;
        if stats.n as usize >= cfg.batch_max_events
            || stats.bytes.unwrap_or(0) as usize >= cfg.batch_max_bytes
        {
            self.seal()?;
        } else if stats.n > 0 && self.state.storage().get_alarm().await?.is_none() {
            self.state.storage().set_alarm(cfg.batch_max_age_ms).await?;
        }
        http::json(
            200,
            &json!({"ok": true, "appended": append.events.len() as u64 - dropped, "suppressed": dropped}),
        )
    }

    /// Appends the events to the open batch, except those of suppressed people; how
    /// many were dropped.
    fn store_events(
        &self,
        sql: &SqlStorage,
        events: &[collector_core::StoredEvent],
    ) -> Result<u64> {
        let suppressed = self.suppressed.borrow();
        let list = suppressed.as_ref().filter(|s| !s.is_empty());
        let mut dropped = 0u64;
        for ev in events {
            if let Some(list) = list {
                if is_suppressed(ev.user_id.as_deref(), ev.anonymous_id.as_deref(), |k| {
                    list.contains(k)
                }) {
                    dropped += 1;
                    continue;
                }
            }
            let bytes = encode_event(ev).map_err(|e| worker::Error::RustError(e.to_string()))?;
            let len = bytes.len() as i64;
            sql.exec(
                "INSERT INTO open_events (event, bytes) VALUES (?, ?)",
                vec![bytes.into(), len.into()],
            )?;
        }
        Ok(dropped)
    }

    fn load_suppressed(&self, sql: &SqlStorage) -> Result<()> {
        if self.suppressed.borrow().is_some() {
            return Ok(());
        }
        #[derive(Deserialize)]
        struct K {
            key: String,
        }
        let rows: Vec<K> = sql.exec("SELECT key FROM suppressed", None)?.to_array()?;
        *self.suppressed.borrow_mut() = Some(rows.into_iter().map(|k| k.key).collect());
        Ok(())
    }

    /// Adds and removes suppressed ids (idempotent), in storage and in the cached list.
    async fn suppress(&self, mut req: Request) -> Result<Response> {
        let change: SuppressRequest = match req.json().await {
            Ok(c) => c,
            Err(e) => return http::error(400, "bad_suppress_request", &e.to_string()),
        };
        if let Err(e) = change.validate() {
            return http::error(400, "bad_suppress_request", &e);
        }
        let sql = self.sql();
        self.load_suppressed(&sql)?;
        let mut cache = self.suppressed.borrow_mut();
        let list = cache.get_or_insert_with(HashSet::new);
        if list.len() + change.add.len() > MAX_SUPPRESSED {
            return http::error(
                400,
                "too_many_suppressed",
                &format!("an edge keeps at most {MAX_SUPPRESSED} suppressed ids"),
            );
        }
        let now = now_ms();
        for key in &change.add {
            let key = key.clone();
            sql.exec(
                "INSERT INTO suppressed (key, added_ms) VALUES (?, ?) ON CONFLICT(key) DO NOTHING",
                vec![key.clone().into(), now.into()],
            )?;
            list.insert(key);
        }
        for key in &change.remove {
            let key = key.clone();
            sql.exec(
                "DELETE FROM suppressed WHERE key = ?",
                vec![key.clone().into()],
            )?;
            list.remove(&key);
        }
        http::json(200, &json!({"suppressed": list.len()}))
    }

    fn suppressions(&self) -> Result<Response> {
        let sql = self.sql();
        self.load_suppressed(&sql)?;
        let mut digests: Vec<String> = self.suppressed.borrow().iter().flatten().cloned().collect();
        digests.sort();
        http::json(200, &json!(Suppressions { digests }))
    }

    async fn lease(&self, mut req: Request) -> Result<Response> {
        let lease: LeaseRequest = match req.json().await {
            Ok(l) => l,
            Err(e) => return http::error(400, "bad_lease_request", &e.to_string()),
        };
        if lease.flush {
            self.seal()?;
        }
        let now = now_ms();
        let sql = self.sql();
        let mut batches = Vec::new();
        for row in sql
            .exec(
                "SELECT id, blob FROM batches WHERE lease_id IS NULL OR lease_expires_ms <= ? ORDER BY id LIMIT ?",
                vec![now.into(), i64::from(lease.max_batches).into()],
            )?
            .raw()
        {
            let row = row?;
            if let (Some(SqlStorageValue::Integer(id)), Some(SqlStorageValue::Blob(blob))) = (row.first(), row.get(1)) {
                batches.push(LeasedBatch {
                    batch_id: *id,
                    blob: blob.clone(),
                });
            }
        }
        let lease_id = new_uuid();
        let expires_at_ms = now + lease.lease_ms;
        for b in &batches {
            sql.exec(
                "UPDATE batches SET lease_id = ?, lease_expires_ms = ? WHERE id = ?",
                vec![
                    lease_id.clone().into(),
                    expires_at_ms.into(),
                    b.batch_id.into(),
                ],
            )?;
        }
        let body = encode_lease(&Lease {
            lease_id,
            expires_at_ms,
            batches,
        })
        .map_err(|e| worker::Error::RustError(e.to_string()))?;
        let mut resp = Response::from_bytes(body)?;
        resp.headers_mut()
            .set("Content-Type", "application/octet-stream")?;
        Ok(resp)
    }

    async fn ack(&self, mut req: Request) -> Result<Response> {
        let ack: AckRequest = match req.json().await {
            Ok(a) => a,
            Err(e) => return http::error(400, "bad_ack_request", &e.to_string()),
        };
        let cursor = self.sql().exec(
            "DELETE FROM batches WHERE lease_id = ?",
            vec![ack.lease_id.into()],
        )?;
        // Drain the cursor so the statement runs to completion before counting.
        let _ = cursor.raw().count();
        let acked = cursor.rows_written() as u64;
        http::json(200, &json!(AckResponse { acked }))
    }

    /// Extends a lease that is still held (its batches not yet handed out again).
    async fn renew(&self, mut req: Request) -> Result<Response> {
        let renew: RenewRequest = match req.json().await {
            Ok(r) => r,
            Err(e) => return http::error(400, "bad_renew_request", &e.to_string()),
        };
        let cursor = self.sql().exec(
            "UPDATE batches SET lease_expires_ms = ? WHERE lease_id = ?",
            vec![(now_ms() + renew.lease_ms).into(), renew.lease_id.into()],
        )?;
        let _ = cursor.raw().count();
        let renewed = cursor.rows_written() as u64;
        http::json(200, &json!(RenewResponse { renewed }))
    }

    fn stats(&self, req: &Request) -> Result<Response> {
        #[derive(Deserialize)]
        struct Count {
            key: String,
            count: i64,
        }
        #[derive(Deserialize)]
        struct Depth {
            sealed: i64,
            leased: i64,
            events: Option<i64>,
            oldest: Option<i64>,
        }
        let sql = self.sql();
        let open: OpenStats = sql
            .exec(
                "SELECT COUNT(*) AS n, SUM(bytes) AS bytes FROM open_events",
                None,
            )?
            .one()?;
        let depth: Depth = sql
            .exec(
                "SELECT COUNT(*) AS sealed, COUNT(lease_id) AS leased, SUM(events) AS events, MIN(sealed_ms) AS oldest FROM batches",
                None,
            )?
            .one()?;
        let counts = |query: &str| -> Result<std::collections::BTreeMap<String, u64>> {
            let rows: Vec<Count> = sql.exec(query, None)?.to_array()?;
            Ok(rows
                .into_iter()
                .map(|c| (c.key, c.count.max(0) as u64))
                .collect())
        };
        let stats = ShardStats {
            shard: req
                .headers()
                .get(SHARD_HEADER)?
                .and_then(|s| s.parse::<u32>().ok()),
            open_events: open.n.max(0) as u64,
            open_bytes: open.bytes.unwrap_or(0).max(0) as u64,
            sealed_batches: depth.sealed.max(0) as u64,
            leased_batches: depth.leased.max(0) as u64,
            sealed_events: depth.events.unwrap_or(0).max(0) as u64,
            oldest_sealed_ms: depth.oldest,
            drops: counts("SELECT reason AS key, count FROM drops ORDER BY reason")?,
            notes: counts("SELECT key, count FROM notes ORDER BY key")?,
        };
        http::json(200, &json!(stats))
    }
}

impl DurableObject for QueueShard {
    fn new(state: State, env: Env) -> Self {
        if let Err(e) = state.storage().sql().exec(SCHEMA, None) {
            worker::console_error!("queue shard schema: {e}");
        }
        Self {
            state,
            env,
            suppressed: RefCell::new(None),
        }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        let cfg = match ShardConfig::from_env(&self.env) {
            Ok(c) => c,
            Err(e) => return http::error(503, "bad_config", &e),
        };
        match req.path().as_str() {
            shard_client::APPEND => self.append(req, cfg).await,
            shard_client::LEASE => self.lease(req).await,
            shard_client::ACK => self.ack(req).await,
            shard_client::RENEW => self.renew(req).await,
            shard_client::STATS => self.stats(&req),
            shard_client::SUPPRESS => self.suppress(req).await,
            shard_client::SUPPRESSIONS => self.suppressions(),
            other => http::error(404, "not_found", &format!("queue shard has no {other}")),
        }
    }

    async fn alarm(&self) -> Result<Response> {
        let sealed = self.seal()?;
        Response::ok(format!("sealed {sealed}"))
    }
}
