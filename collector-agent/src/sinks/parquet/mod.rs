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
//! lake/table=tracks/date=2026-11-25/part-s3-b41-l17.parquet   one file per table, date and
//! lake/table=pages/date=2026-11-25/part-s3-b41-l17.parquet    load (shard, first batch, load id)
//! lake/_collector/state.duckdb   message_ids, loaded_batches (the manifest), quarantine,
//!                                dead_letters, collector_migrations; `users` and
//!                                `collector_user_traits` (written with each load, as
//!                                in a DuckDB warehouse); identity, profiles,
//!                                audiences, activation and privacy requests (run there,
//!                                over views of the files: `Sink::session`)
//! lake/_collector/tmp/           files written, not yet renamed into place; a
//!                                compaction's folder
//! lake/table=tracks/date=2026-11-24/part-c12-0.parquet   a day's small files, compacted
//! ```
//!
//! `date` is the UTC day the edge received the event (`received_at`; not the
//! client-chosen `timestamp`), and no file has a column named `date` or `table` (the
//! partition keys readers add). Exactly once: a file holds the
//! rows of one load whose `message_id`s were new; it is written under `_collector/tmp/`,
//! the ids and the manifest (which lists it as `staged`) are committed, and only then is
//! it renamed into place. A crash before the commit leaves temp files that no reader
//! sees and the next open removes (the retry loads the rows again); a crash after it
//! leaves `staged` files, which the next open renames into place.
//!
//! An idle agent compacts a partition's small files (`compact`, on by default; see
//! [`compact`] for how readers never see a row twice and what a crash leaves):
//!
//! ```toml
//! [warehouse]
//! kind = "parquet"
//! path = "./data/lake"
//! compact = true            # the default
//! compact_min_files = 64    # the day still receiving events; a day that is over: 2
//! ```

mod compact;
pub mod config;
mod sink;

pub use compact::{Compacted, CrashPoint, Policy as CompactPolicy, TARGET_FILE_BYTES};
pub use sink::ParquetSink;
