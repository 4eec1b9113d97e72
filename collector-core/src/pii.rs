//! PII normalisation and keyed hashing, and IP / URL minimisation.
//!
//! Hashes are HMAC-SHA256 under a secret key, tagged with the key's version:
//! `hmac-sha256:v1:<64 hex>`. Unlike a salted hash, a keyed hash cannot be brute-forced
//! without the key (emails and phone numbers are a small space). The keyed state is
//! prepared once ([`PiiHasher::new`]) and cloned per value, not re-keyed per field.

use std::net::IpAddr;

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Prefix of every hash this module produces.
pub const HASH_PREFIX: &str = "hmac-sha256:";

/// What a PII value is, which selects its normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PiiKind {
    Email,
    Phone,
    Ip,
    /// A payment card number (normalised to its digits).
    Card,
    Free,
}

/// A hashing key and its version tag (e.g. `v2`).
#[derive(Clone)]
pub struct PiiHasher {
    version: String,
    mac: HmacSha256,
    /// Versions whose tagged hashes are accepted as already hashed (the active keys).
    active_versions: Vec<String>,
}

impl std::fmt::Debug for PiiHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PiiHasher")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl PiiHasher {
    /// A hasher from a key written `VERSION:SECRET` (the edge's `PII_HMAC_KEY`; the
    /// agent reads the same value): `None` unless the version is non-empty without
    /// spaces and the secret has 16+ characters.
    pub fn from_spec(spec: &str, also_active: &[&str]) -> Option<PiiHasher> {
        let (version, secret) = spec
            .split_once(':')
            .filter(|(v, s)| !v.is_empty() && !v.contains(char::is_whitespace) && s.len() >= 16)?;
        Some(PiiHasher::new(version, secret.as_bytes(), also_active))
    }

    /// `version` hashes new values; `also_active` are older versions still being rotated
    /// out, whose hashes pass through unchanged.
    pub fn new(version: &str, key: &[u8], also_active: &[&str]) -> PiiHasher {
        let mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
        let mut active_versions = vec![version.to_string()];
        active_versions.extend(also_active.iter().map(|v| v.to_string()));
        PiiHasher {
            version: version.to_string(),
            mac,
            active_versions,
        }
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether `value` is already a hash under one of the active key versions.
    pub fn is_hashed(&self, value: &str) -> bool {
        let Some(rest) = value.strip_prefix(HASH_PREFIX) else {
            return false;
        };
        let Some((version, hex)) = rest.split_once(':') else {
            return false;
        };
        self.active_versions.iter().any(|v| v == version)
            && hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    }

    /// Hashes an already-normalised value.
    pub fn hash_normalised(&self, normalised: &str) -> String {
        let mut mac = self.mac.clone();
        mac.update(normalised.as_bytes());
        format!(
            "{HASH_PREFIX}{}:{}",
            self.version,
            hex::encode(mac.finalize().into_bytes())
        )
    }

    /// Normalises by kind and hashes; a value already hashed under an active key is
    /// returned unchanged.
    pub fn hash(&self, kind: PiiKind, value: &str, default_calling_code: &str) -> String {
        if self.is_hashed(value) {
            return value.to_string();
        }
        self.hash_normalised(&normalise(kind, value, default_calling_code))
    }
}

/// Normalises a value before hashing, so the same person hashes the same way:
/// emails are trimmed and lower-cased; phones become E.164 using the default calling
/// code for national numbers; IPs take their canonical text form; free text is trimmed.
pub fn normalise(kind: PiiKind, value: &str, default_calling_code: &str) -> String {
    let v = value.trim();
    match kind {
        // A percent-encoded `@` (found in URLs) hashes like the address itself.
        PiiKind::Email => v.replace("%40", "@").to_lowercase(),
        PiiKind::Phone => phone_e164(v, default_calling_code).unwrap_or_else(|| v.to_string()),
        PiiKind::Ip => v
            .parse::<IpAddr>()
            .map(|ip| ip.to_string())
            .unwrap_or_else(|_| v.to_string()),
        PiiKind::Card => v.chars().filter(char::is_ascii_digit).collect(),
        PiiKind::Free => v.to_string(),
    }
}

