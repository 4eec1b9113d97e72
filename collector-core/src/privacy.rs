//! The privacy pipeline: applies a [`Policy`] to one normalised event, given what the
//! request says (GPC header, TCF cookie, country, IP). Resolves consent, drops or
//! anonymises per the categories' `when_denied`, hashes configured PII fields, scrubs URL
//! query parameters, minimises the IP, and stamps the resolved consent as evidence in
//! `context.consent.resolved`.
//!
//! Hashing and IP handling apply to every kept event whatever its consent: PII never
//! leaves the edge unhashed.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use serde_json::{Map, Value};

use crate::consent::{resolve, resolve_decoded, ConsentInputs, Resolved};
use crate::detect::{self, Detected};
use crate::note::Note;
use crate::pii::{reduce_user_agent, scrub_query, truncate_ip, PiiHasher, PiiKind};
use crate::policy::{DetectAction, IpHandling, Policy, UserAgentHandling, WhenDenied};
use crate::tcf::{self, TcString, TcfError};

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
    /// The cookie's TC string, decoded once per request (not once per event of a
    /// batch). Leave it `Default::default()`.
    pub tcf_cookie_decoded: TcfCookieCache,
}

/// Where an event keeps its consent evidence.
pub const EVIDENCE_PATH: &str = "context.consent.resolved";

/// A request's decoded `euconsent-v2` cookie, filled on first use.
#[derive(Debug, Clone, Default)]
pub struct TcfCookieCache(OnceLock<Option<Result<TcString, TcfError>>>);

impl RequestSignals {
    pub fn new(
        gpc: bool,
        tcf_cookie: Option<String>,
        country: Option<String>,
        ip: Option<String>,
    ) -> RequestSignals {
        RequestSignals {
            gpc,
            tcf_cookie,
            country,
            ip,
            tcf_cookie_decoded: TcfCookieCache::default(),
        }
    }

    fn tcf_cookie_decoded(&self) -> Option<&Result<TcString, TcfError>> {
        self.tcf_cookie_decoded
            .0
            .get_or_init(|| {
                self.tcf_cookie
                    .as_deref()
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(tcf::decode)
            })
            .as_ref()
    }
}

/// Why an event was not kept; the string is the drop-counter key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub reason: String,
    pub resolved: Box<Resolved>,
    /// What was noticed before the decision (e.g. an ignored TC string).
    pub notes: Vec<Note>,
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
    /// Every field the PII rules touched: dotted path → `kind:action` (e.g.
    /// `context.page.title` → `email:hash`), also stored as evidence on the event.
    pub pii: BTreeMap<String, String>,
    /// What to count about this event.
    pub notes: Vec<Note>,
    /// Detected values hashed so far (capped at [`MAX_HASHED_FINDINGS_PER_EVENT`]).
    pub hashed_findings: usize,
}

impl Applied {
    fn touched(&mut self, path: String, kind: &str, action: &str) {
        let entry = self.pii.entry(path).or_default();
        let tag = format!("{kind}:{action}");
        if !entry.split(',').any(|t| t == tag) {
            if !entry.is_empty() {
                entry.push(',');
            }
            entry.push_str(&tag);
        }
    }
}

/// A policy with its hashing key, prepared once and shared by every event.
#[derive(Debug, Clone)]
pub struct PrivacyEngine {
    /// Shared, so building an engine per request does not copy the policy.
    pub policy: Arc<Policy>,
    pub hasher: PiiHasher,
    /// `[pii] seal_to` and the platform's random source, for `encrypt` fields.
    sealer: Option<(crate::seal::SealKey, RandomFill)>,
}

/// Fills a buffer from the platform's CSPRNG; false when it could not.
pub type RandomFill = fn(&mut [u8]) -> bool;

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
    object_at(obj, "context")
}

