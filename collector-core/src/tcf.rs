//! IAB TCF v2.x TC string decoder (core segment): purpose consents, purpose legitimate
//! interests, special features, vendor consents and vendor legitimate interests.
//!
//! The bit layout follows the IAB Tech Lab "Consent string and vendor list formats v2"
//! specification. Decoding is strict: a string the reference implementation rejects is
//! an error here too (see `tests/fixtures/tcf/`), and an error never panics.
//!
//! **Bounded work.** A TC string is untrusted input. Strings longer than
//! [`MAX_TC_STRING_CHARS`] are refused before decoding; vendor sections are kept as the
//! ranges they were written as (never expanded into id lists), so memory and time are a
//! small constant times the string's length, whatever ranges it claims.

use base64::Engine;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TcfError {
    #[error("TC string is empty")]
    Empty,
    #[error("TC string is not base64url")]
    Base64,
    #[error("TC string version {0} is not supported (expected 2)")]
    Version(u8),
    #[error("TC string ends early: needed bit {needed}, have {have}")]
    Truncated { needed: usize, have: usize },
    #[error("TC string has an invalid vendor range {start}..={end}")]
    BadRange { start: u16, end: u16 },
    #[error("TC string has an invalid language or country code")]
    BadLetters,
    #[error("TC string is {chars} characters long; the limit is {limit}")]
    TooLong { chars: usize, limit: usize },
}

impl TcfError {
    /// A stable snake_case code, for counters (`tcf_ignored_<code>`) and evidence.
    pub fn code(&self) -> &'static str {
        match self {
            TcfError::Empty => "empty",
            TcfError::Base64 => "not_base64",
            TcfError::Version(_) => "unsupported_version",
            TcfError::Truncated { .. } => "truncated",
            TcfError::BadRange { .. } => "bad_vendor_range",
            TcfError::BadLetters => "bad_letters",
            TcfError::TooLong { .. } => "too_long",
        }
    }
}

/// Longest TC string decoded. Real strings are a few hundred bytes to a few KB (a
/// browser cookie holds at most 4 KB); anything longer is refused before any work.
pub const MAX_TC_STRING_CHARS: usize = 8 * 1024;

/// Set of vendor ids, kept as the section was written: a bitfield section as its bits
/// (one bit per vendor id, as in the string), a range section as sorted, merged,
/// inclusive ranges (a range `1..=65535` costs four bytes, not 128 KB). Either way the
/// memory is bounded by the TC string's own length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VendorSet {
    /// Bit `id - 1` (most significant bit first) set = vendor `id` is in the set.
    Bits {
        bits: Vec<u8>,
        max: u16,
    },
    Ranges(Vec<(u16, u16)>),
}

impl Default for VendorSet {
    fn default() -> Self {
        VendorSet::Ranges(Vec::new())
    }
}

impl VendorSet {
    pub fn contains(&self, id: u16) -> bool {
        match self {
            VendorSet::Bits { bits, max } => {
                id >= 1 && id <= *max && {
                    let i = usize::from(id - 1);
                    bits[i / 8] & (0x80 >> (i % 8)) != 0
                }
            }
            VendorSet::Ranges(r) => {
                // The last range starting at or before `id`.
                let i = r.partition_point(|(start, _)| *start <= id);
                i > 0 && id <= r[i - 1].1
            }
        }
    }

