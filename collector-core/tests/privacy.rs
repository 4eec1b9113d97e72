//! The privacy pipeline: golden fixtures (input event + request signals → the exact
//! stored event or drop reason) and properties that must hold for any input.
//! Regenerate expectations after a deliberate change with
//! `BLESS=1 cargo test -p collector-core --test privacy`, then review the diff.

use collector_core::pii::PiiHasher;
use collector_core::policy::parse;
use collector_core::privacy::{PrivacyEngine, RequestSignals};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const KEY: &[u8] = b"golden-test-key";

/// Key v1 is current; v0 is being rotated out (values hashed under it pass through).
fn engine() -> PrivacyEngine {
    PrivacyEngine::new(
        parse(include_str!("../../privacy.toml")).unwrap(),
        PiiHasher::new("v1", KEY, &["v0"]),
    )
}

fn signals(v: &Value) -> RequestSignals {
    RequestSignals {
        gpc: v["gpc"].as_bool().unwrap_or(false),
        tcf_cookie: v["tcf_cookie"].as_str().map(str::to_string),
        country: v["country"].as_str().map(str::to_string),
        ip: v["ip"].as_str().map(str::to_string),
        ..RequestSignals::default()
    }
}

fn run(engine: &PrivacyEngine, case: &Value) -> Value {
    let mut ev = case["event"].as_object().unwrap().clone();
    match engine.apply(&mut ev, &signals(&case["signals"])) {
        Ok(_) => json!({"name": case["name"], "stored": ev}),
        Err(d) => json!({"name": case["name"], "dropped": d.reason}),
    }
}

/// The edge writes each event with the evidence spliced in as text
/// (`apply_spliced` + `json_text`); that must be byte for byte the event `apply`
/// leaves, serialised by serde_json, for every golden case.
#[test]
fn the_spliced_evidence_is_byte_for_byte_what_apply_stores() {
    let e = engine();
    let mut kept = 0;
    for line in include_str!("fixtures/privacy/cases.jsonl").lines() {
        let case: Value = serde_json::from_str(line).unwrap();
        let sig = signals(&case["signals"]);
        let mut a = case["event"].as_object().unwrap().clone();
        let mut b = a.clone();
        let (Ok(_), Ok((_, evidence))) = (e.apply(&mut a, &sig), e.apply_spliced(&mut b, &sig))
        else {
            continue;
        };
        kept += 1;
        let mut spliced = String::new();
        collector_core::json_text::push_object_with(
            &mut spliced,
            &b,
            &collector_core::privacy::EVIDENCE_PATH
                .split('.')
                .collect::<Vec<_>>(),
            &evidence,
        );
        assert_eq!(
            spliced,
            serde_json::to_string(&a).unwrap(),
            "{}",
            case["name"]
        );
    }
    assert!(kept > 10, "only {kept} golden cases were kept");
}

#[test]
fn golden_cases_produce_exactly_the_expected_events() {
    let e = engine();
    let cases: Vec<Value> = include_str!("fixtures/privacy/cases.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let actual: Vec<Value> = cases.iter().map(|c| run(&e, c)).collect();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/privacy/expected.jsonl"
    );
    let text: String = actual.iter().map(|v| format!("{v}\n")).collect();
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(path, &text).unwrap();
    }
    let expected = std::fs::read_to_string(path).unwrap();
    // Compared as JSON values: the order of an object's keys is not part of the
    // outcome.
    for (a, x) in text.lines().zip(expected.lines()) {
        let (a, x): (Value, Value) = (
            serde_json::from_str(a).unwrap(),
            serde_json::from_str(x).unwrap(),
        );
        assert_eq!(a, x);
    }
    assert_eq!(text.lines().count(), expected.lines().count());
}

#[test]
fn raw_pii_values_never_survive_the_pipeline() {
    let e = engine();
    for line in include_str!("fixtures/privacy/cases.jsonl").lines() {
        let case: Value = serde_json::from_str(line).unwrap();
        let out = run(&e, &case).to_string().to_lowercase();
        for raw in [
            "jane@example.com",
            "buyer@example.com",
            "555-0132",
            "4155550132",
            "12345678",
            "203.0.113.9",
            "198.51.100.23",
            "192.0.2.77",
            "8a2e:370:7348",
            "s3cr3t",
            "a%40b.c",
            "gclid=abc",
        ] {
            assert!(
                !out.contains(raw),
                "{}: raw {raw:?} survived: {out}",
                case["name"]
            );
        }
    }
}

