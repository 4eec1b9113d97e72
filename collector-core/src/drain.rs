//! The drain API between the edge and the agent: paths, request and response types and
//! their limits, defined once and used by both sides. **An API boundary**: fields are
//! only ever added with `#[serde(default)]`, so an older agent and a newer edge (or the
//! reverse) still understand each other; the binary formats they carry are versioned in
//! [`crate::codec`], and [`DrainInfo::formats`] tells the agent which versions the edge
//! writes before it leases anything.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::codec;

pub const INFO_PATH: &str = "/drain/info";
pub const LEASE_PATH: &str = "/drain/lease";
pub const ACK_PATH: &str = "/drain/ack";
pub const STATS_PATH: &str = "/drain/stats";
pub const RENEW_PATH: &str = "/drain/renew";
/// `POST` a [`SuppressRequest`]; `GET` the [`Suppressions`].
pub const SUPPRESSIONS_PATH: &str = "/drain/suppressions";

/// Most sealed batches one lease may hand out.
pub const MAX_LEASE_BATCHES: u32 = 100;
/// Shortest and longest lease.
pub const MIN_LEASE_MS: i64 = 1_000;
pub const MAX_LEASE_MS: i64 = 3_600_000;
/// Defaults when a lease request leaves them out.
pub const DEFAULT_LEASE_BATCHES: u32 = 10;
pub const DEFAULT_LEASE_MS: i64 = 30_000;

/// The binary format versions an edge writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Formats {
    /// Version of sealed batches (`ECB`).
    pub batch: u8,
    /// Version of lease responses (`ECL`).
    pub lease: u8,
}

impl Formats {
    /// What this build writes.
    pub const CURRENT: Formats = Formats {
        batch: codec::BATCH_VERSION,
        lease: codec::LEASE_VERSION,
    };

    /// Whether a reader built from this code can read what `self` describes: every
    /// version it writes is one this build decodes.
    pub fn readable(&self) -> bool {
        (1..=codec::BATCH_VERSION).contains(&self.batch)
            && (1..=codec::LEASE_VERSION).contains(&self.lease)
    }
}

/// `GET /drain/info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainInfo {
    pub shards: u32,
    /// Kept for agents from before per-format versions, which require it: always 1.
    #[serde(default = "one")]
    pub format_version: u8,
    /// The formats the edge writes. Edges from before per-format versions sent only
    /// `format_version` (1 for every format).
    #[serde(default = "legacy_formats")]
    pub formats: Formats,
}

fn one() -> u8 {
    1
}

fn legacy_formats() -> Formats {
    Formats { batch: 1, lease: 1 }
}

/// `POST /drain/lease`; the front worker forwards it to the shard unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub shard: u32,
    /// Most sealed batches to hand out (1..=[`MAX_LEASE_BATCHES`]).
    #[serde(default = "default_max_batches")]
    pub max_batches: u32,
    /// How long the lease holds before the batches are handed out again.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: i64,
    /// Seal the open batch first, so everything accepted so far can be drained.
    #[serde(default)]
    pub flush: bool,
}

fn default_max_batches() -> u32 {
    DEFAULT_LEASE_BATCHES
}
fn default_lease_ms() -> i64 {
    DEFAULT_LEASE_MS
}

/// A drain request out of bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrainRequestError {
    #[error("max_batches must be 1..={MAX_LEASE_BATCHES}, got {0}")]
    MaxBatches(u32),
    #[error("lease_ms must be {MIN_LEASE_MS}..={MAX_LEASE_MS}, got {0}")]
    LeaseMs(i64),
    #[error("shard {shard} does not exist; this edge has {shards} shards")]
    NoSuchShard { shard: u32, shards: u32 },
}

impl LeaseRequest {
    /// Checks the limits (and the shard, when the number of shards is known).
    pub fn validate(&self, shards: Option<u32>) -> Result<(), DrainRequestError> {
        if !(1..=MAX_LEASE_BATCHES).contains(&self.max_batches) {
            return Err(DrainRequestError::MaxBatches(self.max_batches));
        }
        if !(MIN_LEASE_MS..=MAX_LEASE_MS).contains(&self.lease_ms) {
            return Err(DrainRequestError::LeaseMs(self.lease_ms));
        }
        check_shard(self.shard, shards)
    }
}

/// `POST /drain/ack`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckRequest {
    pub shard: u32,
    pub lease_id: String,
}

impl AckRequest {
    pub fn validate(&self, shards: Option<u32>) -> Result<(), DrainRequestError> {
        check_shard(self.shard, shards)
    }
}

/// A drain request addressed to one shard: the edge parses, validates and forwards every
/// one of them the same way.
pub trait ShardRequest: Serialize + serde::de::DeserializeOwned {
    /// The `code` of a malformed or out-of-bounds request.
    const BAD_REQUEST_CODE: &'static str;
    fn shard(&self) -> u32;
    fn validate(&self, shards: Option<u32>) -> Result<(), DrainRequestError>;
}

