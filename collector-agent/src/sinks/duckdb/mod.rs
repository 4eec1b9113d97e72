//! The embedded DuckDB warehouse (the default, `[warehouse] kind = "duckdb"`).
//!
//! ```toml
//! [warehouse]
//! path = "./data/warehouse.duckdb"   # relative to the config file
//! # memory_limit = "64MB"           # DuckDB's settings; its defaults when absent (64MB at least, 32MB with small row groups)
//! # memory_cap = "32MB"             # or: the default limit's cap (1 GiB), which still grows with the indexes
//! # threads = 1
//! # checkpoint_threshold = "64MB"   # faster loads, more memory (DuckDB's default: 16MB)
//! # row_group_size = 16384          # less memory and faster loads, slower selective queries
//! ```
//!
//! Tables in Segment's warehouse shape (from `sinks::schema`): `tracks`, `pages`,
//! `identifies`, `screens`, `groups`, `aliases`, each with `message_id` (unique across
//! the warehouse: `message_ids` registers every id, without an index), typed id and
//! time columns (UTC `TIMESTAMP`s), JSON columns for
//! `properties`/`traits`/`context`/`integrations`, and the whole normalised event in
//! `raw`; the growing part from `sinks::tables` (flattened `context_*`, properties and
//! traits columns, one table per track event name, `users`, `rejected_values`); plus
//! `message_ids`, `quarantine`, `dead_letters`, `collector_tables`/`collector_columns`
//! (the catalog) and `collector_migrations`.
//!
//! DuckDB lets one process hold a file open for writing, so live queries go through the
//! running agent's admin endpoint (see `crate::admin`).
//!
//! A fatal DuckDB error (a checkpoint that runs out of memory or disk) invalidates the
//! database: DuckDB refuses every statement until it is opened again. The sink then
//! closes it and opens the file again at its next use (replaying the write-ahead log);
//! the load that failed is not acked and its retry lands once.

pub mod config;
pub(crate) mod sink;

pub(crate) use sink::UNKEYED_REGISTRY_SQL;
pub use sink::{run_query, DuckDbSink};