#[test]
fn key_rotation_keeps_old_hashes_and_hashes_new_values_with_the_new_key() {
    let policy = parse(include_str!("../../privacy.toml")).unwrap();
    let old = PrivacyEngine::new(policy.clone(), PiiHasher::new("v1", b"old", &[]));
    let new = PrivacyEngine::new(policy, PiiHasher::new("v2", b"new", &["v1"]));
    let us = RequestSignals {
        country: Some("US".into()),
        ..RequestSignals::default()
    };
    let mut a = json!({"type": "identify", "userId": "u", "traits": {"email": "a@b.c"}})
        .as_object()
        .unwrap()
        .clone();
    old.apply(&mut a, &us).unwrap();
    let v1 = a["traits"]["email"].as_str().unwrap().to_string();
    assert!(v1.starts_with("hmac-sha256:v1:"));
    // An event that already carries the v1 hash (e.g. replayed) keeps it.
    new.apply(&mut a, &us).unwrap();
    assert_eq!(a["traits"]["email"], json!(v1));
    let mut b = json!({"type": "identify", "userId": "u", "traits": {"email": "a@b.c"}})
        .as_object()
        .unwrap()
        .clone();
    new.apply(&mut b, &us).unwrap();
    assert!(b["traits"]["email"]
        .as_str()
        .unwrap()
        .starts_with("hmac-sha256:v2:"));
}

fn arb_consent() -> impl Strategy<Value = Value> {
    (
        proptest::option::of(any::<bool>()),
        proptest::option::of(any::<bool>()),
        proptest::option::of(any::<bool>()),
        any::<bool>(),
        proptest::option::of(proptest::sample::select(vec![
            include_str!("fixtures/tcf/tcf-v2.jsonl")
                .lines()
                .nth(2)
                .unwrap()
                .to_string(),
            "CO".to_string(),
        ])),
    )
        .prop_map(|(a, m, p, gpc, tcf)| {
            let mut prefs = Map::new();
            for (k, v) in [("analytics", a), ("marketing", m), ("personalization", p)] {
                if let Some(v) = v {
                    prefs.insert(k.into(), Value::Bool(v));
                }
            }
            let mut c = json!({"categoryPreferences": prefs, "gpc": gpc});
            if let Some(t) = tcf {
                c["tcf"] = Value::String(t.split('"').nth(3).unwrap_or(&t).to_string());
            }
            c
        })
}

proptest! {
    #[test]
    fn no_event_is_stored_with_a_category_it_was_not_granted_unless_anonymised(
        consent in arb_consent(),
        country in proptest::sample::select(vec!["DE", "FR", "US", "BR", "GB"]),
        gpc_header in any::<bool>(),
        name in proptest::sample::select(vec!["Order Completed", "Product Recommended", "Clicked"]),
        email in "[a-z]{1,8}@[a-z]{1,8}\\.com",
    ) {
        let e = engine();
        let mut ev = json!({"type": "track", "event": name, "userId": "u", "anonymousId": "a",
            "properties": {"email": email.clone()}, "context": {"consent": consent, "traits": {"email": email.clone()}}})
            .as_object().unwrap().clone();
        let sig = RequestSignals { gpc: gpc_header, country: Some(country.to_string()), ..RequestSignals::default() };
        let cats = e.policy.categories_for("track", Some(name)).to_vec();
        match e.apply(&mut ev, &sig) {
            Ok(applied) => {
                let all = applied.resolved.all_granted(&cats);
                // Kept without every category granted only when anonymised.
                prop_assert!(all || applied.anonymised, "{name} kept with {:?}", applied.resolved.evidence());
                if applied.anonymised {
                    prop_assert!(ev.get("userId").is_none());
                    prop_assert_ne!(ev["anonymousId"].as_str(), Some("a"));
                }
                // Granted or not, the raw email never survives.
                prop_assert!(!Value::Object(ev.clone()).to_string().contains(&email));
                let granted: Vec<String> = ev["context"]["consent"]["resolved"]["granted"].as_array().unwrap()
                    .iter().map(|v| v.as_str().unwrap().to_string()).collect();
                prop_assert!(all == cats.iter().all(|c| granted.contains(c)));
            }
            Err(d) => {
                prop_assert!(!d.resolved.all_granted(&cats));
                prop_assert!(d.reason.starts_with("consent_denied_"));
            }
        }
    }

    #[test]
    fn hashing_is_deterministic_per_key_version(email in "[A-Za-z0-9.]{1,10}@[a-z]{1,8}\\.[a-z]{2,3}") {
        let h1 = PiiHasher::new("v1", KEY, &[]);
        let h1b = PiiHasher::new("v1", KEY, &[]);
        let h2 = PiiHasher::new("v2", b"other", &[]);
        let a = h1.hash(collector_core::pii::PiiKind::Email, &email, "");
        prop_assert_eq!(&a, &h1b.hash(collector_core::pii::PiiKind::Email, &email.to_uppercase(), ""));
        prop_assert_ne!(a, h2.hash(collector_core::pii::PiiKind::Email, &email, ""));
    }
}

