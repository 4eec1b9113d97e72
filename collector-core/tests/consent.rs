//! Consent resolution against the shipped privacy.toml: each source, each region, and
//! the precedence between them.

use collector_core::consent::{resolve, ConsentInputs, Source};
use collector_core::policy::{parse, Policy};
use serde_json::{json, Value};

fn policy() -> Policy {
    parse(include_str!("../../privacy.toml")).unwrap()
}

/// TC strings encoded by the IAB reference implementation (see fixtures/tcf/).
fn tc(index: usize) -> String {
    let line = include_str!("fixtures/tcf/tcf-v2.jsonl")
        .lines()
        .nth(index)
        .unwrap();
    let v: Value = serde_json::from_str(line).unwrap();
    v["tc_string"].as_str().unwrap().to_string()
}
/// Purposes 1,3,4,5,6 consented.
fn tc_marketing_and_personalization() -> String {
    tc(2)
}
/// No purpose consented.
fn tc_nothing() -> String {
    tc(3)
}

fn decisions(inputs: ConsentInputs) -> Vec<(String, bool, &'static str)> {
    let r = resolve(&policy(), &inputs);
    r.decisions
        .iter()
        .map(|(c, d)| (c.clone(), d.granted, d.source.as_str()))
        .collect()
}

fn d(c: &str, g: bool, s: &'static str) -> (String, bool, &'static str) {
    (c.to_string(), g, s)
}

fn country(c: &str) -> ConsentInputs {
    ConsentInputs {
        country: Some(c.into()),
        ..ConsentInputs::default()
    }
}

#[test]
fn region_defaults_opt_in_for_eea_opt_out_for_us_and_rest() {
    assert_eq!(
        decisions(country("FR")),
        vec![
            d("analytics", false, "default"),
            d("marketing", false, "default"),
            d("necessary", true, "necessary"),
            d("personalization", false, "default"),
            d("sms", false, "default"),
        ]
    );
    // Opt-out regions grant every category by default, but an explicit-only one (a
    // channel opt-in such as SMS).
    let but_sms = |v: Vec<(String, bool, &str)>| v.iter().all(|(c, g, _)| *g == (c != "sms"));
    for c in ["US", "BR"] {
        assert!(but_sms(decisions(country(c))), "{c}");
    }
    // Unknown country: the catch-all region.
    assert!(but_sms(decisions(ConsentInputs::default())));
}

#[test]
fn explicit_only_categories_are_granted_by_the_visitors_choice_alone() {
    let mut i = country("US");
    i.explicit.insert("sms".into(), true);
    assert!(resolve(&policy(), &i).granted("sms"));
    let mut i = country("DE");
    i.tcf = Some(tc_marketing_and_personalization());
    assert_eq!(
        resolve(&policy(), &i).decisions["sms"],
        collector_core::consent::Decision {
            granted: false,
            source: Source::Default
        }
    );
    // Such a category takes no TCF purposes (nothing but the choice may grant it).
    let src = include_str!("../../privacy.toml").replace(
        "explicit_only = true",
        "explicit_only = true\ntcf_purposes = [1]",
    );
    let errs = collector_core::policy::parse(&src).unwrap_err();
    assert!(errs[0].message.contains("explicit_only"), "{errs:?}");
}

#[test]
fn explicit_preferences_override_region_defaults() {
    let mut i = country("DE");
    i.explicit.insert("analytics".into(), true);
    i.explicit.insert("marketing".into(), false);
    assert_eq!(
        decisions(i),
        vec![
            d("analytics", true, "explicit"),
            d("marketing", false, "explicit"),
            d("necessary", true, "necessary"),
            d("personalization", false, "default"),
            d("sms", false, "default"),
        ]
    );
}

#[test]
fn gpc_denies_sale_and_sharing_categories_even_over_an_explicit_grant() {
    let mut i = country("US");
    i.gpc = true;
    i.explicit.insert("marketing".into(), true);
    assert_eq!(
        decisions(i),
        vec![
            d("analytics", true, "default"),
            d("marketing", false, "gpc"),
            d("necessary", true, "necessary"),
            d("personalization", false, "gpc"),
            d("sms", false, "default"),
        ]
    );
}

#[test]
fn tcf_purposes_grant_categories_when_all_are_consented() {
    let mut i = country("DE");
    i.tcf = Some(tc_marketing_and_personalization());
    assert_eq!(
        decisions(i),
        vec![
            d("analytics", false, "tcf"),
            d("marketing", true, "tcf"),
            d("necessary", true, "necessary"),
            d("personalization", true, "tcf"),
            d("sms", false, "default"),
        ]
    );
    let mut i = country("US");
    i.tcf = Some(tc_nothing());
    assert_eq!(
        decisions(i),
        vec![
            d("analytics", false, "tcf"),
            d("marketing", false, "tcf"),
            d("necessary", true, "necessary"),
            d("personalization", false, "tcf"),
            d("sms", false, "default"),
        ]
    );
}

