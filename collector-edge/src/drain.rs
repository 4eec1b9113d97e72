//! The drain API the agent pulls from. Every request is HMAC-signed with the shared
//! `DRAIN_SECRET` (see `collector_core::sign`); anything unsigned, wrongly signed or
//! outside the ±300 s window gets 401.
//!
//! - `GET  /drain/info`  → `{"shards": N, "format_version": 1}`
//! - `POST /drain/lease` `{"shard", "max_batches", "lease_ms", "flush"}` → a binary
//!   `collector_core::codec::Lease` (sealed batches, a lease id and its expiry)
//! - `POST /drain/ack`   `{"shard", "lease_id"}` → `{"acked": n}` (the batches are deleted)
//! - `GET  /drain/stats` → per-shard queue depth and drop counters by reason

use collector_core::codec::FORMAT_VERSION;
use collector_core::sign::{verify, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use worker::{Date, Env, Method, Request, Response, Result};

use crate::config::EdgeConfig;
use crate::http;
use crate::ingest::shard_request;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOp {
    Info,
    Lease,
    Ack,
    Stats,
}

impl DrainOp {
    pub fn for_path(method: &Method, path: &str) -> Option<DrainOp> {
        match (method, path) {
            (Method::Get, "/drain/info") => Some(DrainOp::Info),
            (Method::Post, "/drain/lease") => Some(DrainOp::Lease),
            (Method::Post, "/drain/ack") => Some(DrainOp::Ack),
            (Method::Get, "/drain/stats") => Some(DrainOp::Stats),
            _ => None,
        }
    }
}

/// Body of `POST /drain/lease`, also what the front worker forwards to a shard.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub shard: u32,
    /// Most sealed batches to hand out (1..=100).
    #[serde(default = "default_max_batches")]
    pub max_batches: u32,
    /// How long the lease holds before the batches are handed out again.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: i64,
    /// Seal the open batch first, so everything accepted so far can be drained.
    #[serde(default)]
    pub flush: bool,
}

fn default_max_batches() -> u32 {
    10
}
fn default_lease_ms() -> i64 {
    30_000
}

/// Body of `POST /drain/ack`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckRequest {
    pub shard: u32,
    pub lease_id: String,
}

pub async fn handle_drain(
    mut req: Request,
    env: &Env,
    cfg: &EdgeConfig,
    op: DrainOp,
) -> Result<Response> {
    let Some(secret) = &cfg.drain_secret else {
        return http::error(
            401,
            "drain_disabled",
            "DRAIN_SECRET is not configured on this edge",
        );
    };
    let body = req.bytes().await.unwrap_or_default();
    let url = req.url()?;
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let header = |name: &str| req.headers().get(name).ok().flatten();
    let now_s = (Date::now().as_millis() / 1000) as i64;
    if let Err(e) = verify(
        secret.as_bytes(),
        req.method().as_ref(),
        &path,
        &body,
        header(TIMESTAMP_HEADER).as_deref(),
        header(SIGNATURE_HEADER).as_deref(),
        now_s,
    ) {
        return http::error(e.status(), "unauthorized", &e.to_string());
    }
    match op {
        DrainOp::Info => http::json(
            200,
            &json!({"shards": cfg.shards, "format_version": FORMAT_VERSION}),
        ),
        DrainOp::Lease => {
            let lease: LeaseRequest = match serde_json::from_slice(&body) {
                Ok(l) => l,
                Err(e) => return http::error(400, "bad_lease_request", &e.to_string()),
            };
            if lease.shard >= cfg.shards {
                return bad_shard(lease.shard, cfg);
            }
            if !(1..=100).contains(&lease.max_batches)
                || !(1_000..=3_600_000).contains(&lease.lease_ms)
            {
                return http::error(
                    400,
                    "bad_lease_request",
                    "max_batches must be 1..=100 and lease_ms 1000..=3600000",
                );
            }
            let body = serde_json::to_vec(&lease)?;
            forward(env, lease.shard, "/lease", body).await
        }
        DrainOp::Ack => {
            let ack: AckRequest = match serde_json::from_slice(&body) {
                Ok(a) => a,
                Err(e) => return http::error(400, "bad_ack_request", &e.to_string()),
            };
            if ack.shard >= cfg.shards {
                return bad_shard(ack.shard, cfg);
            }
            let body = serde_json::to_vec(&ack)?;
            forward(env, ack.shard, "/ack", body).await
        }
        DrainOp::Stats => {
            let mut shards = Vec::new();
            let mut totals = serde_json::Map::new();
            for shard in 0..cfg.shards {
                let mut resp = shard_request(env, shard, "/stats", Method::Get, Vec::new()).await?;
                let stats: Value = resp.json().await?;
                if let Some(drops) = stats.get("drops").and_then(Value::as_object) {
                    for (reason, n) in drops {
                        let prev = totals.get(reason).and_then(Value::as_u64).unwrap_or(0);
                        totals.insert(reason.clone(), json!(prev + n.as_u64().unwrap_or(0)));
                    }
                }
                shards.push(stats);
            }
            http::json(200, &json!({"shards": shards, "drops": totals}))
        }
    }
}

fn bad_shard(shard: u32, cfg: &EdgeConfig) -> Result<Response> {
    http::error(
        400,
        "bad_shard",
        &format!(
            "shard {shard} does not exist; this edge has {} shards",
            cfg.shards
        ),
    )
}

/// Passes a shard's answer through unchanged (status, content type, body).
async fn forward(env: &Env, shard: u32, path: &str, body: Vec<u8>) -> Result<Response> {
    let mut resp = shard_request(env, shard, path, Method::Post, body).await?;
    let status = resp.status_code();
    let content_type = resp
        .headers()
        .get("Content-Type")?
        .unwrap_or_else(|| "application/octet-stream".into());
    let bytes = resp.bytes().await?;
    let mut out = Response::from_bytes(bytes)?.with_status(status);
    out.headers_mut().set("Content-Type", &content_type)?;
    Ok(out)
}