#[test]
fn ingest_with_privacy_stores_withholds_and_rejects_each_event_once() {
    use collector_core::ingest::{parse_body_with_privacy, Endpoint};
    let e = engine();
    let fr = RequestSignals {
        country: Some("FR".into()),
        ip: Some("203.0.113.5".into()),
        ..RequestSignals::default()
    };
    let body = json!({"writeKey": "k", "batch": [
        {"type": "track", "event": "Clicked", "messageId": "a", "userId": "u", "anonymousId": "anon", "traits": {"email": "x@y.z"}},
        {"type": "track", "event": "Order Completed", "messageId": "b", "userId": "u"},
        {"type": "track", "messageId": "c", "userId": "u"}
    ]});
    let p = parse_body_with_privacy(
        Endpoint::Batch,
        body.to_string().as_bytes(),
        0,
        &mut || "id".into(),
        Some((&e, &fr)),
    )
    .unwrap();
    assert_eq!(p.accepted.len(), 1);
    let ev = &p.accepted[0];
    assert_eq!(ev.user_id, None, "anonymised: the header follows the body");
    assert!(ev
        .anonymous_id
        .as_deref()
        .unwrap()
        .starts_with("hmac-sha256:v1:"));
    assert!(!ev.json.contains("x@y.z") && !ev.json.contains("203.0.113.5"));
    assert_eq!(p.withheld.len(), 1);
    assert_eq!(
        (
            p.withheld[0].index,
            p.withheld[0].message_id.as_str(),
            p.withheld[0].reason.as_str()
        ),
        (Some(1), "b", "consent_denied_marketing")
    );
    assert_eq!(p.rejected.len(), 1);
    assert_eq!(p.rejected[0].index, Some(2));
}

// Issue #8: past MAX_HASHED_FINDINGS_PER_EVENT detected values, an event's findings are
// redacted, not hashed, so a hostile event cannot inflate ~15x on its way to storage;
// every finding is counted.
#[test]
fn detected_values_past_the_cap_are_redacted_and_all_counted() {
    use collector_core::note::Note;
    use collector_core::privacy::MAX_HASHED_FINDINGS_PER_EVENT;
    let e = engine();
    let text = "x@y.zz ".repeat(100);
    let mut ev =
        json!({"type": "track", "event": "E", "anonymousId": "a", "properties": {"t": text}})
            .as_object()
            .unwrap()
            .clone();
    let us = RequestSignals::new(false, None, Some("US".into()), None);
    let applied = e.apply(&mut ev, &us).unwrap();
    let t = ev["properties"]["t"].as_str().unwrap();
    assert_eq!(
        t.matches("hmac-sha256:v1:").count(),
        MAX_HASHED_FINDINGS_PER_EVENT
    );
    assert_eq!(
        t.matches("[redacted:email]").count(),
        100 - MAX_HASHED_FINDINGS_PER_EVENT
    );
    assert!(!t.contains("x@y.zz"));
    let n = applied
        .notes
        .iter()
        .filter(|n| **n == Note::PiiDetected(collector_core::detect::Detected::Email))
        .count();
    assert_eq!(n, 100);
}

