//! Identifiers that must never join people together: placeholder values SDKs and
//! sites send by mistake (`"undefined"`, `"guest"`, `"0"`, `"[object Object]"`). One
//! list, applied the same way wherever identity is resolved.
//!
//! A value is blocked when, after trimming spaces, it is blank, wrapped in quotes, made only
//! of `0` and `-` (`"0"`, `"00000000-0000-0000-0000-000000000000"`), `-1`, or (ignoring
//! case) one of [`DEFAULT_BLOCKED`] or the configured extra values.

/// What peers block by default, and what this collector blocks unless told otherwise.
pub const DEFAULT_BLOCKED: &[&str] = &[
    "anonymous",
    "guest",
    "distinct_id",
    "id",
    "not_authenticated",
    "email",
    "undefined",
    "true",
    "false",
    "null",
    "none",
    "nan",
    "[object object]",
    "-1",
    "0",
    "unknown",
    "n/a",
    "nil",
];

/// Whether `v` is one of `list` (lower-case values), ignoring case.
fn listed<'a>(v: &str, mut list: impl Iterator<Item = &'a str>) -> bool {
    if v.is_ascii() {
        list.any(|b| b.len() == v.len() && b.eq_ignore_ascii_case(v))
    } else {
        let lower = v.to_lowercase();
        list.any(|b| b == lower)
    }
}

/// The longest value of [`DEFAULT_BLOCKED`].
const LONGEST_DEFAULT: usize = 17;

/// The block list: the defaults plus configured values (matched ignoring case and
/// surrounding blanks).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockList {
    extra: Vec<String>,
}

impl BlockList {
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(extra: I) -> BlockList {
        BlockList {
            extra: extra
                .into_iter()
                .map(|s| s.as_ref().trim_matches(' ').to_lowercase())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }

    /// The configured values (lower case), without the defaults.
    pub fn extra(&self) -> &[String] {
        &self.extra
    }

    /// Every listed value (lower case): the defaults, then the configured ones.
    pub fn values(&self) -> impl Iterator<Item = &str> {
        DEFAULT_BLOCKED
            .iter()
            .copied()
            .chain(self.extra.iter().map(String::as_str))
    }

    /// Why `value` may not link people, or `None` when it may. (Only spaces are
    /// trimmed, as SQL's `trim` does, so the warehouse applies the same rule.)
    pub fn blocked(&self, value: &str) -> Option<&'static str> {
        let v = value.trim_matches(' ');
        if v.is_empty() {
            return Some("blank id");
        }
        let quoted = v.len() >= 2
            && ((v.starts_with('"') && v.ends_with('"'))
                || (v.starts_with('\'') && v.ends_with('\'')));
        if quoted {
            return Some("quoted id");
        }
        if v.chars().all(|c| c == '0' || c == '-') {
            return Some("id made only of 0 and -");
        }
        // On the edge's hot path: a real id is longer than any default value, and an
        // ASCII one compares without allocating.
        if v.len() <= LONGEST_DEFAULT && listed(v, DEFAULT_BLOCKED.iter().copied()) {
            return Some("placeholder id on the default block list");
        }
        if listed(v, self.extra.iter().map(String::as_str)) {
            return Some("id on the configured block list");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_default_is_the_longest() {
        assert_eq!(
            DEFAULT_BLOCKED.iter().map(|b| b.len()).max(),
            Some(LONGEST_DEFAULT)
        );
    }

    #[test]
    fn placeholders_are_blocked_real_ids_are_not() {
        let b = BlockList::new(["test-user"]);
        for v in [
            "",
            "  ",
            "\"\"",
            "'u1'",
            "\"abc\"",
            "0",
            "000",
            "-",
            "0-0",
            "-1",
            "undefined",
            "NULL",
            " None ",
            "NaN",
            "[object Object]",
            "guest",
            "Anonymous",
            "email",
            "not_authenticated",
            "distinct_id",
            "id",
            "true",
            "False",
            "Test-User",
            "00000000-0000-0000-0000-000000000000",
        ] {
            assert!(b.blocked(v).is_some(), "{v:?} should be blocked");
        }
        for v in [
            "u1", "user-42", "0a", "10", "a\"b", "-2", "guests", "4f6e-11",
        ] {
            assert_eq!(b.blocked(v), None, "{v:?} should pass");
        }
    }
}
