//! ClickHouse over HTTP (`[warehouse] kind = "clickhouse"`).
//!
//! ```toml
//! [warehouse]
//! kind = "clickhouse"
//! url = "http://clickhouse.internal:8123"
//! database = "analytics"          # default; created if missing
//! user = "default"                # default
//! password_env = "CLICKHOUSE_PASSWORD"   # optional; never the password itself
//! # ca_file = "/etc/ssl/company-ca.pem"  # for https://, CAs beside the public ones
//! # cert_file = "/etc/collector/client.pem"  # for https://, a client certificate
//! # key_file = "/etc/collector/client.key"   # and its key, when the server asks
//! ```
//!
//! ClickHouse has no transactions and no unique keys, so exactly once is built, not
//! borrowed:
//!
//! - Rows live in `collector_rows_<table>` (`ReplacingMergeTree`, ordered by
//!   `message_id`, partitioned by the month of `received_at`, both fixed for an event):
//!   two copies of one event collapse into one. A `_version` makes the copy received
//!   first the one kept, as in every sink.
//! - Analysts query the views `tracks`, `pages`, `order_completed`, … which read the
//!   rows tables with `FINAL`: **a query sees every event exactly once as soon as its
//!   load returned**, before or after ClickHouse merges the parts. A view has every
//!   column of its rows table but the sink's own (`_version`, `_received`, `_mid`).
//!   A view that gains a column is swapped in with one `RENAME` (18.16 has no
//!   `CREATE OR REPLACE VIEW`): on 18.16 a query never finds it missing; newer
//!   servers rename the two names one after the other, a far shorter moment.
//!   DDL is not transactional either: a view a crash left missing, or behind a column
//!   its rows table got, is made again when an agent connects and by the next load
//!   into that table.
//! - `message_ids` (a registry) keeps the warehouse-wide uniqueness of `message_id`;
//!   `collector_loaded_batches` (a ledger of `(shard, batch_id)`) is written last, so a
//!   redelivered batch is skipped whole. A crash between the rows and the ledger makes
//!   the retry write the same rows again, which `FINAL` collapses.
//! - `users` is a view that takes, per user id, each trait's latest non-null value:
//!   `collector_rows_users` has a row per identify (`_version`, its `timestamp`;
//!   `_mid`, its message id, for two of one instant).
//! - `quarantine` and `dead_letters` are views too: replaying or resolving appends a new
//!   version of the row (and an operator fixing a quarantined event does the same:
//!   `INSERT INTO collector_quarantine SELECT …, _version + 1 FROM collector_quarantine
//!   FINAL WHERE message_id = …`). `dead_letters.blob` is the batch's bytes, as in every
//!   sink; `blob_hex` beside it is for clients of the JSON formats.
//!
//! - Identity, profiles and audiences (`identities`, `identity_edges`, `identity_merges`,
//!   `profiles`, `identity_dirty`, `audience_membership`) are `FINAL` views too, over
//!   versioned `collector_*` tables: each rewrite of a row is a new `_version`
//!   ([`version_now`]); `identity_pending` lists the loads in `message_ids` that no
//!   run has marked in `collector_identity_read`. See `identity/clickhouse.rs`.
//!
//! Types: `String`, `Float64`, `UInt8` for booleans, JSON as `String`; instants are
//! `DateTime64(3, 'UTC')` on ClickHouse 20.1 and later and `DateTime` (whole seconds;
//! the milliseconds stay in `raw`) on older servers. An instant of a fixed column
//! outside what `DateTime` holds (1970 to 2105) is NULL, with a row in
//! `rejected_values`; the event keeps it in `raw`. Tested against Debian's
//! clickhouse-server 18.16; the SQL avoids what newer releases removed or changed.
//!
//! Rows go in `RowBinary` (`rowbinary.rs`: the server parses no JSON) while the rows
//! table has, in `system.columns` read for each load, the types the sink created; a
//! table whose types an operator changed goes as `JSONEachRow`, which the server
//! converts. ClickHouse has no lock to hold across that read and the insert: a type
//! changed between them makes the insert fail and retry (or, for a change between
//! types of one size, read the bytes as the new type).
//!
//! One load is four rounds of requests, each round's at once: the lookups (ledger,
//! registry, column types) while the agent plans the load; the rows tables' inserts
//! (with the rejected values and the quarantine lookup), which the server parses and
//! stores in a thread each; the registry, quarantine and dead letters; the ledger.
//!
//! Limits: two agents adding the *same new column* at the same instant with values of
//! different types may disagree on its type until restarted; an event whose
//! `message_id` reaches two different tables at once from two agents stays in both.

pub mod config;
mod rowbinary;
mod sink;

pub use sink::ClickHouseSink;

/// The last [`version_now`] handed out, or the floor [`raise_version_floor`] set.
static LAST_VERSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A `_version` for rows the agent rewrites (identity, profiles, audience stays,
/// quarantine and privacy requests): microseconds since the epoch, strictly increasing
/// within the process and above every version the warehouse held when the sink
/// connected, so the newest write of a row is the one `FINAL` keeps.
pub fn version_now() -> u64 {
    use std::sync::atomic::Ordering;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let mut last = LAST_VERSION.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST_VERSION.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

/// Makes every later [`version_now`] larger than `floor`: the sink sets it at connect to
/// the largest version its tables hold, so an agent whose clock stepped back across a
/// restart (or was behind the agent that wrote before it) does not write versions that
/// lose to older rows.
pub fn raise_version_floor(floor: u64) {
    LAST_VERSION.fetch_max(floor, std::sync::atomic::Ordering::Relaxed);
}
