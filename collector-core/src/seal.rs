//! Sealed contact fields: a value the edge encrypts to the agent's public key, which
//! only the agent can open (when it sends to a destination that needs it).
//!
//! The construction is libsodium's sealed box (`crypto_box_seal`): an ephemeral X25519
//! key per value, XSalsa20-Poly1305, the nonce derived from both public keys with
//! BLAKE2b; implemented by RustCrypto's `crypto_box`, which builds for wasm32. A sealed
//! value is text: `sealed:v1:` + base64url (no padding) of the box, 48 bytes longer than
//! the value. Keys are text too: `x25519:` + base64url of the 32 bytes (public, in
//! `privacy.toml`) and `x25519-secret:` + base64url (secret, only in the agent's
//! environment). The same value sealed twice gives two different boxes, so a sealed
//! value reveals nothing, not even equality; joins use the keyed hash kept beside it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use crypto_box::aead::rand_core::CryptoRngCore;
use crypto_box::{PublicKey, SecretKey};

/// The prefix of a sealed value.
pub const PREFIX: &str = "sealed:v1:";
const PUBLIC: &str = "x25519:";
const SECRET: &str = "x25519-secret:";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("not a key of the form {0}<base64url of 32 bytes>")]
    BadKey(&'static str),
    #[error("not a sealed value (sealed:v1:<base64url>)")]
    NotSealed,
    #[error("the sealed value does not open with this key (another key, or altered)")]
    DoesNotOpen,
}

fn key_bytes(text: &str, prefix: &'static str) -> Result<[u8; 32], SealError> {
    let b64 = text
        .trim()
        .strip_prefix(prefix)
        .ok_or(SealError::BadKey(prefix))?;
    let bytes = URL_SAFE_NO_PAD
        .decode(b64)
        .map_err(|_| SealError::BadKey(prefix))?;
    bytes.try_into().map_err(|_| SealError::BadKey(prefix))
}

/// The agent's public key, as `privacy.toml` gives it.
#[derive(Clone, PartialEq, Eq)]
pub struct SealKey(PublicKey);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealKey({})", self.to_text())
    }
}

impl SealKey {
    pub fn parse(text: &str) -> Result<SealKey, SealError> {
        Ok(SealKey(PublicKey::from(key_bytes(text, PUBLIC)?)))
    }

    pub fn to_text(&self) -> String {
        format!("{PUBLIC}{}", URL_SAFE_NO_PAD.encode(self.0.as_bytes()))
    }

    /// Seals `value` (randomness from `rng`: the platform's CSPRNG).
    pub fn seal(&self, value: &str, rng: &mut impl CryptoRngCore) -> String {
        // Sealing a byte string to a valid key cannot fail.
        let boxed = self
            .0
            .seal(rng, value.as_bytes())
            .expect("sealing to a valid key");
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(boxed))
    }
}

/// The agent's secret key: opens sealed values.
pub struct OpenKey(SecretKey);

impl std::fmt::Debug for OpenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpenKey(…)")
    }
}

impl OpenKey {
    pub fn parse(text: &str) -> Result<OpenKey, SealError> {
        Ok(OpenKey(SecretKey::from(key_bytes(text, SECRET)?)))
    }

    /// A new key pair: `(secret text, public text)`.
    pub fn generate(rng: &mut impl CryptoRngCore) -> (String, String) {
        let sk = SecretKey::generate(rng);
        let public = SealKey(sk.public_key()).to_text();
        (
            format!("{SECRET}{}", URL_SAFE_NO_PAD.encode(sk.to_bytes())),
            public,
        )
    }

    /// A new key pair from `fill` (the platform's CSPRNG); `None` when it failed.
    pub fn generate_from(fill: fn(&mut [u8]) -> bool) -> Option<(String, String)> {
        let mut seed = [0u8; 32];
        fill(&mut seed).then(|| OpenKey::generate(&mut Seeded(seed, 0)))
    }

    pub fn public(&self) -> SealKey {
        SealKey(self.0.public_key())
    }

    /// Opens a sealed value.
    pub fn open(&self, sealed: &str) -> Result<String, SealError> {
        let b64 = sealed.strip_prefix(PREFIX).ok_or(SealError::NotSealed)?;
        let boxed = URL_SAFE_NO_PAD
            .decode(b64)
            .map_err(|_| SealError::NotSealed)?;
        let plain = self.0.unseal(&boxed).map_err(|_| SealError::DoesNotOpen)?;
        String::from_utf8(plain).map_err(|_| SealError::DoesNotOpen)
    }
}

/// Yields a seed drawn by the caller (then zeros): sealing takes exactly 32 random
/// bytes, for the ephemeral key, so the caller can draw them and check it succeeded.
struct Seeded([u8; 32], usize);

impl crypto_box::aead::rand_core::RngCore for Seeded {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for d in dest {
            *d = self.0.get(self.1).copied().unwrap_or(0);
            self.1 += 1;
        }
    }
    fn try_fill_bytes(
        &mut self,
        dest: &mut [u8],
    ) -> Result<(), crypto_box::aead::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl crypto_box::aead::rand_core::CryptoRng for Seeded {}

impl SealKey {
    /// Seals `value` with an ephemeral key made from `seed`: 32 bytes from the
    /// platform's CSPRNG, never reused.
    pub fn seal_with_seed(&self, value: &str, seed: [u8; 32]) -> String {
        self.seal(value, &mut Seeded(seed, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic source for tests (the edge and agent use the platform's).
    fn fill(buf: &mut [u8]) -> bool {
        use std::sync::atomic::{AtomicU64, Ordering};
        static STATE: AtomicU64 = AtomicU64::new(1);
        for b in buf {
            let x = STATE
                .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
                .wrapping_mul(0xbf58_476d_1ce4_e5b9);
            *b = (x >> 56) as u8;
        }
        true
    }

    fn seed() -> [u8; 32] {
        let mut s = [0u8; 32];
        fill(&mut s);
        s
    }

    #[test]
    fn sealed_values_open_only_with_the_key_and_hide_equality() {
        let (secret, public) = OpenKey::generate_from(fill).unwrap();
        let key = SealKey::parse(&public).unwrap();
        let open = OpenKey::parse(&secret).unwrap();
        assert_eq!(open.public(), key);
        let a = key.seal_with_seed("jane@example.com", seed());
        let b = key.seal_with_seed("jane@example.com", seed());
        assert!(
            a.starts_with(PREFIX) && a != b,
            "two seals of one value differ"
        );
        assert!(!a.contains("jane") && !a.contains("example"));
        assert_eq!(open.open(&a).unwrap(), "jane@example.com");
        assert_eq!(open.open(&b).unwrap(), "jane@example.com");
        // Another key, an altered box, or not a box at all: an error, never a panic.
        let (other, _) = OpenKey::generate_from(fill).unwrap();
        assert_eq!(
            OpenKey::parse(&other).unwrap().open(&a),
            Err(SealError::DoesNotOpen)
        );
        let mut altered = a.clone().into_bytes();
        let last = altered.len() - 3;
        altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            open.open(&String::from_utf8(altered).unwrap()),
            Err(SealError::DoesNotOpen)
        );
        assert_eq!(open.open("jane@example.com"), Err(SealError::NotSealed));
        assert_eq!(open.open("sealed:v1:***"), Err(SealError::NotSealed));
        assert!(SealKey::parse("x25519:short").is_err());
        assert!(
            SealKey::parse(&secret).is_err(),
            "a secret is not a public key"
        );
    }
}
