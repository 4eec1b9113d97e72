//! The worker's configuration, parsed from `env` into a typed `EdgeConfig` once per
//! isolate (an isolate's bindings never change: a new deployment, or new secrets, start
//! new isolates). A bad value is a clear error naming the variable, never a panic.

use worker::Env;

/// Durable Object binding of the queue shards.
pub const QUEUE_BINDING: &str = "QUEUE";
/// Comma-separated write keys accepted by the tracking API (a var or a secret).
pub const VAR_WRITE_KEYS: &str = "WRITE_KEYS";
/// Comma-separated browser origins allowed by CORS, or `*`.
pub const VAR_ALLOWED_ORIGINS: &str = "ALLOWED_ORIGINS";
/// Number of queue shards. Changing it moves users between shards (ordering is kept
/// per shard only); the drain API reports it so the agent follows.
pub const VAR_SHARDS: &str = "SHARDS";
/// Shared secret that signs drain-API requests (`wrangler secret put DRAIN_SECRET`).
pub const VAR_DRAIN_SECRET: &str = "DRAIN_SECRET";
/// The PII hashing key as `VERSION:SECRET` (`wrangler secret put PII_HMAC_KEY`).
pub const VAR_PII_HMAC_KEY: &str = "PII_HMAC_KEY";
/// Comma-separated older key versions still being rotated out: values already hashed
/// under them pass through unchanged.
pub const VAR_PII_HMAC_PREVIOUS_VERSIONS: &str = "PII_HMAC_PREVIOUS_VERSIONS";
/// `true` only for local development: accepts the `X-Collector-Country` header in place
/// of `request.cf.country`.
pub const VAR_DEV_MODE: &str = "DEV_MODE";
/// Seal the open batch once it holds this many events.
pub const VAR_BATCH_MAX_EVENTS: &str = "BATCH_MAX_EVENTS";
/// Seal the open batch once its events add up to this many bytes.
pub const VAR_BATCH_MAX_BYTES: &str = "BATCH_MAX_BYTES";
/// Seal the open batch at the latest this long after its first event.
pub const VAR_BATCH_MAX_AGE_MS: &str = "BATCH_MAX_AGE_MS";

pub const DEFAULT_SHARDS: u32 = 4;
pub const DEFAULT_BATCH_MAX_EVENTS: usize = 500;
pub const DEFAULT_BATCH_MAX_BYTES: usize = 512 * 1024;
pub const DEFAULT_BATCH_MAX_AGE_MS: i64 = 5_000;
/// Upper bound for `SHARDS`.
pub const MAX_SHARDS: u32 = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origins {
    Any,
    List(Vec<String>),
}

impl Origins {
    pub fn allows(&self, origin: &str) -> bool {
        match self {
            Origins::Any => true,
            Origins::List(list) => list.iter().any(|o| o == origin),
        }
    }
}

/// The front worker's settings.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Accepted write keys; never empty.
    pub write_keys: Vec<String>,
    pub allowed_origins: Origins,
    pub shards: u32,
    /// `None` disables the drain API (every drain request gets 401).
    pub drain_secret: Option<String>,
    /// The privacy policy (embedded at build time) with its hashing key.
    pub privacy: collector_core::privacy::PrivacyEngine,
    /// Whether the country may be overridden by a request header (local only).
    pub dev_mode: bool,
}

/// The privacy rules, validated by `build.rs` and embedded in the worker as JSON.
pub const PRIVACY_POLICY_JSON: &str = include_str!(concat!(env!("OUT_DIR"), "/privacy.json"));

thread_local! {
    static POLICY: std::cell::OnceCell<Result<std::sync::Arc<collector_core::policy::Policy>, String>> =
        const { std::cell::OnceCell::new() };
}

/// The embedded policy, loaded once per isolate.
fn policy() -> Result<std::sync::Arc<collector_core::policy::Policy>, String> {
    POLICY.with(|cell| {
        cell.get_or_init(|| {
            serde_json::from_str(PRIVACY_POLICY_JSON)
                .map(std::sync::Arc::new)
                .map_err(|e| format!("config: the embedded privacy policy does not load: {e}"))
        })
        .clone()
    })
}

fn hasher(env: &Env) -> Result<collector_core::pii::PiiHasher, String> {
    let raw = lookup(env, VAR_PII_HMAC_KEY).ok_or_else(|| {
        format!("config: {VAR_PII_HMAC_KEY} is not set; set it to VERSION:SECRET (e.g. v1:<32+ random bytes>)")
    })?;
    let previous = lookup(env, VAR_PII_HMAC_PREVIOUS_VERSIONS).unwrap_or_default();
    let previous: Vec<&str> = previous
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    collector_core::pii::PiiHasher::from_spec(&raw, &previous).ok_or_else(|| {
        format!("config: {VAR_PII_HMAC_KEY} must be VERSION:SECRET with a secret of 16+ characters")
    })
}

