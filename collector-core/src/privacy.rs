//! The privacy pipeline: applies a [`Policy`] to one normalised event, given what the
//! request says (GPC header, TCF cookie, country, IP). Resolves consent, drops or
//! anonymises per the categories' `when_denied`, hashes configured PII fields, scrubs URL
//! query parameters, minimises the IP, and stamps the resolved consent as evidence in
//! `context.consent.resolved`.
//!
//! Hashing and IP handling apply to every kept event whatever its consent: PII never
//! leaves the edge unhashed.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::consent::{resolve, ConsentInputs, Resolved};
use crate::pii::{reduce_user_agent, scrub_query, truncate_ip, PiiHasher, PiiKind};
use crate::policy::{IpHandling, Policy, UserAgentHandling, WhenDenied};

/// What the request (not the event body) tells about the visitor.
#[derive(Debug, Clone, Default)]
pub struct RequestSignals {
    /// `Sec-GPC: 1`.
    pub gpc: bool,
    /// The `euconsent-v2` cookie.
    pub tcf_cookie: Option<String>,
    /// ISO country of the request (`request.cf.country` at the edge).
    pub country: Option<String>,
    /// The client IP as seen by the edge, used when the event has no `context.ip`.
    pub ip: Option<String>,
}

/// Why an event was not kept; the string is the drop-counter key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub reason: String,
    pub resolved: Box<Resolved>,
}

/// What was done to a kept event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub resolved: Resolved,
    pub anonymised: bool,
    /// Dotted paths whose values were hashed.
    pub hashed: Vec<String>,
    /// Dotted paths removed (PII under anonymisation, scrubbed IPs).
    pub removed: Vec<String>,
    /// URL fields whose query was scrubbed.
    pub scrubbed: Vec<String>,
    /// Fields reduced to less identifying values (the user agent).
    pub reduced: Vec<String>,
}

/// A policy with its hashing key, prepared once and shared by every event.
#[derive(Debug, Clone)]
pub struct PrivacyEngine {
    /// Shared, so building an engine per request does not copy the policy.
    pub policy: Arc<Policy>,
    pub hasher: PiiHasher,
}

fn get_path<'a>(obj: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut cur = obj.get(parts.next()?)?;
    for p in parts {
        cur = cur.get(p)?;
    }
    Some(cur)
}

fn get_path_mut<'a>(obj: &'a mut Map<String, Value>, path: &str) -> Option<&'a mut Value> {
    let mut parts = path.split('.');
    let mut cur = obj.get_mut(parts.next()?)?;
    for p in parts {
        cur = cur.get_mut(p)?;
    }
    Some(cur)
}

fn remove_path(obj: &mut Map<String, Value>, path: &str) -> bool {
    match path.rsplit_once('.') {
        None => obj.remove(path).is_some(),
        Some((parent, last)) => get_path_mut(obj, parent)
            .and_then(Value::as_object_mut)
            .map(|m| m.remove(last).is_some())
            .unwrap_or(false),
    }
}

fn context_mut(obj: &mut Map<String, Value>) -> &mut Map<String, Value> {
    let ctx = obj
        .entry("context")
        .or_insert_with(|| Value::Object(Map::new()));
    if !ctx.is_object() {
        *ctx = Value::Object(Map::new());
    }
    ctx.as_object_mut().expect("just made an object")
}

const URL_FIELDS: [&str; 6] = [
    "context.page.url",
    "context.page.referrer",
    "context.page.search",
    "properties.url",
    "properties.referrer",
    "properties.search",
];

impl PrivacyEngine {
    pub fn new(policy: impl Into<Arc<Policy>>, hasher: PiiHasher) -> PrivacyEngine {
        PrivacyEngine {
            policy: policy.into(),
            hasher,
        }
    }