impl ShardRequest for LeaseRequest {
    const BAD_REQUEST_CODE: &'static str = "bad_lease_request";
    fn shard(&self) -> u32 {
        self.shard
    }
    fn validate(&self, shards: Option<u32>) -> Result<(), DrainRequestError> {
        LeaseRequest::validate(self, shards)
    }
}

impl ShardRequest for AckRequest {
    const BAD_REQUEST_CODE: &'static str = "bad_ack_request";
    fn shard(&self) -> u32 {
        self.shard
    }
    fn validate(&self, shards: Option<u32>) -> Result<(), DrainRequestError> {
        AckRequest::validate(self, shards)
    }
}

impl ShardRequest for RenewRequest {
    const BAD_REQUEST_CODE: &'static str = "bad_renew_request";
    fn shard(&self) -> u32 {
        self.shard
    }
    fn validate(&self, shards: Option<u32>) -> Result<(), DrainRequestError> {
        RenewRequest::validate(self, shards)
    }
}

fn check_shard(shard: u32, shards: Option<u32>) -> Result<(), DrainRequestError> {
    match shards {
        Some(n) if shard >= n => Err(DrainRequestError::NoSuchShard { shard, shards: n }),
        _ => Ok(()),
    }
}

/// `POST /drain/renew`: extends a lease the agent still works on (a large load), so its
/// batches are not handed to another agent meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub shard: u32,
    pub lease_id: String,
    /// The new expiry is now plus this.
    pub lease_ms: i64,
}

impl RenewRequest {
    pub fn validate(&self, shards: Option<u32>) -> Result<(), DrainRequestError> {
        if !(MIN_LEASE_MS..=MAX_LEASE_MS).contains(&self.lease_ms) {
            return Err(DrainRequestError::LeaseMs(self.lease_ms));
        }
        check_shard(self.shard, shards)
    }
}

/// How many batches the renewal extended (0: the lease had expired and its batches may
/// be with another agent; loading them again is harmless, the warehouse dedups).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewResponse {
    pub renewed: u64,
}

/// The answer to an ack: how many batches were deleted (0 if the lease had expired
/// and was handed out again; the next holder loads them idempotently).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckResponse {
    pub acked: u64,
}

/// One shard's queue depth and counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStats {
    #[serde(default)]
    pub shard: Option<u32>,
    pub open_events: u64,
    pub open_bytes: u64,
    pub sealed_batches: u64,
    pub leased_batches: u64,
    pub sealed_events: u64,
    /// When the oldest sealed batch waiting to be drained was sealed (Unix ms): the
    /// agent's lag is now minus this.
    #[serde(default)]
    pub oldest_sealed_ms: Option<i64>,
    /// Events not stored, by reason.
    #[serde(default)]
    pub drops: BTreeMap<String, u64>,
    /// Events stored with a note (untrusted clock, PII found, TC string ignored, …).
    #[serde(default)]
    pub notes: BTreeMap<String, u64>,
}

/// `GET /drain/stats`: every shard, and the counters summed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainStats {
    pub shards: Vec<ShardStats>,
    #[serde(default)]
    pub drops: BTreeMap<String, u64>,
    #[serde(default)]
    pub notes: BTreeMap<String, u64>,
}

impl DrainStats {
    pub fn from_shards(shards: Vec<ShardStats>) -> DrainStats {
        let mut drops = BTreeMap::new();
        let mut notes = BTreeMap::new();
        for s in &shards {
            for (k, v) in &s.drops {
                *drops.entry(k.clone()).or_default() += v;
            }
            for (k, v) in &s.notes {
                *notes.entry(k.clone()).or_default() += v;
            }
        }
        DrainStats {
            shards,
            drops,
            notes,
        }
    }
}

/// Most digests one suppression request may add or remove, and most an edge keeps.
pub const MAX_SUPPRESS_IDS: usize = 10_000;
pub const MAX_SUPPRESSED: usize = 1_000_000;
/// Longest suppressed id value (Segment's ids are short; this bounds a request).
pub const MAX_SUPPRESSED_ID_BYTES: usize = 1_024;

/// One suppressed id: an event whose `user_id` (or `anonymous_id`) equals `value` is
/// dropped at the edge before it is stored, and at drain when it was already queued.
/// The edge never holds the id itself, only its [`SuppressedId::digest`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SuppressedId {
    /// `user_id` or `anonymous_id`.
    #[serde(rename = "type")]
    pub id_type: String,
    pub value: String,
}

impl SuppressedId {
    pub fn new(id_type: &str, value: &str) -> SuppressedId {
        SuppressedId {
            id_type: id_type.into(),
            value: value.into(),
        }
    }