/// The object under `key`, made one (replacing any other value) when it is not; no new
/// key `String` when the key is there.
fn object_at<'a>(obj: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    if !obj.get(key).is_some_and(Value::is_object) {
        obj.insert(key.into(), Value::Object(Map::new()));
    }
    obj.get_mut(key)
        .and_then(Value::as_object_mut)
        .expect("just made an object")
}

/// Most detected values hashed in one event; further ones are redacted.
pub const MAX_HASHED_FINDINGS_PER_EVENT: usize = 64;

/// The URL fields whose query is scrubbed: each parent object, then its fields.
const URL_FIELDS: [(&str, [&str; 3]); 2] = [
    ("context.page", ["url", "referrer", "search"]),
    ("properties", ["url", "referrer", "search"]),
];

impl PrivacyEngine {
    pub fn new(policy: impl Into<Arc<Policy>>, hasher: PiiHasher) -> PrivacyEngine {
        PrivacyEngine {
            policy: policy.into(),
            hasher,
            sealer: None,
        }
    }

    /// Lets the engine seal `encrypt` fields, with `fill` (the platform's CSPRNG; false
    /// when it failed) for the ephemeral keys. Without it, or without `[pii] seal_to`,
    /// or when `fill` fails, such fields are only hashed (the event notes
    /// `seal_unavailable`).
    pub fn with_random(mut self, fill: RandomFill) -> PrivacyEngine {
        self.sealer = self
            .policy
            .seal_to
            .as_deref()
            .and_then(|k| crate::seal::SealKey::parse(k).ok())
            .map(|k| (k, fill));
        self
    }

    /// Applies the policy to an event object in place. `Err` means the event must not be
    /// stored. The stages run in this order: consent, anonymisation, PII fields by path,
    /// PII by key name, URL scrubbing, PII value detection, IP, user agent, evidence.
    pub fn apply(
        &self,
        event: &mut Map<String, Value>,
        req: &RequestSignals,
    ) -> Result<Applied, Dropped> {
        let (applied, evidence) = self.apply_spliced(event, req)?;
        if let Some(slot) = get_path_mut(event, EVIDENCE_PATH) {
            *slot = serde_json::from_str(&evidence).unwrap_or(Value::Null);
        }
        Ok(applied)
    }

    /// [`PrivacyEngine::apply`], leaving `null` at [`EVIDENCE_PATH`] and returning the
    /// evidence as JSON text, for the caller to splice in as it writes the event
    /// ([`crate::json_text::push_object_with`]): what the edge does for every event,
    /// without building the evidence as a `Value` tree.
    pub fn apply_spliced(
        &self,
        event: &mut Map<String, Value>,
        req: &RequestSignals,
    ) -> Result<(Applied, String), Dropped> {
        let mut applied = self.consent_stage(event, req)?;
        // Sealed values come from this engine only: one a client sent could make the
        // agent text or mail an address of the client's choosing.
        if remove_path(event, "context.sealed") {
            applied.removed.push("context.sealed".into());
        }
        if applied.anonymised {
            self.anonymise(event, &mut applied);
        }
        self.pii_paths(event, &mut applied);
        self.pii_keys(event, &mut applied);
        self.scrub_urls(event, &mut applied);
        self.detect_values(event, &mut applied);
        let mut evidence = String::with_capacity(256);
        applied.resolved.write_evidence(&mut evidence, &applied.pii);
        let ctx = context_mut(event);
        self.minimise_ip(ctx, req, &mut applied);
        self.reduce_user_agent(ctx, &mut applied);
        let c = object_at(ctx, "consent");
        // The raw TC string is personal data in its own right; keep only the decision.
        c.remove("tcf");
        c.insert("resolved".into(), Value::Null);
        Ok((applied, evidence))
    }

