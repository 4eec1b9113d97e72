//! `handle_ingest`: the Segment-compatible tracking API.
//!
//! Read (and gunzip) the body, authenticate the write key, parse with
//! `collector_core::ingest`, fan the accepted events out to their queue shards, and
//! answer 200 only once every shard write has succeeded.

use std::collections::BTreeMap;

use base64::Engine;
use collector_core::codec::Append;
use collector_core::ingest::{parse_body_with_privacy, Endpoint, Parsed};
use collector_core::limits::{MAX_COMPRESSED_REQUEST_BYTES, MAX_REQUEST_BYTES};
use collector_core::privacy::RequestSignals;
use collector_core::shard::shard_for_event;
use collector_core::RequestError;
use serde_json::json;
use worker::{Date, Env, Request, Response, Result};

use crate::config::EdgeConfig;
use crate::http;
use crate::shard_client::{self, new_uuid};

/// The write key from `Authorization: Basic base64(key:)`, if that header is present.
fn basic_auth_key(req: &Request) -> Option<Option<String>> {
    let header = req.headers().get("Authorization").ok().flatten()?;
    let Some(encoded) = header
        .strip_prefix("Basic ")
        .or_else(|| header.strip_prefix("basic "))
    else {
        return Some(None);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok());
    Some(decoded.map(|s| s.split(':').next().unwrap_or_default().to_string()))
}

fn request_error(e: &RequestError) -> Result<Response> {
    http::error(e.status(), e.code(), &e.to_string())
}

async fn read_body(req: &Request, raw: Vec<u8>) -> std::result::Result<Vec<u8>, RequestError> {
    let encoding = req
        .headers()
        .get("Content-Encoding")
        .ok()
        .flatten()
        .map(|e| e.trim().to_ascii_lowercase())
        .unwrap_or_default();
    match encoding.as_str() {
        "" | "identity" => Ok(raw),
        "gzip" | "x-gzip" => gunzip(&raw).await,
        other => Err(RequestError::UnsupportedEncoding(other.to_string())),
    }
}

#[wasm_bindgen::prelude::wasm_bindgen(inline_js = r#"
export async function collectorGunzip(bytes, limit) {
  const reader = new Blob([bytes]).stream()
    .pipeThrough(new DecompressionStream("gzip")).getReader();
  const parts = [];
  let total = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    parts.push(value);
    total += value.byteLength;
    if (total > limit) { await reader.cancel(); break; }
  }
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.byteLength; }
  return out;
}
"#)]
extern "C" {
    #[wasm_bindgen(catch, js_name = collectorGunzip)]
    async fn collector_gunzip(
        bytes: &[u8],
        limit: f64,
    ) -> std::result::Result<wasm_bindgen::JsValue, wasm_bindgen::JsValue>;
}

/// Inflates a gzip body with the runtime's own `DecompressionStream` (native zlib; no
/// inflate code in the worker), reading it chunk by chunk and stopping just past
/// [`MAX_REQUEST_BYTES`], so a small body that inflates to gigabytes costs no more
/// than the limit (the caller answers 413 for what is over it).
async fn gunzip(raw: &[u8]) -> std::result::Result<Vec<u8>, RequestError> {
    match collector_gunzip(raw, MAX_REQUEST_BYTES as f64).await {
        Ok(v) => Ok(js_sys::Uint8Array::new(&v).to_vec()),
        Err(e) => Err(RequestError::BadEncoding(
            js_sys::Error::from(e)
                .message()
                .as_string()
                .unwrap_or_else(|| "not a valid gzip stream".into()),
        )),
    }
}

