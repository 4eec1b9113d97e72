//! `kind = "mailchimp"`: audience members as members of a Mailchimp list (Marketing API
//! v3), tagged with the audience's name.
//!
//! A member is keyed by the MD5 of the lower-cased email (Mailchimp's subscriber hash),
//! the email opened from its sealed copy at send time. HTTP Basic auth with any user
//! name and the API key (`secret_env`); `base_url` is the account's data centre, e.g.
//! `https://us21.api.mailchimp.com/3.0`.
//!
//! - An entry: `PUT /lists/{list_id}/members/{hash}` (upsert, `status_if_new`
//!   `subscribed`), then `POST …/{hash}/tags` with the audience `active`.
//! - An exit (left the audience): the tag set `inactive`; the member stays.
//! - An exit because consent no longer allows this destination:
//!   `DELETE /lists/{list_id}/members/{hash}`, which archives the member (Mailchimp's
//!   `delete-permanent` erases, which is for erasure requests). A member already
//!   gone (404) counts as done.
//!
//! One member per call sequence (never more than one connection; Mailchimp allows 10).
//! Answers: 2xx done; 429 and 5xx retried, honouring `Retry-After`; any other 4xx
//! (e.g. 400 "looks fake or invalid") is a dead letter with Mailchimp's `detail`.

use async_trait::async_trait;
use collector_core::pii::PiiKind;
use serde_json::{json, Value};

use super::{call, http_client, Destination, DestinationConfig, Erasure, Item, SendError, What};

pub struct Mailchimp {
    name: String,
    base: String,
    list: String,
    key: String,
    http: reqwest::Client,
}

/// Mailchimp's subscriber hash: MD5 of the lower-cased address.
pub fn subscriber_hash(email: &str) -> String {
    use md5::{Digest, Md5};
    hex::encode(Md5::digest(email.trim().to_lowercase().as_bytes()))
}

impl Mailchimp {
    pub fn new(cfg: &DestinationConfig) -> anyhow::Result<Mailchimp> {
        Ok(Mailchimp {
            name: cfg.name.clone(),
            base: cfg.base_url.trim_end_matches('/').to_string(),
            list: cfg.list_id.clone().unwrap_or_default(),
            key: cfg.secret()?,
            http: http_client(cfg)?,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        missing_is_done: bool,
    ) -> Result<String, SendError> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .basic_auth("collector", Some(&self.key));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let answer = call(&self.name, req).await?;
        if missing_is_done && answer.status.as_u16() == 404 {
            return Ok(format!("{} (already gone)", answer.status));
        }
        let err: Value = serde_json::from_str(&answer.text).unwrap_or(Value::Null);
        let message = err["detail"]
            .as_str()
            .or(err["title"].as_str())
            .map(str::to_string);
        answer.result(&self.name, message, false)
    }
}

#[async_trait]
impl Destination for Mailchimp {
    async fn send(&self, items: &[Item]) -> Result<(), SendError> {
        for item in items {
            let Some(email) = item.contact.email.as_deref() else {
                return Err(SendError::Reject {
                    error: format!("{}: no email for {}", self.name, item.key),
                });
            };
            let member = format!("/lists/{}/members/{}", self.list, subscriber_hash(email));
            let (audience, entered, withdrawn) = match &item.what {
                What::Audience {
                    audience,
                    entered,
                    withdrawn,
                } => (audience.as_str(), *entered, *withdrawn),
                What::Event { .. } => {
                    return Err(SendError::Reject {
                        error: format!("{}: takes audiences, not events", self.name),
                    })
                }
            };
            if withdrawn {
                self.call(reqwest::Method::DELETE, &member, None, true)
                    .await?;
                continue;
            }
            if entered {
                self.call(
                    reqwest::Method::PUT,
                    &member,
                    Some(json!({"email_address": email, "status_if_new": "subscribed"})),
                    false,
                )
                .await?;
            }
            self.call(
                reqwest::Method::POST,
                &format!("{member}/tags"),
                Some(json!({"tags": [{"name": audience, "status": if entered { "active" } else { "inactive" }}]})),
                !entered,
            )
            .await?;
        }
        Ok(())
    }

    fn removes(&self) -> bool {
        true
    }

    /// Reads the list (`GET /lists/{list_id}?fields=id,name`): checks the data centre,
    /// the key and the list, changes nothing.
    async fn test(&self) -> Result<String, SendError> {
        self.call(
            reqwest::Method::GET,
            &format!("/lists/{}?fields=id,name", self.list),
            None,
            false,
        )
        .await
    }

    fn contact_kinds(&self) -> &'static [PiiKind] {
        &[PiiKind::Email]
    }

    fn requires_contact(&self) -> bool {
        true
    }

    fn max_batch(&self) -> usize {
        1
    }

    /// `POST /lists/{list_id}/members/{hash}/actions/delete-permanent`: the member and
    /// their history are gone for good (a member it never had answers 404: done).
    async fn erase(&self, who: &Erasure) -> Option<Result<String, SendError>> {
        let Some(email) = who.contact.email.as_deref() else {
            return Some(Ok(
                "no sealed email is stored for this person, so none was sent here".into(),
            ));
        };
        let path = format!(
            "/lists/{}/members/{}/actions/delete-permanent",
            self.list,
            subscriber_hash(email)
        );
        Some(self.call(reqwest::Method::POST, &path, None, true).await)
    }
}
