//! Warehouse sinks. One folder per sink (`mod.rs` docs, `config.rs`, the sink), all
//! behind the [`Sink`] trait. A sink must be idempotent by `message_id`: the edge
//! delivers at least once, and the warehouse makes it exactly once.

pub mod duckdb;

use collector_core::StoredEvent;

/// What one load did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Rows newly written.
    pub inserted: u64,
    /// Events skipped because their `message_id` was already loaded.
    pub duplicates: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The warehouse could not take the write now (locked, I/O); the batch stays
    /// leased and comes back.
    #[error("warehouse temporarily unavailable: {0}")]
    Transient(String),
    /// The write can never succeed as is.
    #[error("warehouse rejected the load: {0}")]
    Permanent(String),
}

impl SinkError {
    pub fn retryable(&self) -> bool {
        matches!(self, SinkError::Transient(_))
    }
}

/// A warehouse the agent loads into.
pub trait Sink: Send {
    /// Loads events in one transaction: all or nothing. Events whose `message_id` is
    /// already present are skipped and counted as duplicates.
    fn load(&mut self, events: &[StoredEvent]) -> Result<LoadStats, SinkError>;
    /// Keeps a batch that could not be decoded, so nothing is lost silently.
    fn dead_letter(
        &mut self,
        shard: u32,
        batch_id: i64,
        blob: &[u8],
        error: &str,
    ) -> Result<(), SinkError>;
}
