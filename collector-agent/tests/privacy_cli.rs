//! `collector-agent privacy check` and `privacy dry-run`, run as the privacy team would.

use std::process::Command;

fn agent(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_collector-agent"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_shipped_policy_and_names_its_version() {
    let (ok, out, _) = agent(&["privacy", "check", "privacy.toml"]);
    assert!(ok);
    assert!(out.starts_with("privacy.toml: OK (policy sha256:"), "{out}");
}

#[test]
fn check_lists_every_problem_with_file_and_line_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("privacy.toml");
    std::fs::write(&bad, "[categories.a]\ntcf_purposes = [99]\n").unwrap();
    let (ok, _, err) = agent(&["privacy", "check", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "{}:2:17: TCF purpose 99 does not exist",
            bad.display()
        )),
        "{err}"
    );
    assert!(err.contains("no region with countries"), "{err}");
}

#[test]
fn dry_run_reports_keep_drop_anonymise_hash_and_reject_with_reasons() {
    let (ok, out, err) = agent(&[
        "privacy",
        "dry-run",
        "privacy.toml",
        "examples/privacy-dry-run.jsonl",
    ]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("line 1: track Clicked: KEEP (anonymised); region eea_uk_ch"),
        "{out}"
    );
    assert!(
        lines[0].contains("removed [userId, properties.email, context.ip]"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("line 2: track Order Completed: DROP consent_denied_marketing"),
        "{out}"
    );
    assert!(
        lines[2].contains("KEEP; region us")
            && lines[2].contains("hashed [traits.email, traits.phone]"),
        "{out}"
    );
    assert!(
        lines[3].contains("DROP consent_denied_marketing") && lines[3].contains("marketing:gpc"),
        "{out}"
    );
    assert!(lines[4].contains("TCF string ignored"), "{out}");
    assert!(lines[5].contains("scrubbed [context.page.url]"), "{out}");
    assert!(lines[6].contains("REJECT missing_field"), "{out}");
    assert_eq!(
        lines[7],
        "summary: 4 kept (2 anonymised), 2 dropped, 1 rejected; drops by reason: consent_denied_marketing=2"
    );
    // No raw value is printed.
    assert!(!out.to_lowercase().contains("jane@example.com"));
}
