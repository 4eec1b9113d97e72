//! The agent's TOML configuration. Defaults live here and nowhere else.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::sinks::clickhouse::config::ClickHouseConfig;
pub use crate::sinks::duckdb::config::DuckDbConfig;
pub use crate::sinks::parquet::config::ParquetConfig;
pub use crate::sinks::postgres::config::PostgresConfig;

/// `agent.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Base URL of the edge worker, e.g. `http://127.0.0.1:8787`.
    pub edge_url: String,
    /// The drain API's shared secret (the edge's `DRAIN_SECRET`). Prefer
    /// `drain_secret_env` so the secret stays out of the file.
    #[serde(default)]
    pub drain_secret: Option<String>,
    /// Name of an environment variable holding the drain secret.
    #[serde(default)]
    pub drain_secret_env: Option<String>,
    /// The warehouse to load into.
    #[serde(default)]
    pub warehouse: WarehouseConfig,
    /// Loopback address of the admin endpoint (`collector-agent sql` goes through it);
    /// port 0 picks a free port.
    #[serde(default = "default_admin_addr")]
    pub admin_addr: String,
    /// Pause between drain rounds that found nothing.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Most sealed batches to lease at once from one shard.
    #[serde(default = "default_lease_batches")]
    pub lease_batches: u32,
    /// How long a lease holds before the edge hands its batches out again.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// Where to serve Prometheus metrics (`GET /metrics`), e.g. `127.0.0.1:9464`; off
    /// when absent.
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// Timeout of one HTTP request to the edge.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// How long one load may keep failing with errors the warehouse does not call data
    /// errors (a trigger's exception, a permission refused on one table, a bug an event
    /// reaches) before the agent writes it in parts, loads every event the warehouse
    /// takes and quarantines the ones it refuses alone, so one event cannot block its
    /// shard for good. Only when the warehouse took other events meanwhile: a warehouse
    /// that is down, full or locked for everything quarantines nothing. `0`: never.
    #[serde(default = "default_stuck_quarantine_after_ms")]
    pub stuck_quarantine_after_ms: u64,
    /// `[identity]`: the block list and limits of identity resolution.
    #[serde(default)]
    pub identity: crate::identity::IdentityConfig,
    /// The audiences file to evaluate (relative to this file); none when absent.
    #[serde(default)]
    pub audiences: Option<PathBuf>,
    /// The edge's `privacy.toml` (relative to this file): audiences may require only
    /// the consent categories it defines.
    #[serde(default)]
    pub privacy: Option<PathBuf>,
    /// How often audiences are evaluated besides after every load, so time windows
    /// ("15 minutes ago") are noticed when nothing new arrives.
    #[serde(default = "default_audience_interval_ms")]
    pub audience_interval_ms: u64,
    /// `[[destinations]]`: where audiences and events are sent (see
    /// `destinations/config.rs`); each must be named in `privacy.toml`.
    #[serde(default)]
    pub destinations: Vec<crate::destinations::DestinationConfig>,
    /// The environment variable holding the agent's secret key (`x25519-secret:…`,
    /// from `collector-agent keys generate`), which opens the contact fields the edge
    /// sealed (`action = "encrypt"`) for the destinations that send to them.
    #[serde(default)]
    pub seal_key_env: Option<String>,
    /// The environment variable holding the edge's PII key (`VERSION:SECRET`, the
    /// worker's `PII_HMAC_KEY`): privacy requests by email find the person through its
    /// keyed hash.
    #[serde(default)]
    pub pii_key_env: Option<String>,
    /// `[[admin_keys]]`: callers of the signed privacy API on `admin_addr` (a DPO
    /// portal, a ticketing system), each named in the audit trail.
    #[serde(default)]
    pub admin_keys: Vec<AdminKey>,
    /// The environment variable holding the consent dashboard's token. Without it the
    /// dashboard is served on a loopback `admin_addr` only; with it, `admin_addr` may be
    /// any address and the dashboard asks for the token.
    #[serde(default)]
    pub dashboard_token_env: Option<String>,
}

/// `[[admin_keys]]`: one caller of the signed admin API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminKey {
    /// Who it is, as the audit trail names them (`dpo-portal`).
    pub name: String,
    /// The environment variable holding its shared secret (16+ characters).
    pub secret_env: String,
}

fn default_audience_interval_ms() -> u64 {
    60_000
}