    /// Applies the policy to an event object in place. `Err` means the event must not be
    /// stored.
    pub fn apply(
        &self,
        event: &mut Map<String, Value>,
        req: &RequestSignals,
    ) -> Result<Applied, Dropped> {
        let p = &self.policy;
        let inputs = ConsentInputs::from_event(
            event,
            req.gpc,
            req.tcf_cookie.as_deref(),
            req.country.as_deref(),
        );
        let resolved = resolve(p, &inputs);
        let kind = event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("track")
            .to_string();
        let name = event
            .get("event")
            .or_else(|| event.get("name"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let cats = p.categories_for(&kind, name.as_deref()).to_vec();
        // The strictest handling among the event's denied categories.
        let rank = |w: WhenDenied| match w {
            WhenDenied::Keep => 0,
            WhenDenied::Anonymise => 1,
            WhenDenied::Drop => 2,
        };
        let mut handling = WhenDenied::Keep;
        let mut deciding: Option<String> = None;
        for c in cats.iter().filter(|c| !resolved.granted(c)) {
            let w = p
                .category(c)
                .map(|c| c.when_denied)
                .unwrap_or(WhenDenied::Drop);
            if deciding.is_none() || rank(w) > rank(handling) {
                handling = w;
                deciding = Some(c.clone());
            }
        }
        if handling == WhenDenied::Drop {
            return Err(Dropped {
                reason: format!("consent_denied_{}", deciding.unwrap_or_default()),
                resolved: Box::new(resolved),
            });
        }
        let mut applied = Applied {
            resolved,
            anonymised: handling == WhenDenied::Anonymise,
            hashed: Vec::new(),
            removed: Vec::new(),
            scrubbed: Vec::new(),
            reduced: Vec::new(),
        };

        if applied.anonymised {
            for path in ["userId", "traits", "context.traits"] {
                if remove_path(event, path) {
                    applied.removed.push(path.to_string());
                }
            }
            if let Some(Value::String(anon)) = event.get("anonymousId") {
                let hashed = if self.hasher.is_hashed(anon) {
                    anon.clone()
                } else {
                    self.hasher.hash_normalised(anon)
                };
                event.insert("anonymousId".into(), Value::String(hashed));
                applied.hashed.push("anonymousId".into());
            }
        }

        for field in &p.pii_fields {
            if applied.anonymised {
                if remove_path(event, &field.path) {
                    applied.removed.push(field.path.clone());
                }
                continue;
            }
            let Some(v) = get_path_mut(event, &field.path) else {
                continue;
            };
            let raw = match &*v {
                Value::Null => continue,
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            *v = Value::String(
                self.hasher
                    .hash(field.kind, &raw, &p.default_phone_calling_code),
            );
            applied.hashed.push(field.path.clone());
        }

        if !p.scrub_query_params.is_empty() {
            for path in URL_FIELDS {
                let Some(Value::String(url)) = get_path(event, path) else {
                    continue;
                };
                let (clean, changed) = scrub_query(url, &p.scrub_query_params);
                if changed {
                    if let Some(v) = get_path_mut(event, path) {
                        *v = Value::String(clean);
                    }
                    applied.scrubbed.push(path.to_string());
                }
            }
        }

        let evidence = applied.resolved.evidence();
        let ctx = context_mut(event);
        let ip = ctx
            .get("ip")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| req.ip.clone());
        ctx.remove("ip");
        let ip_handling = if applied.anonymised {
            IpHandling::CountryOnly
        } else {
            p.ip
        };
        match (ip_handling, ip) {
            (_, None) => {}
            (IpHandling::Keep, Some(ip)) => {
                ctx.insert(
                    "ip".into(),
                    Value::String(self.hasher.hash(PiiKind::Ip, &ip, "")),
                );
                applied.hashed.push("context.ip".into());
            }
            (IpHandling::Truncate, Some(ip)) => {
                if let Some(t) = truncate_ip(&ip) {
                    ctx.insert("ip".into(), Value::String(t));
                } else {
                    applied.removed.push("context.ip".into());
                }
            }
            (IpHandling::CountryOnly | IpHandling::Drop, Some(_)) => {
                applied.removed.push("context.ip".into())
            }
        }
        match p.user_agent {
            UserAgentHandling::Keep => {}
            UserAgentHandling::Reduce => {
                if let Some(Value::String(ua)) = ctx.get("userAgent") {
                    let reduced = reduce_user_agent(ua);
                    ctx.insert("userAgent".into(), Value::String(reduced));
                    applied.reduced.push("context.userAgent".into());
                }
                // Client hints are high-entropy by design.
                if ctx.remove("userAgentData").is_some() {
                    applied.removed.push("context.userAgentData".into());
                }
            }
            UserAgentHandling::Drop => {
                for k in ["userAgent", "userAgentData"] {
                    if ctx.remove(k).is_some() {
                        applied.removed.push(format!("context.{k}"));
                    }
                }
            }
        }
        if ip_handling == IpHandling::CountryOnly {
            if let Some(c) = &req.country {
                let loc = ctx
                    .entry("location")
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Some(loc) = loc.as_object_mut() {
                    loc.insert("country".into(), Value::String(c.clone()));
                }
            }
        }
        let consent = ctx
            .entry("consent")
            .or_insert_with(|| Value::Object(Map::new()));
        if !consent.is_object() {
            *consent = Value::Object(Map::new());
        }
        if let Some(c) = consent.as_object_mut() {
            // The raw TC string is personal data in its own right; keep only the decision.
            c.remove("tcf");
            c.insert("resolved".into(), evidence);
        }
        Ok(applied)
    }
}
