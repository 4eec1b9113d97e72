//! The admin endpoint: lets `collector-agent sql` query the live warehouse while the
//! agent holds the DuckDB file, takes privacy requests, and serves the consent
//! dashboard. The address and a random bearer token are written to a state file next
//! to the warehouse (`<warehouse>.agent`, mode 0600) and removed when the agent stops.
//!
//! It listens on loopback unless `dashboard_token_env` is set. Two ways in:
//! - the state file's bearer token (the CLI on this machine; every route);
//! - for the privacy API, a named key of `[[admin_keys]]`: the request signed as the
//!   drain API's are ([`collector_core::sign`]), with `X-Collector-Key: <name>`; the
//!   audit trail records that name.
//!
//! Privacy routes: `POST /privacy/requests` (a [`crate::privacy::NewRequest`]; 202 and
//! the stored request, carried out by the drain loop, or 200 with the document for an
//! export), `GET /privacy/requests`, `GET /privacy/requests/{id}`.

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
pub(crate) struct AppState {
    pub(crate) sink: Arc<dyn Sink>,
    token: Arc<String>,
    pub(crate) ops: Arc<Ops>,
}

/// What the privacy API and the dashboard need besides the warehouse.
pub struct Ops {
    /// Hashes emails the way the edge does (`pii_key_env`).
    pub hasher: Option<collector_core::pii::PiiHasher>,
    /// `[[admin_keys]]`: name and secret.
    pub keys: Vec<(String, String)>,
    /// The dashboard's token, when it may be served beyond loopback.
    pub dashboard_token: Option<String>,
    /// Wakes the drain loop to carry out a new request now.
    pub wake: Arc<tokio::sync::Notify>,
    /// The edge, for the dashboard's counters (drops by reason, PII notes).
    pub edge: Option<crate::edge::EdgeClient>,
    /// The policy's consent categories and version, for the dashboard.
    pub categories: Vec<String>,
    pub policy_version: Option<String>,
}

impl Ops {
    pub fn from_config(
        cfg: &crate::config::AgentConfig,
        wake: Arc<tokio::sync::Notify>,
    ) -> anyhow::Result<Ops> {
        let policy = cfg.policy()?;
        Ok(Ops {
            hasher: cfg.pii_hasher()?,
            keys: cfg.admin_secrets()?,
            dashboard_token: cfg.dashboard_token()?,
            wake,
            edge: crate::edge::EdgeClient::new(cfg).ok(),
            categories: policy
                .as_ref()
                .map(|p| p.categories.iter().map(|c| c.name.clone()).collect())
                .unwrap_or_default(),
            policy_version: policy.map(|p| p.version),
        })
    }
}

fn random_token() -> String {
    let mut b = [0u8; 24];
    getrandom::getrandom(&mut b).expect("OS randomness is available");
    hex::encode(b)
}

