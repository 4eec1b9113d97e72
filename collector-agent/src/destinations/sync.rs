//! One sync pass of a destination: enqueue, then send what is due, checking consent
//! before every attempt.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{json, Value};

use super::outbox::{candidates_sql, continuation_sql, enqueue_sql};
use super::{Contact, Destination, DestinationConfig, Item, SendError, What};
use crate::audiences::eval::at;
use crate::sinks::{sql_lit, Dialect, SinkError, SqlSession};
use collector_core::pii::PiiKind;

/// Most batches one pass sends per destination (the rest waits for the next pass, so
/// loads are not held up).
const MAX_BATCHES: usize = 50;
/// Backoff of the first retry, and the longest.
const BASE_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(3_600);

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncStats {
    pub enqueued: u64,
    pub sent: u64,
    /// Not sent: the person's consent does not allow this destination.
    pub withheld: u64,
    /// Not sent: the stay ended before its entry went out.
    pub superseded: u64,
    pub retried: u64,
    pub dead: u64,
}

/// One outbox row due.
#[derive(Debug, Clone)]
struct Row {
    key: String,
    person_id: Option<String>,
    audience: Option<String>,
    entered: bool,
    /// An exit because consent no longer allows the destination (not the audience).
    withdrawn: bool,
    entered_at: Option<String>,
    message_id: Option<String>,
    attempts: i64,
    created_ms: i64,
}

/// A decision about one row, recorded in the outbox and the log.
struct Outcome {
    key: String,
    person_id: Option<String>,
    status: &'static str,
    detail: Option<String>,
    consent: Option<Value>,
}

/// Everything a destination needs to know for one pass.
pub struct Target<'a> {
    pub cfg: &'a DestinationConfig,
    pub dest: &'a dyn Destination,
    /// The consent categories `privacy.toml` requires for it.
    pub categories: &'a [String],
    /// How to open sealed contact fields (`seal_key_env`), when configured.
    pub contacts: Option<&'a super::Contacts>,
}

/// Enqueues and sends for one destination at `now_ms`.
pub async fn sync(
    s: &mut dyn SqlSession,
    t: &Target<'_>,
    now_ms: i64,
) -> Result<SyncStats, SinkError> {
    let mut stats = SyncStats {
        enqueued: enqueue(s, t, now_ms).await?,
        ..SyncStats::default()
    };
    for _ in 0..MAX_BATCHES {
        let limit = t.cfg.batch_size.min(t.dest.max_batch()).max(1);
        let rows = due(s, &t.cfg.name, limit, now_ms).await?;
        if rows.is_empty() {
            break;
        }
        send_rows(s, t, rows, now_ms, &mut stats).await?;
    }
    Ok(stats)
}

/// Fills the outbox (one transaction); the rows it added.
pub async fn enqueue(
    s: &mut dyn SqlSession,
    t: &Target<'_>,
    now_ms: i64,
) -> Result<u64, SinkError> {
    let d = s.dialect();
    s.batch("BEGIN").await?;
    let mut n = 0;
    let continuations = continuation_sql(d, &t.cfg.name, &t.cfg.audiences, now_ms);
    for sql in continuations
        .into_iter()
        .chain(enqueue_sql(&candidates(d, t, now_ms), d, now_ms))
    {
        match s.execute(&sql).await {
            Ok(k) => n += k,
            Err(e) => {
                let _ = s.batch("ROLLBACK").await;
                return Err(e);
            }
        }
    }
    s.batch("COMMIT").await?;
    Ok(n)
}

/// The queries of what `t` should be sent at `now_ms` ([`candidates_sql`]).
fn candidates(d: Dialect, t: &Target<'_>, now_ms: i64) -> Vec<String> {
    let age = i64::try_from(t.cfg.max_event_age().as_millis()).unwrap_or(i64::MAX);
    candidates_sql(
        d,
        &t.cfg.name,
        &t.cfg.audiences,
        &t.cfg.events,
        t.categories,
        age,
        now_ms,
    )
}

fn ms_of(rfc3339: &str) -> i64 {
    collector_core::timestamp::parse_ms(rfc3339).unwrap_or(0)
}

