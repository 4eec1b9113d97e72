//! Client of the edge's signed drain API.

use std::time::Duration;

use collector_core::codec::{decode_lease, Lease};
use collector_core::sign::{sign, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::AgentConfig;

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("edge request failed: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("edge answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("edge sent a lease that does not decode: {0}")]
    Decode(#[from] collector_core::CodecError),
}

impl EdgeError {
    /// Whether trying again later can help (network trouble, 5xx, 429).
    pub fn retryable(&self) -> bool {
        match self {
            EdgeError::Transport(_) => true,
            EdgeError::Status { status, .. } => *status >= 500 || *status == 429,
            EdgeError::Decode(_) => false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct EdgeInfo {
    pub shards: u32,
    pub format_version: u8,
}

#[derive(Clone)]
pub struct EdgeClient {
    http: reqwest::Client,
    base: String,
    secret: String,
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl EdgeClient {
    pub fn new(cfg: &AgentConfig) -> anyhow::Result<EdgeClient> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.request_timeout_ms))
            .build()?;
        Ok(EdgeClient {
            http,
            base: cfg.edge_url.trim_end_matches('/').to_string(),
            secret: cfg.secret()?,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, EdgeError> {
        let ts = now_s();
        let sig = sign(self.secret.as_bytes(), method.as_str(), path, ts, &body);
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(TIMESTAMP_HEADER, ts.to_string())
            .header(SIGNATURE_HEADER, sig);
        if !body.is_empty() {
            req = req.header("Content-Type", "application/json").body(body);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?.to_vec();
        if status != 200 {
            return Err(EdgeError::Status {
                status,
                body: String::from_utf8_lossy(&bytes).chars().take(500).collect(),
            });
        }
        Ok(bytes)
    }

    pub async fn info(&self) -> Result<EdgeInfo, EdgeError> {
        let bytes = self
            .call(reqwest::Method::GET, "/drain/info", Vec::new())
            .await?;
        serde_json::from_slice(&bytes).map_err(|e| EdgeError::Status {
            status: 200,
            body: format!("unexpected /drain/info body: {e}"),
        })
    }

    pub async fn lease(
        &self,
        shard: u32,
        max_batches: u32,
        lease_ms: u64,
        flush: bool,
    ) -> Result<Lease, EdgeError> {
        let body = json!({"shard": shard, "max_batches": max_batches, "lease_ms": lease_ms, "flush": flush});
        let bytes = self
            .call(
                reqwest::Method::POST,
                "/drain/lease",
                body.to_string().into_bytes(),
            )
            .await?;
        Ok(decode_lease(&bytes)?)
    }

    /// Acks a lease; returns how many batches the edge deleted (0 if the lease had
    /// expired and been handed out again: the next holder loads them idempotently).
    pub async fn ack(&self, shard: u32, lease_id: &str) -> Result<u64, EdgeError> {
        let body = json!({"shard": shard, "lease_id": lease_id});
        let bytes = self
            .call(
                reqwest::Method::POST,
                "/drain/ack",
                body.to_string().into_bytes(),
            )
            .await?;
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(v.get("acked").and_then(Value::as_u64).unwrap_or(0))
    }

    /// Queue depth and drop counters by reason, per shard and in total.
    pub async fn stats(&self) -> Result<Value, EdgeError> {
        let bytes = self
            .call(reqwest::Method::GET, "/drain/stats", Vec::new())
            .await?;
        Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
}
