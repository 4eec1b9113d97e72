//! The event model (Segment spec) and per-event validation/normalisation.
//!
//! An accepted event is kept as its full JSON object (unknown fields included, `null`
//! fields removed, `writeKey` removed) plus a few typed header fields the queue and the
//! agent need without re-parsing. The server fills `messageId` when absent and sets
//! `receivedAt`, `timestamp` (skew-corrected), `originalTimestamp` and `sentAt`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::EventError;
use crate::limits::MAX_ID_CHARS;
use crate::note::Note;
use crate::privacy::{PrivacyEngine, RequestSignals};
use crate::timestamp::{correct_skew, format_ms, parse_ms};

/// The six Segment call types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    Track,
    Page,
    Identify,
    Group,
    Alias,
    Screen,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        EventKind::Track,
        EventKind::Page,
        EventKind::Identify,
        EventKind::Group,
        EventKind::Alias,
        EventKind::Screen,
    ];

    /// The `type` value on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Track => "track",
            EventKind::Page => "page",
            EventKind::Identify => "identify",
            EventKind::Group => "group",
            EventKind::Alias => "alias",
            EventKind::Screen => "screen",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The warehouse table this kind lands in (Segment's warehouse names).
    pub fn table(self) -> &'static str {
        match self {
            EventKind::Track => "tracks",
            EventKind::Page => "pages",
            EventKind::Identify => "identifies",
            EventKind::Group => "groups",
            EventKind::Alias => "aliases",
            EventKind::Screen => "screens",
        }
    }
}

/// [`crate::privacy::EVIDENCE_PATH`], one key per level.
const EVIDENCE_PATH_PARTS: [&str; 3] = ["context", "consent", "resolved"];

/// An accepted, normalised event as it travels from the edge to the warehouse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub message_id: String,
    pub kind: EventKind,
    pub anonymous_id: Option<String>,
    pub user_id: Option<String>,
    pub received_at_ms: i64,
    pub timestamp_ms: i64,
    /// The whole normalised event object, as JSON text.
    pub json: String,
}

/// What the request around an event contributes to it.
#[derive(Debug, Clone, Default)]
pub struct EventEnvelope<'a> {
    /// The type implied by the endpoint (`/v1/track` ⇒ track); `None` for `/v1/batch`.
    pub kind_from_path: Option<EventKind>,
    /// A batch's top-level `context`, merged under each event's own.
    pub context: Option<&'a Map<String, Value>>,
    /// A batch's top-level `integrations`, merged under each event's own.
    pub integrations: Option<&'a Map<String, Value>>,
    /// A batch's top-level `sentAt`, used when the event has none.
    pub sent_at_ms: Option<i64>,
    /// When the edge received the request.
    pub received_at_ms: i64,
    /// The privacy policy to enforce and what the request says about consent; `None`
    /// stores events as sent (the agent's tests, tools).
    pub privacy: Option<(&'a PrivacyEngine, &'a RequestSignals)>,
}

/// A valid event is either stored, or withheld by the privacy policy (not an error of
/// the client's: it is counted with its reason, and the request still succeeds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Stored {
        event: StoredEvent,
        /// What to count about it (untrusted clock, PII found, …).
        notes: Vec<Note>,
    },
    Withheld {
        message_id: String,
        reason: String,
        notes: Vec<Note>,
    },
}