pub async fn handle_ingest(
    mut req: Request,
    env: &Env,
    cfg: &EdgeConfig,
    endpoint: Endpoint,
) -> Result<Response> {
    let received_at_ms = Date::now().as_millis() as i64;
    if let Ok(Some(len)) = req.headers().get("Content-Length") {
        if let Ok(len) = len.trim().parse::<usize>() {
            if len > MAX_COMPRESSED_REQUEST_BYTES {
                return request_error(&RequestError::TooLarge {
                    size: len,
                    limit: MAX_COMPRESSED_REQUEST_BYTES,
                });
            }
        }
    }
    let raw = match req.bytes().await {
        Ok(raw) => raw,
        Err(e) => {
            return http::error(
                400,
                "unreadable_body",
                &format!("request body could not be read: {e}"),
            )
        }
    };
    if raw.len() > MAX_COMPRESSED_REQUEST_BYTES {
        return request_error(&RequestError::TooLarge {
            size: raw.len(),
            limit: MAX_COMPRESSED_REQUEST_BYTES,
        });
    }
    let header_key = basic_auth_key(&req);
    if let Some(key) = &header_key {
        match key {
            Some(k) if cfg.accepts_write_key(k) => {}
            _ => {
                return http::error(
                    401,
                    "invalid_write_key",
                    "the write key in Authorization is not valid",
                )
            }
        }
    }
    let body = match read_body(&req, raw).await {
        Ok(b) => b,
        Err(e) => return request_error(&e),
    };
    let signals = request_signals(&req, cfg);
    let privacy = Some((&cfg.privacy, &signals));
    let parsed =
        match parse_body_with_privacy(endpoint, &body, received_at_ms, &mut new_uuid, privacy) {
            Ok(p) => p,
            Err(e) => {
                if header_key.is_some() {
                    // An authenticated client sent a request we cannot read: count it.
                    let drop = Append {
                        drops: vec![(format!("request_{}", e.code()), 1)],
                        ..Append::default()
                    };
                    let _ = shard_client::append(env, 0, &drop).await;
                }
                return request_error(&e);
            }
        };
    if header_key.is_none() {
        match &parsed.write_key {
            None => {
                return http::error(
                    401,
                    "missing_write_key",
                    "no write key: send it as the HTTP Basic username or as `writeKey` in the body",
                )
            }
            Some(k) if !cfg.accepts_write_key(k) => {
                return http::error(
                    401,
                    "invalid_write_key",
                    "the write key in the body is not valid",
                )
            }
            Some(_) => {}
        }
    }
    enqueue_and_respond(env, cfg, parsed).await
}

/// What the request itself says about the visitor's consent and location.
fn request_signals(req: &Request, cfg: &EdgeConfig) -> RequestSignals {
    let header = |name: &str| req.headers().get(name).ok().flatten();
    let tcf_cookie = header("Cookie").and_then(|c| {
        c.split(';')
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == "euconsent-v2")
            .map(|(_, v)| v.to_string())
    });
    let dev_country = if cfg.dev_mode {
        header("X-Collector-Country")
    } else {
        None
    };
    let country = dev_country.or_else(|| req.cf().and_then(|cf| cf.country()));
    RequestSignals::new(
        header("Sec-GPC").is_some_and(|v| v.trim() == "1"),
        tcf_cookie,
        country,
        header("CF-Connecting-IP"),
    )
}

async fn enqueue_and_respond(env: &Env, cfg: &EdgeConfig, parsed: Parsed) -> Result<Response> {
    let Parsed {
        accepted,
        rejected,
        withheld,
        client_drops,
        notes,
        ..
    } = parsed;
    let accepted_count = accepted.len();
    let mut per_shard: BTreeMap<u32, Append> = BTreeMap::new();
    for ev in accepted {
        let shard = shard_for_event(
            ev.anonymous_id.as_deref(),
            ev.user_id.as_deref(),
            &ev.message_id,
            &cfg.privacy.policy.block_list,
            cfg.shards,
        );
        per_shard.entry(shard).or_default().events.push(ev);
    }
    if !rejected.is_empty() || !withheld.is_empty() || !client_drops.is_empty() {
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for (reason, n) in &client_drops {
            *counts.entry(reason.as_str()).or_default() += n;
        }
        for r in &rejected {
            *counts.entry(r.error.code()).or_default() += 1;
        }
        for w in &withheld {
            *counts.entry(w.reason.as_str()).or_default() += 1;
        }
        let target = per_shard.keys().next().copied().unwrap_or(0);
        per_shard.entry(target).or_default().drops = counts
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
    }
    if !notes.is_empty() {
        // Counted with the events, in the same atomic shard write.
        let target = per_shard.keys().next().copied().unwrap_or(0);
        per_shard.entry(target).or_default().notes = notes.to_vec();
    }
    let writes = per_shard
        .iter()
        .map(|(shard, append)| shard_client::append(env, *shard, append));
    let results = futures_util::future::join_all(writes).await;
    if let Some(err) = results.into_iter().find_map(|r| r.err()) {
        worker::console_error!("queue write failed: {err}");
        let mut resp = http::error(
            503,
            "queue_unavailable",
            "the event queue did not confirm the write; retry the request",
        )?;
        resp.headers_mut().set("Retry-After", "1")?;
        return Ok(resp);
    }
    if rejected.is_empty() {
        return http::success();
    }
    let status = rejected
        .iter()
        .map(|r| r.error.status())
        .max()
        .unwrap_or(400);
    let first = &rejected[0].error;
    let details: Vec<_> = rejected
        .iter()
        .map(|r| json!({"index": r.index, "code": r.error.code(), "reason": r.error.to_string()}))
        .collect();
    let message = if rejected.len() == 1 && rejected[0].index.is_none() {
        first.to_string()
    } else {
        format!(
            "{} event(s) rejected, {} accepted; first: {}",
            rejected.len(),
            accepted_count,
            first
        )
    };
    http::json(
        status,
        &json!({
            "success": false,
            "code": first.code(),
            "error": message,
            "accepted": accepted_count,
            "rejected": details,
        }),
    )
}
