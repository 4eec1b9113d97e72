//! The versioned edge-to-agent wire formats. **This is an API boundary**: an agent must
//! read every batch an older edge sealed, and a shard must read every open event an
//! older deploy stored. Each format has **its own version**: never change a struct here
//! without bumping that format's version, keeping a decoder for the old one, and adding
//! a golden fixture (`tests/fixtures/<format>-v<N>.bin`).
//!
//! Frame layout (all formats): `magic (3 bytes) | version (1 byte) | payload | crc32(payload) (4 bytes, LE)`.
//! The payload is [postcard](https://docs.rs/postcard).
//!
//! | magic | format | version | history |
//! |---|---|---|---|
//! | `ECB` | sealed batch, at rest in a shard, leased to the agent | 1 | |
//! | `ECL` | lease response | 1 | |
//! | `ECA` | front worker → shard append | 2 | v2 adds `notes` (v1 still decodes) |
//! | `ECE` | one open event at rest in a shard | 1 | |

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
/// Version of the sealed batch format written now.
pub const BATCH_VERSION: u8 = 1;
/// Version of the lease response format written now.
pub const LEASE_VERSION: u8 = 1;
/// Version of the append format written now (v1 and v2 still decode). Version 3
/// carries the events already in the sealed batch's encoding, after the counts, so a
/// shard stores them as they came.
pub const APPEND_VERSION: u8 = 3;
/// Version of the open event format written now.
pub const EVENT_VERSION: u8 = 1;

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

/// Accepted events, drop counts and note counts the front worker hands to one shard
/// (version 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Append {
    pub events: Vec<StoredEvent>,
    /// `(reason code, count)` of events dropped by this request.
    pub drops: Vec<(String, u64)>,
    /// `(note key, count)` of what was noticed about this request's events.
    pub notes: Vec<(String, u64)>,
}

/// Append version 1: no notes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AppendV1 {
    pub events: Vec<StoredEvent>,
    pub drops: Vec<(String, u64)>,
}

fn frame<T: Serialize>(magic: [u8; 3], version: u8, value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&magic);
    out.push(version);
    let out = postcard::to_extend(value, out).map_err(|e| CodecError::Encode(e.to_string()))?;
    let crc = crc32fast::hash(&out[4..]);
    let mut out = out;
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Checks magic and checksum; returns the version and the payload.
fn unframe(magic: [u8; 3], bytes: &[u8]) -> Result<(u8, &[u8]), CodecError> {
    if bytes.len() < 8 {
        return Err(CodecError::TooShort(bytes.len()));
    }
    if bytes[..3] != magic {
        return Err(CodecError::BadMagic);
    }
    let version = bytes[3];
    let (payload, crc) = bytes[4..].split_at(bytes.len() - 8);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(CodecError::Checksum { stored, computed });
    }
    Ok((version, payload))
}

fn payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    postcard::from_bytes(payload).map_err(|e| CodecError::Payload(e.to_string()))
}

/// Decodes a format that has had one version so far.
fn decode_v1<T: DeserializeOwned>(magic: [u8; 3], bytes: &[u8]) -> Result<T, CodecError> {
    match unframe(magic, bytes)? {
        (1, p) => payload(p),
        (v, _) => Err(CodecError::UnsupportedVersion(v)),
    }
}

pub fn encode_batch(batch: &Batch) -> Result<Vec<u8>, CodecError> {
    frame(BATCH_MAGIC, BATCH_VERSION, batch)
}

/// The events of one append as a batch stores them (each event's postcard encoding,
/// back to back, no framing): what a shard keeps per append, so sealing concatenates
/// instead of decoding and encoding every event again.
pub fn encode_events_raw(events: &[StoredEvent]) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(events.len() * 512);
    for ev in events {
        out = postcard::to_extend(ev, out).map_err(|e| CodecError::Encode(e.to_string()))?;
    }
    Ok(out)
}

/// A sealed batch built from parts of [`encode_events_raw`], byte for byte what
/// [`encode_batch`] writes for the same events.
pub fn encode_batch_from_parts<'a>(
    shard: u32,
    sealed_at_ms: i64,
    events: usize,
    parts: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(&BATCH_MAGIC);
    out.push(BATCH_VERSION);
    let mut out = postcard::to_extend(&(shard, sealed_at_ms, events), out)
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    for p in parts {
        out.extend_from_slice(p);
    }
    let crc = crc32fast::hash(&out[4..]);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

pub fn decode_batch(bytes: &[u8]) -> Result<Batch, CodecError> {
    decode_v1(BATCH_MAGIC, bytes)
}

pub fn encode_lease(lease: &Lease) -> Result<Vec<u8>, CodecError> {
    frame(LEASE_MAGIC, LEASE_VERSION, lease)
}

pub fn decode_lease(bytes: &[u8]) -> Result<Lease, CodecError> {
    decode_v1(LEASE_MAGIC, bytes)
}

