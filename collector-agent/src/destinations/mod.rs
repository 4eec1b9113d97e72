//! Destinations: audiences and events sent to the tools marketing teams use, with
//! consent checked again at the moment of sending.
//!
//! One folder per kind (`webhook/`), each a [`Destination`]: it turns a batch of
//! [`Item`]s into its API's calls and says how a failure should be treated. What is
//! common lives here:
//!
//! - [`outbox`]: the `activation_outbox` table, one row per thing to send, keyed so it
//!   is sent once whatever restarts or replays happen: `destination:person:audience:
//!   entered|exited:entered_at` for an audience stay, `destination:message_id` for an
//!   event; and `activation_log`, what was sent or withheld and the consent it was
//!   decided on.
//! - [`sync`]: one pass per destination: enqueue the new entries, exits and events,
//!   then send what is due, checking the person's current consent (the categories
//!   `privacy.toml`'s `[destinations.<name>]` names) before every attempt. Transient
//!   failures retry with exponential backoff, jittered between half and all of each
//!   step (honouring `Retry-After`), for `retry_for`, then
//!   dead-letter; a rejected batch is split to find the record at fault.

pub mod config;
pub mod mailchimp;
pub mod meta_capi;
pub mod outbox;
pub mod sync;
pub mod twilio;
pub mod webhook;

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

pub use config::DestinationConfig;

/// One thing to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The outbox key (the destination's idempotency key for it).
    pub key: String,
    pub person_id: Option<String>,
    pub what: What,
    /// What the destination receives about it (no contact data in the clear is ever
    /// stored: this is built at send time).
    pub payload: Value,
    /// Contact data opened for this send only, for destinations that need it.
    pub contact: Contact,
}

/// An email address and phone number opened from their sealed copies at send time. In
/// memory only: never written, never logged (`Debug` shows only which are present).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Contact {
    pub email: Option<String>,
    pub phone: Option<String>,
}

impl std::fmt::Debug for Contact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Contact {{ email: {}, phone: {} }}",
            if self.email.is_some() {
                "<opened>"
            } else {
                "-"
            },
            if self.phone.is_some() {
                "<opened>"
            } else {
                "-"
            }
        )
    }
}

/// The agent's means to open sealed contact fields: its secret key, and where the
/// policy seals each kind (`[pii] fields` with `action = "encrypt"`).
pub struct Contacts {
    pub key: collector_core::seal::OpenKey,
    /// `(kind, path)`, e.g. `(Email, "traits.email")`.
    pub paths: Vec<(collector_core::pii::PiiKind, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    /// A person entered or left an audience.
    Audience {
        audience: String,
        entered: bool,
        /// Left because their consent no longer allows this destination (the
        /// destination should forget them, not only untag them).
        withdrawn: bool,
    },
    /// An event, forwarded.
    Event { message_id: String },
}

/// Why a send failed, and what to do about it.
#[derive(Debug, Clone, PartialEq)]
pub enum SendError {
    /// Try again later (timeouts, 429, 5xx), not before `after` when the destination
    /// said so.
    Retry {
        error: String,
        after: Option<Duration>,
    },
    /// The destination refused this batch as it is (4xx): split it to find the record
    /// at fault; a single record goes to the dead letters.
    Reject { error: String },
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Retry { error, .. } | SendError::Reject { error } => f.write_str(error),
        }
    }
}

/// A person to delete at a destination (an erasure request): all their ids, and their
/// contact opened for this call only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erasure {
    pub request_id: String,
    pub person_ids: Vec<String>,
    pub user_ids: Vec<String>,
    pub anonymous_ids: Vec<String>,
    pub contact: Contact,
}