/// `[warehouse]`: `kind` picks the sink (default `duckdb`); the other keys are the
/// kind's own (see each sink's `config.rs`), and unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WarehouseConfig {
    DuckDb(DuckDbConfig),
    Postgres(PostgresConfig),
    Parquet(ParquetConfig),
    ClickHouse(ClickHouseConfig),
}

impl Default for WarehouseConfig {
    fn default() -> Self {
        WarehouseConfig::DuckDb(DuckDbConfig::default())
    }
}

impl<'de> Deserialize<'de> for WarehouseConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = toml::Table::deserialize(d)?;
        let kind = match table.remove("kind") {
            None => "duckdb".to_string(),
            Some(toml::Value::String(k)) => k,
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "warehouse.kind must be a string, got {other}"
                )))
            }
        };
        let value = toml::Value::Table(table);
        let err =
            |e: toml::de::Error| D::Error::custom(format!("warehouse ({kind}): {}", e.message()));
        match kind.as_str() {
            "duckdb" => value.try_into().map(WarehouseConfig::DuckDb).map_err(err),
            "postgres" => value.try_into().map(WarehouseConfig::Postgres).map_err(err),
            "parquet" => value.try_into().map(WarehouseConfig::Parquet).map_err(err),
            "clickhouse" => value
                .try_into()
                .map(WarehouseConfig::ClickHouse)
                .map_err(err),
            other => Err(D::Error::custom(format!(
                "warehouse.kind {other:?} is not one of \"duckdb\", \"postgres\", \"clickhouse\", \"parquet\""
            ))),
        }
    }
}

impl WarehouseConfig {
    /// The SQL dialect identity, profiles and audiences are computed in: the Parquet
    /// lake's is DuckDB's (its state file, with the tables as views over the files).
    pub fn people_dialect(&self) -> crate::sinks::Dialect {
        match self {
            WarehouseConfig::DuckDb(_) | WarehouseConfig::Parquet(_) => {
                crate::sinks::Dialect::DuckDb
            }
            WarehouseConfig::Postgres(_) => crate::sinks::Dialect::Postgres,
            WarehouseConfig::ClickHouse(_) => crate::sinks::Dialect::ClickHouse,
        }
    }

    /// The kind's name as configured.
    pub fn kind(&self) -> &'static str {
        match self {
            WarehouseConfig::DuckDb(_) => "duckdb",
            WarehouseConfig::Postgres(_) => "postgres",
            WarehouseConfig::ClickHouse(_) => "clickhouse",
            WarehouseConfig::Parquet(_) => "parquet",
        }
    }

    /// The DuckDB file, for kinds that have one.
    pub fn duckdb_path(&self) -> Option<&Path> {
        match self {
            WarehouseConfig::DuckDb(c) => Some(&c.path),
            WarehouseConfig::Postgres(_)
            | WarehouseConfig::Parquet(_)
            | WarehouseConfig::ClickHouse(_) => None,
        }
    }

    /// Where a running agent leaves its admin address and token (`collector-agent sql`
    /// and `quarantine replay` find it there): beside the DuckDB file, or in the temp
    /// folder, named after the warehouse URL, for a server.
    pub fn state_file(&self) -> PathBuf {
        match self {
            WarehouseConfig::DuckDb(c) => {
                let mut s = c.path.as_os_str().to_owned();
                s.push(".agent");
                PathBuf::from(s)
            }
            WarehouseConfig::Parquet(c) => c.path.join("_collector").join("agent.state"),
            WarehouseConfig::Postgres(PostgresConfig { url, .. })
            | WarehouseConfig::ClickHouse(ClickHouseConfig { url, .. }) => {
                let h = url.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                });
                std::env::temp_dir().join(format!("collector-agent-{h:016x}.agent"))
            }
        }
    }
}

fn default_admin_addr() -> String {
    "127.0.0.1:0".into()
}
fn default_poll_interval_ms() -> u64 {
    1_000
}
fn default_lease_batches() -> u32 {
    collector_core::drain::DEFAULT_LEASE_BATCHES
}
fn default_lease_ms() -> u64 {
    collector_core::drain::DEFAULT_LEASE_MS as u64
}
fn default_stuck_quarantine_after_ms() -> u64 {
    10 * 60_000
}
fn default_request_timeout_ms() -> u64 {
    30_000
}

