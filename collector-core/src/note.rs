//! Notes: what the edge noticed about, or did to, an event it kept. They are counted by
//! key next to the drop counters (`GET /drain/stats` → `notes`), so a privacy team can
//! see how often the safety nets fire and an operator how many clients have bad clocks.
//! Typed here, so the counter names are defined once.

use crate::detect::Detected;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    /// The client's `sentAt`/`timestamp` were not believable; `timestamp` was derived
    /// without them (see [`crate::timestamp::correct_skew`]).
    ClockUntrusted,
    /// A TC string was present but ignored (malformed, too long, …), by its error code.
    TcfIgnored(&'static str),
    /// A value under a PII key name (`[pii] keys`) was hashed or removed.
    PiiKey,
    /// A PII value was found by detection and hashed or redacted.
    PiiDetected(Detected),
    /// The event's `userId` or `anonymousId` is a placeholder on the block list
    /// (`"undefined"`, `"guest"`, …): kept as sent, but never used to shard or to link
    /// people.
    BlockedId,
    /// An `encrypt` field was only hashed: this engine cannot seal (no `[pii]
    /// seal_to`, or no random source).
    SealUnavailable,
}

impl Note {
    /// The counter key.
    pub fn key(&self) -> String {
        match self {
            Note::ClockUntrusted => "clock_untrusted".into(),
            Note::TcfIgnored(code) => format!("tcf_ignored_{code}"),
            Note::PiiKey => "pii_key_field".into(),
            Note::PiiDetected(kind) => format!("pii_detected_{}", kind.as_str()),
            Note::BlockedId => "blocked_id".into(),
            Note::SealUnavailable => "seal_unavailable".into(),
        }
    }
}

/// Notes counted over a request: `(key, count)`, sorted by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoteCounts(std::collections::BTreeMap<String, u64>);

impl NoteCounts {
    pub fn add(&mut self, note: Note) {
        *self.0.entry(note.key()).or_default() += 1;
    }

    pub fn extend(&mut self, notes: impl IntoIterator<Item = Note>) {
        for n in notes {
            self.add(n);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn to_vec(&self) -> Vec<(String, u64)> {
        self.0.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}
