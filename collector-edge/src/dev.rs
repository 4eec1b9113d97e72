//! Development-only endpoints (answered only when `DEV_MODE=true`).
//!
//! `POST /dev/bench/pipeline?iterations=N&privacy=true|false` runs the ingest pipeline
//! (parse, validate and, with `privacy=true`, the privacy policy) N times over the posted
//! `/v1/batch` body and stores nothing. The Workers clock stands still while a request
//! computes, so `cargo xtask bench` measures this request's CPU time from outside
//! (workerd's process accounting) to get the per-event cost inside the runtime.
//!
//! `POST /dev/inject?shard=N` appends the posted JSON array of `StoredEvent`s to shard N
//! as they are, skipping validation and the privacy policy: tests plant an event the
//! warehouse will refuse (a poison event) to check the agent quarantines it. Never
//! answered in production (`DEV_MODE` is off).

use collector_core::codec::Append;
use collector_core::ingest::{parse_body_with_privacy, Endpoint};
use collector_core::privacy::RequestSignals;
use collector_core::StoredEvent;
use serde_json::json;
use worker::{Env, Request, Response, Result};

use crate::config::EdgeConfig;
use crate::http;
use crate::shard_client;

pub async fn handle_inject(mut req: Request, env: &Env, cfg: &EdgeConfig) -> Result<Response> {
    if !cfg.dev_mode {
        return http::error(404, "not_found", "no route for /dev/inject");
    }
    let shard = collector_core::url_parts::query_param(&req.inner().url(), "shard")
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|s| *s < cfg.shards);
    let Some(shard) = shard else {
        return http::error(400, "bad_shard", "?shard=N must name an existing shard");
    };
    let events: Vec<StoredEvent> = match serde_json::from_slice(&req.bytes().await?) {
        Ok(e) => e,
        Err(e) => return http::error(400, "malformed_json", &e.to_string()),
    };
    let n = events.len();
    let append = Append {
        events,
        ..Append::default()
    };
    if let Err(e) = shard_client::append(env, shard, &append).await {
        return http::error(503, "queue_unavailable", &e.to_string());
    }
    http::json(200, &json!({"injected": n, "shard": shard}))
}

pub async fn handle_bench_pipeline(mut req: Request, cfg: &EdgeConfig) -> Result<Response> {
    if !cfg.dev_mode {
        return http::error(404, "not_found", "no route for /dev/bench/pipeline");
    }
    let url = req.inner().url();
    let param = |k: &str| collector_core::url_parts::query_param(&url, k);
    let iterations: u32 = param("iterations")
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
        .min(100_000);
    let with_privacy = param("privacy").as_deref() != Some("false");
    let body = req.bytes().await?;
    let signals = RequestSignals {
        country: param("country"),
        ip: Some("203.0.113.9".into()),
        ..RequestSignals::default()
    };
    let mut events = 0usize;
    if param("floor").as_deref() == Some("true") {
        // The floor of the same work: the events parsed as `serde_json::Value`, two
        // HMACs each, encoded back to JSON text.
        let hasher = collector_core::pii::PiiHasher::new("v1", b"bench-key-bench-key", &[]);
        for _ in 0..iterations {
            let v: serde_json::Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return http::error(400, "bad_json", &e.to_string()),
            };
            for ev in v["batch"].as_array().into_iter().flatten() {
                let a = hasher.hash_normalised(ev["anonymousId"].as_str().unwrap_or_default());
                let b =
                    hasher.hash_normalised(ev["properties"]["email"].as_str().unwrap_or_default());
                let text = serde_json::to_string(ev).unwrap_or_default();
                events += usize::from(!a.is_empty() && !b.is_empty() && !text.is_empty());
            }
        }
        return http::json(
            200,
            &json!({"iterations": iterations, "events": events, "floor": true}),
        );
    }
    for _ in 0..iterations {
        let privacy = with_privacy.then_some((&cfg.privacy, &signals));
        match parse_body_with_privacy(Endpoint::Batch, &body, 0, &mut || "bench".into(), privacy) {
            Ok(p) => events += p.accepted.len() + p.withheld.len(),
            Err(e) => return http::error(e.status(), e.code(), &e.to_string()),
        }
    }
    http::json(
        200,
        &json!({"iterations": iterations, "events": events, "privacy": with_privacy}),
    )
}
