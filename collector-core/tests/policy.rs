//! The privacy rules file: the shipped example is valid; mistakes are reported with
//! their line, all at once.

use collector_core::pii::PiiKind;
use collector_core::policy::{parse, IpHandling, RegionDefault, WhenDenied};

const EXAMPLE: &str = include_str!("../../privacy.toml");

#[test]
fn the_shipped_privacy_toml_is_valid() {
    let p = parse(EXAMPLE).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(
        p.version.starts_with("sha256:") && p.version.len() == 23,
        "{}",
        p.version
    );
    assert_eq!(
        p.category("marketing").unwrap().when_denied,
        WhenDenied::Drop
    );
    assert_eq!(p.category("marketing").unwrap().tcf_purposes, vec![1, 3, 4]);
    assert!(p.category("marketing").unwrap().gpc_denies);
    assert!(p.category("necessary").unwrap().always_granted);
    assert_eq!(p.region_for(Some("de")).name, "eea_uk_ch");
    assert_eq!(p.region_for(Some("DE")).default, RegionDefault::Deny);
    assert_eq!(p.region_for(Some("US")).default, RegionDefault::Grant);
    assert_eq!(p.region_for(Some("BR")).name, "rest");
    assert_eq!(p.region_for(None).name, "rest");
    assert_eq!(
        p.categories_for("track", Some("Order Completed")),
        ["analytics", "marketing"]
    );
    assert_eq!(p.categories_for("track", Some("Other")), ["analytics"]);
    assert_eq!(p.categories_for("page", None), ["analytics"]);
    assert_eq!(p.destinations["google_ads"], vec!["marketing".to_string()]);
    assert_eq!(p.ip, IpHandling::Truncate);
    assert_eq!(
        p.pii_fields
            .iter()
            .filter(|f| f.kind == PiiKind::Email)
            .count(),
        3
    );
    assert_eq!(p.scrub_query_params, vec!["email", "token", "gclid"]);
}

#[test]
fn the_version_changes_with_the_file() {
    let a = parse(EXAMPLE).unwrap().version;
    let b = parse(&format!("{EXAMPLE}\n# a comment\n")).unwrap().version;
    assert_ne!(a, b);
}

#[test]
fn every_mistake_is_reported_with_its_line() {
    let bad = r#"[categories.analytics]
when_denied = "anonymise"
tcf_purposes = [1, 12]

[categories.Marketing]
when_denied = "drop"

[categories.ads]
tcf_purposes = [2]

[events]
default_categories = ["analytcs"]

[regions.eu]
countries = ["DE", "france", "DE"]
default = "deny"

[destinations.google_ads]
categories = []

[destinations.meta]
categories = ["marketng"]

[pii]
default_phone_calling_code = "+49"
fields = [{ path = "email", kind = "email" }]
"#;
    let errs = parse(bad).unwrap_err();
    let lines: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.message.as_str())).collect();
    let has = |line: usize, needle: &str| {
        assert!(
            lines.iter().any(|(l, m)| *l == line && m.contains(needle)),
            "expected line {line} to mention {needle:?}; got {lines:#?}"
        )
    };
    has(1, "no region with countries = [\"*\"]");
    has(3, "TCF purpose 12 does not exist");
    has(5, "category name `Marketing`");
    has(8, "category `ads` needs `when_denied`");
    has(12, "unknown category `analytcs`");
    has(15, "`france` is not an ISO 3166-1 alpha-2");
    has(15, "country DE is in both regions");
    has(18, "destination `google_ads` requires no category");
    has(22, "unknown category `marketng`");
    has(25, "default_phone_calling_code `+49`");
    has(26, "PII path `email`");
    assert_eq!(errs[0].to_string().split(':').next(), Some("1"));
}

#[test]
fn syntax_errors_and_unknown_keys_point_at_their_line() {
    let errs = parse("[categories.a]\nwhen_denied = \"sometimes\"\n").unwrap_err();
    assert_eq!(errs[0].line, 2, "{errs:?}");
    assert!(errs[0].message.contains("unknown variant"), "{errs:?}");
    let errs = parse("[categories.a]\nwhen_denied = \"drop\"\nalways_grnted = true\n").unwrap_err();
    assert_eq!(errs[0].line, 3, "{errs:?}");
    let errs = parse("[categories.a\n").unwrap_err();
    assert_eq!(errs[0].line, 1, "{errs:?}");
}

const MINIMAL: &str = r#"
[categories.necessary]
always_granted = true
[events]
default_categories = ["necessary"]
[regions.rest]
countries = ["*"]
default = "grant"
"#;

// Issue #8: the PII safety net is on without any configuration...
#[test]
fn safety_net_defaults_apply_when_the_policy_says_nothing() {
    use collector_core::policy::{DetectAction, DEFAULT_PII_KEYS};
    let p = parse(MINIMAL).unwrap();
    assert_eq!(p.pii_keys.len(), DEFAULT_PII_KEYS.len());
    assert_eq!(p.pii_keys["phonenumber"], PiiKind::Phone);
    assert_eq!(p.pii_detect.email, DetectAction::Hash);
    assert_eq!(p.pii_detect.card, DetectAction::Redact);
}

// ...configurable, with key names normalised, and mistakes reported with their line.
#[test]
fn safety_net_keys_and_detection_are_configurable_and_validated() {
    use collector_core::policy::DetectAction;
    let p = parse(&format!(
        "{MINIMAL}[pii]\ndefault_phone_calling_code = \"44\"\n[pii.keys]\n\"Phone-Number\" = \"phone\"\nalt_mail = \"email\"\n[pii.detect]\nphone = \"off\"\n"
    ))
    .unwrap();
    assert_eq!(p.pii_keys.len(), 2, "{:?}", p.pii_keys);
    assert_eq!(p.pii_keys["phonenumber"], PiiKind::Phone);
    assert_eq!(p.pii_keys["altmail"], PiiKind::Email);
    assert_eq!(p.pii_detect.phone, DetectAction::Off);
    assert_eq!(
        p.pii_detect.email,
        DetectAction::Hash,
        "unset kinds keep their default"
    );

    let errs = parse(&format!("{MINIMAL}[pii.keys]\nmobile = \"phone\"\n")).unwrap_err();
    assert!(
        errs[0].message.contains("default_phone_calling_code"),
        "{errs:?}"
    );
    let errs = parse(&format!("{MINIMAL}[pii.detect]\nemail = \"shred\"\n")).unwrap_err();
    assert!(errs[0].line >= 10, "{errs:?}");
}

#[test]
fn identity_block_list_extends_the_defaults() {
    // The shipped file's own list, and the defaults.
    let p = parse(EXAMPLE).unwrap();
    assert!(p.block_list.blocked("Not-Logged-In").is_some());
    assert!(p.block_list.blocked("undefined").is_some());
    assert!(p.block_list.blocked("u1").is_none());
    let bad = EXAMPLE.replace("block = [", "blocks = [");
    let line = EXAMPLE[..EXAMPLE.find("block = [").unwrap()]
        .matches('\n')
        .count()
        + 1;
    let errs = parse(&bad).unwrap_err();
    assert_eq!(errs[0].line, line, "{errs:?}");
}
