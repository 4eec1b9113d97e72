//! The consent audit dashboard, for legal and compliance: served by the agent on its
//! admin address (`/dashboard`), server-rendered HTML with the figures in tables, and
//! charts drawn by the vendored uPlot (npm `uplot`, embedded by `build.rs`; nothing is
//! loaded from elsewhere, and the Content-Security-Policy says so).
//!
//! Access: on a loopback address, anyone on the machine; with `dashboard_token_env`
//! (required to bind elsewhere), the token, as `?token=` once (then a `SameSite=Strict`
//! cookie), a cookie, or `Authorization: Bearer`.
//!
//! Routes: `/dashboard` (`?days=N`, `?person=ID`), `/dashboard/data.json`,
//! `/dashboard/person.json?id=`, and the static `uplot.js`, `uplot.css`, `app.js`.

pub mod data;
mod html;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::admin::AppState;

#[cfg(not(dashboard_assets_missing))]
const UPLOT_JS: &str = include_str!(concat!(env!("OUT_DIR"), "/uPlot.iife.min.js"));
#[cfg(not(dashboard_assets_missing))]
const UPLOT_CSS: &str = include_str!(concat!(env!("OUT_DIR"), "/uPlot.min.css"));
#[cfg(dashboard_assets_missing)]
const UPLOT_JS: &str = "document.body.insertAdjacentHTML('afterbegin','<p role=\"alert\">This agent was built before npm ci ran: its charts are missing. Run cargo xtask setup and build it again.</p>');";
#[cfg(dashboard_assets_missing)]
const UPLOT_CSS: &str = "";
const APP_JS: &str = include_str!("app.js");

/// The policy for pages: only this origin's scripts and styles (uPlot sets inline
/// styles on the elements it draws), no frames, no third parties.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/data.json", get(data_json))
        .route("/dashboard/person.json", get(person_json))
        .route(
            "/dashboard/uplot.js",
            get(|s, h, q| asset(s, h, q, UPLOT_JS, "text/javascript")),
        )
        .route(
            "/dashboard/uplot.css",
            get(|s, h, q| asset(s, h, q, UPLOT_CSS, "text/css")),
        )
        .route(
            "/dashboard/app.js",
            get(|s, h, q| asset(s, h, q, APP_JS, "text/javascript")),
        )
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Params {
    days: Option<u32>,
    person: Option<String>,
    id: Option<String>,
    token: Option<String>,
}

impl Params {
    fn days(&self) -> u32 {
        self.days.unwrap_or(30).clamp(1, 366)
    }
}

const COOKIE: &str = "collector_dashboard";

/// A refusal or failure: its status and a JSON body naming the problem.
pub(crate) struct Fail(StatusCode, String);

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

/// `Ok(set_cookie)`: whether the token came in the query (so the answer sets it as a
/// cookie).
fn authorize(state: &AppState, headers: &HeaderMap, q: &Params) -> Result<bool, Fail> {
    let Some(expected) = &state.ops.dashboard_token else {
        return Ok(false);
    };
    // In constant time over the expected token's length.
    let eq = |given: &str| {
        given.len() == expected.len()
            && given
                .bytes()
                .zip(expected.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    };
    if q.token.as_deref().is_some_and(eq) {
        return Ok(true);
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let cookie = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| {
            c.split(';')
                .filter_map(|kv| kv.trim().split_once('='))
                .find(|(k, _)| *k == COOKIE)
                .map(|(_, v)| v.to_string())
        });
    if bearer.is_some_and(eq) || cookie.as_deref().is_some_and(eq) {
        return Ok(false);
    }
    Err(Fail(
        StatusCode::UNAUTHORIZED,
        "the dashboard needs its token (dashboard_token_env): open /dashboard?token=…".into(),
    ))
}

fn with_headers(mut resp: Response, content_type: &str, set_cookie: Option<&str>) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type).expect("a valid header"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(token) = set_cookie {
        if let Ok(v) = HeaderValue::from_str(&format!(
            "{COOKIE}={token}; Path=/dashboard; HttpOnly; SameSite=Strict"
        )) {
            h.insert(header::SET_COOKIE, v);
        }
    }
    resp
}

