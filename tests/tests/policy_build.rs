//! An invalid privacy policy cannot be deployed: the worker build fails and names every
//! problem with its file and line.

use std::process::Command;

use collector_e2e::Toolchain;

#[test]
fn an_invalid_privacy_policy_fails_the_worker_build_with_its_lines() {
    let tools = Toolchain::discover();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("privacy.toml");
    std::fs::write(
        &bad,
        "[categories.marketing]\ntcf_purposes = [1, 42]\n\n[destinations.ads]\ncategories = []\n",
    )
    .unwrap();
    let out = Command::new("cargo")
        .args([
            "build",
            "--quiet",
            // The command worker-build runs (`--lib --release`), so the build stops in
            // the same build script and reuses the worker build's compiled crates.
            "--lib",
            "--release",
            "-p",
            "collector-edge",
            "--target",
            "wasm32-unknown-unknown",
        ])
        .current_dir(&tools.root)
        .env("PRIVACY_POLICY", &bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the build must fail");
    let file = bad.display().to_string();
    assert!(err.contains("the privacy policy is invalid"), "{err}");
    assert!(
        err.contains(&format!("{file}:2:20: TCF purpose 42 does not exist")),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{file}:4:1: destination `ads` requires no category"
        )),
        "{err}"
    );
}
