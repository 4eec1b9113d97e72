//! The runtime's floor for the edge benchmark (`cargo xtask bench --edge`).
//!
//! The least a collector on Workers can do per request: read the body, hand it to a
//! Durable Object, and write it there with one SQLite `INSERT`. It is built the way the
//! collector's worker is (worker-build, the workspace's release profile and
//! `Cargo.lock`, so the same `worker` and `wasm-bindgen` versions) and the bench reports
//! the collector's events/s and CPU per event as a ratio to it.

use worker::{
    durable_object, event, Context, DurableObject, Env, Headers, Method, Request, RequestInit,
    Response, Result, State,
};

const BINDING: &str = "FLOOR";

#[durable_object]
pub struct Floor {
    state: State,
}

impl DurableObject for Floor {
    fn new(state: State, _env: Env) -> Self {
        if let Err(e) = state.storage().sql().exec(
            "CREATE TABLE IF NOT EXISTS bodies \
             (id INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL)",
            None,
        ) {
            worker::console_error!("floor schema: {e}");
        }
        Self { state }
    }

    async fn fetch(&self, mut req: Request) -> Result<Response> {
        let body = req.bytes().await?;
        self.state
            .storage()
            .sql()
            .exec("INSERT INTO bodies (body) VALUES (?)", vec![body.into()])?;
        json_ok()
    }
}

fn json_ok() -> Result<Response> {
    let headers = Headers::new();
    headers.set("content-type", "application/json")?;
    Ok(Response::ok("{\"success\":true}")?.with_headers(headers))
}

#[event(fetch)]
async fn fetch(mut req: Request, env: Env, _ctx: Context) -> Result<Response> {
    if req.method() != Method::Post {
        return Response::ok("ok");
    }
    let body = req.bytes().await?;
    let stub = env
        .durable_object(BINDING)?
        .id_from_name("shard-0")?
        .get_stub()?;
    let arr = js_sys::Uint8Array::new_with_length(body.len() as u32);
    arr.copy_from(&body);
    let mut init = RequestInit::new();
    init.with_method(Method::Post).with_body(Some(arr.into()));
    stub.fetch_with_request(Request::new_with_init("https://floor/", &init)?)
        .await
}