async fn due(
    s: &mut dyn SqlSession,
    destination: &str,
    limit: usize,
    now_ms: i64,
) -> Result<Vec<Row>, SinkError> {
    let d = s.dialect();
    let r = s
        .query(&format!(
            "SELECT key, person_id, audience, transition, entered_at, message_id, attempts, created_at FROM activation_outbox
             WHERE destination = {} AND status = 'pending' AND next_attempt_at <= {}
             ORDER BY created_at, key LIMIT {}",
            sql_lit(destination),
            at(d, now_ms),
            limit
        ))
        .await?;
    Ok(r.rows
        .into_iter()
        .map(|r| {
            let attempts = r[6].as_deref().and_then(|n| n.parse().ok()).unwrap_or(0);
            let created = r[7].as_deref().map_or(now_ms, ms_of);
            Row::of(&r, attempts, created)
        })
        .collect())
}

impl Row {
    /// A row from `key, person_id, audience, transition, entered_at, message_id`.
    fn of(r: &[Option<String>], attempts: i64, created_ms: i64) -> Row {
        Row {
            key: r[0].clone().unwrap_or_default(),
            person_id: r[1].clone(),
            audience: r[2].clone(),
            entered: r[3].as_deref() == Some("entered"),
            withdrawn: r[3].as_deref() == Some("withdrawn"),
            entered_at: r[4].clone(),
            message_id: r[5].clone(),
            attempts,
            created_ms,
        }
    }
}

use crate::sinks::sql_list as in_list;

/// Whether `consent` (a profile's, or an event's evidence turned into the same shape)
/// grants every category.
fn allows(consent: &Value, categories: &[String]) -> bool {
    categories
        .iter()
        .all(|c| consent[c.as_str()]["granted"].as_bool() == Some(true))
}

/// An event's own evidence (`context.consent.resolved`) in the profile's shape.
fn evidence_consent(raw: &Value) -> Value {
    let r = &raw["context"]["consent"]["resolved"];
    let mut out = serde_json::Map::new();
    for (granted, key) in [(true, "granted"), (false, "denied")] {
        for c in r[key].as_array().into_iter().flatten() {
            if let Some(c) = c.as_str() {
                out.insert(
                    c.to_string(),
                    json!({"granted": granted, "source": r["sources"][c], "policy_version": r["policy_version"]}),
                );
            }
        }
    }
    Value::Object(out)
}

/// Rows decided: what to send, and what not with why.
struct Decided {
    items: Vec<Item>,
    outcomes: Vec<Outcome>,
    by_key: HashMap<String, Row>,
    /// Person → (user ids, traits, consent).
    profiles: HashMap<String, (Value, Value, Value)>,
}

