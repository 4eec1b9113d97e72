//! `collector-agent profile <id>`: one person, found by any of their ids (or their
//! `person_id`): ids, traits, consent, and their latest events.

use std::future::Future;

use serde::Serialize;
use serde_json::Value;

use crate::sinks::{lit, Dialect, QueryResult};

/// One person, as printed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Profile {
    pub person_id: String,
    pub user_ids: Value,
    pub anonymous_ids: Value,
    pub emails: Value,
    pub first_seen: Option<String>,
    pub last_seen: Option<String>,
    pub event_count: u64,
    pub traits: Value,
    pub consent: Value,
    /// The latest events: `[timestamp, type, name, message_id]`, newest first.
    pub last_events: Vec<Vec<Option<String>>>,
}

/// How many of the latest events a profile shows.
pub const LAST_EVENTS: usize = 10;

/// Looks a person up by any id, through `query` in a warehouse of dialect `d`.
pub async fn lookup<F, Fut>(d: Dialect, id: &str, mut query: F) -> anyhow::Result<Option<Profile>>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = anyhow::Result<QueryResult>>,
{
    let id = lit(d, id);
    let found = query(format!(
        "SELECT person_id FROM identities WHERE id_value = {id} OR person_id = {id} ORDER BY person_id LIMIT 1"
    ))
    .await?;
    let Some(person) = found.rows.first().and_then(|r| r[0].clone()) else {
        return Ok(None);
    };
    let p = lit(d, &person);
    let r = query(format!(
        "SELECT CAST(user_ids AS VARCHAR), CAST(anonymous_ids AS VARCHAR), CAST(emails AS VARCHAR), first_seen, last_seen,
                event_count, CAST(traits AS VARCHAR), CAST(consent AS VARCHAR)
         FROM profiles WHERE person_id = {p}"
    ))
    .await?;
    let Some(row) = r.rows.into_iter().next() else {
        return Ok(None);
    };
    let json = |v: &Option<String>| -> Value {
        v.as_deref()
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or(Value::Null)
    };
    let sources = [
        ("tracks", "track", "event_text"),
        ("pages", "page", "name"),
        ("screens", "screen", "name"),
        // A NULL text every dialect reads (ClickHouse cannot CAST NULL to VARCHAR).
        ("identifies", "identify", "NULLIF('', '')"),
        ("groups", "group", "group_id"),
        ("aliases", "alias", "previous_id"),
    ];
    let union = sources
        .iter()
        .map(|(t, kind, name)| {
            format!(
                "SELECT timestamp AS ts, '{kind}' AS type, {name} AS name, message_id, anonymous_id, user_id FROM {t}"
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let events = query(format!(
        "SELECT ts, type, name, message_id FROM ({union}) e
         WHERE anonymous_id IN (SELECT id_value FROM identities WHERE person_id = {p} AND id_type = 'anonymous_id')
            OR user_id IN (SELECT id_value FROM identities WHERE person_id = {p} AND id_type = 'user_id')
         ORDER BY ts DESC, message_id DESC LIMIT {LAST_EVENTS}"
    ))
    .await?;
    Ok(Some(Profile {
        person_id: person,
        user_ids: json(&row[0]),
        anonymous_ids: json(&row[1]),
        emails: json(&row[2]),
        first_seen: row[3].clone(),
        last_seen: row[4].clone(),
        event_count: row[5].as_deref().and_then(|n| n.parse().ok()).unwrap_or(0),
        traits: json(&row[6]),
        consent: json(&row[7]),
        last_events: events.rows,
    }))
}

impl Profile {
    /// The profile as a person reads it.
    pub fn to_text(&self) -> String {
        let list = |v: &Value| match v {
            Value::Array(a) if !a.is_empty() => a
                .iter()
                .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join(", "),
            _ => "-".into(),
        };
        let mut out = format!(
            "person {}\n  user ids:      {}\n  anonymous ids: {}\n  emails (hashed): {}\n  first seen: {}  last seen: {}  events: {}\n",
            self.person_id,
            list(&self.user_ids),
            list(&self.anonymous_ids),
            list(&self.emails),
            self.first_seen.as_deref().unwrap_or("-"),
            self.last_seen.as_deref().unwrap_or("-"),
            self.event_count
        );
        out.push_str("traits:\n");
        match &self.traits {
            Value::Object(m) if !m.is_empty() => {
                for (k, v) in m {
                    out.push_str(&format!("  {k} = {v}\n"));
                }
            }
            _ => out.push_str("  (none)\n"),
        }
        out.push_str("consent:\n");
        match &self.consent {
            Value::Object(m) if !m.is_empty() => {
                for (k, v) in m {
                    let granted = if v["granted"].as_bool() == Some(true) {
                        "granted"
                    } else {
                        "denied"
                    };
                    out.push_str(&format!(
                        "  {k}: {granted} ({}, policy {}, {})\n",
                        v["source"].as_str().unwrap_or("?"),
                        v["policy_version"].as_str().unwrap_or("?"),
                        v["at"].as_str().unwrap_or("?")
                    ));
                }
            }
            _ => out.push_str("  (no consent evidence)\n"),
        }
        out.push_str("last events:\n");
        for e in &self.last_events {
            let c = |i: usize| e.get(i).cloned().flatten().unwrap_or_default();
            out.push_str(&format!("  {}  {:<9} {}  ({})\n", c(0), c(1), c(2), c(3)));
        }
        out
    }
}
