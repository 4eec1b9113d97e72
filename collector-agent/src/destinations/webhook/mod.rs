//! `kind = "webhook"`: JSON batches to any HTTPS endpoint, signed.
//!
//! Each call is a `POST` to `base_url` with a JSON body:
//!
//! ```json
//! {"destination": "crm_hook", "sent_at": "2026-11-26T10:00:00.000Z",
//!  "items": [{"key": "crm_hook:<person>:pricing_no_purchase_7d:entered:2026-…",
//!             "type": "audience", "action": "entered", "reason": null,
//!             "audience": "pricing_no_purchase_7d",
//!             "person_id": "…", "data": {"user_ids": ["u-1"], "traits": {…}}},
//!            {"key": "crm_hook:<message_id>", "type": "event", "person_id": "…",
//!             "data": {…the event as stored…}}]}
//! ```
//!
//! and the headers of the drain API's signing scheme ([`collector_core::sign`]):
//! `X-Collector-Timestamp` (Unix seconds) and `X-Collector-Signature: v1=<hex>`, the
//! HMAC-SHA256 with the shared secret of `POST \n <path and query> \n <timestamp> \n
//! hex(sha256(body))`. A receiver recomputes it, compares in constant time, and refuses
//! a timestamp more than 300 s from its clock (a replay). An exit's `reason` is
//! `"consent_withdrawn"` when the person's consent no longer allows this destination
//! (forget them), else `null` (they left the audience). `Idempotency-Key` is the
//! SHA-256 of the batch's item keys: a retried batch carries the same one, and each
//! item's `key` names it for good, so a receiver can drop what it has seen.
//!
//! An erasure request sends `{"destination", "sent_at", "type": "delete", "request_id",
//! "person_ids", "user_ids", "anonymous_ids"}`, signed the same way: the receiver
//! deletes everything it holds under those ids.
//!
//! Answers: 2xx is delivered; 408, 429 and 5xx (and timeouts) are retried later,
//! honouring `Retry-After`; any other 4xx rejects the batch (it is split to find the
//! item at fault, which is dead-lettered with the answer).

use async_trait::async_trait;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{call, http_client, Destination, DestinationConfig, Erasure, Item, SendError, What};

pub struct Webhook {
    name: String,
    url: reqwest::Url,
    secret: String,
    http: reqwest::Client,
}

impl Webhook {
    pub fn new(cfg: &DestinationConfig) -> anyhow::Result<Webhook> {
        Ok(Webhook {
            name: cfg.name.clone(),
            url: reqwest::Url::parse(&cfg.base_url)
                .map_err(|e| anyhow::anyhow!("destinations.{}.base_url: {e}", cfg.name))?,
            secret: cfg.secret()?,
            http: http_client(cfg)?,
        })
    }

    /// The body of one call.
    pub fn body(&self, items: &[Item], now_ms: i64) -> Value {
        let items: Vec<Value> = items
            .iter()
            .map(|i| match &i.what {
                What::Audience {
                    audience,
                    entered,
                    withdrawn,
                } => json!({
                    "key": i.key, "type": "audience",
                    "action": if *entered { "entered" } else { "exited" },
                    "reason": if *withdrawn { Some("consent_withdrawn") } else { None },
                    "audience": audience, "person_id": i.person_id, "data": i.payload,
                }),
                What::Event { message_id } => json!({
                    "key": i.key, "type": "event", "message_id": message_id,
                    "person_id": i.person_id, "data": i.payload,
                }),
            })
            .collect();
        json!({
            "destination": self.name,
            "sent_at": collector_core::timestamp::format_ms(now_ms),
            "items": items,
        })
    }
}

/// The idempotency key of a batch: the SHA-256 of its item keys.
fn batch_key(items: &[Item]) -> String {
    let mut h = Sha256::new();
    for i in items {
        h.update(i.key.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

impl Webhook {
    /// Posts a signed body; the answer's status and text, or how it failed.
    async fn post(&self, body: Value, key: String) -> Result<String, SendError> {
        let now = crate::now_ms();
        let body = serde_json::to_vec(&body).map_err(|e| SendError::Reject {
            error: e.to_string(),
        })?;
        let ts = now.div_euclid(1000);
        let path = match self.url.query() {
            Some(q) => format!("{}?{q}", self.url.path()),
            None => self.url.path().to_string(),
        };
        let sig = collector_core::sign::sign(self.secret.as_bytes(), "POST", &path, ts, &body);
        let req = self
            .http
            .post(self.url.clone())
            .header("Content-Type", "application/json")
            .header(collector_core::sign::TIMESTAMP_HEADER, ts.to_string())
            .header(collector_core::sign::SIGNATURE_HEADER, sig)
            .header("Idempotency-Key", key)
            .body(body);
        call(&self.name, req).await?.result(&self.name, None, false)
    }
}

#[async_trait]
impl Destination for Webhook {
    async fn send(&self, items: &[Item]) -> Result<(), SendError> {
        self.post(self.body(items, crate::now_ms()), batch_key(items))
            .await
            .map(|_| ())
    }

    fn removes(&self) -> bool {
        true
    }

    /// A batch with no items and `"test": true`.
    async fn test(&self) -> Result<String, SendError> {
        let mut body = self.body(&[], crate::now_ms());
        body["test"] = Value::Bool(true);
        self.post(body, batch_key(&[])).await
    }

    /// A signed `"type": "delete"` call naming every id of the person (no items);
    /// `Idempotency-Key` is the SHA-256 of `delete:<request id>`.
    async fn erase(&self, who: &Erasure) -> Option<Result<String, SendError>> {
        let body = json!({
            "destination": self.name,
            "sent_at": collector_core::timestamp::format_ms(crate::now_ms()),
            "type": "delete",
            "request_id": who.request_id,
            "person_ids": who.person_ids,
            "user_ids": who.user_ids,
            "anonymous_ids": who.anonymous_ids,
        });
        let key = hex::encode(Sha256::digest(
            format!("delete:{}", who.request_id).as_bytes(),
        ));
        Some(self.post(body, key).await)
    }
}