/// Decides and sends one batch of due rows.
async fn send_rows(
    s: &mut dyn SqlSession,
    t: &Target<'_>,
    rows: Vec<Row>,
    now_ms: i64,
    stats: &mut SyncStats,
) -> Result<(), SinkError> {
    let d = s.dialect();
    let Decided {
        items,
        mut outcomes,
        by_key,
        profiles,
    } = decide(s, t, rows, stats).await?;
    // Send, splitting a rejected batch until the item at fault is alone.
    let mut pending = vec![items];
    let mut last_call = None;
    while let Some(batch) = pending.pop() {
        if batch.is_empty() {
            continue;
        }
        pace(t.cfg, &mut last_call).await;
        // A destination's answer may quote the address it was sent (Twilio's 21211
        // does): it is scrubbed before anything is logged or written.
        let result = t
            .dest
            .send(&batch)
            .await
            .map_err(|e| redact_error(e, &batch));
        match result {
            Ok(()) => {
                for i in &batch {
                    stats.sent += 1;
                    let consent = i
                        .person_id
                        .as_ref()
                        .and_then(|p| profiles.get(p))
                        .map(|p| p.2.clone());
                    outcomes.push(Outcome {
                        key: i.key.clone(),
                        person_id: i.person_id.clone(),
                        status: "sent",
                        detail: None,
                        consent,
                    });
                }
            }
            Err(SendError::Reject { error }) if batch.len() > 1 => {
                tracing::info!(destination = %t.cfg.name, items = batch.len(), %error, "batch rejected; splitting it to find the item at fault");
                let mut a = batch;
                let b = a.split_off(a.len() / 2);
                pending.push(b);
                pending.push(a);
            }
            Err(SendError::Reject { error }) => {
                stats.dead += 1;
                outcomes.push(Outcome {
                    key: batch[0].key.clone(),
                    person_id: batch[0].person_id.clone(),
                    status: "dead",
                    detail: Some(error),
                    consent: None,
                });
            }
            Err(SendError::Retry { error, after }) => {
                tracing::warn!(destination = %t.cfg.name, %error, "send failed; retried later");
                for i in &batch {
                    let row = &by_key[&i.key];
                    let wait = backoff(row.attempts).max(after.unwrap_or_default());
                    let next = now_ms + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2);
                    let give_up = row.created_ms
                        + i64::try_from(t.cfg.retry_for().as_millis()).unwrap_or(i64::MAX / 2);
                    if next > give_up {
                        stats.dead += 1;
                        outcomes.push(Outcome {
                            key: i.key.clone(),
                            person_id: i.person_id.clone(),
                            status: "dead",
                            detail: Some(format!(
                                "still failing after {}: {error}",
                                t.cfg.retry_for
                            )),
                            consent: None,
                        });
                    } else {
                        stats.retried += 1;
                        s.execute(&format!(
                            "UPDATE activation_outbox SET attempts = attempts + 1, next_attempt_at = {}, last_error = {} WHERE key = {}",
                            at(d, next),
                            sql_lit(&error),
                            sql_lit(&i.key)
                        ))
                        .await?;
                    }
                }
            }
        }
    }
    record(s, t, outcomes, now_ms).await
}