/// The shipped policy (which seals emails and phones), sealing to `public` instead of
/// the development key.
fn sealing_policy(public: &str) -> collector_core::policy::Policy {
    let src = include_str!("../../privacy.toml");
    let line = src.lines().find(|l| l.starts_with("seal_to = ")).unwrap();
    parse(&src.replace(line, &format!("seal_to = \"{public}\""))).unwrap()
}

fn os_random(buf: &mut [u8]) -> bool {
    // Tests only: a fixed-seed generator would do as well, but the edge's path is this.
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    for b in buf {
        let x = N.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        *b = (x.wrapping_mul(0xbf58_476d_1ce4_e5b9) >> 56) as u8;
    }
    true
}

#[test]
fn encrypt_fields_are_hashed_in_place_and_sealed_to_the_agent() {
    use collector_core::seal::OpenKey;
    let (secret, public) = OpenKey::generate_from(os_random).unwrap();
    let policy = sealing_policy(&public);
    let e =
        PrivacyEngine::new(policy.clone(), PiiHasher::new("v1", KEY, &[])).with_random(os_random);
    let mut ev = json!({"type": "identify", "userId": "u1",
        "traits": {"email": "  Jane.Doe@Example.COM "},
        "context": {"sealed": {"traits.email": "sealed:v1:forged-by-the-client"}}})
    .as_object()
    .unwrap()
    .clone();
    let signals = RequestSignals {
        country: Some("US".into()),
        ..RequestSignals::default()
    };
    let applied = e.apply(&mut ev, &signals).unwrap();
    let stored = Value::Object(ev.clone()).to_string();
    assert!(
        !stored.to_lowercase().contains("jane"),
        "no raw email at rest: {stored}"
    );
    let hashed = ev["traits"]["email"].as_str().unwrap();
    assert!(e.hasher.is_hashed(hashed), "{hashed}");
    let sealed = ev["context"]["sealed"]["traits.email"].as_str().unwrap();
    assert_ne!(
        sealed, "sealed:v1:forged-by-the-client",
        "a client's sealed value is dropped"
    );
    let open = OpenKey::parse(&secret).unwrap();
    assert_eq!(
        open.open(sealed).unwrap(),
        "jane.doe@example.com",
        "sealed normalised"
    );
    assert!(applied.removed.contains(&"context.sealed".to_string()));
    assert_eq!(
        ev["context"]["consent"]["resolved"]["pii"]["traits.email"],
        json!("email:encrypt")
    );

    // Without a random source the field is only hashed, and the event says so.
    let plain = PrivacyEngine::new(policy, PiiHasher::new("v1", KEY, &[]));
    let mut ev =
        json!({"type": "identify", "userId": "u1", "traits": {"email": "jane@example.com"}})
            .as_object()
            .unwrap()
            .clone();
    let applied = plain.apply(&mut ev, &signals).unwrap();
    assert!(ev["context"].get("sealed").is_none());
    assert!(applied.notes.iter().any(|n| n.key() == "seal_unavailable"));
}

#[test]
fn encrypt_without_a_key_to_seal_to_is_a_policy_error_with_its_line() {
    let shipped = include_str!("../../privacy.toml");
    let line = shipped
        .lines()
        .find(|l| l.starts_with("seal_to = "))
        .unwrap();
    let src = shipped.replace(line, "");
    let errs = parse(&src).unwrap_err();
    let encrypted: Vec<usize> = src
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(r#"action = "encrypt""#))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(
        errs.len(),
        encrypted.len(),
        "one error per encrypted field: {errs:?}"
    );
    for (e, line) in errs.iter().zip(&encrypted) {
        assert!(e.message.contains("set [pii] seal_to"), "{e}");
        assert_eq!(e.line, *line);
    }
    let bad = shipped.replace(line, "seal_to = \"x25519:nope\"");
    let errs = parse(&bad).unwrap_err();
    assert!(
        errs.iter().any(|e| e.message.contains("seal_to")),
        "{errs:?}"
    );
}