/// E.164 form of a phone number (`+` and 8 to 15 digits), or `None` if it is not one.
/// `00` is the international prefix; a single leading `0` is a national trunk prefix.
pub fn phone_e164(raw: &str, default_calling_code: &str) -> Option<String> {
    let raw = raw.trim();
    let allowed = |c: char| c.is_ascii_digit() || " -().\u{a0}/".contains(c) || c == '+';
    if raw.is_empty() || !raw.chars().all(allowed) || raw.matches('+').count() > 1 {
        return None;
    }
    let plus = raw.starts_with('+');
    if raw.contains('+') && !plus {
        return None;
    }
    let digits: String = raw.chars().filter(char::is_ascii_digit).collect();
    let full = if plus {
        digits
    } else if let Some(rest) = digits.strip_prefix("00") {
        rest.to_string()
    } else {
        let cc: String = default_calling_code
            .chars()
            .filter(char::is_ascii_digit)
            .collect();
        if cc.is_empty() {
            return None;
        }
        format!("{cc}{}", digits.strip_prefix('0').unwrap_or(&digits))
    };
    if (8..=15).contains(&full.len()) && !full.starts_with('0') {
        Some(format!("+{full}"))
    } else {
        None
    }
}

/// Truncates an IP address: IPv4 to its /24, IPv6 to its /48. `None` if not an IP.
pub fn truncate_ip(raw: &str) -> Option<String> {
    match raw.trim().parse::<IpAddr>().ok()? {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            Some(std::net::Ipv4Addr::new(o[0], o[1], o[2], 0).to_string())
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            Some(std::net::Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0).to_string())
        }
    }
}

/// Reduces a User-Agent string to browser family, major version and OS family, e.g.
/// `Chrome 120 (Windows)`: enough for analytics, too little to fingerprint.
pub fn reduce_user_agent(ua: &str) -> String {
    let major = |token: &str| -> Option<String> {
        let rest = &ua[ua.find(token)? + token.len()..];
        let v: String = rest.chars().take_while(char::is_ascii_digit).collect();
        (!v.is_empty()).then_some(v)
    };
    let lower = ua.to_ascii_lowercase();
    let (family, version) = if ["bot", "crawler", "spider"]
        .iter()
        .any(|b| lower.contains(b))
    {
        ("Bot", None)
    } else if ua.contains("Edg/") {
        ("Edge", major("Edg/"))
    } else if ua.contains("OPR/") {
        ("Opera", major("OPR/"))
    } else if ua.contains("Firefox/") {
        ("Firefox", major("Firefox/"))
    } else if ua.contains("FxiOS/") {
        ("Firefox", major("FxiOS/"))
    } else if ua.contains("CriOS/") {
        ("Chrome", major("CriOS/"))
    } else if ua.contains("Chrome/") || ua.contains("Chromium/") {
        ("Chrome", major("Chrome/").or_else(|| major("Chromium/")))
    } else if ua.contains("Safari/") {
        ("Safari", major("Version/"))
    } else {
        ("Other", None)
    };
    let os = if ua.contains("Windows") {
        "Windows"
    } else if ua.contains("Android") {
        "Android"
    } else if ua.contains("iPhone") || ua.contains("iPad") || ua.contains("iPod") {
        "iOS"
    } else if ua.contains("Mac OS X") || ua.contains("Macintosh") {
        "macOS"
    } else if ua.contains("CrOS") {
        "ChromeOS"
    } else if ua.contains("Linux") {
        "Linux"
    } else {
        "Other"
    };
    match version {
        Some(v) => format!("{family} {v} ({os})"),
        None => format!("{family} ({os})"),
    }
}

