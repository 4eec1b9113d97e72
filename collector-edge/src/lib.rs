//! `collector-edge`: the Cloudflare Worker.
//!
//! The fetch entry point only routes to named handlers:
//! - `OPTIONS /v1/*`               → [`http::preflight`] (CORS)
//! - `POST /v1/{track,page,…,batch}` and the short forms `/v1/{t,p,i,g,a,s,b}` →
//!   [`ingest::handle_ingest`]
//! - `/drain/*`                    → [`drain::handle_drain`] (HMAC-signed, for the agent)
//! - `GET /health`                 → liveness
//! - `POST /dev/bench/pipeline`    → [`dev::handle_bench_pipeline`] (only with `DEV_MODE=true`)
//! - `POST /dev/inject`            → [`dev::handle_inject`] (only with `DEV_MODE=true`)
//!
//! The durable queue is [`queue_shard::QueueShard`].

pub mod config;
pub mod dev;
pub mod drain;
pub mod http;
pub mod ingest;
pub mod queue_shard;
pub mod shard_client;

use collector_core::ingest::endpoint_for_path;
use worker::{event, Context, Env, Method, Request, Response, Result};

use crate::config::EdgeConfig;
use crate::drain::{handle_drain, DrainOp};
use crate::ingest::handle_ingest;

#[event(fetch)]
async fn fetch(req: Request, env: Env, _ctx: Context) -> Result<Response> {
    let cfg = match EdgeConfig::cached(&env) {
        Ok(cfg) => cfg,
        Err(e) => {
            worker::console_error!("{e}");
            return http::error(503, "bad_config", &e);
        }
    };
    let path = req.path();
    let method = req.method();
    if let Some(endpoint) = endpoint_for_path(&path) {
        let origin = http::origin(&req);
        if let Some(o) = origin.as_deref() {
            if method != Method::Options && !cfg.allowed_origins.allows(o) {
                return http::error(
                    403,
                    "origin_not_allowed",
                    &format!("origin {o:?} is not in ALLOWED_ORIGINS"),
                );
            }
        }
        let resp = match method {
            Method::Options => return http::preflight(origin.as_deref(), &cfg.allowed_origins),
            Method::Post => handle_ingest(req, &env, &cfg, endpoint).await?,
            _ => http::error(405, "method_not_allowed", "the tracking API takes POST")?,
        };
        return http::with_cors(resp, origin.as_deref(), &cfg.allowed_origins);
    }
    if let Some(op) = DrainOp::for_path(&method, &path) {
        return handle_drain(req, &env, &cfg, op).await;
    }
    match (method, path.as_str()) {
        (Method::Get, "/health") => http::json(200, &serde_json::json!({"ok": true})),
        (Method::Post, "/dev/bench/pipeline") => dev::handle_bench_pipeline(req, &cfg).await,
        (Method::Post, "/dev/inject") => dev::handle_inject(req, &env, &cfg).await,
        (_, p) => http::error(404, "not_found", &format!("no route for {p}")),
    }
}
