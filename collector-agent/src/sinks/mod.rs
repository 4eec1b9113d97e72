//! Warehouse sinks. One folder per sink (`mod.rs` docs, `config.rs`, the sink), all
//! behind the [`Sink`] trait. A sink must be idempotent by `message_id`: the edge
//! delivers at least once, and the warehouse makes it exactly once.

pub mod duckdb;

use collector_core::StoredEvent;

/// What one load did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoadStats {
    /// Rows newly written.
    pub inserted: u64,
    /// Events skipped because their `message_id` was already loaded (in any table: a
    /// `message_id` is unique across the warehouse), in this load or an earlier one.
    pub duplicates: u64,
    /// Events the warehouse refused, kept in the quarantine with their reason.
    pub quarantined: u64,
    /// Batches that did not decode, kept as dead letters.
    pub dead_letters: u64,
}

impl LoadStats {
    pub fn add(&mut self, o: LoadStats) {
        self.inserted += o.inserted;
        self.duplicates += o.duplicates;
        self.quarantined += o.quarantined;
        self.dead_letters += o.dead_letters;
    }
}

/// Why a write failed, and whether trying again can help: the drain loop decides with
/// [`SinkError::retryable`] alone.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The warehouse could not take the write now (locked, I/O, its schema needs an
    /// operator); the batch stays leased and comes back.
    #[error("warehouse temporarily unavailable: {0}")]
    Transient(String),
    /// This data can never be written as is (a conversion or constraint error). The
    /// sink isolates the event that causes it and quarantines it.
    #[error("warehouse rejected the load: {0}")]
    Permanent(String),
}

impl SinkError {
    pub fn retryable(&self) -> bool {
        matches!(self, SinkError::Transient(_))
    }
}

/// One leased batch, as the drain loop hands it to a sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadBatch {
    Decoded {
        batch_id: i64,
        events: Vec<StoredEvent>,
    },
    /// A batch that does not decode: kept whole as a dead letter, keyed by
    /// `(shard, batch_id)`.
    Undecodable {
        batch_id: i64,
        blob: Vec<u8>,
        error: String,
    },
}

/// Everything one lease brought from one shard: loaded in one transaction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Load {
    pub shard: u32,
    pub batches: Vec<LoadBatch>,
}

impl Load {
    /// A load of one decoded batch.
    pub fn events(shard: u32, batch_id: i64, events: Vec<StoredEvent>) -> Load {
        Load {
            shard,
            batches: vec![LoadBatch::Decoded { batch_id, events }],
        }
    }
}

/// A warehouse the agent loads into.
pub trait Sink: Send {
    /// Loads one lease's batches, all or nothing: its events (each `message_id` once in
    /// the whole warehouse), the events the warehouse refuses (quarantined with their
    /// reason, never blocking the rest), and undecodable batches (dead letters). Loading
    /// the same `Load` again changes nothing. `Err` only when nothing was committed and
    /// the load must be retried.
    fn load(&mut self, load: &Load) -> Result<LoadStats, SinkError>;
}
