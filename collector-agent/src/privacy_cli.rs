//! `collector-agent privacy check|dry-run`: tools for the privacy team to validate a
//! rules file and to see what it would do to sample events before it is deployed.

use std::fmt::Write as _;
use std::path::Path;

use collector_core::event::{normalize, EventEnvelope, Outcome};
use collector_core::pii::PiiHasher;
use collector_core::policy::{parse, Policy};
use collector_core::privacy::{PrivacyEngine, RequestSignals};
use serde_json::{Map, Value};

/// Validates a rules file; `Err` carries every problem as `file:line:col: message`.
pub fn check(path: &Path) -> Result<String, String> {
    let policy = load(path)?;
    let d = policy.pii_detect;
    Ok(format!(
        "{}: OK (policy {}; {} categories, {} regions, {} destinations, {} PII fields, {} PII key names; detect email={} phone={} card={})\n",
        path.display(),
        policy.version,
        policy.categories.len(),
        policy.regions.len(),
        policy.destinations.len(),
        policy.pii_fields.len(),
        policy.pii_keys.len(),
        d.email.as_str(),
        d.phone.as_str(),
        d.card.as_str()
    ))
}

/// Reads and validates a rules file; `Err` carries every problem as
/// `file:line:col: message`.
pub fn load(path: &Path) -> Result<Policy, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text).map_err(|errs| {
        errs.iter()
            .map(|e| format!("{}:{e}", path.display()))
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// Runs every line of a JSONL file through the policy and reports what would happen to
/// it. A line is `{"event": {...}, "country": "FR", "gpc": true, "tcf_cookie": "...",
/// "ip": "..."}`, or a bare event. Hashes use `key` (`VERSION:SECRET`), by default a
/// throw-away dry-run key: the report names the fields hashed, not their values.
pub fn dry_run(
    policy_path: &Path,
    events_path: &Path,
    key: Option<&str>,
) -> Result<String, String> {
    let policy = load(policy_path)?;
    let (version, secret) = key
        .and_then(|k| k.split_once(':'))
        .unwrap_or(("dry-run", "dry-run-key"));
    let engine = PrivacyEngine::new(policy, PiiHasher::new(version, secret.as_bytes(), &[]))
        .with_random(|b| getrandom::getrandom(b).is_ok());
    let text = std::fs::read_to_string(events_path)
        .map_err(|e| format!("{}: {e}", events_path.display()))?;
    let mut out = String::new();
    let (mut kept, mut anonymised, mut dropped, mut rejected) = (0, 0, 0, 0);
    let mut reasons: std::collections::BTreeMap<String, u64> = Default::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                rejected += 1;
                let _ = writeln!(out, "line {n}: REJECT not JSON: {e}");
                continue;
            }
        };
        let (event, signals) = match v.get("event") {
            Some(ev) => (
                ev.clone(),
                RequestSignals::new(
                    v.get("gpc").and_then(Value::as_bool).unwrap_or(false),
                    v.get("tcf_cookie")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    v.get("country").and_then(Value::as_str).map(str::to_string),
                    v.get("ip").and_then(Value::as_str).map(str::to_string),
                ),
            ),
            None => (v.clone(), RequestSignals::default()),
        };
        let label = format!(
            "{} {}",
            event.get("type").and_then(Value::as_str).unwrap_or("?"),
            event
                .get("event")
                .or_else(|| event.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("")
        );
        // Validate and normalise as the worker does, then apply the policy once to the
        // normalised event, keeping the details of what it did for the report.
        let env = EventEnvelope {
            received_at_ms: 0,
            ..EventEnvelope::default()
        };
        let stored = match normalize(event, &env, &mut || "dry-run-id".to_string()) {
            Err(e) => {
                rejected += 1;
                let _ = writeln!(out, "line {n}: {label}: REJECT {} ({e})", e.code());
                continue;
            }
            Ok(Outcome::Stored { event, .. }) => event,
            Ok(Outcome::Withheld { .. }) => unreachable!("no policy was given to normalize"),
        };
        let mut obj: Map<String, Value> = match serde_json::from_str(&stored.json) {
            Ok(Value::Object(m)) => m,
            _ => unreachable!("normalize stores an object"),
        };
        match engine.apply(&mut obj, &signals) {
            Err(d) => {
                dropped += 1;
                *reasons.entry(d.reason.clone()).or_default() += 1;
                let _ = writeln!(
                    out,
                    "line {n}: {label}: DROP {}; {}",
                    d.reason,
                    summary(&d.resolved.evidence())
                );
            }
            Ok(a) => {
                kept += 1;
                if a.anonymised {
                    anonymised += 1;
                }
                let pii: Vec<String> = a.pii.iter().map(|(p, t)| format!("{p}={t}")).collect();
                let _ = writeln!(
                    out,
                    "line {n}: {label}: KEEP{}; {}; hashed [{}]; removed [{}]; scrubbed [{}]; reduced [{}]; pii [{}]",
                    if a.anonymised { " (anonymised)" } else { "" },
                    summary(&a.resolved.evidence()),
                    a.hashed.join(", "),
                    a.removed.join(", "),
                    a.scrubbed.join(", "),
                    a.reduced.join(", "),
                    pii.join(", ")
                );
            }
        }
    }
    let _ =
        writeln!(
        out,
        "summary: {kept} kept ({anonymised} anonymised), {dropped} dropped, {rejected} rejected{}",
        if reasons.is_empty() {
            String::new()
        } else {
            format!(
                "; drops by reason: {}",
                reasons.iter().map(|(r, n)| format!("{r}={n}")).collect::<Vec<_>>().join(", ")
            )
        }
    );
    Ok(out)
}

fn summary(evidence: &Value) -> String {
    let list = |k: &str| {
        evidence[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    let sources: Vec<String> = evidence["sources"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(c, s)| format!("{c}:{}", s.as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    let mut s = format!(
        "region {} granted [{}] denied [{}] by [{}]",
        evidence["region"].as_str().unwrap_or("?"),
        list("granted"),
        list("denied"),
        sources.join(" ")
    );
    if let Some(e) = evidence.get("tcf_error").and_then(Value::as_str) {
        let _ = write!(s, "; TCF string ignored: {e}");
    }
    s
}