/// Decides due rows: whom the destination may receive now (consent, open stays), and
/// the payload of each item.
async fn decide(
    s: &mut dyn SqlSession,
    t: &Target<'_>,
    rows: Vec<Row>,
    stats: &mut SyncStats,
) -> Result<Decided, SinkError> {
    let d = s.dialect();
    let tt = super::outbox::text(d);
    // The people of the events, by their ids.
    let mids: Vec<&String> = rows.iter().filter_map(|r| r.message_id.as_ref()).collect();
    let mut events: HashMap<String, (Value, Option<String>)> = HashMap::new();
    if !mids.is_empty() {
        let r = s
            .query(&format!(
                "SELECT t.message_id, CAST(t.raw AS {tt}),
                   (SELECT i.person_id FROM identities i WHERE (i.id_type = 'user_id' AND i.id_value = t.user_id)
                      OR (i.id_type = 'anonymous_id' AND i.id_value = t.anonymous_id) ORDER BY i.id_type DESC LIMIT 1)
                 FROM tracks t WHERE t.message_id IN ({})",
                in_list(mids.into_iter())
            ))
            .await?;
        for row in r.rows {
            let raw = row[1]
                .as_deref()
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or(Value::Null);
            events.insert(row[0].clone().unwrap_or_default(), (raw, row[2].clone()));
        }
    }
    let people: HashSet<String> = rows
        .iter()
        .filter_map(|r| r.person_id.clone())
        .chain(events.values().filter_map(|(_, p)| p.clone()))
        .collect();
    let mut profiles: HashMap<String, (Value, Value, Value)> = HashMap::new();
    if !people.is_empty() {
        let r = s
            .query(&format!(
                "SELECT person_id, CAST(user_ids AS {tt}), CAST(traits AS {tt}), CAST(consent AS {tt}) FROM profiles WHERE person_id IN ({})",
                in_list(people.iter())
            ))
            .await?;
        let json = |v: &Option<String>| {
            v.as_deref()
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or(Value::Null)
        };
        for row in r.rows {
            profiles.insert(
                row[0].clone().unwrap_or_default(),
                (json(&row[1]), json(&row[2]), json(&row[3])),
            );
        }
    }
    // Stays still open (an entry whose stay ended is not sent).
    let open: HashSet<(String, String, String)> = if rows.iter().any(|r| r.entered) {
        s.query(&format!(
            "SELECT person_id, audience, entered_at FROM audience_membership WHERE exited_at IS NULL AND person_id IN ({})",
            in_list(rows.iter().filter_map(|r| r.person_id.as_ref()))
        ))
        .await?
        .rows
        .into_iter()
        .map(|r| {
            (
                r[0].clone().unwrap_or_default(),
                r[1].clone().unwrap_or_default(),
                r[2].clone().unwrap_or_default(),
            )
        })
        .collect()
    } else {
        HashSet::new()
    };

    let mut outcomes = Vec::new();
    let mut items = Vec::new();
    let mut by_key: HashMap<String, Row> = HashMap::new();
    for row in rows {
        let settle = |status: &'static str, detail: String, consent: Option<Value>| Outcome {
            key: row.key.clone(),
            person_id: row.person_id.clone(),
            status,
            detail: Some(detail),
            consent,
        };
        let item = match (&row.audience, &row.message_id) {
            (Some(audience), _) => {
                let person = row.person_id.clone().unwrap_or_default();
                let profile = profiles.get(&person);
                if row.entered {
                    let stay = (
                        person.clone(),
                        audience.clone(),
                        row.entered_at.clone().unwrap_or_default(),
                    );
                    if !open.contains(&stay) {
                        stats.superseded += 1;
                        outcomes.push(settle(
                            "superseded",
                            "the stay ended before its entry was sent".into(),
                            None,
                        ));
                        continue;
                    }
                    let consent = profile.map_or(Value::Null, |p| p.2.clone());
                    if !allows(&consent, t.categories) {
                        stats.withheld += 1;
                        outcomes.push(settle(
                            "withheld",
                            format!("consent does not grant {}", t.categories.join(", ")),
                            Some(consent),
                        ));
                        continue;
                    }
                } else if !t.dest.removes() {
                    outcomes.push(settle(
                        "skipped",
                        "the destination cannot remove people".into(),
                        None,
                    ));
                    continue;
                }
                let payload = match profile {
                    Some((ids, traits, _)) if row.entered => {
                        json!({"user_ids": ids, "traits": traits})
                    }
                    Some((ids, _, _)) => json!({"user_ids": ids}),
                    None => json!({}),
                };
                Item {
                    key: row.key.clone(),
                    person_id: Some(person),
                    what: What::Audience {
                        audience: audience.clone(),
                        entered: row.entered,
                        withdrawn: row.withdrawn,
                    },
                    payload,
                    contact: Contact::default(),
                }
            }
            (None, Some(mid)) => {
                let Some((raw, person)) = events.get(mid) else {
                    outcomes.push(settle(
                        "dead",
                        "the event is no longer in the warehouse".into(),
                        None,
                    ));
                    stats.dead += 1;
                    continue;
                };
                // Collected under consent, and still allowed now.
                let evidence = evidence_consent(raw);
                let current = person
                    .as_ref()
                    .and_then(|p| profiles.get(p))
                    .map(|p| p.2.clone());
                let consent = current.clone().unwrap_or_else(|| evidence.clone());
                if !allows(&evidence, t.categories) || !allows(&consent, t.categories) {
                    stats.withheld += 1;
                    outcomes.push(Outcome {
                        key: row.key.clone(),
                        person_id: person.clone(),
                        status: "withheld",
                        detail: Some(format!(
                            "consent does not grant {}",
                            t.categories.join(", ")
                        )),
                        consent: Some(json!({"event": evidence, "current": current})),
                    });
                    continue;
                }
                Item {
                    key: row.key.clone(),
                    person_id: person.clone(),
                    what: What::Event {
                        message_id: mid.clone(),
                    },
                    payload: raw.clone(),
                    contact: Contact::default(),
                }
            }
            (None, None) => {
                stats.dead += 1;
                outcomes.push(settle(
                    "dead",
                    "an outbox row with neither audience nor event".into(),
                    None,
                ));
                continue;
            }
        };
        by_key.insert(row.key.clone(), row);
        items.push(item);
    }
    let items = open_contacts(s, t, items, &events, &mut outcomes, stats).await?;
    Ok(Decided {
        items,
        outcomes,
        by_key,
        profiles,
    })
}

