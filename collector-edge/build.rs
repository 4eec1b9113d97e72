//! Embeds the privacy rules file into the worker, validated at build time: a policy
//! with a mistake fails the build (and so the deploy) with every problem and its line.
//! The file is `PRIVACY_POLICY` if set, else `privacy.toml` at the repository root.
//! What is embedded is the validated policy as JSON, so the worker does not link a TOML
//! parser.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=PRIVACY_POLICY");
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let path = std::env::var_os("PRIVACY_POLICY")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../privacy.toml"));
    println!("cargo:rerun-if-changed={}", path.display());
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read the privacy policy {}: {e}", path.display()));
    let policy = match collector_core::policy::parse(&text) {
        Ok(p) => p,
        Err(errors) => {
            let list: Vec<String> = errors
                .iter()
                .map(|e| format!("{}:{e}", path.display()))
                .collect();
            panic!("the privacy policy is invalid:\n{}", list.join("\n"));
        }
    };
    let json = serde_json::to_string(&policy).expect("a policy serialises");
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("privacy.json");
    std::fs::write(&out, json).expect("write OUT_DIR/privacy.json");
}
