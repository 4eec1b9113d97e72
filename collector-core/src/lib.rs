//! `collector-core`: the pure heart of the edge collector.
//!
//! **Invariant:** this crate does no I/O. No clock, no randomness, no network, no
//! filesystem, no async runtime. Time and ids are passed in by the caller, so the same
//! code runs in the Worker (`wasm32-unknown-unknown`) and in the native agent, and tests
//! are exact.
//!
//! Modules:
//! - [`event`]: the Segment-spec event model and per-event validation.
//! - [`ingest`]: parsing a whole HTTP request body (single call or `/v1/batch`) into
//!   accepted events and indexed rejections.
//! - [`limits`]: the size limits every request and event is held to.
//! - [`timestamp`]: ISO-8601 parsing/formatting and clock-skew correction.
//! - [`codec`]: the versioned edge-to-agent batch format (an API boundary).
//! - [`sign`]: HMAC-SHA256 request signing for the drain API.
//! - [`shard`]: which queue shard an event belongs to.
//! - [`error`]: the error types and their HTTP mapping.
//! - [`identity`]: the ids that may never link people (the block list).

pub mod codec;
pub mod consent;
pub mod detect;
pub mod drain;
pub mod error;
pub mod event;
pub mod identity;
pub mod ingest;
pub mod json_text;
pub mod limits;
pub mod note;
pub mod pii;
pub mod policy;
pub mod privacy;
pub mod seal;
pub mod shard;
pub mod sign;
pub mod tcf;
pub mod timestamp;
pub mod url_parts;

pub use error::{CodecError, EventError, RequestError, SignError};
pub use event::{EventKind, StoredEvent};
