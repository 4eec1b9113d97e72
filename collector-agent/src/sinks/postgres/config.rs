//! `[warehouse] kind = "postgres"`.

use serde::Deserialize;

use super::tls::{self, TlsParams};
use crate::sinks::PasswordEnv;

/// A PostgreSQL warehouse.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://USER@HOST:PORT/DATABASE` (no password here: see `password_env`),
    /// with libpq's TLS parameters if wanted: `?sslmode=verify-full&sslrootcert=ca.pem`
    /// (see `tls.rs` for what each means; the default is libpq's `prefer`).
    pub url: String,
    /// Name of an environment variable holding the password, if the server wants one.
    #[serde(default)]
    pub password_env: Option<String>,
    /// The schema the tables live in.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Timeout of connecting, and of one statement of a load (a load waiting longer,
    /// on a lock say, fails and is retried).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Timeout of one statement of the work that reads the whole warehouse: schema
    /// migrations, identity, audiences, privacy requests, `collector-agent sql`. 0 for
    /// none. Their statements grow with the warehouse (an identity run from scratch
    /// over a million identifies has single statements of ~30 s here), so they get
    /// their own, longer limit.
    #[serde(default = "default_query_timeout_ms")]
    pub query_timeout_ms: u64,
}

fn default_schema() -> String {
    "public".into()
}

fn default_timeout_ms() -> u64 {
    30_000
}

fn default_query_timeout_ms() -> u64 {
    3_600_000
}

impl PostgresConfig {
    /// The server at `url` with every other key at its default, as a config that names
    /// only `url` has.
    pub fn at(url: &str) -> PostgresConfig {
        PostgresConfig {
            url: url.to_string(),
            password_env: None,
            schema: default_schema(),
            timeout_ms: default_timeout_ms(),
            query_timeout_ms: default_query_timeout_ms(),
        }
    }

    /// Checks what can be checked without connecting.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(self.url.starts_with("postgres://") || self.url.starts_with("postgresql://")) {
            anyhow::bail!(
                "config: warehouse.url must start with postgres://, got {:?}",
                self.url
            );
        }
        let rest = self.url.split_once("://").map(|x| x.1).unwrap_or("");
        if rest
            .split_once('@')
            .is_some_and(|(userinfo, _)| userinfo.contains(':'))
        {
            anyhow::bail!(
                "config: warehouse.url must not hold a password; use warehouse.password_env"
            );
        }
        let (_, tls) = self
            .driver_config()
            .map_err(|e| anyhow::anyhow!("config: {e}"))?;
        tls.client_config()
            .map_err(|e| anyhow::anyhow!("config: {e}"))?;
        if self.schema.is_empty()
            || !self
                .schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            anyhow::bail!(
                "config: warehouse.schema must be letters, digits and _, got {:?}",
                self.schema
            );
        }
        PasswordEnv(&self.password_env).validate()
    }

    /// The driver's config from `url` less its TLS parameters, and those.
    pub fn driver_config(&self) -> Result<(tokio_postgres::Config, TlsParams), String> {
        let (url, tls) = tls::split_url(&self.url)?;
        let mut pg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("warehouse.url: {}", crate::causes(&e)))?;
        pg.ssl_mode(tls.mode.driver_mode());
        Ok((pg, tls))
    }

    pub fn password(&self) -> Option<String> {
        PasswordEnv(&self.password_env).password()
    }
}