/// Opens the contact data the destination sends to, for each item: an event's own
/// sealed copies, or a person's latest from their events. An item that needs one and
/// has none is not sent (`unreachable`).
async fn open_contacts(
    s: &mut dyn SqlSession,
    t: &Target<'_>,
    items: Vec<Item>,
    events: &HashMap<String, (Value, Option<String>)>,
    outcomes: &mut Vec<Outcome>,
    stats: &mut SyncStats,
) -> Result<Vec<Item>, SinkError> {
    let kinds = t.dest.contact_kinds();
    if kinds.is_empty() || items.is_empty() {
        return Ok(items);
    }
    let paths: Vec<(PiiKind, &str)> = t
        .contacts
        .map(|c| {
            c.paths
                .iter()
                .filter(|(k, _)| kinds.contains(k))
                .map(|(k, p)| (*k, p.as_str()))
                .collect()
        })
        .unwrap_or_default();
    let people: Vec<&String> = items.iter().filter_map(|i| i.person_id.as_ref()).collect();
    let latest = latest_sealed(s, &paths, &people).await?;
    let mut out = Vec::new();
    for mut item in items {
        for (kind, path) in &paths {
            // An event's own sealed copy, else the person's latest.
            let own = match &item.what {
                What::Event { message_id } => events
                    .get(message_id)
                    .and_then(|(raw, _)| raw["context"]["sealed"][*path].as_str())
                    .map(str::to_string),
                What::Audience { .. } => None,
            };
            let sealed = own.or_else(|| {
                item.person_id
                    .as_ref()
                    .and_then(|p| latest.get(&(p.clone(), path.to_string())).cloned())
            });
            let Some(sealed) = sealed else { continue };
            let opened = t.contacts.and_then(|c| c.key.open(&sealed).ok());
            match kind {
                PiiKind::Email if item.contact.email.is_none() => item.contact.email = opened,
                PiiKind::Phone if item.contact.phone.is_none() => item.contact.phone = opened,
                _ => {}
            }
        }
        let reachable = item.contact.email.is_some() || item.contact.phone.is_some();
        // An exit needs no address where the destination keys people otherwise; one
        // that does will say so when it sends.
        if t.dest.requires_contact() && !reachable {
            stats.withheld += 1;
            outcomes.push(Outcome {
                key: item.key.clone(),
                person_id: item.person_id.clone(),
                status: "unreachable",
                detail: Some(format!(
                    "no sealed {} to send to (privacy.toml fields with action = \"encrypt\", and the agent's seal_key_env)",
                    kinds
                        .iter()
                        .map(|k| format!("{k:?}").to_lowercase())
                        .collect::<Vec<_>>()
                        .join(" or ")
                )),
                consent: None,
            });
            continue;
        }
        out.push(item);
    }
    Ok(out)
}

/// Each person's latest sealed copy of each path (`(person, path)` → sealed text), from
/// identifies and tracks.
pub(crate) async fn latest_sealed(
    s: &mut dyn SqlSession,
    paths: &[(PiiKind, &str)],
    people: &[&String],
) -> Result<HashMap<(String, String), String>, SinkError> {
    let d = s.dialect();
    let mut latest: HashMap<(String, String), String> = HashMap::new();
    if people.is_empty() {
        return Ok(latest);
    }
    for (_, path) in paths {
        for table in ["identifies", "tracks"] {
            let v = crate::audiences::eval::json_text(d, "e.context", &["sealed", path]);
            let r = s
                .query(&format!(
                    "SELECT i.person_id, {v} FROM {table} e JOIN identities i
                       ON (i.id_type = 'user_id' AND i.id_value = e.user_id) OR (i.id_type = 'anonymous_id' AND i.id_value = e.anonymous_id)
                     WHERE i.person_id IN ({}) AND {v} IS NOT NULL
                     ORDER BY e.timestamp DESC, e.message_id DESC",
                    in_list(people.iter().copied())
                ))
                .await?;
            for row in r.rows {
                if let (Some(p), Some(v)) = (row[0].clone(), row[1].clone()) {
                    latest.entry((p, path.to_string())).or_insert(v);
                }
            }
        }
    }
    Ok(latest)
}

