//! Consent resolution: from what the request and event say (explicit preferences, IAB
//! TCF string, Global Privacy Control, the visitor's country) to a granted/denied
//! decision per category of the policy, each with the source that decided it.
//!
//! Precedence, highest first:
//! 1. `always_granted` categories (e.g. `necessary`) are granted;
//! 2. an **explicit denial** (`context.consent.categoryPreferences.X = false`);
//! 3. **GPC** (`Sec-GPC: 1` or `context.consent.gpc = true`) denies every category with
//!    `gpc_denies = true`;
//! 4. an **explicit grant**;
//! 5. a valid **TCF** string grants a category with `tcf_purposes` iff every listed
//!    purpose has consent (a malformed string is ignored and reported);
//! 6. the **region default** of the visitor's country.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::policy::{Policy, RegionDefault};
use crate::tcf;

/// Who decided a category.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Necessary,
    Explicit,
    Gpc,
    Tcf,
    Default,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Necessary => "necessary",
            Source::Explicit => "explicit",
            Source::Gpc => "gpc",
            Source::Tcf => "tcf",
            Source::Default => "default",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub granted: bool,
    pub source: Source,
}

/// What is known about a visitor's consent for one event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsentInputs {
    /// Category → granted, from `context.consent.categoryPreferences` (Segment's shape)
    /// or `context.consent.categories` (this SDK's shape).
    pub explicit: BTreeMap<String, bool>,
    /// A TC string, from `context.consent.tcf` or the `euconsent-v2` cookie.
    pub tcf: Option<String>,
    /// `Sec-GPC: 1` or `context.consent.gpc`.
    pub gpc: bool,
    /// ISO 3166-1 alpha-2 country of the request.
    pub country: Option<String>,
}

impl ConsentInputs {
    /// Reads the event's `context.consent` and merges the request's own signals.
    pub fn from_event(
        event: &Map<String, Value>,
        gpc_header: bool,
        tcf_cookie: Option<&str>,
        country: Option<&str>,
    ) -> ConsentInputs {
        let consent = event
            .get("context")
            .and_then(|c| c.get("consent"))
            .and_then(Value::as_object);
        let mut explicit = BTreeMap::new();
        for key in ["categoryPreferences", "categories"] {
            if let Some(prefs) = consent.and_then(|c| c.get(key)).and_then(Value::as_object) {
                for (cat, v) in prefs {
                    if let Some(b) = v.as_bool() {
                        explicit.insert(cat.clone(), b);
                    }
                }
            }
        }
        let tcf = consent
            .and_then(|c| c.get("tcf"))
            .and_then(|t| {
                t.as_str()
                    .or_else(|| t.get("tcString").and_then(Value::as_str))
            })
            .or(tcf_cookie)
            .map(str::to_string);
        let gpc = gpc_header
            || consent
                .and_then(|c| c.get("gpc"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
        ConsentInputs {
            explicit,
            tcf,
            gpc,
            country: country.map(|c| c.trim().to_ascii_uppercase()),
        }
    }
}

/// The resolved consent of one event: the evidence stored with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub decisions: BTreeMap<String, Decision>,
    pub region: String,
    pub policy_version: String,
    pub gpc: bool,
    /// Why a TC string that was present was ignored.
    pub tcf_error: Option<String>,
    /// The same as a stable code ([`tcf::TcfError::code`]), for the counters.
    pub tcf_error_code: Option<&'static str>,
    pub tcf_used: bool,
}

impl Resolved {
    pub fn granted(&self, category: &str) -> bool {
        self.decisions.get(category).is_some_and(|d| d.granted)
    }

    /// Whether every one of `categories` is granted.
    pub fn all_granted(&self, categories: &[String]) -> bool {
        categories.iter().all(|c| self.granted(c))
    }

