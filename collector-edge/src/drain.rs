//! The drain API the agent pulls from. Every request is HMAC-signed with the shared
//! `DRAIN_SECRET` (see `collector_core::sign`); anything unsigned, wrongly signed or
//! outside the ±300 s window gets 401.
//!
//! The request and response types, paths and limits are `collector_core::drain`'s,
//! shared with the agent.
//!
//! - `GET  /drain/info`  → `{"shards": N, "formats": {"batch": 1, "lease": 1}, "format_version": 1}`
//! - `POST /drain/lease` `{"shard", "max_batches", "lease_ms", "flush"}` → a binary
//!   `collector_core::codec::Lease` (sealed batches, a lease id and its expiry)
//! - `POST /drain/ack`   `{"shard", "lease_id"}` → `{"acked": n}` (the batches are deleted)
//! - `POST /drain/renew` `{"shard", "lease_id", "lease_ms"}` → `{"renewed": n}`
//! - `GET  /drain/stats` → per-shard queue depth, drop counters by reason, note counters
//! - `POST /drain/suppressions` `{"add": [digest], "remove": [digest]}` → every shard's
//!   suppression list updated (idempotent) → `{"suppressed": n}`; a digest is
//!   `collector_core::drain::suppression_digest` of an id, never the id
//! - `GET  /drain/suppressions` → `{"digests": [...]}`

use collector_core::drain::{
    AckRequest, DrainInfo, DrainRequestError, DrainStats, Formats, LeaseRequest, RenewRequest,
    ShardRequest, ShardStats, SuppressRequest, ACK_PATH, INFO_PATH, LEASE_PATH, RENEW_PATH,
    STATS_PATH, SUPPRESSIONS_PATH,
};
use collector_core::sign::{verify, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use serde_json::json;
use worker::{Date, Env, Method, Request, Response, Result};

use crate::config::EdgeConfig;
use crate::http;
use crate::shard_client;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOp {
    Info,
    Lease,
    Ack,
    Renew,
    Stats,
    Suppress,
    Suppressions,
}

impl DrainOp {
    pub fn for_path(method: &Method, path: &str) -> Option<DrainOp> {
        match (method, path) {
            (Method::Get, INFO_PATH) => Some(DrainOp::Info),
            (Method::Post, LEASE_PATH) => Some(DrainOp::Lease),
            (Method::Post, ACK_PATH) => Some(DrainOp::Ack),
            (Method::Post, RENEW_PATH) => Some(DrainOp::Renew),
            (Method::Get, STATS_PATH) => Some(DrainOp::Stats),
            (Method::Post, SUPPRESSIONS_PATH) => Some(DrainOp::Suppress),
            (Method::Get, SUPPRESSIONS_PATH) => Some(DrainOp::Suppressions),
            _ => None,
        }
    }
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
    let url = req.inner().url();
    let path = collector_core::url_parts::path_and_query(&url);
    let header = |name: &str| req.headers().get(name).ok().flatten();
    let now_s = (Date::now().as_millis() / 1000) as i64;
    if let Err(e) = verify(
        secret.as_bytes(),
        req.method().as_ref(),
        path,
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
            &json!(DrainInfo {
                shards: cfg.shards,
                format_version: 1,
                formats: Formats::CURRENT,
            }),
        ),
        DrainOp::Lease => to_shard::<LeaseRequest>(env, cfg, &body, shard_client::LEASE).await,
        DrainOp::Ack => to_shard::<AckRequest>(env, cfg, &body, shard_client::ACK).await,
        DrainOp::Renew => to_shard::<RenewRequest>(env, cfg, &body, shard_client::RENEW).await,
        DrainOp::Stats => {
            let mut shards = Vec::new();
            for shard in 0..cfg.shards {
                let mut resp =
                    shard_client::request(env, shard, shard_client::STATS, Method::Get, Vec::new())
                        .await?;
                let stats: ShardStats = resp.json().await?;
                shards.push(stats);
            }
            http::json(200, &json!(DrainStats::from_shards(shards)))
        }
        DrainOp::Suppress => {
            let req: SuppressRequest = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return http::error(400, "bad_suppress_request", &e.to_string()),
            };
            if let Err(e) = req.validate() {
                return http::error(400, "bad_suppress_request", &e);
            }
            // Every shard keeps the whole list (an event's shard does not depend on
            // one id alone). A shard that fails fails the request: the agent retries,
            // and applying the same change again changes nothing.
            let body = serde_json::to_vec(&req)?;
            let mut suppressed = 0u64;
            for shard in 0..cfg.shards {
                let mut resp = shard_client::request(
                    env,
                    shard,
                    shard_client::SUPPRESS,
                    Method::Post,
                    body.clone(),
                )
                .await?;
                if resp.status_code() != 200 {
                    return http::error(
                        503,
                        "queue_unavailable",
                        &format!("shard {shard} did not confirm the suppression list; retry"),
                    );
                }
                let v: serde_json::Value = resp.json().await?;
                suppressed = v["suppressed"].as_u64().unwrap_or(0);
            }
            http::json(200, &json!({"suppressed": suppressed}))
        }
        DrainOp::Suppressions => forward_get(env, 0, shard_client::SUPPRESSIONS).await,
    }
}

async fn forward_get(env: &Env, shard: u32, path: &str) -> Result<Response> {
    let mut resp = shard_client::request(env, shard, path, Method::Get, Vec::new()).await?;
    let status = resp.status_code();
    let bytes = resp.bytes().await?;
    let mut out = Response::from_bytes(bytes)?.with_status(status);
    out.headers_mut().set("Content-Type", "application/json")?;
    Ok(out)
}

/// Parses and validates a request for one shard, then forwards it there.
async fn to_shard<T: ShardRequest>(
    env: &Env,
    cfg: &EdgeConfig,
    body: &[u8],
    path: &str,
) -> Result<Response> {
    let req: T = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return http::error(400, T::BAD_REQUEST_CODE, &e.to_string()),
    };
    if let Err(e) = req.validate(Some(cfg.shards)) {
        return bad_request(&e, T::BAD_REQUEST_CODE);
    }
    forward(env, req.shard(), path, serde_json::to_vec(&req)?).await
}

fn bad_request(e: &DrainRequestError, code: &str) -> Result<Response> {
    let code = match e {
        DrainRequestError::NoSuchShard { .. } => "bad_shard",
        _ => code,
    };
    http::error(400, code, &e.to_string())
}

/// Passes a shard's answer through unchanged (status, content type, body).
async fn forward(env: &Env, shard: u32, path: &str, body: Vec<u8>) -> Result<Response> {
    let mut resp = shard_client::request(env, shard, path, Method::Post, body).await?;
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