#[test]
fn explicit_denial_beats_gpc_and_tcf_and_gpc_beats_tcf() {
    let mut i = country("DE");
    i.tcf = Some(tc_marketing_and_personalization());
    i.gpc = true;
    i.explicit.insert("personalization".into(), false);
    let r = resolve(&policy(), &i);
    assert_eq!(r.decisions["personalization"].source, Source::Explicit);
    assert_eq!(r.decisions["marketing"].source, Source::Gpc);
    assert!(!r.granted("marketing"));
}

#[test]
fn a_malformed_tcf_string_is_ignored_and_reported() {
    let mut i = country("DE");
    i.tcf = Some("CO".into());
    let r = resolve(&policy(), &i);
    assert!(r.tcf_error.is_some());
    assert!(!r.tcf_used);
    assert_eq!(r.decisions["marketing"].source, Source::Default);
    assert!(r.evidence()["tcf_error"]
        .as_str()
        .unwrap()
        .contains("ends early"));
}

#[test]
fn inputs_are_read_from_segment_and_sdk_shapes_and_request_signals() {
    let ev = json!({"context": {"consent": {"categoryPreferences": {"analytics": true, "marketing": "yes"},
        "categories": {"marketing": false}, "gpc": true, "tcf": "CPX"}}});
    let i = ConsentInputs::from_event(
        ev.as_object().unwrap(),
        false,
        Some("cookie-tc"),
        Some("de"),
    );
    assert_eq!(i.explicit.get("analytics"), Some(&true));
    assert_eq!(
        i.explicit.get("marketing"),
        Some(&false),
        "non-boolean values are ignored"
    );
    assert!(i.gpc);
    assert_eq!(
        i.tcf.as_deref(),
        Some("CPX"),
        "the event's TC string wins over the cookie"
    );
    assert_eq!(i.country.as_deref(), Some("DE"));
    let bare = ConsentInputs::from_event(
        json!({}).as_object().unwrap(),
        true,
        Some("cookie-tc"),
        None,
    );
    assert!(bare.gpc);
    assert_eq!(bare.tcf.as_deref(), Some("cookie-tc"));
}

#[test]
fn evidence_names_granted_denied_sources_and_policy_version() {
    let mut i = country("FR");
    i.explicit.insert("analytics".into(), true);
    let p = policy();
    let ev = resolve(&p, &i).evidence();
    assert_eq!(ev["policy_version"], json!(p.version));
    assert_eq!(ev["region"], "eea_uk_ch");
    assert_eq!(ev["granted"], json!(["analytics", "necessary"]));
    assert_eq!(ev["denied"], json!(["marketing", "personalization", "sms"]));
    assert_eq!(ev["sources"]["analytics"], "explicit");
    assert_eq!(ev["gpc"], false);
}

// Issue #13: the edge writes the evidence as text, without a `Value` tree. Its bytes are
// pinned here: the order of the keys, the `tcf_error` and `pii` members, and escaping.
#[test]
fn evidence_text_is_exactly_the_stored_shape() {
    let mut i = country("DE");
    i.tcf = Some("CO".into());
    i.explicit.insert("analytics".into(), true);
    let p = policy();
    let r = resolve(&p, &i);
    let pii: std::collections::BTreeMap<String, String> = [
        ("properties.email".to_string(), "email:hash".to_string()),
        (
            "traits.\"odd\"\nkey".to_string(),
            "phone:hash,phone:encrypt".to_string(),
        ),
    ]
    .into_iter()
    .collect();
    let mut text = String::new();
    r.write_evidence(&mut text, &pii);
    let sources: serde_json::Map<String, Value> = r
        .decisions
        .iter()
        .map(|(c, d)| (c.clone(), json!(d.source.as_str())))
        .collect();
    let expected = json!({
        "policy_version": p.version,
        "region": "eea_uk_ch",
        "granted": ["analytics", "necessary"],
        "denied": ["marketing", "personalization", "sms"],
        "sources": sources,
        "gpc": false,
        "tcf_error": r.tcf_error.clone().unwrap(),
        "pii": {"properties.email": "email:hash", "traits.\"odd\"\nkey": "phone:hash,phone:encrypt"},
    });
    assert_eq!(text, serde_json::to_string(&expected).unwrap());
    // Without findings and without a TC string error, neither member is written.
    let plain = resolve(&p, &country("US"));
    let mut text = String::new();
    plain.write_evidence(&mut text, &Default::default());
    assert!(text.ends_with(",\"gpc\":false}"), "{text}");
    assert_eq!(
        plain.evidence(),
        serde_json::from_str::<Value>(&text).unwrap()
    );
}