/// Binds the admin endpoint: on a loopback address unless `beyond_loopback` (the
/// dashboard has a token).
pub async fn bind(
    addr: &str,
    beyond_loopback: bool,
) -> anyhow::Result<(AgentState, tokio::net::TcpListener)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() && !beyond_loopback {
        anyhow::bail!("admin_addr must be a loopback address, got {local} (set dashboard_token_env to serve beyond loopback)");
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
    ops: Arc<Ops>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/health", get(|| async { Json(json!({"ok": true})) }))
        .route("/sql", post(handle_sql))
        .route("/quarantine/replay", post(handle_replay))
        .route("/replay", post(handle_replay_all))
        .route(
            "/privacy/requests",
            post(handle_privacy_submit).get(handle_privacy_list),
        )
        .route("/privacy/requests/{id}", get(handle_privacy_get))
        .merge(crate::dashboard::routes())
        .with_state(AppState {
            sink,
            token: Arc::new(token),
            ops,
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

/// Who is calling the privacy API: the bearer token (the local CLI) or a signed
/// `[[admin_keys]]` key, by name.
enum Caller {
    Local,
    Key(String),
}

fn privacy_caller(
    state: &AppState,
    method: &str,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Caller, AdminError> {
    if authorize(state, headers).is_ok() {
        return Ok(Caller::Local);
    }
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let unauthorized = |why: String| (StatusCode::UNAUTHORIZED, Json(json!({"error": why})));
    let Some(name) = header("x-collector-key") else {
        return Err(unauthorized(
            "sign the request with an admin key (X-Collector-Key, X-Collector-Timestamp, X-Collector-Signature) or send the local admin token".into(),
        ));
    };
    let Some((_, secret)) = state.ops.keys.iter().find(|(n, _)| n == name) else {
        return Err(unauthorized(format!("no admin key named {name:?}")));
    };
    collector_core::sign::verify(
        secret.as_bytes(),
        method,
        path,
        body,
        header(collector_core::sign::TIMESTAMP_HEADER),
        header(collector_core::sign::SIGNATURE_HEADER),
        crate::now_ms() / 1000,
    )
    .map_err(|e| unauthorized(format!("admin key {name:?}: {e}")))?;
    Ok(Caller::Key(name.to_string()))
}

fn bad_request(msg: impl Into<String>) -> AdminError {
    (StatusCode::BAD_REQUEST, Json(json!({"error": msg.into()})))
}

async fn privacy_session(
    state: &AppState,
) -> Result<Box<dyn crate::sinks::SqlSession + '_>, AdminError> {
    match state.sink.privacy_session().await.map_err(unavailable)? {
        Some(s) => Ok(s),
        _ => Err((
            StatusCode::NOT_IMPLEMENTED,
            Json(
                json!({"error": format!("privacy requests need a warehouse with a SQL session; the {} sink has none", state.sink.kind())}),
            ),
        )),
    }
}

async fn handle_privacy_submit(
    State(state): State<AppState>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), AdminError> {
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/privacy/requests");
    let caller = privacy_caller(&state, "POST", path, &headers, &body)?;
    let req: crate::privacy::NewRequest = serde_json::from_slice(&body)
        .map_err(|e| bad_request(format!("bad privacy request: {e}")))?;
    let kind = req
        .kind
        .ok_or_else(|| bad_request("kind is required: erase, suppress, unsuppress or export"))?;
    let subject = req
        .subject(state.ops.hasher.as_ref())
        .map_err(bad_request)?;
    let by = match caller {
        Caller::Local => req
            .requested_by
            .clone()
            .unwrap_or_else(|| "cli".to_string()),
        Caller::Key(name) => name,
    };
    let now = crate::now_ms();
    let mut s = privacy_session(&state).await?;
    let stored = crate::privacy::submit(&mut *s, kind, req.id.as_deref(), &subject, &by, now)
        .await
        .map_err(|e| match e {
            crate::sinks::SinkError::Permanent(m) => {
                (StatusCode::CONFLICT, Json(json!({"error": m})))
            }
            e => unavailable(e),
        })?;
    if kind == crate::privacy::Kind::Export {
        let document = crate::privacy::export(&mut *s, &stored, state.sink.rows_in_files(), now)
            .await
            .map_err(unavailable)?;
        let request = crate::privacy::get(&mut *s, &stored.id)
            .await
            .map_err(unavailable)?;
        return Ok((
            StatusCode::OK,
            Json(json!({"request": request, "document": document})),
        ));
    }
    state.ops.wake.notify_one();
    Ok((StatusCode::ACCEPTED, Json(json!({"request": stored}))))
}

async fn handle_privacy_list(
    State(state): State<AppState>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, AdminError> {
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/privacy/requests");
    privacy_caller(&state, "GET", path, &headers, b"")?;
    let mut s = privacy_session(&state).await?;
    let list = crate::privacy::list(&mut *s).await.map_err(unavailable)?;
    Ok(Json(json!({"requests": list})))
}

async fn handle_privacy_get(
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, AdminError> {
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    privacy_caller(&state, "GET", path, &headers, b"")?;
    let mut s = privacy_session(&state).await?;
    match crate::privacy::get(&mut *s, &id)
        .await
        .map_err(unavailable)?
    {
        Some(r) => Ok(Json(json!({"request": r}))),
        None => Err((
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no privacy request {id:?}")})),
        )),
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
        let status = if e.retryable() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::BAD_REQUEST
        };
        (status, Json(json!({"error": e.query_error()})))
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
    call_running_agent_with(state_file, reqwest::Method::POST, path, build).await
}

/// [`call_running_agent`] with any method.
pub async fn call_running_agent_with<T: serde::de::DeserializeOwned>(
    state_file: &Path,
    method: reqwest::Method,
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
        .request(method, format!("http://{}{path}", state.addr))
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
