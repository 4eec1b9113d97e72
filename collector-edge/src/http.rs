//! JSON responses and CORS. Every error body names its problem with a stable `code`.

use serde_json::{json, Value};
use worker::{Headers, Request, Response, Result};

use crate::config::Origins;

pub fn json(status: u16, body: &Value) -> Result<Response> {
    Ok(Response::from_json(body)?.with_status(status))
}

/// `200 {"success":true}`: the answer to every accepted request (written as text; no
/// JSON value is built for it).
pub fn success() -> Result<Response> {
    let headers = Headers::new();
    headers.set("Content-Type", "application/json")?;
    Ok(Response::ok("{\"success\":true}")?.with_headers(headers))
}

/// `{"success": false, "code": ..., "error": ...}` with the given status.
pub fn error(status: u16, code: &str, message: &str) -> Result<Response> {
    json(
        status,
        &json!({"success": false, "code": code, "error": message}),
    )
}

/// The request's `Origin`, if the browser sent one.
pub fn origin(req: &Request) -> Option<String> {
    req.headers().get("Origin").ok().flatten()
}

/// Adds CORS headers for an allowed origin. Browsers send `text/plain` (no preflight)
/// or `application/json` with `Authorization` (preflighted); both work.
pub fn with_cors(mut resp: Response, origin: Option<&str>, origins: &Origins) -> Result<Response> {
    if let Some(origin) = origin {
        if origins.allows(origin) {
            let h: &mut Headers = resp.headers_mut();
            h.set("Access-Control-Allow-Origin", origin)?;
            h.set("Vary", "Origin")?;
            h.set("Access-Control-Allow-Credentials", "true")?;
            // The SDK reads Retry-After to back off (429/503); not a safelisted header.
            h.set("Access-Control-Expose-Headers", "Retry-After")?;
        }
    }
    Ok(resp)
}

/// Answers a CORS preflight.
pub fn preflight(origin: Option<&str>, origins: &Origins) -> Result<Response> {
    match origin {
        Some(o) if origins.allows(o) => {
            let mut resp = Response::empty()?.with_status(204);
            let h = resp.headers_mut();
            h.set("Access-Control-Allow-Origin", o)?;
            h.set("Vary", "Origin")?;
            h.set("Access-Control-Allow-Credentials", "true")?;
            h.set("Access-Control-Allow-Methods", "POST, OPTIONS")?;
            h.set(
                "Access-Control-Allow-Headers",
                "Content-Type, Authorization, Content-Encoding",
            )?;
            h.set("Access-Control-Max-Age", "86400")?;
            Ok(resp)
        }
        Some(o) => error(
            403,
            "origin_not_allowed",
            &format!("origin {o:?} is not in ALLOWED_ORIGINS"),
        ),
        None => error(400, "not_a_preflight", "OPTIONS without an Origin header"),
    }
}
