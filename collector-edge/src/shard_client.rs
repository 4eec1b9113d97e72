//! Talking to a queue shard's Durable Object from the front worker: the one place that
//! knows how a shard is addressed. `ingest` appends through it, `drain` leases and acks
//! through it, and `queue_shard` only reads [`SHARD_HEADER`] (no module cycle).

use collector_core::codec::{encode_append, Append};
use worker::{Date, Env, Method, Request, RequestInit, Response, Result};

use crate::config::QUEUE_BINDING;

/// Header carrying the shard number from the front worker.
pub const SHARD_HEADER: &str = "x-collector-shard";

/// Paths of a shard's own (internal) API.
pub const APPEND: &str = "/append";
pub const LEASE: &str = "/lease";
pub const ACK: &str = "/ack";
pub const RENEW: &str = "/renew";
pub const STATS: &str = "/stats";
pub const SUPPRESS: &str = "/suppress";
pub const SUPPRESSIONS: &str = "/suppressions";

/// A fresh random UUID v4 (the runtime's CSPRNG via `crypto.getRandomValues`).
pub fn new_uuid() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::getrandom(&mut bytes).is_err() {
        // Without randomness we still need a unique id: fall back to time + counter.
        let now = Date::now().as_millis();
        bytes[..8].copy_from_slice(&now.to_le_bytes());
    }
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// Writes to one shard; `Ok` only when the Durable Object confirmed the write.
pub async fn append(env: &Env, shard: u32, append: &Append) -> Result<()> {
    let body = encode_append(append).map_err(|e| worker::Error::RustError(e.to_string()))?;
    let resp = request(env, shard, APPEND, Method::Post, body).await?;
    if resp.status_code() != 200 {
        return Err(worker::Error::RustError(format!(
            "shard {shard} answered {}",
            resp.status_code()
        )));
    }
    Ok(())
}

/// Sends a request to queue shard `shard`'s Durable Object.
pub async fn request(
    env: &Env,
    shard: u32,
    path: &str,
    method: Method,
    body: Vec<u8>,
) -> Result<Response> {
    let ns = env.durable_object(QUEUE_BINDING)?;
    let stub = ns.id_from_name(&format!("shard-{shard}"))?.get_stub()?;
    let mut init = RequestInit::new();
    init.with_method(method);
    if !body.is_empty() {
        init.with_body(Some(js_bytes(&body)));
    }
    let headers = worker::Headers::new();
    headers.set(SHARD_HEADER, &shard.to_string())?;
    init.with_headers(headers);
    let req = Request::new_with_init(&format!("https://queue-shard{path}"), &init)?;
    stub.fetch_with_request(req).await
}

fn js_bytes(body: &[u8]) -> wasm_bindgen::JsValue {
    let arr = js_sys::Uint8Array::new_with_length(body.len() as u32);
    arr.copy_from(body);
    arr.into()
}
