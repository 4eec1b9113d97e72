//! PII value detection: the safety net for whatever a site sends where no rule names it.
//!
//! Finds, in any string, e-mail addresses (also percent-encoded, `jane%40example.com`),
//! phone numbers in international form (`+49 151 1234 5678`) and payment card numbers
//! (13 to 19 digits, optionally grouped by spaces or dashes, with a card network's
//! prefix and a valid Luhn check digit).
//!
//! **Linear time, no allocation when nothing is found.** One pass over the bytes finds
//! candidates; every byte is looked at a small constant number of times (an e-mail's
//! local part is never extended back past the previous `@` or match), so a hostile
//! string costs a constant times its length. The detector runs on every string of every
//! event, so the common case (nothing found) only scans.

/// What was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Detected {
    Email,
    Phone,
    Card,
}

impl Detected {
    pub const ALL: [Detected; 3] = [Detected::Email, Detected::Phone, Detected::Card];

    pub fn as_str(self) -> &'static str {
        match self {
            Detected::Email => "email",
            Detected::Phone => "phone",
            Detected::Card => "card",
        }
    }
}

/// One finding: `text[start..end]` is the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub kind: Detected,
    pub start: usize,
    pub end: usize,
}

fn is_local(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-')
}

fn is_domain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-')
}

/// An e-mail around the `@` (or `%40`) at `at..at_end`, not extending left of `floor`.
fn email_at(s: &[u8], at: usize, at_end: usize, floor: usize) -> Option<(usize, usize)> {
    let mut start = at;
    while start > floor && is_local(s[start - 1]) {
        start -= 1;
    }
    while start < at && matches!(s[start], b'.' | b'%' | b'+' | b'-') {
        start += 1;
    }
    if start == at {
        return None;
    }
    let mut end = at_end;
    while end < s.len() && is_domain(s[end]) {
        end += 1;
    }
    while end > at_end && matches!(s[end - 1], b'.' | b'-') {
        end -= 1;
    }
    let domain = &s[at_end..end];
    let dot = domain.iter().rposition(|b| *b == b'.')?;
    let tld = &domain[dot + 1..];
    (dot > 0 && tld.len() >= 2 && tld.iter().all(u8::is_ascii_alphabetic)).then_some((start, end))
}

/// A run starting at `start` of digits with single separators from `seps` between them:
/// `(end, digit count)`.
fn digit_run(s: &[u8], start: usize, seps: &[u8]) -> (usize, usize) {
    let (mut i, mut digits, mut end) = (start, 0, start);
    while i < s.len() {
        if s[i].is_ascii_digit() {
            digits += 1;
            i += 1;
            end = i;
        } else if seps.contains(&s[i]) && i + 1 < s.len() && s[i + 1].is_ascii_digit() {
            i += 1;
        } else if seps.contains(&s[i])
            && i + 2 < s.len()
            && seps.contains(&s[i + 1])
            && s[i + 2].is_ascii_digit()
            && s[i] != s[i + 1]
        {
            // "(0) 30" style: two different separators, e.g. ") ".
            i += 2;
        } else {
            break;
        }
    }
    (end, digits)
}

fn boundary_before(s: &[u8], i: usize) -> bool {
    i == 0 || !s[i - 1].is_ascii_alphanumeric()
}

fn boundary_after(s: &[u8], i: usize) -> bool {
    i >= s.len() || !s[i].is_ascii_alphanumeric()
}

/// Whether a 13-19 digit number is a payment card number: a card network's prefix
/// (Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay, Maestro) and Luhn-valid.
pub fn is_card_number(digits: &[u8]) -> bool {
    if !(13..=19).contains(&digits.len()) || !digits.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let prefix = |n: usize| -> u32 {
        digits[..n]
            .iter()
            .fold(0, |acc, d| acc * 10 + u32::from(d - b'0'))
    };
    let network = match digits[0] {
        b'4' => true,
        b'5' => (51..=55).contains(&prefix(2)) || (50..=59).contains(&prefix(2)),
        b'2' => (2221..=2720).contains(&prefix(4)),
        b'3' => matches!(prefix(2), 34 | 37 | 35 | 36 | 38 | 39 | 30),
        b'6' => {
            prefix(4) == 6011
                || prefix(2) == 65
                || (644..=649).contains(&prefix(3))
                || prefix(2) == 62
                || prefix(2) == 67
        }
        _ => false,
    };
    network && luhn(digits)
}

fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d - b'0');
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Calls `found` for every finding in `text`, left to right, non-overlapping.
pub fn scan(text: &str, mut found: impl FnMut(Found)) {
    let s = text.as_bytes();
    // Fast path: too short for any finding (`a@b.cc`), or no byte that can start or
    // anchor one.
    if s.len() < 6
        || !s
            .iter()
            .any(|b| matches!(b, b'@' | b'+' | b'%') || b.is_ascii_digit())
    {
        return;
    }
    let mut i = 0;
    // Nothing found may start before `floor` (the end of the last finding, or the last
    // `@` looked at): it keeps findings apart and the scan linear.
    let mut floor = 0;
    while i < s.len() {
        let b = s[i];
        let at_len = if b == b'@' {
            1
        } else if b == b'%' && s.get(i + 1) == Some(&b'4') && s.get(i + 2) == Some(&b'0') {
            3
        } else {
            0
        };
        if at_len > 0 {
            if let Some((start, end)) = email_at(s, i, i + at_len, floor) {
                found(Found {
                    kind: Detected::Email,
                    start,
                    end,
                });
                floor = end;
                i = end;
            } else {
                i += at_len;
                floor = i;
            }
            continue;
        }
        if b == b'+'
            && boundary_before(s, i)
            && s.get(i + 1).is_some_and(|d| (b'1'..=b'9').contains(d))
        {
            let (end, digits) = digit_run(s, i + 1, b" -.()");
            if (8..=15).contains(&digits) && boundary_after(s, end) && !next_is_at(s, end) {
                found(Found {
                    kind: Detected::Phone,
                    start: i,
                    end,
                });
                floor = end;
                i = end;
                continue;
            }
            i = end.max(i + 1);
            continue;
        }
        if b.is_ascii_digit() {
            let (end, digits) = digit_run(s, i, b" -");
            if boundary_before(s, i) && boundary_after(s, end) && (13..=19).contains(&digits) {
                let mut buf = [0u8; 19];
                let mut n = 0;
                for d in s[i..end].iter().filter(|d| d.is_ascii_digit()) {
                    buf[n] = *d;
                    n += 1;
                }
                if is_card_number(&buf[..n]) && !next_is_at(s, end) {
                    found(Found {
                        kind: Detected::Card,
                        start: i,
                        end,
                    });
                    floor = end;
                }
            }
            // A digit run is never the local part of an e-mail we would miss: `@`
            // handling looks back over it (down to `floor`).
            i = end.max(i + 1);
            continue;
        }
        i += 1;
    }
}