    /// How many vendor ids are in the set.
    pub fn len(&self) -> usize {
        match self {
            VendorSet::Bits { bits, .. } => bits.iter().map(|b| b.count_ones() as usize).sum(),
            VendorSet::Ranges(r) => r
                .iter()
                .map(|(a, b)| usize::from(*b) - usize::from(*a) + 1)
                .sum(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every id, in order, lazily (nothing is expanded in memory).
    pub fn ids(&self) -> Box<dyn Iterator<Item = u16> + '_> {
        match self {
            VendorSet::Bits { max, .. } => Box::new((1..=*max).filter(|id| self.contains(*id))),
            VendorSet::Ranges(r) => Box::new(r.iter().flat_map(|(a, b)| *a..=*b)),
        }
    }

    /// Sorts and merges ranges in place (overlapping or adjacent ones become one).
    fn from_ranges(mut ranges: Vec<(u16, u16)>) -> VendorSet {
        ranges.sort_unstable();
        let mut kept = 0usize;
        for i in 0..ranges.len() {
            let (a, b) = ranges[i];
            if kept > 0 && u32::from(a) <= u32::from(ranges[kept - 1].1) + 1 {
                ranges[kept - 1].1 = ranges[kept - 1].1.max(b);
            } else {
                ranges[kept] = (a, b);
                kept += 1;
            }
        }
        ranges.truncate(kept);
        VendorSet::Ranges(ranges)
    }
}

/// The decoded core segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcString {
    pub version: u8,
    /// Deciseconds since the Unix epoch.
    pub created_ds: u64,
    pub last_updated_ds: u64,
    pub cmp_id: u16,
    pub cmp_version: u16,
    pub consent_screen: u8,
    pub consent_language: String,
    pub vendor_list_version: u16,
    pub policy_version: u8,
    pub is_service_specific: bool,
    pub use_non_standard_texts: bool,
    /// Bit i-1 set = special feature i opted in (1..=12).
    special_features: u16,
    /// Bit i-1 set = purpose i consented (1..=24).
    purpose_consents: u32,
    purpose_legitimate_interests: u32,
    pub purpose_one_treatment: bool,
    pub publisher_cc: String,
    pub vendor_consents: VendorSet,
    pub vendor_legitimate_interests: VendorSet,
}

impl TcString {
    pub fn purpose_consent(&self, purpose: u8) -> bool {
        (1..=24).contains(&purpose) && self.purpose_consents & (1 << (purpose - 1)) != 0
    }
    pub fn purpose_legitimate_interest(&self, purpose: u8) -> bool {
        (1..=24).contains(&purpose) && self.purpose_legitimate_interests & (1 << (purpose - 1)) != 0
    }
    pub fn special_feature_optin(&self, feature: u8) -> bool {
        (1..=12).contains(&feature) && self.special_features & (1 << (feature - 1)) != 0
    }
    pub fn purpose_consents(&self) -> Vec<u8> {
        (1..=24).filter(|p| self.purpose_consent(*p)).collect()
    }
    pub fn purpose_legitimate_interests(&self) -> Vec<u8> {
        (1..=24)
            .filter(|p| self.purpose_legitimate_interest(*p))
            .collect()
    }
    pub fn special_feature_optins(&self) -> Vec<u8> {
        (1..=12)
            .filter(|f| self.special_feature_optin(*f))
            .collect()
    }
}

struct Bits<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Bits<'_> {
    fn len(&self) -> usize {
        self.bytes.len() * 8
    }

    fn read(&mut self, n: usize) -> Result<u64, TcfError> {
        if self.pos + n > self.len() {
            return Err(TcfError::Truncated {
                needed: self.pos + n,
                have: self.len(),
            });
        }
        let mut v = 0u64;
        for _ in 0..n {
            let byte = self.bytes[self.pos / 8];
            let bit = (byte >> (7 - (self.pos % 8))) & 1;
            v = (v << 1) | u64::from(bit);
            self.pos += 1;
        }
        Ok(v)
    }

    fn flag(&mut self) -> Result<bool, TcfError> {
        Ok(self.read(1)? == 1)
    }

    /// Reads `n` bits as a bitmask where the first bit read is id 1 (stored at bit 0).
    fn mask(&mut self, n: usize) -> Result<u32, TcfError> {
        let mut m = 0u32;
        for i in 0..n {
            if self.flag()? {
                m |= 1 << i;
            }
        }
        Ok(m)
    }

    fn letters(&mut self) -> Result<String, TcfError> {
        let a = self.read(6)? as u8;
        let b = self.read(6)? as u8;
        if a > 25 || b > 25 {
            return Err(TcfError::BadLetters);
        }
        Ok([(b'A' + a) as char, (b'A' + b) as char].iter().collect())
    }

    /// A vendor section. Every range entry consumes at least 17 bits and every bitfield
    /// run at least one, so the ranges kept are bounded by the string's own length.
    fn vendors(&mut self) -> Result<VendorSet, TcfError> {
        let max = self.read(16)? as u16;
        let mut ranges = Vec::new();
        if self.flag()? {
            let entries = self.read(12)?;
            for _ in 0..entries {
                let is_range = self.flag()?;
                let start = self.read(16)? as u16;
                let end = if is_range {
                    self.read(16)? as u16
                } else {
                    start
                };
                if start == 0 || end < start || end > max {
                    return Err(TcfError::BadRange { start, end });
                }
                ranges.push((start, end));
            }
        } else {
            let n = usize::from(max);
            if self.pos + n > self.len() {
                return Err(TcfError::Truncated {
                    needed: self.pos + n,
                    have: self.len(),
                });
            }
            let mut bits = vec![0u8; n.div_ceil(8)];
            for i in 0..n {
                if self.flag()? {
                    bits[i / 8] |= 0x80 >> (i % 8);
                }
            }
            return Ok(VendorSet::Bits { bits, max });
        }
        Ok(VendorSet::from_ranges(ranges))
    }
}