    /// [`Resolved::evidence`] as JSON text, written straight into `out` (no `Value`
    /// tree: the edge writes this for every event), with `pii` (path → `kind:action`)
    /// when it is not empty. Byte for byte what serialising the `Value` gives (a test
    /// checks it).
    pub fn write_evidence(&self, out: &mut String, pii: &BTreeMap<String, String>) {
        use crate::json_text::{push_str, push_str_array, push_str_object};
        out.push_str("{\"policy_version\":");
        push_str(out, &self.policy_version);
        out.push_str(",\"region\":");
        push_str(out, &self.region);
        let with = |granted: bool| {
            self.decisions
                .iter()
                .filter(move |(_, d)| d.granted == granted)
                .map(|(c, _)| c.as_str())
        };
        out.push_str(",\"granted\":");
        push_str_array(out, with(true));
        out.push_str(",\"denied\":");
        push_str_array(out, with(false));
        out.push_str(",\"sources\":");
        push_str_object(
            out,
            self.decisions
                .iter()
                .map(|(c, d)| (c.as_str(), d.source.as_str())),
        );
        out.push_str(",\"gpc\":");
        out.push_str(if self.gpc { "true" } else { "false" });
        if let Some(e) = &self.tcf_error {
            out.push_str(",\"tcf_error\":");
            push_str(out, e);
        }
        if !pii.is_empty() {
            out.push_str(",\"pii\":");
            push_str_object(out, pii.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
        out.push('}');
    }

    /// The evidence an auditor needs, as stored in `context.consent.resolved`: what
    /// [`Resolved::write_evidence`] writes (without `pii`), as a `Value`.
    pub fn evidence(&self) -> Value {
        let mut text = String::with_capacity(256);
        self.write_evidence(&mut text, &BTreeMap::new());
        serde_json::from_str(&text).expect("write_evidence writes valid JSON")
    }
}

/// Resolves every category of the policy for one event.
pub fn resolve(policy: &Policy, inputs: &ConsentInputs) -> Resolved {
    let decoded = inputs
        .tcf
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(tcf::decode);
    resolve_decoded(policy, inputs, decoded.as_ref())
}

/// [`resolve`] with the TC string already decoded (`inputs.tcf` is not read): a
/// request's `euconsent-v2` cookie is decoded once, not once per event of a batch.
pub fn resolve_decoded(
    policy: &Policy,
    inputs: &ConsentInputs,
    decoded: Option<&Result<tcf::TcString, tcf::TcfError>>,
) -> Resolved {
    let (tcf, tcf_error) = match decoded {
        None => (None, None),
        Some(Ok(tc)) => (Some(tc), None),
        Some(Err(e)) => (None, Some(e)),
    };
    let region = policy.region_for(inputs.country.as_deref());
    let mut decisions = BTreeMap::new();
    let mut tcf_used = false;
    for cat in &policy.categories {
        let explicit = inputs.explicit.get(&cat.name).copied();
        let d = if cat.always_granted {
            Decision {
                granted: true,
                source: Source::Necessary,
            }
        } else if explicit == Some(false) {
            Decision {
                granted: false,
                source: Source::Explicit,
            }
        } else if inputs.gpc && cat.gpc_denies {
            Decision {
                granted: false,
                source: Source::Gpc,
            }
        } else if explicit == Some(true) {
            Decision {
                granted: true,
                source: Source::Explicit,
            }
        } else if let (Some(tc), false) = (tcf, cat.tcf_purposes.is_empty()) {
            tcf_used = true;
            Decision {
                granted: cat.tcf_purposes.iter().all(|p| tc.purpose_consent(*p)),
                source: Source::Tcf,
            }
        } else {
            Decision {
                granted: region.default == RegionDefault::Grant && !cat.explicit_only,
                source: Source::Default,
            }
        };
        decisions.insert(cat.name.clone(), d);
    }
    Resolved {
        decisions,
        region: region.name.clone(),
        policy_version: policy.version.clone(),
        gpc: inputs.gpc,
        tcf_error: tcf_error.map(ToString::to_string),
        tcf_error_code: tcf_error.map(tcf::TcfError::code),
        tcf_used,
    }
}
