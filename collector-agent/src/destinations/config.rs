//! `[[destinations]]` in `agent.toml`.

use std::time::Duration;

use serde::Deserialize;

use crate::audiences::config::parse_window;

/// One destination: where activations go.
///
/// ```toml
/// [[destinations]]
/// name = "crm_hook"                       # privacy.toml needs [destinations.crm_hook]
/// kind = "webhook"                       # webhook | twilio | meta_capi | mailchimp
/// base_url = "https://hooks.example.com/collector"
/// secret_env = "CRM_HOOK_SECRET"          # signs every call (never the secret itself)
/// audiences = ["pricing_no_purchase_7d"]  # entries and exits of these audiences
/// events = ["Order Completed"]            # these track events, as they load
/// batch_size = 100                        # items per call
/// rate_limit = 10                         # calls per second at most
/// retry_for = "24h"                       # then a dead letter
/// max_event_age = "7d"                    # older events are not forwarded
/// timeout_ms = 10000
///
/// [[destinations]]
/// name = "cart_sms"                       # privacy.toml: categories = ["marketing", "sms"]
/// kind = "twilio"
/// base_url = "https://api.twilio.com"
/// account = "AC0123456789abcdef0123456789abcdef"
/// secret_env = "TWILIO_AUTH_TOKEN"
/// from = "+15005550006"
/// message = "Your cart is waiting: https://shop.example/cart"
/// audiences = ["cart_abandoners_15m"]
///
/// [[destinations]]
/// name = "meta_capi"                      # privacy.toml: categories = ["marketing"]
/// kind = "meta_capi"
/// base_url = "https://graph.facebook.com/v21.0"
/// pixel_id = "123456789012345"
/// secret_env = "META_ACCESS_TOKEN"
/// events = ["Order Completed"]
///
/// [[destinations]]
/// name = "newsletter"                     # privacy.toml: categories = ["marketing", "email"]
/// kind = "mailchimp"
/// base_url = "https://us21.api.mailchimp.com/3.0"
/// list_id = "a1b2c3d4e5"
/// secret_env = "MAILCHIMP_API_KEY"
/// audiences = ["pricing_no_purchase_7d"]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    pub name: String,
    pub kind: String,
    pub base_url: String,
    #[serde(default)]
    pub secret_env: Option<String>,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub events: Vec<String>,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "default_rate")]
    pub rate_limit: u32,
    #[serde(default = "default_retry_for")]
    pub retry_for: String,
    #[serde(default = "default_age")]
    pub max_event_age: String,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// `twilio`: the account SID (`AC…`; not a secret: the auth token is `secret_env`).
    #[serde(default)]
    pub account: Option<String>,
    /// `twilio`: the sender, a phone number (`+1…`) or a Messaging Service SID (`MG…`).
    #[serde(default)]
    pub from: Option<String>,
    /// `twilio`: the text sent; `{audience}` is replaced by the audience's name.
    #[serde(default)]
    pub message: Option<String>,
    /// `meta_capi`: the pixel (dataset) id the events belong to.
    #[serde(default)]
    pub pixel_id: Option<String>,
    /// `mailchimp`: the list (audience) id members are added to.
    #[serde(default)]
    pub list_id: Option<String>,
}

fn default_batch() -> usize {
    100
}
fn default_rate() -> u32 {
    10
}
fn default_retry_for() -> String {
    "24h".into()
}
fn default_age() -> String {
    "7d".into()
}
fn default_timeout() -> u64 {
    10_000
}

/// The kinds built so far.
pub const KINDS: &[&str] = &["webhook", "twilio", "meta_capi", "mailchimp"];

/// The kinds that send to an address (opened from its sealed copy).
pub const NEEDS_CONTACTS: &[&str] = &["twilio", "mailchimp"];

impl DestinationConfig {
    pub fn retry_for(&self) -> Duration {
        parse_window(&self.retry_for).unwrap_or(Duration::from_secs(86_400))
    }

    pub fn max_event_age(&self) -> Duration {
        parse_window(&self.max_event_age).unwrap_or(Duration::from_secs(7 * 86_400))
    }