async fn asset(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Params>,
    body: &'static str,
    content_type: &'static str,
) -> Response {
    if let Err(r) = authorize(&state, &headers, &q) {
        return r.into_response();
    }
    with_headers(body.into_response(), content_type, None)
}

fn unavailable(e: impl std::fmt::Display) -> Fail {
    Fail(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

/// The figures: the warehouse's, and the edge's counters.
async fn figures(state: &AppState, days: u32) -> Result<data::Data, Fail> {
    let mut session = match state.sink.session().await {
        Ok(Some(s)) if s.dialect().relational().is_some() => s,
        Ok(_) => {
            return Err(Fail(
                StatusCode::NOT_IMPLEMENTED,
                format!(
                    "the dashboard reads a DuckDB, PostgreSQL or Parquet lake warehouse; this one is {}",
                    state.sink.kind()
                ),
            ))
        }
        Err(e) => return Err(unavailable(e)),
    };
    let mut d = data::compute(&mut *session, &state.ops.categories, days, crate::now_ms())
        .await
        .map_err(unavailable)?;
    drop(session);
    match &state.ops.edge {
        Some(edge) => match edge.stats().await {
            Ok(stats) => {
                d.withheld = stats.drops;
                d.notes = stats.notes;
            }
            Err(e) => d.edge_error = Some(e.to_string()),
        },
        None => d.edge_error = Some("no edge configured".into()),
    }
    Ok(d)
}

async fn page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Params>,
) -> Response {
    let set_cookie = match authorize(&state, &headers, &q) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let d = match figures(&state, q.days()).await {
        Ok(d) => d,
        Err(r) => return r.into_response(),
    };
    let person = match q.person.as_deref().map(str::trim).filter(|p| !p.is_empty()) {
        None => None,
        Some(id) => {
            let mut session = match state.sink.session().await {
                Ok(Some(s)) => s,
                Ok(None) => return unavailable("no SQL warehouse").into_response(),
                Err(e) => return unavailable(e).into_response(),
            };
            match data::history(&mut *session, id, state.ops.hasher.as_ref()).await {
                Ok(h) => Some((id.to_string(), h)),
                Err(e) => return unavailable(e).into_response(),
            }
        }
    };
    let body = html::render(&d, state.ops.policy_version.as_deref(), person.as_ref());
    let token = set_cookie.then(|| q.token.clone()).flatten();
    with_headers(
        body.into_response(),
        "text/html; charset=utf-8",
        token.as_deref(),
    )
}

async fn data_json(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Params>,
) -> Response {
    if let Err(r) = authorize(&state, &headers, &q) {
        return r.into_response();
    }
    match figures(&state, q.days()).await {
        Ok(d) => with_headers(Json(d).into_response(), "application/json", None),
        Err(r) => r.into_response(),
    }
}

async fn person_json(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Params>,
) -> Response {
    if let Err(r) = authorize(&state, &headers, &q) {
        return r.into_response();
    }
    let Some(id) = q.id.as_deref().filter(|i| !i.is_empty()) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "?id= is required"})),
        )
            .into_response();
    };
    let mut session = match state.sink.session().await {
        Ok(Some(s)) => s,
        Ok(None) => return unavailable("no SQL warehouse").into_response(),
        Err(e) => return unavailable(e).into_response(),
    };
    match data::history(&mut *session, id, state.ops.hasher.as_ref()).await {
        Ok((person, rows)) => with_headers(
            Json(json!({
                "ids": person.ids.iter().map(|(t, v)| json!({"type": t, "value": v})).collect::<Vec<_>>(),
                "person_ids": person.person_ids,
                "events": rows,
            }))
            .into_response(),
            "application/json",
            None,
        ),
        Err(e) => unavailable(e).into_response(),
    }
}