/// Decodes a TC string (the core segment; other segments are ignored).
pub fn decode(tc: &str) -> Result<TcString, TcfError> {
    let tc = tc.trim();
    if tc.len() > MAX_TC_STRING_CHARS {
        return Err(TcfError::TooLong {
            chars: tc.len(),
            limit: MAX_TC_STRING_CHARS,
        });
    }
    let core = tc.split('.').next().unwrap_or("");
    if core.is_empty() {
        return Err(TcfError::Empty);
    }
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    let normalised: String = core
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect();
    let bytes = engine
        .decode(normalised.as_bytes())
        .map_err(|_| TcfError::Base64)?;
    let mut b = Bits {
        bytes: &bytes,
        pos: 0,
    };
    let version = b.read(6)? as u8;
    if version != 2 {
        return Err(TcfError::Version(version));
    }
    Ok(TcString {
        version,
        created_ds: b.read(36)?,
        last_updated_ds: b.read(36)?,
        cmp_id: b.read(12)? as u16,
        cmp_version: b.read(12)? as u16,
        consent_screen: b.read(6)? as u8,
        consent_language: b.letters()?,
        vendor_list_version: b.read(12)? as u16,
        policy_version: b.read(6)? as u8,
        is_service_specific: b.flag()?,
        use_non_standard_texts: b.flag()?,
        special_features: b.mask(12)? as u16,
        purpose_consents: b.mask(24)?,
        purpose_legitimate_interests: b.mask(24)?,
        purpose_one_treatment: b.flag()?,
        publisher_cc: b.letters()?,
        vendor_consents: b.vendors()?,
        vendor_legitimate_interests: b.vendors()?,
    })
}

/// Builds TC strings bit by bit (base64url, no padding): for tests and fixtures that
/// need strings no CMP would write, such as hostile ones at the limits.
#[derive(Debug, Default, Clone)]
pub struct TcWriter {
    bits: Vec<bool>,
}

impl TcWriter {
    /// Appends the low `n` bits of `v`, most significant first.
    pub fn put(&mut self, n: usize, v: u64) -> &mut Self {
        for i in (0..n).rev() {
            self.bits.push((v >> i) & 1 == 1);
        }
        self
    }

    /// A valid v2 core segment up to (not including) the vendor consent section, with
    /// `purposes` as the 24 purpose-consent bits (purpose 1 is the most significant).
    pub fn core_header(purposes: u32) -> TcWriter {
        let mut w = TcWriter::default();
        w.put(6, 2)
            .put(36, 16_000_000_000)
            .put(36, 16_000_000_000)
            .put(12, 7)
            .put(12, 1)
            .put(6, 1)
            .put(6, 4)
            .put(6, 13) // "EN"
            .put(12, 100)
            .put(6, 4)
            .put(1, 0)
            .put(1, 0)
            .put(12, 0)
            .put(24, u64::from(purposes))
            .put(24, 0)
            .put(1, 0)
            .put(6, 3)
            .put(6, 4); // "DE"
        w
    }

    pub fn encode(&self) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut bits = self.bits.clone();
        // Whole bytes, as CMPs write them (a lone trailing character is not base64).
        while !bits.len().is_multiple_of(8) {
            bits.push(false);
        }
        bits.chunks(6)
            .map(|c| {
                let mut v = 0usize;
                for i in 0..6 {
                    v = (v << 1) | usize::from(c.get(i).copied().unwrap_or(false));
                }
                ALPHABET[v] as char
            })
            .collect()
    }
}

/// A syntactically valid TC string (purposes 1 to 8 consented) whose vendor consent
/// section holds `entries` ranges of 1..=65535: the shape that, expanded into id lists,
/// once took seconds of CPU and 1.2 GB in workerd (issue #8). For tests.
pub fn range_bomb(entries: u64) -> String {
    let mut w = TcWriter::core_header(0xff_0000);
    w.put(16, 65_535).put(1, 1).put(12, entries);
    for _ in 0..entries {
        w.put(1, 1).put(16, 1).put(16, 65_535);
    }
    w.put(16, 0).put(1, 0);
    w.encode()
}

/// The largest [`range_bomb`] within [`MAX_TC_STRING_CHARS`]. For tests.
pub fn largest_range_bomb() -> String {
    // Each entry is 33 bits; the rest of the string about 250.
    let entries = ((MAX_TC_STRING_CHARS * 6 - 260) / 33) as u64;
    range_bomb(entries)
}
