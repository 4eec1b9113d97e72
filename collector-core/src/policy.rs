//! The privacy rules file (`privacy.toml`), owned by privacy teams: consent categories,
//! regional defaults, destinations and the categories they require, PII fields and IP
//! handling. Parsing validates everything and reports every problem with its line.
//!
//! ```toml
//! [categories.necessary]
//! always_granted = true
//!
//! [categories.analytics]
//! when_denied = "anonymise"     # drop | anonymise | keep
//! tcf_purposes = [1, 8, 9, 10]  # TCF purpose consents that grant it (all of them)
//!
//! [categories.marketing]
//! when_denied = "drop"
//! tcf_purposes = [1, 3, 4]
//! gpc_denies = true             # Sec-GPC: 1 is an opt-out of this category
//!
//! [categories.sms]
//! when_denied = "keep"
//! explicit_only = true          # only the visitor's own choice grants it
//!
//! [events]
//! default_categories = ["analytics"]
//! [events.track]
//! "Order Completed" = ["analytics", "marketing"]
//!
//! [regions.eea]
//! countries = ["AT", "BE", "DE", "FR"]   # ISO 3166-1 alpha-2
//! default = "deny"                       # opt-in: nothing until granted
//! [regions.rest]
//! countries = ["*"]                      # everyone else (exactly one region has "*")
//! default = "grant"
//!
//! [destinations.google_ads]
//! categories = ["marketing"]             # all required
//!
//! [pii]
//! ip = "truncate"                        # keep | truncate | country_only | drop
//! user_agent = "reduce"                  # keep | reduce | drop
//! default_phone_calling_code = "49"
//! scrub_query_params = ["email", "token"]
//! fields = [{ path = "traits.email", kind = "email" },
//!           { path = "traits.phone", kind = "phone", action = "encrypt" }]  # hash | encrypt
//! seal_to = "x25519:…"                   # the agent's public key, for `encrypt`
//!
//! [pii.keys]     # safety net 1: these key names at any depth of traits, context.traits
//! email = "email" # and properties (case, `_`, `-` ignored). Absent: the built-in list.
//! mobile = "phone"
//!
//! [pii.detect]   # safety net 2: PII found in any string of the event
//! email = "hash" # hash | redact | off (absent: email and phone hashed, cards redacted)
//! card = "redact"
//! ```

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::pii::PiiKind;

/// One problem in a rules file, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

/// What happens to an event whose categories are not all granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenDenied {
    Drop,
    Anonymise,
    Keep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegionDefault {
    Grant,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IpHandling {
    Keep,
    Truncate,
    CountryOnly,
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserAgentHandling {
    Keep,
    Reduce,
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Category {
    pub name: String,
    pub always_granted: bool,
    pub when_denied: WhenDenied,
    pub tcf_purposes: Vec<u8>,
    pub gpc_denies: bool,
    /// Granted only by the visitor's own choice: no region default grants it (channel
    /// opt-ins such as SMS, which laws like the TCPA require to be express).
    #[serde(default)]
    pub explicit_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub name: String,
    pub countries: BTreeSet<String>,
    pub catch_all: bool,
    pub default: RegionDefault,
}

/// What to do with a PII value found by detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectAction {
    /// Replace the value with its keyed hash (the same versioned HMAC as fields).
    Hash,
    /// Replace the value with `[redacted:<kind>]`.
    Redact,
    /// Leave it.
    Off,
}

impl DetectAction {
    pub fn as_str(self) -> &'static str {
        match self {
            DetectAction::Hash => "hash",
            DetectAction::Redact => "redact",
            DetectAction::Off => "off",
        }
    }
}

/// Value detection per kind (`[pii] detect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetectRules {
    pub email: DetectAction,
    pub phone: DetectAction,
    pub card: DetectAction,
}

impl Default for DetectRules {
    /// On by default: a safety net that has to be switched on protects nobody.
    fn default() -> Self {
        DetectRules {
            email: DetectAction::Hash,
            phone: DetectAction::Hash,
            card: DetectAction::Redact,
        }
    }
}

impl DetectRules {
    pub fn action(&self, kind: crate::detect::Detected) -> DetectAction {
        match kind {
            crate::detect::Detected::Email => self.email,
            crate::detect::Detected::Phone => self.phone,
            crate::detect::Detected::Card => self.card,
        }
    }

