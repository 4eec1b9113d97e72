//! Client of the edge's signed drain API: the request and response types, paths and
//! limits are `collector_core::drain`'s, shared with the edge.

use std::time::Duration;

use collector_core::codec::{decode_lease, Lease};
use collector_core::drain::{
    AckRequest, AckResponse, DrainInfo, DrainStats, LeaseRequest, RenewRequest, RenewResponse,
    SuppressRequest, SuppressedId, Suppressions, ACK_PATH, INFO_PATH, LEASE_PATH, RENEW_PATH,
    STATS_PATH, SUPPRESSIONS_PATH,
};
use collector_core::sign::{sign, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use serde::de::DeserializeOwned;

use crate::config::AgentConfig;

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("edge request failed: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("edge answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("edge sent a lease that does not decode: {0}")]
    Decode(#[from] collector_core::CodecError),
    #[error("edge sent an unexpected {path} body: {error}")]
    Body { path: &'static str, error: String },
    #[error(transparent)]
    Request(#[from] collector_core::drain::DrainRequestError),
    /// The task making the request ended without an answer (it panicked).
    #[error("edge request task failed: {0}")]
    Task(String),
}

impl EdgeError {
    /// Whether trying again later can help (network trouble, 5xx, 429).
    pub fn retryable(&self) -> bool {
        match self {
            EdgeError::Transport(_) | EdgeError::Task(_) => true,
            EdgeError::Status { status, .. } => *status >= 500 || *status == 429,
            EdgeError::Decode(_) | EdgeError::Body { .. } | EdgeError::Request(_) => false,
        }
    }
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

    async fn call_json<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &'static str,
        body: Vec<u8>,
    ) -> Result<T, EdgeError> {
        let bytes = self.call(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| EdgeError::Body {
            path,
            error: e.to_string(),
        })
    }

    pub async fn info(&self) -> Result<DrainInfo, EdgeError> {
        self.call_json(reqwest::Method::GET, INFO_PATH, Vec::new())
            .await
    }

    pub async fn lease(
        &self,
        shard: u32,
        max_batches: u32,
        lease_ms: u64,
        flush: bool,
    ) -> Result<Lease, EdgeError> {
        let req = LeaseRequest {
            shard,
            max_batches,
            lease_ms: i64::try_from(lease_ms).unwrap_or(i64::MAX),
            flush,
        };
        req.validate(None)?;
        let body = serde_json::to_vec(&req).map_err(|e| EdgeError::Body {
            path: LEASE_PATH,
            error: e.to_string(),
        })?;
        let bytes = self.call(reqwest::Method::POST, LEASE_PATH, body).await?;
        Ok(decode_lease(&bytes)?)
    }

    /// Acks a lease; returns how many batches the edge deleted (0 if the lease had
    /// expired and been handed out again: the next holder loads them idempotently).
    pub async fn ack(&self, shard: u32, lease_id: &str) -> Result<u64, EdgeError> {
        let req = AckRequest {
            shard,
            lease_id: lease_id.to_string(),
        };
        let body = serde_json::to_vec(&req).map_err(|e| EdgeError::Body {
            path: ACK_PATH,
            error: e.to_string(),
        })?;
        let r: AckResponse = self
            .call_json(reqwest::Method::POST, ACK_PATH, body)
            .await?;
        Ok(r.acked)
    }

    /// Extends a lease by `lease_ms` from now; returns how many batches it still holds.
    pub async fn renew(&self, shard: u32, lease_id: &str, lease_ms: u64) -> Result<u64, EdgeError> {
        let req = RenewRequest {
            shard,
            lease_id: lease_id.to_string(),
            lease_ms: i64::try_from(lease_ms).unwrap_or(i64::MAX),
        };
        req.validate(None)?;
        let body = serde_json::to_vec(&req).map_err(|e| EdgeError::Body {
            path: RENEW_PATH,
            error: e.to_string(),
        })?;
        let r: RenewResponse = self
            .call_json(reqwest::Method::POST, RENEW_PATH, body)
            .await?;
        Ok(r.renewed)
    }

    /// Queue depth, drop counters by reason and note counters, per shard and in total.
    pub async fn stats(&self) -> Result<DrainStats, EdgeError> {
        self.call_json(reqwest::Method::GET, STATS_PATH, Vec::new())
            .await
    }

    /// Adds and removes ids on every shard's suppression list (idempotent); how many
    /// ids are suppressed now.
    pub async fn suppress(
        &self,
        add: Vec<SuppressedId>,
        remove: Vec<SuppressedId>,
    ) -> Result<u64, EdgeError> {
        #[derive(serde::Deserialize)]
        struct Answer {
            suppressed: u64,
        }
        // In requests the edge accepts, whatever the list's length.
        let max = collector_core::drain::MAX_SUPPRESS_IDS / 2;
        let (mut add, mut remove) = (add.into_iter().peekable(), remove.into_iter().peekable());
        loop {
            let req = SuppressRequest {
                add: add.by_ref().take(max).map(|i| i.digest()).collect(),
                remove: remove.by_ref().take(max).map(|i| i.digest()).collect(),
            };
            let body = serde_json::to_vec(&req).map_err(|e| EdgeError::Body {
                path: SUPPRESSIONS_PATH,
                error: e.to_string(),
            })?;
            let a: Answer = self
                .call_json(reqwest::Method::POST, SUPPRESSIONS_PATH, body)
                .await?;
            if add.peek().is_none() && remove.peek().is_none() {
                return Ok(a.suppressed);
            }
        }
    }

    /// The edge's suppression list (digests).
    pub async fn suppressions(&self) -> Result<Vec<String>, EdgeError> {
        let s: Suppressions = self
            .call_json(reqwest::Method::GET, SUPPRESSIONS_PATH, Vec::new())
            .await?;
        Ok(s.digests)
    }
}