/// Removes the named query parameters (case-insensitive names) from a URL or a bare
/// query string (`?a=1&b=2`), keeping everything else as it was. Returns whether it
/// removed anything.
pub fn scrub_query(url: &str, names: &[String]) -> (String, bool) {
    let (before_fragment, fragment) = match url.split_once('#') {
        Some((a, f)) => (a, Some(f)),
        None => (url, None),
    };
    let Some((base, query)) = before_fragment.split_once('?') else {
        return (url.to_string(), false);
    };
    let mut removed = false;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let name = pair.split('=').next().unwrap_or("");
            let name = percent_decode(name);
            let drop = !pair.is_empty() && names.iter().any(|n| n.eq_ignore_ascii_case(&name));
            removed |= drop;
            !drop
        })
        .collect();
    if !removed {
        return (url.to_string(), false);
    }
    let mut out = base.to_string();
    let kept: Vec<&str> = kept.into_iter().filter(|p| !p.is_empty()).collect();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    (out, true)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_spec_is_version_colon_secret_of_16_or_more() {
        let h = PiiHasher::from_spec("v2:0123456789abcdef", &[]).unwrap();
        assert!(h.hash_normalised("x").starts_with("hmac-sha256:v2:"));
        assert!(PiiHasher::from_spec("v2:short", &[]).is_none());
        assert!(PiiHasher::from_spec(":0123456789abcdef", &[]).is_none());
        assert!(PiiHasher::from_spec("v 2:0123456789abcdef", &[]).is_none());
        assert!(PiiHasher::from_spec("no-colon", &[]).is_none());
    }

    #[test]
    fn hmac_matches_rfc4231_test_case_2() {
        // RFC 4231 §4.3: key "Jefe", data "what do ya want for nothing?".
        let h = PiiHasher::new("v1", b"Jefe", &[]);
        assert_eq!(
            h.hash_normalised("what do ya want for nothing?"),
            "hmac-sha256:v1:5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn email_is_normalised_before_hashing_and_hashing_is_deterministic_per_key() {
        let h = PiiHasher::new("v1", b"key-one", &[]);
        let a = h.hash(PiiKind::Email, "  Jane.Doe@Example.COM ", "49");
        assert_eq!(a, h.hash(PiiKind::Email, "jane.doe@example.com", "49"));
        let h2 = PiiHasher::new("v2", b"key-two", &["v1"]);
        let b = h2.hash(PiiKind::Email, "jane.doe@example.com", "49");
        assert_ne!(a[15..], b[15..]);
        assert!(b.starts_with("hmac-sha256:v2:"));
        // During rotation, v1 hashes pass through v2 unchanged, and are not re-hashed.
        assert_eq!(h2.hash(PiiKind::Email, &a, "49"), a);
        // Once v1 is retired, a v1-tagged value is treated as raw input.
        let h3 = PiiHasher::new("v3", b"key-three", &[]);
        assert!(h3
            .hash(PiiKind::Email, &a, "49")
            .starts_with("hmac-sha256:v3:"));
        // A forged tag that is not a real digest is hashed.
        assert!(!h2.is_hashed("hmac-sha256:v1:not-hex"));
    }

    #[test]
    fn phones_become_e164() {
        assert_eq!(
            phone_e164("+49 (30) 1234-5678", "1").as_deref(),
            Some("+493012345678")
        );
        assert_eq!(
            phone_e164("030 12345678", "49").as_deref(),
            Some("+493012345678")
        );
        assert_eq!(
            phone_e164("0049 30 12345678", "1").as_deref(),
            Some("+493012345678")
        );
        assert_eq!(
            phone_e164("(415) 555-0132", "1").as_deref(),
            Some("+14155550132")
        );
        assert_eq!(phone_e164("call me", "1"), None);
        assert_eq!(phone_e164("12", "1"), None);
        assert_eq!(phone_e164("1+2", "1"), None);
        let h = PiiHasher::new("v1", b"k", &[]);
        assert_eq!(
            h.hash(PiiKind::Phone, "030 12345678", "49"),
            h.hash(PiiKind::Phone, "+49 30 1234 5678", "1")
        );
    }

    #[test]
    fn user_agents_reduce_to_family_major_version_and_os() {
        let cases = [
            ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.6099.109 Safari/537.36", "Chrome 120 (Windows)"),
            ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 Safari/605.1.15", "Safari 17 (macOS)"),
            ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) CriOS/120.0.6099.119 Mobile/15E148 Safari/604.1", "Chrome 120 (iOS)"),
            ("Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0", "Firefox 121 (Linux)"),
            ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36 Edg/120.0.2210.91", "Edge 120 (Windows)"),
            ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.6099.144 Mobile Safari/537.36", "Chrome 120 (Android)"),
            ("Googlebot/2.1 (+http://www.google.com/bot.html)", "Bot (Other)"),
            ("curl/8.5.0", "Other (Other)"),
        ];
        for (ua, want) in cases {
            assert_eq!(reduce_user_agent(ua), want, "{ua}");
        }
    }

    #[test]
    fn ips_truncate_to_24_and_48() {
        assert_eq!(truncate_ip("203.0.113.77").as_deref(), Some("203.0.113.0"));
        assert_eq!(
            truncate_ip("2001:db8:85a3:8d3:1319:8a2e:370:7348").as_deref(),
            Some("2001:db8:85a3::")
        );
        assert_eq!(truncate_ip("not an ip"), None);
    }

    #[test]
    fn query_parameters_are_scrubbed_case_insensitively() {
        let names = vec!["email".to_string(), "token".to_string()];
        assert_eq!(
            scrub_query(
                "https://x.test/p?a=1&Email=j%40x.com&b=2&token=abc#top",
                &names
            ),
            ("https://x.test/p?a=1&b=2#top".to_string(), true)
        );
        assert_eq!(scrub_query("?email=x", &names), (String::new(), true));
        assert_eq!(
            scrub_query("https://x.test/p?%65mail=x&z=1", &names),
            ("https://x.test/p?z=1".to_string(), true)
        );
        assert_eq!(
            scrub_query("https://x.test/p?a=1", &names),
            ("https://x.test/p?a=1".to_string(), false)
        );
        assert_eq!(
            scrub_query("https://x.test/p", &names),
            ("https://x.test/p".to_string(), false)
        );
    }
}
