//! `[warehouse] kind = "clickhouse"`.

use serde::Deserialize;

use crate::sinks::PasswordEnv;

/// A ClickHouse server, over its HTTP interface.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// `http://HOST:8123` (no credentials here: see `user` and `password_env`).
    pub url: String,
    /// The database the tables live in (created if missing).
    #[serde(default = "default_database")]
    pub database: String,
    /// The ClickHouse user.
    #[serde(default = "default_user")]
    pub user: String,
    /// Name of an environment variable holding the password, if the user has one.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Timeout of one HTTP request of a load (and of connecting).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Timeout of one statement of the work that reads the whole warehouse: identity,
    /// audiences, privacy requests, `collector-agent sql` (also sent as ClickHouse's
    /// `max_execution_time`, so the server stops what the agent gave up on). 0 for none.
    #[serde(default = "default_query_timeout_ms")]
    pub query_timeout_ms: u64,
    /// For an `https://` url: a PEM file of CA certificates the server's certificate
    /// may chain to, beside the public CAs the agent trusts built in (a company CA, a
    /// self-signed server; `/etc/ssl/certs/ca-certificates.crt` for the machine's store).
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// For an `https://` url whose server asks for a client certificate (ClickHouse's
    /// `verificationMode` `relaxed` or `strict`): the agent's certificate (PEM, the leaf
    /// first, then any intermediates) and its private key (PEM: PKCS#8, RSA or EC).
    /// Both or neither.
    #[serde(default)]
    pub cert_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub key_file: Option<std::path::PathBuf>,
}

fn default_database() -> String {
    "analytics".into()
}

fn default_user() -> String {
    "default".into()
}

fn default_timeout_ms() -> u64 {
    30_000
}

fn default_query_timeout_ms() -> u64 {
    3_600_000
}

impl ClickHouseConfig {
    /// The server at `url` with every other key at its default, as a config that names
    /// only `url` has.
    pub fn at(url: &str) -> ClickHouseConfig {
        ClickHouseConfig {
            url: url.to_string(),
            database: default_database(),
            user: default_user(),
            password_env: None,
            timeout_ms: default_timeout_ms(),
            query_timeout_ms: default_query_timeout_ms(),
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }

    /// Checks what can be checked without connecting.
    pub fn validate(&self) -> anyhow::Result<()> {
        let Some(rest) = self
            .url
            .strip_prefix("http://")
            .or_else(|| self.url.strip_prefix("https://"))
        else {
            anyhow::bail!(
                "config: warehouse.url must start with http:// or https:// (ClickHouse's HTTP interface), got {:?}",
                self.url
            );
        };
        if rest
            .split('/')
            .next()
            .is_some_and(|host| host.contains('@'))
        {
            anyhow::bail!(
                "config: warehouse.url must not hold credentials; use warehouse.user and warehouse.password_env"
            );
        }
        let plain = |s: &str| {
            !s.is_empty()
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !s.starts_with(|c: char| c.is_ascii_digit())
        };
        if !plain(&self.database) {
            anyhow::bail!(
                "config: warehouse.database must be letters, digits and _, got {:?}",
                self.database
            );
        }
        if self.ca_file.is_some() && !self.url.starts_with("https://") {
            anyhow::bail!(
                "config: warehouse.ca_file is for an https:// url, got {:?}",
                self.url
            );
        }
        self.ca_certificates()?;
        self.identity()?;
        PasswordEnv(&self.password_env).validate()
    }

    /// The client certificate and key of `cert_file` and `key_file` (none without
    /// them); an error names the key at fault.
    pub fn identity(&self) -> anyhow::Result<Option<reqwest::Identity>> {
        let (cert, key) = match (&self.cert_file, &self.key_file) {
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c, k),
            (Some(_), None) => {
                anyhow::bail!(
                    "config: warehouse.cert_file needs warehouse.key_file, its private key"
                )
            }
            (None, Some(_)) => {
                anyhow::bail!(
                    "config: warehouse.key_file needs warehouse.cert_file, its certificate"
                )
            }
        };
        if !self.url.starts_with("https://") {
            anyhow::bail!(
                "config: warehouse.cert_file and key_file are for an https:// url, got {:?}",
                self.url
            );
        }
        let read = |name: &str, path: &std::path::Path, marker: &str, what: &str| {
            let text = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("config: warehouse.{name} {}: {e}", path.display()))?;
            let has = String::from_utf8_lossy(&text).contains(marker);
            anyhow::ensure!(
                has,
                "config: warehouse.{name} {}: no PEM {what} in it",
                path.display()
            );
            Ok::<_, anyhow::Error>(text)
        };
        let mut pem = read("key_file", key, "PRIVATE KEY-----", "private key")?;
        pem.push(b'\n');
        pem.extend(read(
            "cert_file",
            cert,
            "-----BEGIN CERTIFICATE-----",
            "certificate",
        )?);
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
            anyhow::anyhow!(
                "config: warehouse.cert_file {} and key_file {}: {}",
                cert.display(),
                key.display(),
                crate::causes(&e)
            )
        })?;
        Ok(Some(identity))
    }

    /// The certificates of `ca_file` (none without it); an error names the file.
    pub fn ca_certificates(&self) -> anyhow::Result<Vec<reqwest::Certificate>> {
        let Some(path) = &self.ca_file else {
            return Ok(Vec::new());
        };
        let pem = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("config: warehouse.ca_file {}: {e}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| anyhow::anyhow!("config: warehouse.ca_file {}: {e}", path.display()))?;
        if certs.is_empty() {
            anyhow::bail!(
                "config: warehouse.ca_file {}: no PEM certificate in it",
                path.display()
            );
        }
        Ok(certs)
    }

    pub fn password(&self) -> Option<String> {
        PasswordEnv(&self.password_env).password()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_a_url_is_what_a_config_naming_only_the_url_reads_as() {
        let read: ClickHouseConfig = toml::from_str("url = \"http://127.0.0.1:8123\"").unwrap();
        assert_eq!(ClickHouseConfig::at("http://127.0.0.1:8123"), read);
    }
}