impl AgentConfig {
    /// Reads and validates a config file; relative paths resolve against its folder.
    pub fn load(path: &Path) -> anyhow::Result<AgentConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        let mut cfg: AgentConfig =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        match &mut cfg.warehouse {
            WarehouseConfig::DuckDb(w) if w.path.is_relative() => w.path = base.join(&w.path),
            WarehouseConfig::Parquet(w) if w.path.is_relative() => w.path = base.join(&w.path),
            _ => {}
        }
        for p in [&mut cfg.audiences, &mut cfg.privacy].into_iter().flatten() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if !(self.edge_url.starts_with("http://") || self.edge_url.starts_with("https://")) {
            anyhow::bail!(
                "config: edge_url must start with http:// or https://, got {:?}",
                self.edge_url
            );
        }
        // The drain API's own limits, from the one definition the edge enforces.
        let lease = collector_core::drain::LeaseRequest {
            shard: 0,
            max_batches: self.lease_batches,
            lease_ms: i64::try_from(self.lease_ms).unwrap_or(i64::MAX),
            flush: false,
        };
        if let Err(e) = lease.validate(None) {
            let e = e.to_string().replace("max_batches", "lease_batches");
            anyhow::bail!("config: {e}");
        }
        match &self.warehouse {
            WarehouseConfig::Postgres(p) => p.validate()?,
            WarehouseConfig::ClickHouse(c) => c.validate()?,
            WarehouseConfig::DuckDb(d) => {
                d.settings_sql()?;
            }
            WarehouseConfig::Parquet(p) => {
                p.settings_sql()?;
            }
        }
        self.identity.limits.validate()?;
        anyhow::ensure!(
            self.identity.events_per_run >= 1,
            "config: identity.events_per_run must be at least 1"
        );
        anyhow::ensure!(
            self.audience_interval_ms >= 1_000,
            "config: audience_interval_ms must be at least 1000"
        );
        let audiences = self.load_audiences()?;
        if !self.destinations.is_empty() {
            anyhow::ensure!(
                matches!(
                    self.warehouse,
                    WarehouseConfig::DuckDb(_)
                        | WarehouseConfig::Postgres(_)
                        | WarehouseConfig::Parquet(_)
                ),
                "config: destinations: activation runs from duckdb, postgres and parquet warehouses; this one is kind = \"{}\"",
                self.warehouse.kind()
            );
            let policy = self.policy()?;
            let mut seen = std::collections::HashSet::new();
            for d in &self.destinations {
                anyhow::ensure!(
                    seen.insert(d.name.as_str()),
                    "config: destinations: the name {:?} is used twice",
                    d.name
                );
                d.validate(&audiences, policy.as_ref())?;
                if crate::destinations::config::NEEDS_CONTACTS.contains(&d.kind.as_str()) {
                    anyhow::ensure!(
                        self.seal_key_env.is_some(),
                        "config: destinations.{}: kind = \"{}\" sends to addresses, which only the agent's key opens: set seal_key_env",
                        d.name,
                        d.kind
                    );
                }
            }
        }
        self.secret()?;
        Ok(())
    }

    /// The secrets only sending needs, read from the environment: each destination's
    /// credential and the key that opens sealed contacts (`config check` and `run`;
    /// commands that only query the warehouse do without them).
    pub fn validate_secrets(&self) -> anyhow::Result<()> {
        for d in &self.destinations {
            d.secret()?;
        }
        self.contacts()?;
        self.pii_hasher()?;
        self.admin_secrets()?;
        self.dashboard_token()?;
        Ok(())
    }

    /// The edge's PII hasher (`pii_key_env`), when configured.
    pub fn pii_hasher(&self) -> anyhow::Result<Option<collector_core::pii::PiiHasher>> {
        let Some(var) = &self.pii_key_env else {
            return Ok(None);
        };
        let raw = std::env::var(var).map_err(|_| {
            anyhow::anyhow!("config: pii_key_env: the environment variable {var} is not set")
        })?;
        collector_core::pii::PiiHasher::from_spec(&raw, &[])
            .map(Some)
            .ok_or_else(|| {
                anyhow::anyhow!("config: pii_key_env: {var} must be VERSION:SECRET with a secret of 16+ characters (the edge's PII_HMAC_KEY)")
            })
    }

    /// Each admin key's name and secret.
    pub fn admin_secrets(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut out: Vec<(String, String)> = Vec::new();
        for k in &self.admin_keys {
            anyhow::ensure!(
                !k.name.is_empty() && !out.iter().any(|(n, _)| *n == k.name),
                "config: admin_keys: names must be unique and not empty ({:?})",
                k.name
            );
            let secret = std::env::var(&k.secret_env).map_err(|_| {
                anyhow::anyhow!(
                    "config: admin_keys.{}: the environment variable {} is not set",
                    k.name,
                    k.secret_env
                )
            })?;
            anyhow::ensure!(
                secret.len() >= 16,
                "config: admin_keys.{}: the secret must have 16+ characters",
                k.name
            );
            out.push((k.name.clone(), secret));
        }
        Ok(out)
    }

    /// The dashboard's token (`dashboard_token_env`), when configured.
    pub fn dashboard_token(&self) -> anyhow::Result<Option<String>> {
        let Some(var) = &self.dashboard_token_env else {
            return Ok(None);
        };
        let t = std::env::var(var).map_err(|_| {
            anyhow::anyhow!(
                "config: dashboard_token_env: the environment variable {var} is not set"
            )
        })?;
        anyhow::ensure!(
            t.len() >= 16,
            "config: dashboard_token_env: the token must have 16+ characters"
        );
        Ok(Some(t))
    }

    /// The key and paths that open sealed contact fields, when `seal_key_env` is set.
    /// The key must be the one `privacy.toml` seals to.
    pub fn contacts(&self) -> anyhow::Result<Option<crate::destinations::Contacts>> {
        let Some(var) = &self.seal_key_env else {
            return Ok(None);
        };
        let text = std::env::var(var).map_err(|_| {
            anyhow::anyhow!("config: seal_key_env: the environment variable {var} is not set")
        })?;
        let key = collector_core::seal::OpenKey::parse(&text)
            .map_err(|e| anyhow::anyhow!("config: seal_key_env: {var}: {e}"))?;
        let policy = self.policy()?.ok_or_else(|| {
            anyhow::anyhow!(
                "config: seal_key_env needs `privacy` (the policy says which fields are sealed)"
            )
        })?;
        let public = key.public().to_text();
        anyhow::ensure!(
            policy.seal_to.as_deref() == Some(public.as_str()),
            "config: seal_key_env: {var} holds the key of {public}, but privacy.toml's [pii] seal_to is {}",
            policy.seal_to.as_deref().unwrap_or("not set")
        );
        let paths = policy
            .pii_fields
            .iter()
            .filter(|f| f.action == collector_core::policy::FieldAction::Encrypt)
            .map(|f| (f.kind, f.path.clone()))
            .collect();
        Ok(Some(crate::destinations::Contacts { key, paths }))
    }

    /// The consent categories of `privacy`, when configured.
    pub fn consent_categories(&self) -> anyhow::Result<Option<Vec<String>>> {
        Ok(self
            .policy()?
            .map(|p| p.categories.into_iter().map(|c| c.name).collect()))
    }

    /// `[identity]` with `privacy`'s block list added, so the agent blocks what the edge
    /// blocks.
    pub fn identity_config(&self) -> anyhow::Result<crate::identity::IdentityConfig> {
        let mut cfg = self.identity.clone();
        if let Some(p) = self.policy()? {
            cfg.block.extend(p.block_list.extra().iter().cloned());
        }
        Ok(cfg)
    }

    /// The edge's policy (`privacy`), when configured.
    pub fn policy(&self) -> anyhow::Result<Option<collector_core::policy::Policy>> {
        let Some(path) = &self.privacy else {
            return Ok(None);
        };
        let policy =
            crate::privacy_cli::load(path).map_err(|e| anyhow::anyhow!("config: privacy: {e}"))?;
        Ok(Some(policy))
    }

    /// The audiences to evaluate (none without an `audiences` file).
    pub fn load_audiences(&self) -> anyhow::Result<Vec<crate::audiences::Audience>> {
        let Some(path) = &self.audiences else {
            return Ok(Vec::new());
        };
        let cats = self.consent_categories()?;
        crate::audiences::load(path, cats.as_deref())
            .map_err(|e| anyhow::anyhow!("config: audiences: {e}"))
    }

    /// The drain secret, from `drain_secret_env` or `drain_secret`.
    pub fn secret(&self) -> anyhow::Result<String> {
        if let Some(var) = &self.drain_secret_env {
            return std::env::var(var).map_err(|_| {
                anyhow::anyhow!("config: drain_secret_env names {var}, which is not set")
            });
        }
        self.drain_secret
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| anyhow::anyhow!("config: set drain_secret_env (or drain_secret)"))
    }
}
