//! `[identity]` in `agent.toml`.

use serde::Deserialize;

/// How ids are joined into people.
///
/// ```toml
/// [identity]
/// enabled = true                 # this agent resolves people and evaluates audiences
/// block = ["test-user"]          # more placeholder ids to ignore (the defaults stay)
/// events_per_run = 10000         # a backlog is resolved in runs of about this many events
/// [identity.limits]
/// user_id = 1                    # at most one user id per person
/// email = 3
/// anonymous_id = 200
/// max_ids = 500                  # ids of any type per person
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Whether this agent resolves identity, computes profiles and evaluates audiences
    /// after its loads and on schedule (default: yes). DuckDB is one agent's, and
    /// PostgreSQL runs one identity run at a time (an advisory lock); ClickHouse has no
    /// locks, so when several agents drain into one ClickHouse database, leave this on
    /// in one of them.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Extra ids that may never join people (the default list always applies).
    #[serde(default)]
    pub block: Vec<String>,
    /// The events one identity run reads, about: the loads waiting to be read are
    /// taken in order, in runs (one transaction each) of whole loads until this many
    /// events, so a backlog drained at once (hours of an edge's spool after an outage)
    /// is resolved in bounded memory rather than in one run as large as the backlog.
    /// A run still reads at least one load (up to `lease_batches` batches). Default
    /// [`DEFAULT_EVENTS_PER_RUN`].
    #[serde(default = "default_events_per_run")]
    pub events_per_run: u64,
    #[serde(default)]
    pub limits: Limits,
}

/// See [`IdentityConfig::events_per_run`]: with it, draining 36k events into the lake
/// peaked at 141 MB instead of 171 MB (BENCHMARKS.md, "Sixteenth round").
pub const DEFAULT_EVENTS_PER_RUN: u64 = 10_000;

fn default_events_per_run() -> u64 {
    DEFAULT_EVENTS_PER_RUN
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            enabled: true,
            block: Vec::new(),
            events_per_run: DEFAULT_EVENTS_PER_RUN,
            limits: Limits::default(),
        }
    }
}

fn yes() -> bool {
    true
}

/// The most ids of each type one person may have; a merge that would exceed one is
/// refused and recorded with its reason.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default = "one")]
    pub user_id: u32,
    #[serde(default = "default_emails")]
    pub email: u32,
    #[serde(default = "default_anonymous")]
    pub anonymous_id: u32,
    #[serde(default = "default_max_ids")]
    pub max_ids: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            user_id: one(),
            email: default_emails(),
            anonymous_id: default_anonymous(),
            max_ids: default_max_ids(),
        }
    }
}

impl Limits {
    /// The limit of an id type.
    pub fn of(&self, id_type: &str) -> u32 {
        match id_type {
            "user_id" => self.user_id,
            "email" => self.email,
            "anonymous_id" => self.anonymous_id,
            _ => self.max_ids,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        for (k, v) in [
            ("user_id", self.user_id),
            ("email", self.email),
            ("anonymous_id", self.anonymous_id),
            ("max_ids", self.max_ids),
        ] {
            anyhow::ensure!(v >= 1, "config: identity.limits.{k} must be at least 1");
        }
        Ok(())
    }
}

fn one() -> u32 {
    1
}
fn default_emails() -> u32 {
    5
}
fn default_anonymous() -> u32 {
    500
}
fn default_max_ids() -> u32 {
    1000
}
