//! `kind = "twilio"`: an SMS per audience entry (or forwarded event), through Twilio's
//! Messages API: `POST {base_url}/2010-04-01/Accounts/{account}/Messages.json`,
//! form-encoded `To`, `From` (or `MessagingServiceSid` for an `MG…` sender) and `Body`,
//! HTTP Basic auth with the account SID and the auth token (`secret_env`).
//!
//! The number is the person's phone, opened from its sealed copy at send time (a
//! `phone` field with `action = "encrypt"` in privacy.toml); a person without one is
//! not texted (`unreachable`). Exits are not sent: a text cannot be taken back.
//!
//! Twilio has no idempotency key, so one message is one call (a failure never resends
//! the others) and the outbox marks it sent as soon as Twilio accepted it; only a crash
//! between Twilio's answer and that mark can text twice. Answers: 2xx sent; 429, 5xx
//! and Twilio error 20429 (too many requests) are retried, honouring `Retry-After`;
//! any other 4xx (21211 invalid `To`, 21610 the recipient replied STOP, …) is a dead
//! letter with Twilio's code and message.

use async_trait::async_trait;
use collector_core::pii::PiiKind;
use serde_json::Value;

use super::{call, http_client, Destination, DestinationConfig, Item, SendError, What};

pub struct Twilio {
    name: String,
    url: String,
    account: String,
    token: String,
    from: String,
    message: String,
    http: reqwest::Client,
}

impl Twilio {
    pub fn new(cfg: &DestinationConfig) -> anyhow::Result<Twilio> {
        let account = cfg.account.clone().unwrap_or_default();
        Ok(Twilio {
            name: cfg.name.clone(),
            url: format!(
                "{}/2010-04-01/Accounts/{account}/Messages.json",
                cfg.base_url.trim_end_matches('/')
            ),
            account,
            token: cfg.secret()?,
            from: cfg.from.clone().unwrap_or_default(),
            message: cfg.message.clone().unwrap_or_default(),
            http: http_client(cfg)?,
        })
    }

    fn body(&self, item: &Item) -> String {
        match &item.what {
            What::Audience { audience, .. } => self.message.replace("{audience}", audience),
            What::Event { .. } => self
                .message
                .replace("{audience}", item.payload["event"].as_str().unwrap_or("")),
        }
    }

    async fn post(&self, form: &[(&str, &str)]) -> Result<String, SendError> {
        let req = self
            .http
            .post(&self.url)
            .basic_auth(&self.account, Some(&self.token))
            .form(form);
        let answer = call(&self.name, req).await?;
        let err: Value = serde_json::from_str(&answer.text).unwrap_or(Value::Null);
        let code = err["code"].as_u64();
        let message = format!(
            "Twilio error {} {}",
            code.map_or("-".into(), |c| c.to_string()),
            err["message"]
                .as_str()
                .map_or_else(|| answer.excerpt(), str::to_string)
        );
        // 20429: too many requests, whatever the status says.
        answer.result(&self.name, Some(message), code == Some(20429))
    }

    fn sender(&self) -> (&'static str, &str) {
        if self.from.starts_with("MG") {
            ("MessagingServiceSid", &self.from)
        } else {
            ("From", &self.from)
        }
    }
}

#[async_trait]
impl Destination for Twilio {
    async fn send(&self, items: &[Item]) -> Result<(), SendError> {
        for item in items {
            let Some(to) = item.contact.phone.as_deref() else {
                return Err(SendError::Reject {
                    error: format!("{}: no phone number for {}", self.name, item.key),
                });
            };
            let body = self.body(item);
            let (sender_key, sender) = self.sender();
            self.post(&[("To", to), (sender_key, sender), ("Body", &body)])
                .await?;
        }
        Ok(())
    }

    fn removes(&self) -> bool {
        false
    }

    /// Twilio's test calls cost nothing only with test credentials; this sends no
    /// message: it lists one message of the account (`GET …/Messages.json?PageSize=1`),
    /// which checks the URL, the account and the token.
    async fn test(&self) -> Result<String, SendError> {
        let req = self
            .http
            .get(format!("{}?PageSize=1", self.url))
            .basic_auth(&self.account, Some(&self.token));
        call(&self.name, req).await?.result(&self.name, None, false)
    }

    fn contact_kinds(&self) -> &'static [PiiKind] {
        &[PiiKind::Phone]
    }

    fn requires_contact(&self) -> bool {
        true
    }

    fn max_batch(&self) -> usize {
        1
    }
}
