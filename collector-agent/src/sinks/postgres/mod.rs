//! The PostgreSQL warehouse (`[warehouse] kind = "postgres"`).
//!
//! ```toml
//! [warehouse]
//! kind = "postgres"
//! url = "postgres://collector@db.internal:5432/analytics"
//! password_env = "PGPASSWORD"     # optional; never the password itself
//! schema = "public"               # default
//! ```
//!
//! TLS as libpq does it, from the URL: `?sslmode=verify-full&sslrootcert=ca.pem`
//! (`tls.rs`: the modes, `sslrootcert=system`, client certificates).
//!
//! Tables in Segment's warehouse shape (as in every sink, from `sinks::schema`):
//! `timestamptz` instants, `jsonb` for `properties`/`traits`/`context`/`integrations`/
//! `raw`, `message_id` the primary key; per-event tables, flattened columns, `users` and
//! `rejected_values` (see `sinks::tables`); plus `message_ids`, `quarantine`,
//! `dead_letters`, the catalog (`collector_tables`, `collector_columns`) and
//! `collector_migrations`. New tables and columns are created under the agents'
//! advisory lock, so agents sharing a database never race on DDL. Exactly once: each load is one
//! transaction; registering its ids in `message_ids` (one `COPY`, or `INSERT … ON
//! CONFLICT DO NOTHING` when one is already there) decides which rows are new, so a
//! replayed batch inserts nothing.
//! The new rows go in `COPY … (FORMAT binary)` (`copy.rs`) while the tables have the
//! sink's own types; a table whose column types an operator changed goes as CSV.

pub mod config;
mod copy;
mod sink;
pub mod tls;

pub use sink::PostgresSink;
