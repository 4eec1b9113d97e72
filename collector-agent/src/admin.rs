//! The admin endpoint on loopback: lets `collector-agent sql` query the live warehouse
//! while the agent holds the DuckDB file. The address and a random bearer token are
//! written to a state file next to the warehouse (`<warehouse>.agent`, mode 0600) and
//! removed when the agent stops.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::sinks::{replay_all, LoadStats, QueryResult, ReplayStats, Sink};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentState {
    pub addr: SocketAddr,
    pub token: String,
    pub pid: u32,
}

#[derive(Clone)]
struct AppState {
    sink: Arc<dyn Sink>,
    token: Arc<String>,
}

fn random_token() -> String {
    let mut b = [0u8; 24];
    getrandom::getrandom(&mut b).expect("OS randomness is available");
    hex::encode(b)
}

/// Binds the admin endpoint on a loopback address.
pub async fn bind(addr: &str) -> anyhow::Result<(AgentState, tokio::net::TcpListener)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() {
        anyhow::bail!("admin_addr must be a loopback address, got {local}");
    }
    let state = AgentState {
        addr: local,
        token: random_token(),
        pid: std::process::id(),
    };
    Ok((state, listener))
}

/// Serves the admin API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sink: Arc<dyn Sink>,
    token: String,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/health", get(|| async { Json(json!({"ok": true})) }))
        .route("/sql", post(handle_sql))
        .route("/quarantine/replay", post(handle_replay))
        .route("/replay", post(handle_replay_all))
        .with_state(AppState {
            sink,
            token: Arc::new(token),
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

type AdminError = (StatusCode, Json<serde_json::Value>);

/// A warehouse that could not do the work: 503 with the reason.
fn unavailable(e: crate::sinks::SinkError) -> AdminError {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": e.to_string()})),
    )
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), AdminError> {
    let expected = format!("Bearer {}", state.token);
    let ok = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(|v| v == expected)
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err((
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "bad or missing admin token"})),
        ))
    }
}

/// Body of `POST /quarantine/replay`: the message ids to replay (empty: all).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReplayRequest {
    #[serde(default)]
    pub message_ids: Vec<String>,
}

async fn handle_replay(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<ReplayRequest>,
) -> Result<Json<LoadStats>, AdminError> {
    authorize(&state, &headers)?;
    state
        .sink
        .replay_quarantine(&req.message_ids)
        .await
        .map(Json)
        .map_err(unavailable)
}

async fn handle_replay_all(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<ReplayRequest>,
) -> Result<Json<ReplayStats>, AdminError> {
    authorize(&state, &headers)?;
    replay_all(state.sink.as_ref(), &req.message_ids, &|_, _| {})
        .await
        .map(Json)
        .map_err(unavailable)
}

async fn handle_sql(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: String,
) -> Result<Json<QueryResult>, AdminError> {
    authorize(&state, &headers)?;
    state.sink.query(&body).await.map(Json).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": e.to_string()})),
        )
    })
}

/// Writes the state file with owner-only permissions.
pub fn write_state(path: &Path, state: &AgentState) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path)?;
    f.write_all(serde_json::to_string(state)?.as_bytes())?;
    Ok(())
}

/// Sends one request to the running agent's admin endpoint: `Ok(None)` when no agent
/// runs for this warehouse (no state file, or nothing listening).
async fn call_running_agent<T: serde::de::DeserializeOwned>(
    state_file: &Path,
    path: &str,
    build: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
) -> anyhow::Result<Option<T>> {
    let Ok(text) = std::fs::read_to_string(state_file) else {
        return Ok(None);
    };
    let Ok(state) = serde_json::from_str::<AgentState>(&text) else {
        return Ok(None);
    };
    let req = reqwest::Client::new()
        .post(format!("http://{}{path}", state.addr))
        .bearer_auth(&state.token);
    let resp = match build(req).send().await {
        Ok(r) => r,
        Err(e) if e.is_connect() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let status = resp.status();
    let body: serde_json::Value = resp.json().await?;
    if !status.is_success() {
        anyhow::bail!(
            "{}",
            body.get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("the agent refused the request")
        );
    }
    Ok(Some(serde_json::from_value(body)?))
}

/// Runs SQL through the running agent (`Ok(None)` when none runs).
pub async fn query_running_agent(
    state_file: &Path,
    sql: &str,
) -> anyhow::Result<Option<QueryResult>> {
    let sql = sql.to_string();
    call_running_agent(state_file, "/sql", |r| r.body(sql)).await
}

/// Replays quarantined events through the running agent (`Ok(None)` when none runs).
pub async fn replay_running_agent(
    state_file: &Path,
    message_ids: &[String],
) -> anyhow::Result<Option<LoadStats>> {
    let req = ReplayRequest {
        message_ids: message_ids.to_vec(),
    };
    call_running_agent(state_file, "/quarantine/replay", |r| r.json(&req)).await
}

/// Replays dead letters and quarantined events through the running agent (`Ok(None)`
/// when none runs).
pub async fn replay_all_running_agent(
    state_file: &Path,
    message_ids: &[String],
) -> anyhow::Result<Option<ReplayStats>> {
    let req = ReplayRequest {
        message_ids: message_ids.to_vec(),
    };
    call_running_agent(state_file, "/replay", |r| r.json(&req)).await
}
