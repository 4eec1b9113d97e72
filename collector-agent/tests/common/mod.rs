//! Helpers shared by the agent's test files.

#![allow(dead_code)]

use collector_core::ingest::{parse_body, Endpoint};
use collector_core::StoredEvent;

/// Events as the edge would store them: a `/v1/batch` body parsed and validated by core
/// (no privacy policy), received at 2026-11-24T13:54:04Z.
pub fn events(body: serde_json::Value) -> Vec<StoredEvent> {
    let mut n = 0;
    let p = parse_body(
        Endpoint::Batch,
        body.to_string().as_bytes(),
        1_795_528_444_000,
        &mut || {
            n += 1;
            format!("gen-{n}")
        },
    )
    .unwrap();
    assert!(p.rejected.is_empty(), "{:?}", p.rejected);
    p.accepted
}