    /// The signing secret, from the environment.
    pub fn secret(&self) -> anyhow::Result<String> {
        let var = self.secret_env.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "config: destinations.{}.secret_env is required for kind = \"{}\" (the name of the variable holding the signing secret)",
                self.name,
                self.kind
            )
        })?;
        match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(v),
            _ => anyhow::bail!(
                "config: destinations.{}.secret_env: the environment variable {var} is not set",
                self.name
            ),
        }
    }

    /// Checks one destination against the audiences defined and the privacy policy's
    /// destinations (deny by default: one the policy does not name receives nothing).
    /// Its secret is read only by what sends ([`Self::secret`]): commands that only
    /// query the warehouse do not need it.
    pub fn validate(
        &self,
        audiences: &[crate::audiences::Audience],
        policy: Option<&collector_core::policy::Policy>,
    ) -> anyhow::Result<()> {
        let n = &self.name;
        anyhow::ensure!(
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "config: destinations: name {n:?} must be lower case letters, digits and _"
        );
        anyhow::ensure!(
            KINDS.contains(&self.kind.as_str()),
            "config: destinations.{n}.kind = {:?}: the kinds built are {}",
            self.kind,
            KINDS.join(", ")
        );
        anyhow::ensure!(
            self.base_url.starts_with("http://") || self.base_url.starts_with("https://"),
            "config: destinations.{n}.base_url must be an http:// or https:// URL"
        );
        anyhow::ensure!(
            self.batch_size >= 1 && self.batch_size <= 10_000,
            "config: destinations.{n}.batch_size must be between 1 and 10000"
        );
        anyhow::ensure!(
            self.rate_limit >= 1,
            "config: destinations.{n}.rate_limit must be at least 1 (calls per second)"
        );
        for (key, v) in [
            ("retry_for", &self.retry_for),
            ("max_event_age", &self.max_event_age),
        ] {
            parse_window(v).map_err(|e| anyhow::anyhow!("config: destinations.{n}.{key}: {e}"))?;
        }
        if self.kind == "twilio" {
            for (key, v) in [
                ("account", &self.account),
                ("from", &self.from),
                ("message", &self.message),
            ] {
                anyhow::ensure!(
                    v.as_deref().is_some_and(|v| !v.trim().is_empty()),
                    "config: destinations.{n}.{key} is required for kind = \"twilio\""
                );
            }
        }
        if self.kind == "mailchimp" {
            anyhow::ensure!(
                self.list_id
                    .as_deref()
                    .is_some_and(|p| !p.trim().is_empty()),
                "config: destinations.{n}.list_id is required for kind = \"mailchimp\""
            );
            anyhow::ensure!(
                self.events.is_empty(),
                "config: destinations.{n}: kind = \"mailchimp\" takes audiences, not events"
            );
        }
        if self.kind == "meta_capi" {
            anyhow::ensure!(
                self.pixel_id
                    .as_deref()
                    .is_some_and(|p| !p.trim().is_empty()),
                "config: destinations.{n}.pixel_id is required for kind = \"meta_capi\""
            );
            anyhow::ensure!(
                self.audiences.is_empty(),
                "config: destinations.{n}: kind = \"meta_capi\" takes events, not audiences (sync audiences to Meta as custom audiences from a webhook)"
            );
        }
        anyhow::ensure!(
            !self.audiences.is_empty() || !self.events.is_empty(),
            "config: destinations.{n} receives nothing: give audiences, events or both"
        );
        for a in &self.audiences {
            anyhow::ensure!(
                audiences.iter().any(|x| &x.name == a),
                "config: destinations.{n}.audiences: no audience {a:?} in the audiences file"
            );
        }
        let Some(policy) = policy else {
            anyhow::bail!(
                "config: destinations.{n}: set `privacy = \"privacy.toml\"`: which consent each destination needs comes from the policy (deny by default)"
            );
        };
        anyhow::ensure!(
            policy.destinations.contains_key(n),
            "config: destinations.{n}: privacy.toml has no [destinations.{n}], so it would receive nothing (deny by default); name the consent categories it needs there"
        );
        anyhow::ensure!(
            self.secret_env.is_some(),
            "config: destinations.{n}.secret_env is required (the name of the environment variable holding its credential)"
        );
        Ok(())
    }
}