    /// Resolves consent and decides: drop (`Err`), anonymise, or keep.
    fn consent_stage(
        &self,
        event: &Map<String, Value>,
        req: &RequestSignals,
    ) -> Result<Applied, Dropped> {
        let p = &self.policy;
        let inputs = ConsentInputs::from_event(event, req.gpc, None, req.country.as_deref());
        let resolved = if inputs.tcf.is_some() {
            resolve(p, &inputs)
        } else {
            resolve_decoded(p, &inputs, req.tcf_cookie_decoded())
        };
        let mut notes = Vec::new();
        if let Some(code) = resolved.tcf_error_code {
            notes.push(Note::TcfIgnored(code));
        }
        let kind = event.get("type").and_then(Value::as_str).unwrap_or("track");
        let name = event
            .get("event")
            .or_else(|| event.get("name"))
            .and_then(Value::as_str);
        // The strictest handling among the event's denied categories.
        let rank = |w: WhenDenied| match w {
            WhenDenied::Keep => 0,
            WhenDenied::Anonymise => 1,
            WhenDenied::Drop => 2,
        };
        let mut handling = WhenDenied::Keep;
        let mut deciding: Option<&str> = None;
        for c in p
            .categories_for(kind, name)
            .iter()
            .filter(|c| !resolved.granted(c))
        {
            let w = p
                .category(c)
                .map(|c| c.when_denied)
                .unwrap_or(WhenDenied::Drop);
            if deciding.is_none() || rank(w) > rank(handling) {
                handling = w;
                deciding = Some(c);
            }
        }
        if handling == WhenDenied::Drop {
            return Err(Dropped {
                reason: format!("consent_denied_{}", deciding.unwrap_or_default()),
                resolved: Box::new(resolved),
                notes,
            });
        }
        Ok(Applied {
            resolved,
            anonymised: handling == WhenDenied::Anonymise,
            hashed: Vec::new(),
            removed: Vec::new(),
            scrubbed: Vec::new(),
            reduced: Vec::new(),
            pii: BTreeMap::new(),
            notes,
            hashed_findings: 0,
        })
    }

