//! `collector-agent privacy request …`: through the running agent when one runs (as
//! `sql` does), else on the warehouse directly.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;

use super::{cli_caller, Kind, NewRequest, Request};
use crate::admin;
use crate::config::AgentConfig;

/// The answer of the admin API to a submission.
#[derive(serde::Deserialize)]
struct Submitted {
    request: Request,
    #[serde(default)]
    document: Option<Value>,
}

#[derive(serde::Deserialize)]
struct One {
    request: Request,
}

#[derive(serde::Deserialize)]
struct Many {
    requests: Vec<Request>,
}

/// Submits a request and, unless `wait` is `None`, waits up to `wait` for it to
/// finish. Returns the request as it stands, and an export's document.
pub async fn submit(
    cfg: &AgentConfig,
    mut new: NewRequest,
    wait: Option<Duration>,
) -> anyhow::Result<(Request, Option<Value>)> {
    new.requested_by = Some(cli_caller());
    let state_file = cfg.warehouse.state_file();
    let body = new.clone();
    if let Some(s) = admin::call_running_agent_with::<Submitted>(
        &state_file,
        reqwest::Method::POST,
        "/privacy/requests",
        |r| r.json(&body),
    )
    .await?
    {
        if s.document.is_some() || wait.is_none() {
            return Ok((s.request, s.document));
        }
        let deadline = tokio::time::Instant::now() + wait.unwrap_or_default();
        let mut r = s.request;
        while !r.is_finished() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let path = format!("/privacy/requests/{}", r.id);
            if let Some(one) = admin::call_running_agent_with::<One>(
                &state_file,
                reqwest::Method::GET,
                &path,
                |r| r,
            )
            .await?
            {
                r = one.request;
            }
        }
        return Ok((r, None));
    }
    // No agent runs: carry it out here.
    let kind = new.kind.context("the request's kind is missing")?;
    let subject = new
        .subject(cfg.pii_hasher()?.as_ref())
        .map_err(|e| anyhow::anyhow!(e))?;
    let sink = crate::sinks::open(&cfg.warehouse)
        .await
        .map_err(|e| anyhow::anyhow!("warehouse: {e}"))?;
    let drainer = crate::Drainer::new(cfg.clone(), sink.clone())?;
    let now = crate::now_ms();
    let stored = {
        let mut s = session(&*sink).await?;
        super::submit(
            &mut *s,
            kind,
            new.id.as_deref(),
            &subject,
            new.requested_by.as_deref().unwrap_or("cli"),
            now,
        )
        .await?
    };
    if kind == Kind::Export {
        let mut s = session(&*sink).await?;
        let doc = super::export(&mut *s, &stored, sink.rows_in_files(), now).await?;
        let r = super::get(&mut *s, &stored.id)
            .await?
            .context("the request was stored")?;
        return Ok((r, Some(doc)));
    }
    if !stored.is_finished() {
        if let Err(e) = drainer.refresh_suppressions().await {
            tracing::warn!(error = %e, "could not read the edge's suppression list");
        }
        // An erasure completes on the run after the one that erased (nothing came back).
        for _ in 0..2 {
            drainer.privacy_pass(crate::now_ms()).await?;
            let mut s = session(&*sink).await?;
            if super::get(&mut *s, &stored.id)
                .await?
                .is_some_and(|r| r.is_finished())
            {
                break;
            }
        }
    }
    let mut s = session(&*sink).await?;
    let r = super::get(&mut *s, &stored.id)
        .await?
        .context("the request was stored")?;
    Ok((r, None))
}

async fn session(
    sink: &dyn crate::sinks::Sink,
) -> anyhow::Result<Box<dyn crate::sinks::SqlSession + '_>> {
    match sink.privacy_session().await? {
        Some(s) => Ok(s),
        _ => anyhow::bail!(
            "privacy requests need a warehouse with a SQL session; the {} sink has none",
            sink.kind()
        ),
    }
}

/// One request with its stores.
pub async fn status(cfg: &AgentConfig, id: &str) -> anyhow::Result<Request> {
    let path = format!("/privacy/requests/{id}");
    if let Some(one) = admin::call_running_agent_with::<One>(
        &cfg.warehouse.state_file(),
        reqwest::Method::GET,
        &path,
        |r| r,
    )
    .await?
    {
        return Ok(one.request);
    }
    let sink = crate::sinks::open(&cfg.warehouse)
        .await
        .map_err(|e| anyhow::anyhow!("warehouse: {e}"))?;
    let mut s = session(&*sink).await?;
    super::get(&mut *s, id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no privacy request {id:?}"))
}

/// Every request, newest first.
pub async fn list(cfg: &AgentConfig) -> anyhow::Result<Vec<Request>> {
    if let Some(m) = admin::call_running_agent_with::<Many>(
        &cfg.warehouse.state_file(),
        reqwest::Method::GET,
        "/privacy/requests",
        |r| r,
    )
    .await?
    {
        return Ok(m.requests);
    }
    let sink = crate::sinks::open(&cfg.warehouse)
        .await
        .map_err(|e| anyhow::anyhow!("warehouse: {e}"))?;
    let mut s = session(&*sink).await?;
    Ok(super::list(&mut *s).await?)
}
