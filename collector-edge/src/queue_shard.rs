//! `QueueShard`: the durable queue, one Durable Object per shard (SQLite storage,
//! migration `v1` in `wrangler.toml`).
//!
//! Each append is one row of `open_chunks`: its events in the sealed batch's own
//! encoding (`codec::encode_events_raw`), without those of suppressed people (counted as
//! `suppressed`). Rows of the older `open_events` (one per event) are still read, so an
//! upgraded shard loses nothing. The open batch is sealed, by concatenation, into one
//! encoded `Batch` blob per `batches` row when it reaches `BATCH_MAX_EVENTS` or `BATCH_MAX_BYTES`, or when the alarm fires `BATCH_MAX_AGE_MS`
//! after its first event. The drain API leases sealed batches (lease id + expiry) and
//! deletes them on ack; a lease that is not acked in time expires and its batches are
//! handed out again.
//!
//! Every handler does its SQL synchronously (no `await` between statements), so each is
//! one atomic unit, and the runtime's output gate holds the response until the writes
//! are durable: a 200 from `/append` means the events are on disk.

use collector_core::codec::{
    decode_append_parts, decode_event, encode_batch_from_parts, encode_events_raw, encode_lease,
    AppendParts, Lease, LeasedBatch,
};
use std::cell::{Cell, RefCell};
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
CREATE TABLE IF NOT EXISTS open_chunks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    events INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    blob BLOB NOT NULL
);
";

#[durable_object]
pub struct QueueShard {
    state: State,
    env: Env,
    /// The suppression list (digests of `user_id` / `anonymous_id` values), read from
    /// storage on first use and kept in step with it by `/suppress` (one instance
    /// serves the object at a time).
    suppressed: RefCell<Option<HashSet<String>>>,
    /// The open batch's events and bytes, read from storage once per instance and
    /// kept in step by every append and seal (no scan per append).
    open: Cell<Option<(i64, i64)>>,
    /// Whether this instance knows an alarm is set (so an append does not ask).
    alarm_set: Cell<bool>,
    /// Whether this instance has stored its shard number.
    shard_stored: Cell<bool>,
    /// The sealing thresholds, read from `env` on the first request.
    config: Cell<Option<ShardConfig>>,
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

    /// The open batch's events and bytes (both tables: appends are chunks; rows of
    /// `open_events` are from before chunks).
    fn open_totals(&self, sql: &SqlStorage) -> Result<(i64, i64)> {
        if let Some(t) = self.open.get() {
            return Ok(t);
        }
        let t: OpenStats = sql
            .exec(
                "SELECT (SELECT COUNT(*) FROM open_events) + (SELECT COALESCE(SUM(events), 0) FROM open_chunks) AS n,
                        (SELECT COALESCE(SUM(bytes), 0) FROM open_events) + (SELECT COALESCE(SUM(bytes), 0) FROM open_chunks) AS bytes",
                None,
            )?
            .one()?;
        let t = (t.n, t.bytes.unwrap_or(0));
        self.open.set(Some(t));
        Ok(t)
    }

