//! Identity: one person per cluster of ids, computed in the warehouse.
//!
//! Ids (`anonymous_id`, `user_id`, and the hashed `email` trait) seen together in one
//! event are edges of a graph: every event carrying both an anonymous id and a user id,
//! `identify` with an email, and `alias` (`previousId` → `userId`; a `previousId` equal
//! to the event's anonymous id is that anonymous id, any other is a user id). People
//! are the groups of ids the edges join, subject to:
//!
//! - **the block list** (`collector_core::identity`): placeholder ids (`"undefined"`,
//!   `"guest"`, `"0"`, …) never join anyone; an edge with one is kept as `blocked`;
//! - **limits** per id type (at most one `user_id` per person by default) and on the
//!   number of ids: an edge that would break one is `refused`, and the groups stay apart.
//!
//! Edges are taken in canonical order (event time, then message id), so the result
//! depends only on which events were loaded, never on the order they arrived in: late
//! and replayed events give the same people as in-order ones. Each person's
//! `person_id` is the md5 of its best id (`user_id` first, then `email`, then the
//! anonymous id first seen), so it is stable while that id stays.
//!
//! Tables: `identity_edges` (each pair of ids once, at its earliest event, with
//! `status` accepted/refused/blocked and the reason), `identities` (id → person),
//! `identity_merges` (every merge of two people and every refused edge, naming the
//! event and the ids), `profiles` (one row per person). Nothing is ever split
//! silently: ids leave a person only when the edges that joined them are removed (an
//! erasure, issue #12, deletes them and lists the person's other ids in
//! `identity_dirty`) or a late event takes precedence; the next run resolves that part
//! of the graph again and logs each id that left as a `split` in `identity_merges`.

mod clickhouse;
pub mod config;
pub mod profile;
pub mod resolve;
pub mod run;

pub use config::{IdentityConfig, Limits};
pub use run::{ddl, person_id, run, IdentityStats};