/// Whether an `@` follows (then the digits are an e-mail's local part, not a number).
fn next_is_at(s: &[u8], end: usize) -> bool {
    s.get(end) == Some(&b'@') || s[end.min(s.len())..].starts_with(b"%40")
}

/// Rewrites every finding with `replace(kind, value)`; `None` when nothing was found
/// (then nothing was allocated).
pub fn rewrite(
    text: &str,
    mut replace: impl FnMut(Detected, &str) -> Option<String>,
) -> Option<String> {
    let mut out: Option<String> = None;
    let mut last = 0;
    scan(text, |f| {
        if let Some(r) = replace(f.kind, &text[f.start..f.end]) {
            let o = out.get_or_insert_with(|| String::with_capacity(text.len() + 64));
            o.push_str(&text[last..f.start]);
            o.push_str(&r);
            last = f.end;
        }
    });
    let mut out = out?;
    out.push_str(&text[last..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(s: &str) -> Vec<(Detected, &str)> {
        let mut v = Vec::new();
        scan(s, |f| v.push((f.kind, &s[f.start..f.end])));
        v
    }

    #[test]
    fn finds_emails_in_text_urls_and_percent_encoding() {
        assert_eq!(
            kinds("Welcome back, Jane.Doe+shop@Example.co.uk!"),
            vec![(Detected::Email, "Jane.Doe+shop@Example.co.uk")]
        );
        assert_eq!(
            kinds("https://shop.test/thanks?e=jane%40example.com&x=1"),
            vec![(Detected::Email, "jane%40example.com")]
        );
        assert_eq!(
            kinds("a@b.com,c@d.org"),
            vec![(Detected::Email, "a@b.com"), (Detected::Email, "c@d.org")]
        );
        assert!(kinds("@handle and user@localhost and x@1.2").is_empty());
        assert!(kinds("price: 10 @ 5.00").is_empty());
    }

    #[test]
    fn finds_international_phone_numbers_only() {
        assert_eq!(
            kinds("call +49 151 2345 6789 now"),
            vec![(Detected::Phone, "+49 151 2345 6789")]
        );
        assert_eq!(
            kinds("tel:+1 (415) 555-0132"),
            vec![(Detected::Phone, "+1 (415) 555-0132")]
        );
        assert!(
            kinds("0151 2345 6789").is_empty(),
            "national form is not detected"
        );
        assert!(kinds("C++14, +1, a+49151234567, +12345").is_empty());
        assert!(kinds("2026-11-25T10:00:00.000+01:00").is_empty());
    }

    #[test]
    fn finds_luhn_valid_card_numbers_with_a_network_prefix() {
        assert_eq!(
            kinds("card 4111 1111 1111 1111 ok"),
            vec![(Detected::Card, "4111 1111 1111 1111")]
        );
        assert_eq!(
            kinds("5500-0000-0000-0004"),
            vec![(Detected::Card, "5500-0000-0000-0004")]
        );
        assert_eq!(
            kinds("378282246310005"),
            vec![(Detected::Card, "378282246310005")]
        );
        // Luhn fails, no network prefix, too long, inside a word or a longer number.
        assert!(kinds("4111 1111 1111 1112").is_empty());
        assert!(kinds("1795528444123").is_empty(), "a millisecond timestamp");
        assert!(kinds("41111111111111111111111").is_empty());
        assert!(kinds("id4111111111111111").is_empty());
        assert!(
            kinds("12345678-1234-4123-8123-123456789012").is_empty(),
            "a uuid"
        );
    }

    #[test]
    fn rewrite_replaces_findings_and_allocates_nothing_without_them() {
        assert_eq!(rewrite("nothing to see here, 42", |_, _| None), None);
        assert_eq!(
            rewrite("to jane@x.com or +4915123456789.", |k, _| Some(format!(
                "[{}]",
                k.as_str()
            ))),
            Some("to [email] or [phone].".into())
        );
    }

    #[test]
    fn hostile_strings_do_not_overlap_or_panic() {
        for s in [
            "@".repeat(1000),
            "%40".repeat(1000),
            "a@".repeat(1000),
            "a.".repeat(1000) + "@",
            "+1".repeat(1000),
            "4 ".repeat(1000),
            "é@é.é +é 4é".repeat(100),
        ] {
            let mut last_end = 0;
            scan(&s, |f| {
                assert!(f.start >= last_end && f.end > f.start && f.end <= s.len());
                assert!(s.is_char_boundary(f.start) && s.is_char_boundary(f.end));
                last_end = f.end;
            });
        }
    }
}