    pub fn any(&self) -> bool {
        [self.email, self.phone, self.card]
            .iter()
            .any(|a| *a != DetectAction::Off)
    }
}

/// Key names hashed at any depth when `[pii] keys` is absent.
pub const DEFAULT_PII_KEYS: &[(&str, PiiKind)] = &[
    ("email", PiiKind::Email),
    ("emailaddress", PiiKind::Email),
    ("mail", PiiKind::Email),
    ("phone", PiiKind::Phone),
    ("phonenumber", PiiKind::Phone),
    ("mobile", PiiKind::Phone),
    ("mobilephone", PiiKind::Phone),
    ("mobilenumber", PiiKind::Phone),
    ("cellphone", PiiKind::Phone),
    ("telephone", PiiKind::Phone),
    ("tel", PiiKind::Phone),
];

/// The bytes of a key name as the key rules compare it: lower case, ASCII letters and
/// digits only (`phone_number`, `phoneNumber` and `Phone-Number` are all `phonenumber`).
fn normalised_key_bytes(key: &str) -> impl Iterator<Item = u8> + '_ {
    key.bytes()
        .filter(u8::is_ascii_alphanumeric)
        .map(|b| b.to_ascii_lowercase())
}

/// A key name as the key rules compare it (see [`normalised_key_bytes`]).
pub fn normalise_key(key: &str) -> String {
    normalised_key_bytes(key).map(char::from).collect()
}

/// [`normalise_key`] into `buf`, without allocating: for the hot path, which runs on
/// every key of every event. `None` when it does not fit (no rule is that long).
pub fn normalise_key_in<'b>(key: &str, buf: &'b mut [u8]) -> Option<&'b str> {
    let mut n = 0;
    for b in normalised_key_bytes(key) {
        *buf.get_mut(n)? = b;
        n += 1;
    }
    std::str::from_utf8(&buf[..n]).ok()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PiiField {
    /// Dotted path, e.g. `context.traits.email`.
    pub path: String,
    pub kind: PiiKind,
    #[serde(default)]
    pub action: FieldAction,
}

/// What the edge does with a PII field's value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldAction {
    /// Replace it by its keyed hash (joins and identity still work).
    #[default]
    Hash,
    /// Hash it in place, and also seal the normalised value to the agent's key
    /// (`[pii] seal_to`) under `context.sealed.<path>`, for the destinations that need
    /// the address itself (email platforms, SMS). Only the agent can open it.
    Encrypt,
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// `sha256:<first 16 hex>` of the file's bytes, stamped on every event.
    pub version: String,
    pub categories: Vec<Category>,
    pub default_event_categories: Vec<String>,
    /// Per event type (`track`, `page`, …), per event name or page name.
    pub event_categories: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    pub regions: Vec<Region>,
    pub destinations: BTreeMap<String, Vec<String>>,
    pub ip: IpHandling,
    pub user_agent: UserAgentHandling,
    pub default_phone_calling_code: String,
    pub scrub_query_params: Vec<String>,
    pub pii_fields: Vec<PiiField>,
    /// The agent's public key (`x25519:…`) that `encrypt` fields are sealed to.
    #[serde(default)]
    pub seal_to: Option<String>,
    /// Normalised key name → kind, hashed at any depth of traits, context.traits and
    /// properties ([`normalise_key`]).
    pub pii_keys: BTreeMap<String, PiiKind>,
    /// Value detection in every string of the event.
    pub pii_detect: DetectRules,
    /// Ids that never link people (`[identity] block` plus the defaults).
    #[serde(default)]
    pub block_list: crate::identity::BlockList,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    categories: BTreeMap<String, Spanned<RawCategory>>,
    #[serde(default)]
    events: Option<Spanned<RawEvents>>,
    #[serde(default)]
    regions: BTreeMap<String, Spanned<RawRegion>>,
    #[serde(default)]
    destinations: BTreeMap<String, Spanned<RawDestination>>,
    #[serde(default)]
    pii: Option<RawPii>,
    #[serde(default)]
    identity: Option<RawIdentity>,
}

/// `[identity]`: ids that never link people, beyond the defaults
/// ([`crate::identity::DEFAULT_BLOCKED`]); the edge and the agent apply the same list.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    #[serde(default)]
    block: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCategory {
    #[serde(default)]
    always_granted: bool,
    #[serde(default)]
    when_denied: Option<WhenDenied>,
    #[serde(default)]
    tcf_purposes: Vec<Spanned<i64>>,
    #[serde(default)]
    gpc_denies: bool,
    #[serde(default)]
    explicit_only: bool,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
}