    /// Seals every open event into one batch row. Synchronous: one atomic unit. The
    /// chunks are already in the batch's encoding: they are concatenated, not decoded.
    fn seal(&self) -> Result<usize> {
        let sql = self.sql();
        let shape = || worker::Error::RustError("an open row has an unexpected shape".into());
        let mut legacy = Vec::new();
        let mut max_legacy = 0i64;
        for row in sql
            .exec("SELECT seq, event FROM open_events ORDER BY seq", None)?
            .raw()
        {
            let row = row?;
            let (Some(SqlStorageValue::Integer(seq)), Some(SqlStorageValue::Blob(bytes))) =
                (row.first(), row.get(1))
            else {
                return Err(shape());
            };
            max_legacy = *seq;
            match decode_event(bytes) {
                Ok(ev) => legacy.push(ev),
                Err(e) => {
                    // Never silently: count it, and keep going with the rest.
                    worker::console_error!("open event {seq} does not decode: {e}");
                    self.count_drop(&sql, "corrupt_open_event", 1)?;
                }
            }
        }
        let mut parts: Vec<Vec<u8>> = Vec::new();
        let mut n = legacy.len();
        if !legacy.is_empty() {
            parts.push(
                encode_events_raw(&legacy).map_err(|e| worker::Error::RustError(e.to_string()))?,
            );
        }
        let mut max_chunk = 0i64;
        for row in sql
            .exec(
                "SELECT seq, events, blob FROM open_chunks ORDER BY seq",
                None,
            )?
            .raw()
        {
            let row = row?;
            let (
                Some(SqlStorageValue::Integer(seq)),
                Some(SqlStorageValue::Integer(events)),
                Some(SqlStorageValue::Blob(blob)),
            ) = (row.first(), row.get(1), row.get(2))
            else {
                return Err(shape());
            };
            max_chunk = *seq;
            n += *events as usize;
            parts.push(blob.clone());
        }
        if max_legacy == 0 && max_chunk == 0 {
            return Ok(0);
        }
        if n > 0 {
            let sealed_at_ms = now_ms();
            let blob = encode_batch_from_parts(
                self.shard_number()?,
                sealed_at_ms,
                n,
                parts.iter().map(Vec::as_slice),
            )
            .map_err(|e| worker::Error::RustError(e.to_string()))?;
            sql.exec(
                "INSERT INTO batches (blob, events, sealed_ms) VALUES (?, ?, ?)",
                vec![blob.into(), (n as i64).into(), sealed_at_ms.into()],
            )?;
        }
        if max_legacy > 0 {
            sql.exec(
                "DELETE FROM open_events WHERE seq <= ?",
                vec![max_legacy.into()],
            )?;
        }
        if max_chunk > 0 {
            sql.exec(
                "DELETE FROM open_chunks WHERE seq <= ?",
                vec![max_chunk.into()],
            )?;
        }
        self.open.set(Some((0, 0)));
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
        let append = match decode_append_parts(&body) {
            Ok(a) => a,
            Err(e) => return http::error(400, "bad_append", &e.to_string()),
        };
        let shard: i64 = req
            .headers()
            .get(SHARD_HEADER)?
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let sql = self.sql();
        if !self.shard_stored.get() {
            sql.exec(
                "INSERT INTO meta (key, value) VALUES ('shard', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                vec![shard.into()],
            )?;
            self.shard_stored.set(true);
        }
        for (reason, n) in &append.drops {
            self.count_drop(&sql, reason, *n)?;
        }
        for (key, n) in &append.notes {
            self.count_note(&sql, key, *n)?;
        }
        self.load_suppressed(&sql)?;
        let dropped = self.store_events(&sql, &append)?;
        if dropped > 0 {
            self.count_drop(&sql, "suppressed", dropped)?;
        }
        let (n, bytes) = self.open_totals(&sql)?;
        if n as usize >= cfg.batch_max_events || bytes as usize >= cfg.batch_max_bytes {
            self.seal()?;
        } else if n > 0 && !self.alarm_set.get() {
            if self.state.storage().get_alarm().await?.is_none() {
                self.state.storage().set_alarm(cfg.batch_max_age_ms).await?;
            }
            self.alarm_set.set(true);
        }
        http::json(
            200,
            &json!({"ok": true, "appended": append.events - dropped, "suppressed": dropped}),
        )
    }

    /// Appends the events to the open batch as one chunk (one row per append, in
    /// the batch's own encoding, as the front worker sent them), except those of
    /// suppressed people; how many were dropped. Only with a suppression list are the
    /// events decoded (to read their ids) and the kept ones encoded again.
    fn store_events(&self, sql: &SqlStorage, append: &AppendParts<'_>) -> Result<u64> {
        let codec_err = |e: collector_core::CodecError| worker::Error::RustError(e.to_string());
        let suppressed = self.suppressed.borrow();
        let (n, blob, dropped) = match suppressed.as_ref().filter(|s| !s.is_empty()) {
            None => (append.events, append.events_raw.as_ref().to_vec(), 0),
            Some(list) => {
                let events = append.decode_events().map_err(codec_err)?;
                let kept: Vec<collector_core::StoredEvent> = events
                    .into_iter()
                    .filter(|ev| {
                        !is_suppressed(ev.user_id.as_deref(), ev.anonymous_id.as_deref(), |k| {
                            list.contains(k)
                        })
                    })
                    .collect();
                let dropped = append.events - kept.len() as u64;
                let blob = encode_events_raw(&kept).map_err(codec_err)?;
                (kept.len() as u64, blob, dropped)
            }
        };
        if n == 0 {
            return Ok(dropped);
        }
        let (n, bytes) = (n as i64, blob.len() as i64);
        // Read before the insert, so a first read does not count this chunk twice.
        let (open_n, open_bytes) = self.open_totals(sql)?;
        sql.exec(
            "INSERT INTO open_chunks (events, bytes, blob) VALUES (?, ?, ?)",
            vec![n.into(), bytes.into(), blob.into()],
        )?;
        self.open.set(Some((open_n + n, open_bytes + bytes)));
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
        let (open_n, open_bytes) = self.open_totals(&sql)?;
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
            open_events: open_n.max(0) as u64,
            open_bytes: open_bytes.max(0) as u64,
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
            open: Cell::new(None),
            alarm_set: Cell::new(false),
            shard_stored: Cell::new(false),
            config: Cell::new(None),
        }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        let cfg = match self.config.get() {
            Some(c) => c,
            None => match ShardConfig::from_env(&self.env) {
                Ok(c) => {
                    self.config.set(Some(c));
                    c
                }
                Err(e) => return http::error(503, "bad_config", &e),
            },
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
        self.alarm_set.set(false);
        let sealed = self.seal()?;
        Response::ok(format!("sealed {sealed}"))
    }
}