    /// What the suppression list holds for it: [`suppression_digest`].
    pub fn digest(&self) -> String {
        suppression_digest(&self.id_type, &self.value)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.id_type != "user_id" && self.id_type != "anonymous_id" {
            return Err(format!(
                "id type {:?} is not \"user_id\" or \"anonymous_id\"",
                self.id_type
            ));
        }
        if self.value.is_empty() || self.value.len() > MAX_SUPPRESSED_ID_BYTES {
            return Err(format!(
                "an id value must have 1 to {MAX_SUPPRESSED_ID_BYTES} bytes"
            ));
        }
        Ok(())
    }
}

/// The suppression list's entry for an id: the first 128 bits of
/// `SHA-256("collector-suppression:v1:<type>:<value>")`, in hex. The edge's storage
/// holds these, not the ids of the people who asked to be forgotten.
pub fn suppression_digest(id_type: &str, value: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"collector-suppression:v1:");
    h.update(id_type.as_bytes());
    h.update(b":");
    h.update(value.as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// Whether a string is a suppression digest (32 lowercase hex digits).
pub fn is_digest(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether an event with these ids is suppressed, given a lookup of digests.
pub fn is_suppressed(
    user_id: Option<&str>,
    anonymous_id: Option<&str>,
    contains: impl Fn(&str) -> bool,
) -> bool {
    user_id.is_some_and(|v| contains(&suppression_digest("user_id", v)))
        || anonymous_id.is_some_and(|v| contains(&suppression_digest("anonymous_id", v)))
}

/// `POST /drain/suppressions`: digests to add to and remove from every shard's list
/// (idempotent: adding one twice or removing an absent one changes nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuppressRequest {
    #[serde(default)]
    pub add: Vec<String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

impl SuppressRequest {
    pub fn validate(&self) -> Result<(), String> {
        if self.add.len() + self.remove.len() > MAX_SUPPRESS_IDS {
            return Err(format!(
                "at most {MAX_SUPPRESS_IDS} digests per request, got {}",
                self.add.len() + self.remove.len()
            ));
        }
        if let Some(bad) = self.add.iter().chain(&self.remove).find(|d| !is_digest(d)) {
            return Err(format!(
                "{bad:?} is not a suppression digest (32 lowercase hex digits)"
            ));
        }
        Ok(())
    }
}

/// `GET /drain/suppressions`: the digests suppressed now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suppressions {
    pub digests: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suppressed_ids_are_digested_checked_and_matched_by_type() {
        let id = SuppressedId::new("user_id", "u:1");
        let d = id.digest();
        assert!(is_digest(&d), "{d}");
        assert_ne!(d, SuppressedId::new("anonymous_id", "u:1").digest());
        assert!(SuppressedId::new("email", "x").validate().is_err());
        assert!(SuppressedId::new("user_id", "").validate().is_err());
        let has = |k: &str| k == d;
        assert!(is_suppressed(Some("u:1"), None, has));
        assert!(!is_suppressed(Some("other"), None, has));
        // A user id that happens to be an anonymous id elsewhere is not the same id.
        assert!(!is_suppressed(None, Some("u:1"), has));
        let many = SuppressRequest {
            add: vec![d; MAX_SUPPRESS_IDS + 1],
            remove: vec![],
        };
        assert!(many.validate().is_err());
        let raw = SuppressRequest {
            add: vec!["user_id:u:1".into()],
            remove: vec![],
        };
        assert!(raw.validate().is_err(), "ids in the clear are refused");
    }

    #[test]
    fn lease_request_limits_are_enforced() {
        let ok = LeaseRequest {
            shard: 1,
            max_batches: 10,
            lease_ms: 30_000,
            flush: false,
        };
        assert_eq!(ok.validate(Some(4)), Ok(()));
        assert!(matches!(
            ok.validate(Some(1)),
            Err(DrainRequestError::NoSuchShard { .. })
        ));
        let many = LeaseRequest {
            max_batches: MAX_LEASE_BATCHES + 1,
            ..ok.clone()
        };
        assert_eq!(many.validate(None), Err(DrainRequestError::MaxBatches(101)));
        let short = LeaseRequest {
            lease_ms: MIN_LEASE_MS - 1,
            ..ok
        };
        assert_eq!(short.validate(None), Err(DrainRequestError::LeaseMs(999)));
    }

    #[test]
    fn defaults_fill_a_minimal_lease_request() {
        let r: LeaseRequest = serde_json::from_str(r#"{"shard": 2}"#).unwrap();
        assert_eq!(r.max_batches, DEFAULT_LEASE_BATCHES);
        assert_eq!(r.lease_ms, DEFAULT_LEASE_MS);
        assert!(serde_json::from_str::<LeaseRequest>(r#"{"shard": 2, "x": 1}"#).is_err());
    }

    #[test]
    fn info_from_an_older_edge_reads_as_version_one_formats() {
        let old: DrainInfo = serde_json::from_str(r#"{"shards": 4, "format_version": 1}"#).unwrap();
        assert_eq!(old.formats, Formats { batch: 1, lease: 1 });
        assert!(old.formats.readable());
        let newer = Formats {
            batch: codec::BATCH_VERSION + 1,
            lease: 1,
        };
        assert!(!newer.readable());
    }
}