#[derive(Deserialize)]
struct RawEvents {
    #[serde(default)]
    default_categories: Vec<Spanned<String>>,
    // Spans do not survive `flatten`: mistakes here are reported at the [events] line.
    #[serde(flatten)]
    by_type: BTreeMap<String, BTreeMap<String, Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    countries: Vec<Spanned<String>>,
    default: RegionDefault,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    #[serde(default)]
    categories: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPii {
    #[serde(default)]
    ip: Option<IpHandling>,
    #[serde(default)]
    user_agent: Option<UserAgentHandling>,
    #[serde(default)]
    default_phone_calling_code: Option<Spanned<String>>,
    #[serde(default)]
    scrub_query_params: Vec<String>,
    #[serde(default)]
    fields: Vec<Spanned<RawField>>,
    #[serde(default)]
    keys: Option<Spanned<BTreeMap<String, PiiKind>>>,
    #[serde(default)]
    detect: Option<Spanned<RawDetect>>,
    #[serde(default)]
    seal_to: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDetect {
    #[serde(default)]
    email: Option<DetectAction>,
    #[serde(default)]
    phone: Option<DetectAction>,
    #[serde(default)]
    card: Option<DetectAction>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    path: String,
    kind: PiiKind,
    #[serde(default)]
    action: FieldAction,
}

const EVENT_TYPES: [&str; 6] = ["track", "page", "screen", "identify", "group", "alias"];
const TCF_MAX_PURPOSE: i64 = 11;

/// The 1-based line and column of a byte offset in `src` (for errors with a place).
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

struct Errors<'a> {
    src: &'a str,
    list: Vec<PolicyError>,
}

impl Errors<'_> {
    fn at(&mut self, span: std::ops::Range<usize>, message: String) {
        let (line, column) = line_col(self.src, span.start);
        self.list.push(PolicyError {
            line,
            column,
            message,
        });
    }
}