/// Validates and normalises one event. `new_id` is called only when the event has no
/// `messageId`, so the caller owns randomness.
pub fn normalize(
    value: Value,
    env: &EventEnvelope<'_>,
    new_id: &mut dyn FnMut() -> String,
) -> Result<Outcome, EventError> {
    let Value::Object(mut obj) = value else {
        return Err(EventError::NotAnObject);
    };
    // Segment libraries send `null` for absent fields: absent and null are the same.
    obj.retain(|_, v| !v.is_null());
    // The write key authenticates the request; it is never stored.
    obj.remove("writeKey");

    let kind = match env.kind_from_path {
        Some(kind) => kind,
        None => match obj.get("type") {
            None => return Err(EventError::MissingType),
            Some(Value::String(s)) => {
                EventKind::parse(s).ok_or_else(|| EventError::UnknownType(s.clone()))?
            }
            Some(_) => {
                return Err(EventError::WrongType {
                    field: "type",
                    expected: "a string",
                })
            }
        },
    };
    if obj.get("type").and_then(Value::as_str) != Some(kind.as_str()) {
        obj.insert("type".into(), Value::String(kind.as_str().into()));
    }

    let anonymous_id = take_id(&mut obj, "anonymousId")?;
    let user_id = take_id(&mut obj, "userId")?;
    if anonymous_id.is_none() && user_id.is_none() {
        return Err(EventError::MissingIdentity);
    }
    let message_id = match take_id(&mut obj, "messageId")? {
        Some(id) => id,
        None => {
            let id = new_id();
            obj.insert("messageId".into(), Value::String(id.clone()));
            id
        }
    };

    match kind {
        EventKind::Track => match obj.get("event") {
            Some(Value::String(s)) if !s.trim().is_empty() => {}
            Some(Value::String(_)) | None => return Err(EventError::MissingField("event")),
            Some(_) => {
                return Err(EventError::WrongType {
                    field: "event",
                    expected: "a string",
                })
            }
        },
        EventKind::Group => {
            if take_id(&mut obj, "groupId")?.is_none() {
                return Err(EventError::MissingField("groupId"));
            }
        }
        EventKind::Alias => {
            if take_id(&mut obj, "previousId")?.is_none() {
                return Err(EventError::MissingField("previousId"));
            }
        }
        EventKind::Page | EventKind::Identify | EventKind::Screen => {}
    }
    for field in ["name", "category"] {
        if let Some(v) = obj.get(field) {
            if !v.is_string() {
                return Err(EventError::WrongType {
                    field: if field == "name" { "name" } else { "category" },
                    expected: "a string",
                });
            }
        }
    }
    for field in ["properties", "traits", "context", "integrations"] {
        if let Some(v) = obj.get(field) {
            if !v.is_object() {
                return Err(EventError::WrongType {
                    field: static_field(field),
                    expected: "an object",
                });
            }
        }
    }
    merge_under(&mut obj, "context", env.context);
    merge_under(&mut obj, "integrations", env.integrations);

    let sent_ms = take_time(&obj, "sentAt")?.or(env.sent_at_ms);
    let original_ms = match take_time(&obj, "originalTimestamp")? {
        Some(ms) => Some(ms),
        None => take_time(&obj, "timestamp")?,
    };
    let corrected = correct_skew(env.received_at_ms, sent_ms, original_ms);
    let mut notes = Vec::new();
    if !corrected.trusted {
        notes.push(Note::ClockUntrusted);
    }
    obj.insert("receivedAt".into(), format_ms(env.received_at_ms).into());
    set_string(&mut obj, "timestamp", format_ms(corrected.timestamp_ms));
    if let Some(ms) = corrected.original_ms {
        set_string(&mut obj, "originalTimestamp", format_ms(ms));
    }
    if let Some(ms) = sent_ms {
        set_string(&mut obj, "sentAt", format_ms(ms));
    }

    let mut evidence = None;
    let (anonymous_id, user_id) = match env.privacy {
        None => (anonymous_id, user_id),
        Some((engine, signals)) => {
            match engine.apply_spliced(&mut obj, signals) {
                Err(dropped) => {
                    notes.extend(dropped.notes);
                    return Ok(Outcome::Withheld {
                        message_id,
                        reason: dropped.reason,
                        notes,
                    });
                }
                Ok((applied, text)) => {
                    notes.extend(applied.notes);
                    evidence = Some(text);
                }
            }
            // Anonymisation may have removed or replaced the ids.
            let id = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
            let ids = (id("anonymousId"), id("userId"));
            let list = &engine.policy.block_list;
            if [&ids.0, &ids.1]
                .iter()
                .any(|v| v.as_deref().is_some_and(|v| list.blocked(v).is_some()))
            {
                notes.push(Note::BlockedId);
            }
            ids
        }
    };
    // Written straight into a `String`, the consent evidence spliced in as the text
    // the engine wrote (no `Value` tree for it, no `io::Write` adapter).
    let mut json = String::with_capacity(512);
    match &evidence {
        Some(text) => {
            crate::json_text::push_object_with(&mut json, &obj, &EVIDENCE_PATH_PARTS, text)
        }
        None => crate::json_text::push_object_with(&mut json, &obj, &[], ""),
    }
    Ok(Outcome::Stored {
        event: StoredEvent {
            message_id,
            kind,
            anonymous_id,
            user_id,
            received_at_ms: env.received_at_ms,
            timestamp_ms: corrected.timestamp_ms,
            json,
        },
        notes,
    })
}

/// Sets `key` to the string `v`, in place when the key is there (no new key `String`).
fn set_string(obj: &mut Map<String, Value>, key: &'static str, v: String) {
    match obj.get_mut(key) {
        Some(slot) => *slot = Value::String(v),
        None => {
            obj.insert(key.into(), Value::String(v));
        }
    }
}

fn static_field(field: &str) -> &'static str {
    match field {
        "properties" => "properties",
        "traits" => "traits",
        "context" => "context",
        _ => "integrations",
    }
}

/// Reads an id field: a non-empty string, or a number (coerced to its decimal text, as
/// Segment does). An empty string counts as absent. The object is updated to hold the
/// string form.
fn take_id(
    obj: &mut Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, EventError> {
    // Whether the object must be updated to hold the string form.
    let mut coerced = false;
    let id = match obj.get(field) {
        None => return Ok(None),
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => {
            coerced = true;
            Some(n.to_string())
        }
        Some(_) => {
            return Err(EventError::WrongType {
                field,
                expected: "a string",
            })
        }
    };
    match id {
        None => {
            obj.remove(field);
            Ok(None)
        }
        Some(id) if id.chars().count() > MAX_ID_CHARS => Err(EventError::FieldTooLong {
            field,
            limit: MAX_ID_CHARS,
        }),
        Some(id) => {
            if coerced {
                obj.insert(field.into(), Value::String(id.clone()));
            }
            Ok(Some(id))
        }
    }
}

fn take_time(obj: &Map<String, Value>, field: &'static str) -> Result<Option<i64>, EventError> {
    match obj.get(field) {
        None => Ok(None),
        Some(Value::String(s)) => parse_ms(s)
            .map(Some)
            .ok_or_else(|| EventError::BadTimestamp {
                field,
                value: s.chars().take(64).collect(),
            }),
        Some(_) => Err(EventError::WrongType {
            field,
            expected: "an ISO-8601 date-time string",
        }),
    }
}

/// Adds the batch-level object's keys under the event's own (the event wins).
fn merge_under(obj: &mut Map<String, Value>, field: &str, batch: Option<&Map<String, Value>>) {
    let Some(batch) = batch else { return };
    if batch.is_empty() {
        return;
    }
    let entry = obj
        .entry(field.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(own) = entry {
        for (k, v) in batch {
            if !own.contains_key(k) {
                own.insert(k.clone(), v.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_evidence_path_is_the_privacy_engines() {
        assert_eq!(
            super::EVIDENCE_PATH_PARTS.join("."),
            crate::privacy::EVIDENCE_PATH
        );
    }
}