    /// Removes the user's identity; the anonymous id becomes a keyed hash.
    fn anonymise(&self, event: &mut Map<String, Value>, applied: &mut Applied) {
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

    /// `[pii] fields`: exact paths, hashed (removed when anonymising).
    fn pii_paths(&self, event: &mut Map<String, Value>, applied: &mut Applied) {
        let p = &self.policy;
        for field in &p.pii_fields {
            let kind = kind_name(field.kind);
            if applied.anonymised {
                if remove_path(event, &field.path) {
                    applied.removed.push(field.path.clone());
                    applied.touched(field.path.clone(), kind, "remove");
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
            // Normalised once, for the hash and (for `encrypt`) the sealed copy; a value
            // already hashed under an active key stays as it is and is not sealed.
            let normalised = (!self.hasher.is_hashed(&raw))
                .then(|| crate::pii::normalise(field.kind, &raw, &p.default_phone_calling_code));
            *v = Value::String(match &normalised {
                Some(n) => self.hasher.hash_normalised(n),
                None => raw,
            });
            applied.hashed.push(field.path.clone());
            let Some(normalised) =
                normalised.filter(|_| field.action == crate::policy::FieldAction::Encrypt)
            else {
                applied.touched(field.path.clone(), kind, "hash");
                continue;
            };
            let mut seed = [0u8; 32];
            match &self.sealer {
                Some((key, fill)) if fill(&mut seed) => {
                    let sealed = key.seal_with_seed(&normalised, seed);
                    let ctx = context_mut(event);
                    let bag = ctx
                        .entry("sealed")
                        .or_insert_with(|| Value::Object(Map::new()));
                    if let Some(bag) = bag.as_object_mut() {
                        bag.insert(field.path.clone(), Value::String(sealed));
                    }
                    applied.touched(field.path.clone(), kind, "encrypt");
                }
                _ => {
                    applied.notes.push(Note::SealUnavailable);
                    applied.touched(field.path.clone(), kind, "hash");
                }
            }
        }
    }

    /// `[pii] keys`: any value under a PII key name, at any depth of `traits`,
    /// `context.traits` and `properties`, is hashed by the key's kind (removed when
    /// anonymising). Values already hashed under an active key stay as they are.
    fn pii_keys(&self, event: &mut Map<String, Value>, applied: &mut Applied) {
        if self.policy.pii_keys.is_empty() {
            return;
        }
        for root in ["traits", "context.traits", "properties"] {
            if let Some(v) = get_path_mut(event, root) {
                let mut path = root.to_string();
                self.pii_keys_in(v, &mut path, applied);
            }
        }
    }

    fn pii_keys_in(&self, v: &mut Value, path: &mut String, applied: &mut Applied) {
        // Recursion depth is bounded by the JSON parser (128 levels).
        let len = path.len();
        match v {
            Value::Object(m) => {
                let mut remove = Vec::new();
                for (k, child) in m.iter_mut() {
                    path.push('.');
                    path.push_str(k);
                    let rule = match child {
                        Value::String(_) | Value::Number(_) => self.key_rule(k),
                        _ => None,
                    };
                    match rule {
                        Some(kind) if applied.anonymised => {
                            remove.push(k.clone());
                            applied.removed.push(path.clone());
                            applied.touched(path.clone(), kind_name(kind), "remove");
                            applied.notes.push(Note::PiiKey);
                        }
                        Some(kind) => {
                            let raw = match &*child {
                                Value::String(s) => s.clone(),
                                other => other.to_string(),
                            };
                            if !self.hasher.is_hashed(&raw) {
                                *child = Value::String(self.hasher.hash(
                                    kind,
                                    &raw,
                                    &self.policy.default_phone_calling_code,
                                ));
                                applied.hashed.push(path.clone());
                                applied.touched(path.clone(), kind_name(kind), "hash");
                                applied.notes.push(Note::PiiKey);
                            }
                        }
                        None => self.pii_keys_in(child, path, applied),
                    }
                    path.truncate(len);
                }
                for k in remove {
                    m.remove(&k);
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter_mut().enumerate() {
                    path.push('.');
                    path.push_str(&i.to_string());
                    self.pii_keys_in(child, path, applied);
                    path.truncate(len);
                }
            }
            _ => {}
        }
    }

    /// The `[pii.keys]` kind of a key name, normalised without allocating (a key longer
    /// than any rule's cannot match).
    fn key_rule(&self, key: &str) -> Option<PiiKind> {
        let mut buf = [0u8; 48];
        let norm = crate::policy::normalise_key_in(key, &mut buf)?;
        self.policy.pii_keys.get(norm).copied()
    }

    /// `[pii] scrub_query_params` in the page and referrer URLs.
    fn scrub_urls(&self, event: &mut Map<String, Value>, applied: &mut Applied) {
        let names = &self.policy.scrub_query_params;
        if names.is_empty() {
            return;
        }
        for (parent, fields) in URL_FIELDS {
            // One lookup of the parent, then one per field.
            let Some(Value::Object(m)) = get_path_mut(event, parent) else {
                continue;
            };
            for field in fields {
                let Some(Value::String(url)) = m.get_mut(field) else {
                    continue;
                };
                let (clean, changed) = scrub_query(url, names);
                if changed {
                    *url = clean;
                    applied.scrubbed.push(format!("{parent}.{field}"));
                }
            }
        }
    }

    /// `[pii] detect`: e-mails, international phone numbers and card numbers found in any
    /// string of the event (ids, names, titles, URLs, …) are hashed or redacted, per
    /// kind. Anonymised events get no hashes that could link them: findings are redacted.
    fn detect_values(&self, event: &mut Map<String, Value>, applied: &mut Applied) {
        if !self.policy.pii_detect.any() {
            return;
        }
        let mut path = String::new();
        for (k, v) in event.iter_mut() {
            // Server-set fields and the dedup key are not the client's free text.
            if matches!(
                k.as_str(),
                "type" | "messageId" | "timestamp" | "sentAt" | "receivedAt" | "originalTimestamp"
            ) {
                continue;
            }
            path.clear();
            path.push_str(k);
            self.detect_in(v, &mut path, applied);
        }
    }

    fn detect_in(&self, v: &mut Value, path: &mut String, applied: &mut Applied) {
        let len = path.len();
        match v {
            Value::String(s) => {
                if self.hasher.is_hashed(s) {
                    return;
                }
                let mut found: Vec<(Detected, DetectAction)> = Vec::new();
                let mut hashed = applied.hashed_findings;
                let rewritten = detect::rewrite(s, |kind, value| {
                    let mut action = if applied.anonymised {
                        DetectAction::Redact
                    } else {
                        self.policy.pii_detect.action(kind)
                    };
                    // A hash is ~80 bytes: past this many findings in one event, redact
                    // instead, so a hostile event cannot grow ~15x on its way to storage.
                    if action == DetectAction::Hash {
                        if hashed >= MAX_HASHED_FINDINGS_PER_EVENT {
                            action = DetectAction::Redact;
                        } else {
                            hashed += 1;
                        }
                    }
                    let out = match action {
                        DetectAction::Off => return None,
                        DetectAction::Redact => format!("[redacted:{}]", kind.as_str()),
                        DetectAction::Hash => self.hasher.hash(
                            detected_kind(kind),
                            value,
                            &self.policy.default_phone_calling_code,
                        ),
                    };
                    found.push((kind, action));
                    Some(out)
                });
                applied.hashed_findings = hashed;
                if let Some(r) = rewritten {
                    *s = r;
                    for (kind, action) in found {
                        applied.notes.push(Note::PiiDetected(kind));
                        applied.touched(path.clone(), kind.as_str(), action.as_str());
                    }
                }
            }
            Value::Number(n) => {
                // A card number sent as a JSON number.
                let text = n.to_string();
                let action = if applied.anonymised {
                    DetectAction::Redact
                } else {
                    self.policy.pii_detect.card
                };
                if action != DetectAction::Off && detect::is_card_number(text.as_bytes()) {
                    *v = Value::String(match action {
                        DetectAction::Hash => self.hasher.hash(PiiKind::Card, &text, ""),
                        _ => "[redacted:card]".into(),
                    });
                    applied.notes.push(Note::PiiDetected(Detected::Card));
                    applied.touched(path.clone(), "card", action.as_str());
                }
            }
            Value::Object(m) => {
                for (k, child) in m.iter_mut() {
                    path.push('.');
                    path.push_str(k);
                    self.detect_in(child, path, applied);
                    path.truncate(len);
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter_mut().enumerate() {
                    path.push('.');
                    path.push_str(&i.to_string());
                    self.detect_in(child, path, applied);
                    path.truncate(len);
                }
            }
            Value::Bool(_) | Value::Null => {}
        }
    }

    /// `[pii] ip`: the event's `context.ip`, or the request's.
    fn minimise_ip(
        &self,
        ctx: &mut Map<String, Value>,
        req: &RequestSignals,
        applied: &mut Applied,
    ) {
        let ip = ctx
            .get("ip")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| req.ip.clone());
        ctx.remove("ip");
        let ip_handling = if applied.anonymised {
            IpHandling::CountryOnly
        } else {
            self.policy.ip
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
    }

    /// `[pii] user_agent`.
    fn reduce_user_agent(&self, ctx: &mut Map<String, Value>, applied: &mut Applied) {
        match self.policy.user_agent {
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
    }
}

fn kind_name(kind: PiiKind) -> &'static str {
    match kind {
        PiiKind::Email => "email",
        PiiKind::Phone => "phone",
        PiiKind::Ip => "ip",
        PiiKind::Card => "card",
        PiiKind::Free => "free",
    }
}

fn detected_kind(kind: Detected) -> PiiKind {
    match kind {
        Detected::Email => PiiKind::Email,
        Detected::Phone => PiiKind::Phone,
        Detected::Card => PiiKind::Card,
    }
}
