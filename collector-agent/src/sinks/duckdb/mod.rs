//! The embedded DuckDB warehouse (the default).
//!
//! Tables in Segment's warehouse shape: `tracks`, `pages`, `identifies`, `screens`,
//! `groups`, `aliases`, each with `message_id` as primary key, typed id and time columns
//! (UTC `TIMESTAMP`s), JSON columns for `properties`/`traits`/`context`/`integrations`,
//! and the whole normalised event in `raw`. Undecodable batches go to `dead_letters`.
//!
//! DuckDB lets one process hold a file open for writing, so live queries go through the
//! running agent's admin endpoint (see `crate::admin`).

pub mod config;
mod sink;

pub use sink::{run_query, DuckDbSink, QueryResult};