/// Encodes an append (version 3): the drop and note counts and the number of events,
/// then the events as [`encode_events_raw`] writes them, then the checksum.
pub fn encode_append(append: &Append) -> Result<Vec<u8>, CodecError> {
    let enc = |e: postcard::Error| CodecError::Encode(e.to_string());
    let mut out = Vec::with_capacity(64 + append.events.len() * 512);
    out.extend_from_slice(&APPEND_MAGIC);
    out.push(APPEND_VERSION);
    let head = (&append.drops, &append.notes, append.events.len() as u64);
    let mut out = postcard::to_extend(&head, out).map_err(enc)?;
    for ev in &append.events {
        out = postcard::to_extend(ev, out).map_err(enc)?;
    }
    let crc = crc32fast::hash(&out[4..]);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Encodes an append as version 2 (the events inside the postcard value): what a front
/// worker of the previous release sent. For tests of mixed-version deploys.
pub fn encode_append_v2(append: &Append) -> Result<Vec<u8>, CodecError> {
    frame(APPEND_MAGIC, 2, append)
}

/// An append as a queue shard stores it: the counts decoded, the events left in the
/// sealed batch's encoding ([`encode_events_raw`]): borrowed from a version-3 append,
/// encoded again from an older one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendParts<'a> {
    pub drops: Vec<(String, u64)>,
    pub notes: Vec<(String, u64)>,
    /// How many events `events_raw` holds.
    pub events: u64,
    pub events_raw: std::borrow::Cow<'a, [u8]>,
}

impl AppendParts<'_> {
    /// The events, decoded (a shard needs them only to drop a suppressed person's).
    pub fn decode_events(&self) -> Result<Vec<StoredEvent>, CodecError> {
        decode_events_raw(&self.events_raw, self.events)
    }
}

/// `n` events as [`encode_events_raw`] wrote them; trailing bytes are an error.
pub fn decode_events_raw(mut raw: &[u8], n: u64) -> Result<Vec<StoredEvent>, CodecError> {
    let mut events = Vec::with_capacity(n.min(10_000) as usize);
    for _ in 0..n {
        let (ev, rest) = postcard::take_from_bytes::<StoredEvent>(raw)
            .map_err(|e| CodecError::Payload(e.to_string()))?;
        events.push(ev);
        raw = rest;
    }
    if !raw.is_empty() {
        return Err(CodecError::Payload(format!(
            "{} bytes after the last of {n} events",
            raw.len()
        )));
    }
    Ok(events)
}

/// Reads an append of any version for storing: see [`AppendParts`].
pub fn decode_append_parts(bytes: &[u8]) -> Result<AppendParts<'_>, CodecError> {
    match unframe(APPEND_MAGIC, bytes)? {
        (3, p) => {
            type Head = (Vec<(String, u64)>, Vec<(String, u64)>, u64);
            let ((drops, notes, events), rest) = postcard::take_from_bytes::<Head>(p)
                .map_err(|e| CodecError::Payload(e.to_string()))?;
            Ok(AppendParts {
                drops,
                notes,
                events,
                events_raw: std::borrow::Cow::Borrowed(rest),
            })
        }
        (1 | 2, _) => {
            let a = decode_append(bytes)?;
            Ok(AppendParts {
                events: a.events.len() as u64,
                events_raw: std::borrow::Cow::Owned(encode_events_raw(&a.events)?),
                drops: a.drops,
                notes: a.notes,
            })
        }
        (v, _) => Err(CodecError::UnsupportedVersion(v)),
    }
}

/// Encodes an append as version 1 (notes are lost): what a front worker of the previous
/// release sent. For tests of mixed-version deploys.
pub fn encode_append_v1(append: &AppendV1) -> Result<Vec<u8>, CodecError> {
    frame(APPEND_MAGIC, 1, append)
}

/// Decodes an append of version 1, 2 or 3 (during a deploy, an old front worker may
/// still talk to a new shard).
pub fn decode_append(bytes: &[u8]) -> Result<Append, CodecError> {
    match unframe(APPEND_MAGIC, bytes)? {
        (1, p) => {
            let v1: AppendV1 = payload(p)?;
            Ok(Append {
                events: v1.events,
                drops: v1.drops,
                notes: Vec::new(),
            })
        }
        (2, p) => payload(p),
        (3, _) => {
            let parts = decode_append_parts(bytes)?;
            Ok(Append {
                events: parts.decode_events()?,
                drops: parts.drops,
                notes: parts.notes,
            })
        }
        (v, _) => Err(CodecError::UnsupportedVersion(v)),
    }
}

/// One open event at rest in a shard's storage. Stored data outlives deploys, so this is
/// framed and versioned like a batch.
pub fn encode_event(event: &StoredEvent) -> Result<Vec<u8>, CodecError> {
    frame(EVENT_MAGIC, EVENT_VERSION, event)
}

pub fn decode_event(bytes: &[u8]) -> Result<StoredEvent, CodecError> {
    decode_v1(EVENT_MAGIC, bytes)
}