/// The contacts of `people` that `kinds` names, opened from their latest sealed copies
/// (for an erasure: the destination deletes them by address).
pub(crate) async fn person_contact(
    s: &mut dyn SqlSession,
    contacts: Option<&super::Contacts>,
    kinds: &[PiiKind],
    people: &[&String],
) -> Result<Contact, SinkError> {
    let mut out = Contact::default();
    let Some(c) = contacts else { return Ok(out) };
    let paths: Vec<(PiiKind, &str)> = c
        .paths
        .iter()
        .filter(|(k, _)| kinds.contains(k))
        .map(|(k, p)| (*k, p.as_str()))
        .collect();
    let latest = latest_sealed(s, &paths, people).await?;
    for (kind, path) in &paths {
        for p in people {
            let Some(sealed) = latest.get(&((*p).clone(), path.to_string())) else {
                continue;
            };
            let opened = c.key.open(sealed).ok();
            match kind {
                PiiKind::Email if out.email.is_none() => out.email = opened,
                PiiKind::Phone if out.phone.is_none() => out.phone = opened,
                _ => {}
            }
        }
    }
    Ok(out)
}

/// Writes the outcomes: the outbox rows' status and the log.
async fn record(
    s: &mut dyn SqlSession,
    t: &Target<'_>,
    outcomes: Vec<Outcome>,
    now_ms: i64,
) -> Result<(), SinkError> {
    if outcomes.is_empty() {
        return Ok(());
    }
    let d = s.dialect();
    let now = at(d, now_ms);
    let when = collector_core::timestamp::format_ms(now_ms);
    s.batch("BEGIN").await?;
    let mut log = Vec::new();
    for o in &outcomes {
        let error = o.detail.as_deref().filter(|_| o.status == "dead");
        if let Err(e) = s
            .execute(&format!(
                "UPDATE activation_outbox SET status = {}, done_at = {now}, attempts = attempts + {}, last_error = {} WHERE key = {}",
                sql_lit(o.status),
                i64::from(matches!(o.status, "sent" | "dead")),
                error.map_or("last_error".to_string(), sql_lit),
                sql_lit(&o.key)
            ))
            .await
        {
            let _ = s.batch("ROLLBACK").await;
            return Err(e);
        }
        log.push(vec![
            Some(when.clone()),
            Some(t.cfg.name.clone()),
            Some(o.key.clone()),
            o.person_id.clone(),
            Some(o.status.to_string()),
            Some(t.categories.join(",")),
            o.consent.as_ref().map(Value::to_string),
            o.detail.clone(),
        ]);
    }
    if let Err(e) = s.insert("activation_log", log).await {
        let _ = s.batch("ROLLBACK").await;
        return Err(e);
    }
    s.batch("COMMIT").await
}

/// `text` without the contact data (as sent, and as bare digits).
pub(crate) fn redact(text: &str, contact: &Contact) -> String {
    let mut text = text.to_string();
    for v in [&contact.email, &contact.phone].into_iter().flatten() {
        let digits: String = v.chars().filter(char::is_ascii_digit).collect();
        for form in [v.as_str(), v.trim_start_matches('+'), digits.as_str()] {
            if form.len() >= 5 {
                text = text.replace(form, "[contact]");
            }
        }
    }
    text
}

/// `e` without the contact data of `batch`.
fn redact_error(e: SendError, batch: &[Item]) -> SendError {
    let scrub = |text: String| batch.iter().fold(text, |t, i| redact(&t, &i.contact));
    match e {
        SendError::Retry { error, after } => SendError::Retry {
            error: scrub(error),
            after,
        },
        SendError::Reject { error } => SendError::Reject {
            error: scrub(error),
        },
    }
}

/// A random wait between half and all of `BASE · 2^attempts`, capped. Never near zero:
/// with full jitter a wait under a millisecond (one in a thousand first retries) made
/// the row due again at once, so the same pass called the failing destination again.
fn backoff(attempts: i64) -> Duration {
    let exp = BASE_BACKOFF
        .saturating_mul(1u32 << attempts.clamp(0, 20) as u32)
        .min(MAX_BACKOFF);
    crate::jittered(exp)
}

