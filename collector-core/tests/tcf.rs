//! The TCF decoder against TC strings decoded by the IAB Tech Lab's reference
//! implementation (`tests/fixtures/tcf/make-fixtures.mjs` writes the fixture).

use collector_core::tcf::{decode, TcfError};
use serde_json::Value;

fn fixtures() -> Vec<Value> {
    let text = include_str!("fixtures/tcf/tcf-v2.jsonl");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn nums(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect()
}

#[test]
fn decodes_like_the_reference_implementation() {
    let all = fixtures();
    assert!(all.len() >= 8);
    let mut decoded = 0;
    for f in &all {
        let s = f["tc_string"].as_str().unwrap();
        let result = decode(s);
        if f.get("error").is_some() {
            assert!(
                result.is_err(),
                "{s}: the reference rejects it ({}), so must we",
                f["error"]
            );
            continue;
        }
        let tc = result.unwrap_or_else(|e| panic!("{s}: {e}"));
        decoded += 1;
        assert_eq!(u64::from(tc.version), f["version"].as_u64().unwrap(), "{s}");
        assert_eq!(u64::from(tc.cmp_id), f["cmp_id"].as_u64().unwrap(), "{s}");
        assert_eq!(
            u64::from(tc.cmp_version),
            f["cmp_version"].as_u64().unwrap(),
            "{s}"
        );
        assert_eq!(
            u64::from(tc.vendor_list_version),
            f["vendor_list_version"].as_u64().unwrap(),
            "{s}"
        );
        assert_eq!(
            u64::from(tc.policy_version),
            f["policy_version"].as_u64().unwrap(),
            "{s}"
        );
        assert_eq!(
            tc.is_service_specific,
            f["is_service_specific"].as_bool().unwrap(),
            "{s}"
        );
        assert_eq!(
            tc.purpose_one_treatment,
            f["purpose_one_treatment"].as_bool().unwrap(),
            "{s}"
        );
        assert_eq!(tc.publisher_cc, f["publisher_cc"].as_str().unwrap(), "{s}");
        assert_eq!(
            tc.consent_language,
            f["consent_language"].as_str().unwrap(),
            "{s}"
        );
        let as_u64 = |v: Vec<u8>| v.into_iter().map(u64::from).collect::<Vec<_>>();
        assert_eq!(
            as_u64(tc.special_feature_optins()),
            nums(&f["special_feature_optins"]),
            "{s}"
        );
        assert_eq!(
            as_u64(tc.purpose_consents()),
            nums(&f["purpose_consents"]),
            "{s}"
        );
        assert_eq!(
            as_u64(tc.purpose_legitimate_interests()),
            nums(&f["purpose_legitimate_interests"]),
            "{s}"
        );
        let ids = |v: &collector_core::tcf::VendorSet| v.ids().map(u64::from).collect::<Vec<_>>();
        assert_eq!(ids(&tc.vendor_consents), nums(&f["vendor_consents"]), "{s}");
        assert_eq!(
            ids(&tc.vendor_legitimate_interests),
            nums(&f["vendor_legitimate_interests"]),
            "{s}"
        );
    }
    assert!(decoded >= 5);
}

#[test]
fn malformed_strings_are_errors() {
    assert_eq!(decode(""), Err(TcfError::Empty));
    assert_eq!(decode("!!!"), Err(TcfError::Base64));
    assert!(matches!(decode("CO"), Err(TcfError::Truncated { .. })));
    assert!(matches!(
        decode("BOEFEAyOEFEAyAHABDENAI4AAAB9vABAASA"),
        Err(TcfError::Version(1))
    ));
}

#[test]
fn no_prefix_of_a_valid_string_panics() {
    for f in fixtures() {
        let s = f["tc_string"].as_str().unwrap();
        for i in 0..s.len() {
            let _ = decode(&s[..i]);
        }
    }
}