/// Parses and validates a rules file. Returns every problem found, not just the first.
pub fn parse(src: &str) -> Result<Policy, Vec<PolicyError>> {
    let raw: RawPolicy = toml::from_str(src).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(src, s.start)).unwrap_or((1, 1));
        vec![PolicyError {
            line,
            column,
            message: e.message().to_string(),
        }]
    })?;
    let mut errs = Errors {
        src,
        list: Vec::new(),
    };

    if raw.categories.is_empty() {
        errs.at(
            0..0,
            "no [categories.*] defined; define at least one (e.g. [categories.necessary])".into(),
        );
    }
    let known: Vec<String> = raw.categories.keys().cloned().collect();
    let mut categories = Vec::new();
    for (name, c) in &raw.categories {
        let span = c.span();
        let c = c.get_ref();
        if !name.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_') || name.is_empty() {
            errs.at(
                span.clone(),
                format!("category name `{name}` must be lower-case letters and `_`"),
            );
        }
        let mut purposes = Vec::new();
        for p in &c.tcf_purposes {
            let v = *p.get_ref();
            if !(1..=TCF_MAX_PURPOSE).contains(&v) {
                errs.at(
                    p.span(),
                    format!("TCF purpose {v} does not exist (purposes are 1..={TCF_MAX_PURPOSE})"),
                );
            } else {
                purposes.push(v as u8);
            }
        }
        let when_denied = match (c.always_granted, c.when_denied) {
            (true, _) => WhenDenied::Keep,
            (false, Some(w)) => w,
            (false, None) => {
                errs.at(span.clone(), format!(
                    "category `{name}` needs `when_denied` (drop, anonymise or keep), or `always_granted = true`"
                ));
                WhenDenied::Drop
            }
        };
        if c.explicit_only && (c.always_granted || !purposes.is_empty()) {
            errs.at(
                span.clone(),
                format!("category `{name}` is explicit_only: only the visitor's choice grants it, so it takes neither always_granted nor tcf_purposes"),
            );
        }
        categories.push(Category {
            name: name.clone(),
            always_granted: c.always_granted,
            when_denied,
            tcf_purposes: purposes,
            gpc_denies: c.gpc_denies,
            explicit_only: c.explicit_only,
        });
    }

    let check_cat = |errs: &mut Errors<'_>, s: &Spanned<String>| -> Option<String> {
        let name = s.get_ref();
        if known.iter().any(|k| k == name) {
            Some(name.clone())
        } else {
            errs.at(
                s.span(),
                format!("unknown category `{name}` (known: {})", known.join(", ")),
            );
            None
        }
    };

    let mut default_event_categories = Vec::new();
    let mut event_categories: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    match &raw.events {
        None => errs.at(
            0..0,
            "no [events] section; set `default_categories` so every event has categories".into(),
        ),
        Some(ev) => {
            let span = ev.span();
            let ev = ev.get_ref();
            if ev.default_categories.is_empty() {
                errs.at(
                    span.clone(),
                    "[events] `default_categories` must name at least one category".into(),
                );
            }
            default_event_categories = ev
                .default_categories
                .iter()
                .filter_map(|c| check_cat(&mut errs, c))
                .collect();
            for (ty, names) in &ev.by_type {
                if !EVENT_TYPES.contains(&ty.as_str()) {
                    errs.at(
                        span.clone(),
                        format!(
                            "[events.{ty}]: `{ty}` is not an event type ({})",
                            EVENT_TYPES.join(", ")
                        ),
                    );
                    continue;
                }
                for (event, cats) in names {
                    let resolved: Vec<String> = cats
                        .iter()
                        .filter_map(|c| {
                            check_cat(&mut errs, &Spanned::new(span.clone(), c.clone()))
                        })
                        .collect();
                    event_categories
                        .entry(ty.clone())
                        .or_default()
                        .insert(event.clone(), resolved);
                }
            }
        }
    }

    let mut regions = Vec::new();
    let mut seen_country: BTreeMap<String, String> = BTreeMap::new();
    for (name, r) in &raw.regions {
        let span = r.span();
        let r = r.get_ref();
        let mut countries = BTreeSet::new();
        let mut catch_all = false;
        for c in &r.countries {
            let code = c.get_ref();
            if code == "*" {
                catch_all = true;
            } else if code.len() != 2 || !code.chars().all(|ch| ch.is_ascii_uppercase()) {
                errs.at(c.span(), format!("`{code}` is not an ISO 3166-1 alpha-2 country code (two capital letters) or \"*\""));
            } else if let Some(other) = seen_country.insert(code.clone(), name.clone()) {
                errs.at(
                    c.span(),
                    format!("country {code} is in both regions `{other}` and `{name}`"),
                );
            } else {
                countries.insert(code.clone());
            }
        }
        if r.countries.is_empty() {
            errs.at(span.clone(), format!("region `{name}` lists no countries"));
        }
        regions.push(Region {
            name: name.clone(),
            countries,
            catch_all,
            default: r.default,
        });
    }
    match regions.iter().filter(|r| r.catch_all).count() {
        0 => errs.at(
            0..0,
            "no region with countries = [\"*\"]: every country needs a default".into(),
        ),
        1 => {}
        _ => errs.at(0..0, "more than one region has countries = [\"*\"]".into()),
    }

    let mut destinations = BTreeMap::new();
    for (name, d) in &raw.destinations {
        let span = d.span();
        let cats: Vec<String> = d
            .get_ref()
            .categories
            .iter()
            .filter_map(|c| check_cat(&mut errs, c))
            .collect();
        if d.get_ref().categories.is_empty() {
            errs.at(span, format!(
                "destination `{name}` requires no category; every destination must name the categories it needs (deny by default)"
            ));
        }
        destinations.insert(name.clone(), cats);
    }

    let mut pii_fields = Vec::new();
    let (mut ip, mut calling_code, mut scrub) = (IpHandling::Truncate, String::new(), Vec::new());
    let mut user_agent = UserAgentHandling::Reduce;
    let mut pii_keys: BTreeMap<String, PiiKind> = DEFAULT_PII_KEYS
        .iter()
        .map(|(k, kind)| (k.to_string(), *kind))
        .collect();
    let mut pii_detect = DetectRules::default();
    let mut seal_to = None;
    if let Some(p) = &raw.pii {
        if let Some(k) = &p.seal_to {
            match crate::seal::SealKey::parse(k.get_ref()) {
                Ok(key) => seal_to = Some(key.to_text()),
                Err(e) => errs.at(k.span(), format!("[pii] seal_to: {e}")),
            }
        }
        if let Some(d) = &p.detect {
            let d = d.get_ref();
            let dflt = DetectRules::default();
            pii_detect = DetectRules {
                email: d.email.unwrap_or(dflt.email),
                phone: d.phone.unwrap_or(dflt.phone),
                card: d.card.unwrap_or(dflt.card),
            };
        }
        if let Some(keys) = &p.keys {
            pii_keys.clear();
            for (k, kind) in keys.get_ref() {
                let norm = normalise_key(k);
                if norm.is_empty() {
                    errs.at(
                        keys.span(),
                        format!("PII key `{k}` has no letters or digits"),
                    );
                }
                pii_keys.insert(norm, *kind);
            }
        }
        ip = p.ip.unwrap_or(IpHandling::Truncate);
        user_agent = p.user_agent.unwrap_or(UserAgentHandling::Reduce);
        scrub = p
            .scrub_query_params
            .iter()
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if let Some(cc) = &p.default_phone_calling_code {
            let v = cc.get_ref();
            if v.is_empty() || v.len() > 3 || !v.chars().all(|c| c.is_ascii_digit()) {
                errs.at(
                    cc.span(),
                    format!("default_phone_calling_code `{v}` must be 1 to 3 digits, e.g. \"49\""),
                );
            }
            calling_code = v.clone();
        }
        for f in &p.fields {
            let field = f.get_ref();
            let root = field.path.split('.').next().unwrap_or("");
            let valid_root = ["traits", "properties", "context"].contains(&root);
            if !valid_root || field.path.split('.').any(str::is_empty) || !field.path.contains('.')
            {
                errs.at(f.span(), format!(
                    "PII path `{}` must be a dotted path under traits, properties or context (e.g. traits.email)",
                    field.path
                ));
            }
            if field.kind == PiiKind::Phone && calling_code.is_empty() {
                errs.at(
                    f.span(),
                    "a phone field needs [pii] default_phone_calling_code".into(),
                );
            }
            if field.action == FieldAction::Encrypt && p.seal_to.is_none() {
                errs.at(
                    f.span(),
                    format!("`{}` is to be encrypted: set [pii] seal_to to the agent's public key (`collector-agent keys generate` makes one)", field.path),
                );
            }
            pii_fields.push(PiiField {
                path: field.path.clone(),
                kind: field.kind,
                action: field.action,
            });
        }
        if let Some(keys) = &p.keys {
            if calling_code.is_empty() && keys.get_ref().values().any(|k| *k == PiiKind::Phone) {
                errs.at(
                    keys.span(),
                    "a phone key needs [pii] default_phone_calling_code".into(),
                );
            }
        }
    }

    if !errs.list.is_empty() {
        errs.list.sort_by_key(|e| (e.line, e.column));
        return Err(errs.list);
    }
    let digest = Sha256::digest(src.as_bytes());
    Ok(Policy {
        version: format!("sha256:{}", &hex::encode(digest)[..16]),
        categories,
        default_event_categories,
        event_categories,
        regions,
        destinations,
        ip,
        user_agent,
        default_phone_calling_code: calling_code,
        scrub_query_params: scrub,
        pii_fields,
        seal_to,
        pii_keys,
        pii_detect,
        block_list: crate::identity::BlockList::new(
            raw.identity.iter().flat_map(|i| i.block.iter()),
        ),
    })
}

impl Policy {
    pub fn category(&self, name: &str) -> Option<&Category> {
        self.categories.iter().find(|c| c.name == name)
    }

    /// The region of a country (ISO alpha-2); unknown or absent countries get the `*` region.
    pub fn region_for(&self, country: Option<&str>) -> &Region {
        let upper = country.map(|c| c.trim().to_ascii_uppercase());
        upper
            .as_deref()
            .and_then(|c| self.regions.iter().find(|r| r.countries.contains(c)))
            .or_else(|| self.regions.iter().find(|r| r.catch_all))
            .expect("a validated policy has a catch-all region")
    }

    /// The categories an event belongs to: its type/name mapping, else the default.
    pub fn categories_for(&self, kind: &str, name: Option<&str>) -> &[String] {
        name.and_then(|n| self.event_categories.get(kind).and_then(|m| m.get(n)))
            .map(Vec::as_slice)
            .unwrap_or(&self.default_event_categories)
    }
}
