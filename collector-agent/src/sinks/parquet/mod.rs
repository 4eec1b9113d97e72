//! A Parquet lake (`[warehouse] kind = "parquet"`), readable by DuckDB, Spark,
//! Snowflake external tables and BigQuery.
//!
//! ```toml
//! [warehouse]
//! kind = "parquet"
//! path = "./data/lake"
//! ```
//!
//! Layout (the same when the folder becomes object storage):
//!
//! ```text
//! lake/table=tracks/date=2026-11-25/part-s3-b41.parquet   one file per table, date and batch
//! lake/table=pages/date=2026-11-25/part-s0-b7.parquet
//! lake/_collector/state.duckdb   message_ids, loaded_batches (the manifest), quarantine,
//!                                dead_letters, collector_migrations
//! ```
//!
//! `date` is the UTC date of the event's `timestamp`. Exactly once: a file holds the
//! rows of one batch whose `message_id`s were new; it is written to a temp file and
//! renamed into place, and the ids and the manifest are committed after. A crash before
//! that commit leaves a file that the retry rewrites with the same name and the same
//! rows (the ids were not committed, so the same rows are new again); a crash after it
//! makes every row of the retry a duplicate, so nothing is written.

pub mod config;
mod sink;

pub use sink::ParquetSink;
