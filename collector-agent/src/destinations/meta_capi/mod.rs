//! `kind = "meta_capi"`: events to Meta's Conversions API,
//! `POST {base_url}/{pixel_id}/events` with a JSON body `{"data": [...],
//! "access_token": …}` (the token from `secret_env`).
//!
//! Each event: `event_name` (Segment's e-commerce names become Meta's standard ones:
//! Order Completed → Purchase, Product Added → AddToCart, Checkout Started →
//! InitiateCheckout, Product Viewed → ViewContent; others as sent), `event_time` (Unix
//! seconds), `event_id` = the `messageId` (Meta drops the pixel's copy of the same
//! event), `action_source = "website"`, `event_source_url`, and `user_data` with the
//! SHA-256 that Meta requires of the normalised email (`em`) and phone (digits with the
//! country code, `ph`), computed at send time from the values opened from their sealed
//! copies, plus `external_id` (SHA-256 of the user id) and the (reduced) user agent;
//! `custom_data` carries `value` (`revenue`, `total` or `value`) and `currency`.
//!
//! Meta takes events at most 7 days old: an older one is never sent (a dead letter
//! saying so). One bad event rejects the whole batch, so a rejected batch is split
//! until the event at fault is alone. Answers: 2xx sent; 429, 5xx and Graph API errors
//! marked transient or with a rate-limit code (4, 17, 32, 613) are retried.

use async_trait::async_trait;
use collector_core::pii::PiiKind;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::{call, http_client, Destination, DestinationConfig, Item, SendError, What};

/// The most events Meta takes in one call.
const MAX_EVENTS: usize = 1_000;
/// How old an event Meta still accepts.
const MAX_AGE_MS: i64 = 7 * 86_400_000;

pub struct MetaCapi {
    name: String,
    url: String,
    token: String,
    http: reqwest::Client,
}

fn sha256(v: &str) -> String {
    hex::encode(Sha256::digest(v.as_bytes()))
}

/// Meta's name for a Segment e-commerce event.
pub fn event_name(segment: &str) -> &str {
    match segment {
        "Order Completed" => "Purchase",
        "Product Added" => "AddToCart",
        "Checkout Started" => "InitiateCheckout",
        "Product Viewed" => "ViewContent",
        "Products Searched" => "Search",
        "Signed Up" => "CompleteRegistration",
        other => other,
    }
}

impl MetaCapi {
    pub fn new(cfg: &DestinationConfig) -> anyhow::Result<MetaCapi> {
        Ok(MetaCapi {
            name: cfg.name.clone(),
            url: format!(
                "{}/{}/events",
                cfg.base_url.trim_end_matches('/'),
                cfg.pixel_id.clone().unwrap_or_default()
            ),
            token: cfg.secret()?,
            http: http_client(cfg)?,
        })
    }

    /// One event of the `data` array.
    pub fn event(item: &Item) -> Value {
        let ev = &item.payload;
        let name = ev["event"].as_str().unwrap_or("");
        let ts: i64 = ev["timestamp"]
            .as_str()
            .and_then(collector_core::timestamp::parse_ms)
            .unwrap_or(0);
        let mut user = Map::new();
        if let Some(e) = &item.contact.email {
            user.insert("em".into(), json!([sha256(e)]));
        }
        if let Some(p) = &item.contact.phone {
            let digits: String = p.chars().filter(char::is_ascii_digit).collect();
            user.insert("ph".into(), json!([sha256(&digits)]));
        }
        if let Some(u) = ev["userId"].as_str() {
            user.insert("external_id".into(), json!([sha256(u)]));
        }
        if let Some(ua) = ev["context"]["userAgent"].as_str() {
            user.insert("client_user_agent".into(), json!(ua));
        }
        let props = &ev["properties"];
        let mut custom = Map::new();
        if let Some(v) = ["revenue", "total", "value"]
            .iter()
            .find_map(|k| props[*k].as_f64())
        {
            custom.insert("value".into(), json!(v));
        }
        if let Some(c) = props["currency"].as_str() {
            custom.insert("currency".into(), json!(c));
        }
        let message_id = match &item.what {
            What::Event { message_id } => message_id.as_str(),
            What::Audience { .. } => item.key.as_str(),
        };
        let mut out = json!({
            "event_name": event_name(name),
            "event_time": ts.div_euclid(1000),
            "event_id": message_id,
            "action_source": "website",
            "user_data": user,
        });
        if let Some(url) = ev["context"]["page"]["url"].as_str() {
            out["event_source_url"] = json!(url);
        }
        if !custom.is_empty() {
            out["custom_data"] = Value::Object(custom);
        }
        out
    }

    async fn post(&self, body: Value) -> Result<String, SendError> {
        let answer = call(&self.name, self.http.post(&self.url).json(&body)).await?;
        let err: Value = serde_json::from_str(&answer.text).unwrap_or(Value::Null);
        let code = err["error"]["code"].as_u64();
        let transient = err["error"]["is_transient"].as_bool() == Some(true)
            || matches!(code, Some(4 | 17 | 32 | 613));
        let message = err["error"]["message"].as_str().map(str::to_string);
        answer.result(&self.name, message, transient)
    }
}

#[async_trait]
impl Destination for MetaCapi {
    async fn send(&self, items: &[Item]) -> Result<(), SendError> {
        let now = crate::now_ms();
        // An event Meta would refuse for its age is never sent; alone, it is the dead
        // letter; in a batch, the batch is split to single it out.
        for item in items {
            let ts: i64 = item.payload["timestamp"]
                .as_str()
                .and_then(collector_core::timestamp::parse_ms)
                .unwrap_or(0);
            if now - ts > MAX_AGE_MS {
                return Err(SendError::Reject {
                    error: format!(
                        "{}: {} is older than the 7 days Meta accepts",
                        self.name, item.key
                    ),
                });
            }
        }
        let data: Vec<Value> = items.iter().map(Self::event).collect();
        self.post(json!({"data": data, "access_token": self.token}))
            .await
            .map(|_| ())
    }

    fn removes(&self) -> bool {
        false
    }

    /// An empty `data` array: Meta checks the pixel and the token and records nothing.
    async fn test(&self) -> Result<String, SendError> {
        self.post(
            json!({"data": [], "access_token": self.token, "test_event_code": "COLLECTOR_TEST"}),
        )
        .await
    }

    fn contact_kinds(&self) -> &'static [PiiKind] {
        &[PiiKind::Email, PiiKind::Phone]
    }

    fn max_batch(&self) -> usize {
        MAX_EVENTS
    }
}