/// Waits so calls stay under `rate_limit` per second.
async fn pace(cfg: &DestinationConfig, last: &mut Option<tokio::time::Instant>) {
    let gap = Duration::from_secs(1) / cfg.rate_limit;
    if let Some(l) = *last {
        tokio::time::sleep_until(l + gap).await;
    }
    *last = Some(tokio::time::Instant::now());
}

/// What the next sync of a destination would do at `now_ms`, found with queries only:
/// nothing is sent or written.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DryRun {
    /// People who would be added to an audience (`audience: person_id`).
    pub add: Vec<String>,
    /// People who would be removed.
    pub remove: Vec<String>,
    /// Events that would be forwarded (message ids).
    pub events: Vec<String>,
    /// Not sent because consent does not allow this destination.
    pub withheld: u64,
    /// Entries whose stay ended before they went out.
    pub superseded: u64,
    /// Of the above, how many are retries of earlier attempts.
    pub retries: u64,
}

/// The most outbox rows a dry run looks at.
const DRY_RUN_ROWS: usize = 100_000;

pub async fn dry_run(
    s: &mut dyn SqlSession,
    t: &Target<'_>,
    now_ms: i64,
) -> Result<DryRun, SinkError> {
    let d = s.dialect();
    let mut rows = due(s, &t.cfg.name, DRY_RUN_ROWS, now_ms).await?;
    let retries = rows.iter().filter(|r| r.attempts > 0).count() as u64;
    for c in candidates(d, t, now_ms) {
        let r = s
            .query(&format!(
                "SELECT key, person_id, audience, transition, entered_at, message_id FROM ({c}) x
                 WHERE key NOT IN (SELECT key FROM activation_outbox) ORDER BY key LIMIT {DRY_RUN_ROWS}"
            ))
            .await?;
        rows.extend(r.rows.iter().map(|r| Row::of(r, 0, now_ms)));
    }
    let mut stats = SyncStats::default();
    let decided = decide(s, t, rows, &mut stats).await?;
    let mut out = DryRun {
        withheld: stats.withheld,
        superseded: stats.superseded,
        retries,
        ..DryRun::default()
    };
    for i in decided.items {
        let person = i.person_id.unwrap_or_default();
        match i.what {
            What::Audience {
                audience, entered, ..
            } if entered => {
                out.add.push(format!("{audience}: {person}"));
            }
            What::Audience { audience, .. } => out.remove.push(format!("{audience}: {person}")),
            What::Event { message_id } => out.events.push(message_id),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A retried row is never due again within the same pass: the wait is at least half
    // the step (full jitter gave < 1 ms about once in a thousand first retries, and the
    // activation test that hangs a destination then saw a third call).
    #[test]
    fn retry_waits_are_half_to_all_of_the_step_and_capped() {
        for _ in 0..5_000 {
            let w = backoff(0);
            assert!(w >= BASE_BACKOFF / 2 && w <= BASE_BACKOFF, "{w:?}");
        }
        let w = backoff(3);
        assert!(w >= BASE_BACKOFF * 4 && w <= BASE_BACKOFF * 8, "{w:?}");
        for attempts in [12, 20, 40, i64::MAX] {
            let w = backoff(attempts);
            assert!(
                w >= MAX_BACKOFF / 2 && w <= MAX_BACKOFF,
                "{attempts}: {w:?}"
            );
        }
    }

    #[test]
    fn answers_quoting_an_address_are_scrubbed() {
        let item = Item {
            key: "k".into(),
            person_id: None,
            what: What::Event {
                message_id: "m".into(),
            },
            payload: Value::Null,
            contact: Contact {
                email: Some("ann@example.com".into()),
                phone: Some("+4915123456789".into()),
            },
        };
        let e = SendError::Reject {
            error: "The 'To' number +4915123456789 (4915123456789) is invalid; ann@example.com looks fake".into(),
        };
        let SendError::Reject { error } = redact_error(e, &[item]) else {
            unreachable!()
        };
        assert_eq!(
            error,
            "The 'To' number [contact] ([contact]) is invalid; [contact] looks fake"
        );
    }
}