/// A destination kind.
#[async_trait]
pub trait Destination: Send + Sync {
    /// Sends one batch (at most the configured `batch_size` items); `Ok` when all of it
    /// was accepted.
    async fn send(&self, items: &[Item]) -> Result<(), SendError>;
    /// Whether it can take a person out of an audience (else exits are not sent).
    fn removes(&self) -> bool;
    /// One signed call that changes nothing at the destination; its answer.
    async fn test(&self) -> Result<String, SendError>;
    /// The contact kinds it sends to (opened at send time); none by default.
    fn contact_kinds(&self) -> &'static [collector_core::pii::PiiKind] {
        &[]
    }
    /// Whether an item without any of those contacts cannot be sent at all.
    fn requires_contact(&self) -> bool {
        false
    }
    /// The most items one call takes (APIs that take one record per call say 1, so a
    /// failure never makes the others be sent twice).
    fn max_batch(&self) -> usize {
        usize::MAX
    }
    /// Deletes a person at the destination (an erasure); its answer. `None` when the
    /// destination has no deletion endpoint (the audit trail says so). Deleting someone
    /// the destination never had is a success.
    async fn erase(&self, _who: &Erasure) -> Option<Result<String, SendError>> {
        None
    }
}

/// The destination a config describes.
pub fn open(cfg: &DestinationConfig) -> anyhow::Result<Box<dyn Destination>> {
    match cfg.kind.as_str() {
        "webhook" => Ok(Box::new(webhook::Webhook::new(cfg)?)),
        "twilio" => Ok(Box::new(twilio::Twilio::new(cfg)?)),
        "meta_capi" => Ok(Box::new(meta_capi::MetaCapi::new(cfg)?)),
        "mailchimp" => Ok(Box::new(mailchimp::Mailchimp::new(cfg)?)),
        other => anyhow::bail!("destination {}: kind {other:?} is not built", cfg.name),
    }
}

/// An HTTP client with the destination's timeout.
pub(crate) fn http_client(cfg: &DestinationConfig) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_millis(cfg.timeout_ms))
        .build()?)
}

/// A destination's answer to one call.
pub(crate) struct Answer {
    pub status: reqwest::StatusCode,
    /// `Retry-After`, when given.
    pub after: Option<Duration>,
    pub text: String,
}

/// Sends a request; a transport failure (refused, reset, timed out) is retried.
pub(crate) async fn call(name: &str, req: reqwest::RequestBuilder) -> Result<Answer, SendError> {
    let now = crate::now_ms();
    let resp = req.send().await.map_err(|e| SendError::Retry {
        error: format!("{name}: {e}"),
        after: None,
    })?;
    let status = resp.status();
    let after = retry_after(
        resp.headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()),
        now,
    );
    let text = resp.text().await.unwrap_or_default();
    Ok(Answer {
        status,
        after,
        text,
    })
}

impl Answer {
    /// The first characters of the body.
    pub fn excerpt(&self) -> String {
        self.text.chars().take(300).collect()
    }

    /// `Ok("<status>: <excerpt>")` on 2xx; else an error naming `message` (the body's
    /// excerpt when `None`), retried on 408, 429 and 5xx or when the destination said it
    /// was `transient`, else a rejection.
    pub fn result(
        self,
        name: &str,
        message: Option<String>,
        transient: bool,
    ) -> Result<String, SendError> {
        if self.status.is_success() {
            return Ok(format!("{}: {}", self.status, self.excerpt()));
        }
        let error = format!(
            "{name} answered {}: {}",
            self.status,
            message.unwrap_or_else(|| self.excerpt())
        );
        let code = self.status.as_u16();
        if code == 408 || code == 429 || self.status.is_server_error() || transient {
            Err(SendError::Retry {
                error,
                after: self.after,
            })
        } else {
            Err(SendError::Reject { error })
        }
    }
}

/// `Retry-After` (seconds, or an HTTP date) as a wait from now.
pub fn retry_after(value: Option<&str>, now_ms: i64) -> Option<Duration> {
    let v = value?.trim();
    if let Ok(s) = v.parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let at = time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc2822).ok()?;
    let ms = at.unix_timestamp() * 1000 - now_ms;
    Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        assert_eq!(retry_after(Some("120"), 0), Some(Duration::from_secs(120)));
        // Wed, 21 Oct 2015 07:28:00 GMT = 1445412480 s.
        assert_eq!(
            retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT"), 1_445_412_470_000),
            Some(Duration::from_secs(10))
        );
        assert_eq!(retry_after(Some("soon"), 0), None);
        assert_eq!(retry_after(None, 0), None);
    }
}
