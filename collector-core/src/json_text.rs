//! JSON text written straight into a `String`, byte for byte what `serde_json`
//! writes (compact), for the per-event hot path: no `io::Write` adapter, no UTF-8
//! check of the result, and one value may be spliced in as text already written
//! (the consent evidence, built once per event without a `Value` tree).

use std::fmt::Write as _;

use serde_json::{Map, Value};

/// `s` as a JSON string literal, escaped as `serde_json` escapes it: `"` and `\`,
/// the short forms `\b \f \n \r \t`, other control characters as `\u00XX`; all else
/// (non-ASCII included) as it is.
pub fn push_str(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !NEEDS_ESCAPE[usize::from(b)] {
            continue;
        }
        // `b` is ASCII, so `i` is a character boundary.
        out.push_str(&s[start..i]);
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x08 => out.push_str("\\b"),
            0x0c => out.push_str("\\f"),
            _ => {
                let _ = write!(out, "\\u{:04x}", b);
            }
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// The bytes [`push_str`] escapes: control characters, `"` and `\`.
static NEEDS_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// A JSON array of strings.
pub fn push_str_array<'a>(out: &mut String, items: impl IntoIterator<Item = &'a str>) {
    out.push('[');
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_str(out, item);
    }
    out.push(']');
}

/// A JSON object of string values, in the order given.
pub fn push_str_object<'a>(out: &mut String, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) {
    out.push('{');
    for (i, (k, v)) in pairs.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_str(out, k);
        out.push(':');
        push_str(out, v);
    }
    out.push('}');
}

/// `v` as compact JSON text.
pub fn push_value(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        // `Number`'s `Display` is its serialisation (itoa / ryu).
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Value::String(s) => push_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_value(out, item);
            }
            out.push(']');
        }
        Value::Object(m) => push_object_with(out, m, &[], ""),
    }
}

/// `m` as compact JSON text, except that the value at the dotted `path` (one key per
/// level; an empty path splices nothing) is written as the JSON text `raw`.
pub fn push_object_with(out: &mut String, m: &Map<String, Value>, path: &[&str], raw: &str) {
    out.push('{');
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_str(out, k);
        out.push(':');
        match path.split_first() {
            Some((first, rest)) if k == first => match v {
                _ if rest.is_empty() => out.push_str(raw),
                Value::Object(child) => push_object_with(out, child, rest, raw),
                other => push_value(out, other),
            },
            _ => push_value(out, v),
        }
    }
    out.push('}');
}

/// `v` as compact JSON text, in a new `String`.
pub fn to_string(v: &Value) -> String {
    let mut out = String::with_capacity(256);
    push_value(&mut out, v);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            "[\\x00-\\x7f\"\\\\]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((any::<String>(), inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn writes_what_serde_json_writes(v in value()) {
            prop_assert_eq!(to_string(&v), serde_json::to_string(&v).unwrap());
        }
    }

    #[test]
    fn splices_raw_text_at_the_path_only() {
        let v = serde_json::json!({
            "a": 1,
            "context": {"consent": {"categories": {"x": true}, "resolved": null}, "ip": "1.2.3.4"},
            "resolved": "top-level is not the path"
        });
        let mut out = String::new();
        push_object_with(
            &mut out,
            v.as_object().unwrap(),
            &["context", "consent", "resolved"],
            r#"{"gpc":false}"#,
        );
        assert_eq!(
            out,
            r#"{"a":1,"context":{"consent":{"categories":{"x":true},"resolved":{"gpc":false}},"ip":"1.2.3.4"},"resolved":"top-level is not the path"}"#
        );
        // A path that is not there splices nothing.
        let mut out = String::new();
        push_object_with(&mut out, v.as_object().unwrap(), &["nope", "x"], "RAW");
        assert_eq!(out, serde_json::to_string(&v).unwrap());
    }
}
