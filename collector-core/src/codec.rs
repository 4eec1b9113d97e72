//! The versioned edge-to-agent wire formats. **This is an API boundary**: an agent must
//! read every batch an older edge sealed. Never change a struct here without bumping the
//! format version, keeping a decoder for the old one, and adding a golden fixture.
//!
//! Frame layout (all formats): `magic (3 bytes) | version (1 byte) | payload | crc32(payload) (4 bytes, LE)`.
//! The payload is [postcard](https://docs.rs/postcard).

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::CodecError;
use crate::event::StoredEvent;

/// Magic of a sealed batch blob (one row of a queue shard).
pub const BATCH_MAGIC: [u8; 3] = *b"ECB";
/// Magic of a drain-lease response.
pub const LEASE_MAGIC: [u8; 3] = *b"ECL";
/// Magic of an append from the edge's front worker to a queue shard.
pub const APPEND_MAGIC: [u8; 3] = *b"ECA";
/// Magic of one open (not yet sealed) event at rest in a queue shard.
pub const EVENT_MAGIC: [u8; 3] = *b"ECE";
/// Current version of all four formats.
pub const FORMAT_VERSION: u8 = 1;

/// A sealed batch of events from one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub shard: u32,
    pub sealed_at_ms: i64,
    pub events: Vec<StoredEvent>,
}

/// One sealed batch handed out under a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeasedBatch {
    pub batch_id: i64,
    #[serde(with = "serde_bytes")]
    pub blob: Vec<u8>,
}

/// The answer to a drain lease: ack `lease_id` once the batches are committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub lease_id: String,
    pub expires_at_ms: i64,
    pub batches: Vec<LeasedBatch>,
}

/// Accepted events and drop counts the front worker hands to one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Append {
    pub events: Vec<StoredEvent>,
    /// `(reason code, count)` of events dropped by this request.
    pub drops: Vec<(String, u64)>,
}

fn frame<T: Serialize>(magic: [u8; 3], value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&magic);
    out.push(FORMAT_VERSION);
    let out = postcard::to_extend(value, out).map_err(|e| CodecError::Encode(e.to_string()))?;
    let crc = crc32fast::hash(&out[4..]);
    let mut out = out;
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn unframe<T: DeserializeOwned>(magic: [u8; 3], bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() < 8 {
        return Err(CodecError::TooShort(bytes.len()));
    }
    if bytes[..3] != magic {
        return Err(CodecError::BadMagic);
    }
    let version = bytes[3];
    if version != FORMAT_VERSION {
        return Err(CodecError::UnsupportedVersion(version));
    }
    let (payload, crc) = bytes[4..].split_at(bytes.len() - 8);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(CodecError::Checksum { stored, computed });
    }
    postcard::from_bytes(payload).map_err(|e| CodecError::Payload(e.to_string()))
}

pub fn encode_batch(batch: &Batch) -> Result<Vec<u8>, CodecError> {
    frame(BATCH_MAGIC, batch)
}

pub fn decode_batch(bytes: &[u8]) -> Result<Batch, CodecError> {
    unframe(BATCH_MAGIC, bytes)
}

pub fn encode_lease(lease: &Lease) -> Result<Vec<u8>, CodecError> {
    frame(LEASE_MAGIC, lease)
}

pub fn decode_lease(bytes: &[u8]) -> Result<Lease, CodecError> {
    unframe(LEASE_MAGIC, bytes)
}

pub fn encode_append(append: &Append) -> Result<Vec<u8>, CodecError> {
    frame(APPEND_MAGIC, append)
}

pub fn decode_append(bytes: &[u8]) -> Result<Append, CodecError> {
    unframe(APPEND_MAGIC, bytes)
}

/// One open event at rest in a shard's storage. Stored data outlives deploys, so this is
/// framed and versioned like a batch.
pub fn encode_event(event: &StoredEvent) -> Result<Vec<u8>, CodecError> {
    frame(EVENT_MAGIC, event)
}

pub fn decode_event(bytes: &[u8]) -> Result<StoredEvent, CodecError> {
    unframe(EVENT_MAGIC, bytes)
}