/// A queue shard's sealing thresholds.
#[derive(Debug, Clone, Copy)]
pub struct ShardConfig {
    pub batch_max_events: usize,
    pub batch_max_bytes: usize,
    pub batch_max_age_ms: i64,
}

fn lookup(env: &Env, name: &str) -> Option<String> {
    env.secret(name)
        .map(|s| s.to_string())
        .or_else(|_| env.var(name).map(|v| v.to_string()))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn number<T: std::str::FromStr>(env: &Env, name: &str, default: T) -> Result<T, String> {
    match lookup(env, name) {
        None => Ok(default),
        Some(s) => s
            .parse()
            .map_err(|_| format!("config: {name} must be a whole number, got {s:?}")),
    }
}

thread_local! {
    static CONFIG: std::cell::OnceCell<Result<std::rc::Rc<EdgeConfig>, String>> =
        const { std::cell::OnceCell::new() };
}

impl EdgeConfig {
    /// The configuration, parsed on this isolate's first request.
    pub fn cached(env: &Env) -> Result<std::rc::Rc<EdgeConfig>, String> {
        CONFIG.with(|cell| {
            cell.get_or_init(|| EdgeConfig::from_env(env).map(std::rc::Rc::new))
                .clone()
        })
    }

    pub fn from_env(env: &Env) -> Result<EdgeConfig, String> {
        let write_keys: Vec<String> = lookup(env, VAR_WRITE_KEYS)
            .unwrap_or_default()
            .split(',')
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .collect();
        if write_keys.is_empty() {
            return Err(format!(
                "config: {VAR_WRITE_KEYS} is not set; set at least one write key"
            ));
        }
        let allowed_origins = match lookup(env, VAR_ALLOWED_ORIGINS).as_deref() {
            None => Origins::List(Vec::new()),
            Some("*") => Origins::Any,
            Some(list) => Origins::List(
                list.split(',')
                    .map(|o| o.trim().trim_end_matches('/').to_string())
                    .filter(|o| !o.is_empty())
                    .collect(),
            ),
        };
        let shards = number(env, VAR_SHARDS, DEFAULT_SHARDS)?;
        if shards == 0 || shards > MAX_SHARDS {
            return Err(format!(
                "config: {VAR_SHARDS} must be between 1 and {MAX_SHARDS}, got {shards}"
            ));
        }
        Ok(EdgeConfig {
            write_keys,
            allowed_origins,
            shards,
            drain_secret: lookup(env, VAR_DRAIN_SECRET),
            privacy: collector_core::privacy::PrivacyEngine::new(policy()?, hasher(env)?)
                .with_random(fill_random),
            dev_mode: lookup(env, VAR_DEV_MODE).as_deref() == Some("true"),
        })
    }

    /// Constant-time-ish membership test (every key is compared in full).
    pub fn accepts_write_key(&self, key: &str) -> bool {
        let mut ok = false;
        for k in &self.write_keys {
            ok |= constant_time_eq(k.as_bytes(), key.as_bytes());
        }
        ok
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ShardConfig {
    pub fn from_env(env: &Env) -> Result<ShardConfig, String> {
        let cfg = ShardConfig {
            batch_max_events: number(env, VAR_BATCH_MAX_EVENTS, DEFAULT_BATCH_MAX_EVENTS)?,
            batch_max_bytes: number(env, VAR_BATCH_MAX_BYTES, DEFAULT_BATCH_MAX_BYTES)?,
            batch_max_age_ms: number(env, VAR_BATCH_MAX_AGE_MS, DEFAULT_BATCH_MAX_AGE_MS)?,
        };
        if cfg.batch_max_events == 0 || cfg.batch_max_age_ms <= 0 {
            return Err(format!(
                "config: {VAR_BATCH_MAX_EVENTS} and {VAR_BATCH_MAX_AGE_MS} must be positive"
            ));
        }
        // A sealed batch is one SQLite row; Durable Object rows are capped at 2 MB.
        if cfg.batch_max_bytes == 0 || cfg.batch_max_bytes > 1024 * 1024 {
            return Err(format!(
                "config: {VAR_BATCH_MAX_BYTES} must be between 1 and 1048576"
            ));
        }
        Ok(cfg)
    }
}

/// The Workers runtime's CSPRNG (`crypto.getRandomValues`), for sealing `encrypt`
/// fields; false when it failed (the field is then only hashed).
fn fill_random(buf: &mut [u8]) -> bool {
    getrandom::getrandom(buf).is_ok()
}
