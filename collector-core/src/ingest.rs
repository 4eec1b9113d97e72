//! Parsing one HTTP request body of the Segment tracking API into accepted events and
//! indexed rejections. Good events next to bad ones are always kept.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::error::{EventError, RequestError};
use crate::event::{normalize, EventEnvelope, EventKind, Outcome, StoredEvent};
use crate::limits::{MAX_BATCH_EVENTS, MAX_EVENT_BYTES, MAX_REQUEST_BYTES};
use crate::note::NoteCounts;
use crate::privacy::{PrivacyEngine, RequestSignals};
use crate::timestamp::parse_ms;

/// What an ingest path accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Single(EventKind),
    Batch,
}

/// Maps a request path to its endpoint: `/v1/track` and Segment's browser short form
/// `/v1/t`, and so on. Trailing slashes are tolerated.
pub fn endpoint_for_path(path: &str) -> Option<Endpoint> {
    let rest = path.strip_prefix("/v1/")?.trim_end_matches('/');
    Some(match rest {
        "track" | "t" => Endpoint::Single(EventKind::Track),
        "page" | "p" => Endpoint::Single(EventKind::Page),
        "identify" | "i" => Endpoint::Single(EventKind::Identify),
        "group" | "g" => Endpoint::Single(EventKind::Group),
        "alias" | "a" => Endpoint::Single(EventKind::Alias),
        "screen" | "s" => Endpoint::Single(EventKind::Screen),
        "batch" | "b" | "import" => Endpoint::Batch,
        _ => return None,
    })
}

/// One rejected event: its index in the batch (`None` for a single-event request) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub index: Option<usize>,
    pub error: EventError,
}

/// A valid event the privacy policy withheld, and why (the drop-counter key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Withheld {
    pub index: Option<usize>,
    pub message_id: String,
    pub reason: String,
}

/// The outcome of parsing a request body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    /// `writeKey` found in the body (browser `text/plain` requests carry it there).
    pub write_key: Option<String>,
    pub accepted: Vec<StoredEvent>,
    pub rejected: Vec<Rejection>,
    pub withheld: Vec<Withheld>,
    /// Events the client itself did not send, by reason (the browser SDK reports them in
    /// the batch body as `"dropped": {"queue_full": 2}`): counted at the edge as
    /// `client_<reason>`, so no event disappears without a count anywhere.
    pub client_drops: Vec<(String, u64)>,
    /// What was noticed about the events (kept or withheld), counted by key.
    pub notes: NoteCounts,
}

impl Parsed {
    fn record(&mut self, index: Option<usize>, result: Result<Outcome, EventError>) {
        match result {
            Ok(Outcome::Stored { event, notes }) => {
                self.notes.extend(notes);
                self.accepted.push(event);
            }
            Ok(Outcome::Withheld {
                message_id,
                reason,
                notes,
            }) => {
                self.notes.extend(notes);
                self.withheld.push(Withheld {
                    index,
                    message_id,
                    reason,
                });
            }
            Err(error) => self.rejected.push(Rejection { index, error }),
        }
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    batch: Option<&'a RawValue>,
    #[serde(rename = "writeKey", default)]
    write_key: Option<Value>,
    #[serde(default)]
    context: Option<Value>,
    #[serde(default)]
    integrations: Option<Value>,
    #[serde(rename = "sentAt", default)]
    sent_at: Option<Value>,
    #[serde(default)]
    dropped: Option<Value>,
}

/// Most reasons one request may report, and the largest count per reason.
const MAX_CLIENT_DROP_REASONS: usize = 32;
const MAX_CLIENT_DROP_COUNT: u64 = 1_000_000;

/// Reads a client's `"dropped": {"reason": count}` report. Never fails the request (the
/// events next to it matter more): entries that are not a short `[a-z0-9_]` reason with a
/// count in range are counted together as `client_report_invalid`.
fn client_drops_of(v: Option<Value>) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut invalid = 0u64;
    match v {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (reason, count) in m {
                let ok_reason = !reason.is_empty()
                    && reason.len() <= 48
                    && reason
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                match count.as_u64() {
                    Some(n)
                        if ok_reason
                            && n <= MAX_CLIENT_DROP_COUNT
                            && out.len() < MAX_CLIENT_DROP_REASONS =>
                    {
                        if n > 0 {
                            out.push((format!("client_{reason}"), n));
                        }
                    }
                    _ => invalid += 1,
                }
            }
        }
        Some(_) => invalid += 1,
    }
    out.sort();
    if invalid > 0 {
        out.push(("client_report_invalid".into(), invalid));
    }
    out
}

/// Parses a (decompressed) request body. `received_at_ms` is the edge's receive time;
/// `new_id` makes a `messageId` for events that have none.
pub fn parse_body(
    endpoint: Endpoint,
    body: &[u8],
    received_at_ms: i64,
    new_id: &mut dyn FnMut() -> String,
) -> Result<Parsed, RequestError> {
    parse_body_with_privacy(endpoint, body, received_at_ms, new_id, None)
}

/// [`parse_body`], enforcing a privacy policy on every valid event.
pub fn parse_body_with_privacy(
    endpoint: Endpoint,
    body: &[u8],
    received_at_ms: i64,
    new_id: &mut dyn FnMut() -> String,
    privacy: Option<(&PrivacyEngine, &RequestSignals)>,
) -> Result<Parsed, RequestError> {
    if body.len() > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLarge {
            size: body.len(),
            limit: MAX_REQUEST_BYTES,
        });
    }
    let text = std::str::from_utf8(body).map_err(|_| RequestError::NotUtf8)?;
    match endpoint {
        Endpoint::Single(kind) => parse_single(kind, text, received_at_ms, new_id, privacy),
        Endpoint::Batch => parse_batch(text, received_at_ms, new_id, privacy),
    }
}

fn parse_single(
    kind: EventKind,
    text: &str,
    received_at_ms: i64,
    new_id: &mut dyn FnMut() -> String,
    privacy: Option<(&PrivacyEngine, &RequestSignals)>,
) -> Result<Parsed, RequestError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| RequestError::MalformedJson(e.to_string()))?;
    if !value.is_object() {
        return Err(RequestError::NotAnObject);
    }
    let write_key = write_key_of(value.get("writeKey"))?;
    let mut parsed = Parsed {
        write_key,
        ..Parsed::default()
    };
    if text.len() > MAX_EVENT_BYTES {
        parsed.rejected.push(Rejection {
            index: None,
            error: EventError::TooLarge {
                size: text.len(),
                limit: MAX_EVENT_BYTES,
            },
        });
        return Ok(parsed);
    }
    let env = EventEnvelope {
        kind_from_path: Some(kind),
        received_at_ms,
        privacy,
        ..EventEnvelope::default()
    };
    let result = normalize(value, &env, new_id);
    parsed.record(None, result);
    Ok(parsed)
}

fn parse_batch(
    text: &str,
    received_at_ms: i64,
    new_id: &mut dyn FnMut() -> String,
    privacy: Option<(&PrivacyEngine, &RequestSignals)>,
) -> Result<Parsed, RequestError> {
    if !text.trim_start().starts_with('{') {
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => RequestError::NotAnObject,
            Err(e) => RequestError::MalformedJson(e.to_string()),
        });
    }
    let envelope: Envelope<'_> = match serde_json::from_str(text) {
        Ok(e) => e,
        Err(e) if e.is_data() => return Err(RequestError::NotAnObject),
        Err(e) => return Err(RequestError::MalformedJson(e.to_string())),
    };
    let raw_batch = envelope.batch.ok_or(RequestError::MissingBatch)?;
    if raw_batch.get() == "null" {
        return Err(RequestError::MissingBatch);
    }
    let items: Vec<&RawValue> =
        serde_json::from_str(raw_batch.get()).map_err(|_| RequestError::WrongType {
            field: "batch",
            expected: "an array",
        })?;
    if items.len() > MAX_BATCH_EVENTS {
        return Err(RequestError::TooManyEvents {
            count: items.len(),
            limit: MAX_BATCH_EVENTS,
        });
    }
    let context = object_of(envelope.context, "context")?;
    let integrations = object_of(envelope.integrations, "integrations")?;
    let sent_at_ms = match envelope.sent_at {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(parse_ms(&s).ok_or(RequestError::WrongType {
            field: "sentAt",
            expected: "an ISO-8601 date-time string",
        })?),
        Some(_) => {
            return Err(RequestError::WrongType {
                field: "sentAt",
                expected: "an ISO-8601 date-time string",
            })
        }
    };
    let mut parsed = Parsed {
        write_key: write_key_of(envelope.write_key.as_ref())?,
        client_drops: client_drops_of(envelope.dropped),
        ..Parsed::default()
    };
    let env = EventEnvelope {
        kind_from_path: None,
        context: context.as_ref(),
        integrations: integrations.as_ref(),
        sent_at_ms,
        received_at_ms,
        privacy,
    };
    for (index, raw) in items.into_iter().enumerate() {
        let size = raw.get().len();
        if size > MAX_EVENT_BYTES {
            parsed.rejected.push(Rejection {
                index: Some(index),
                error: EventError::TooLarge {
                    size,
                    limit: MAX_EVENT_BYTES,
                },
            });
            continue;
        }
        let result = serde_json::from_str::<Value>(raw.get())
            .map_err(|e| EventError::MalformedJson(e.to_string()))
            .and_then(|value| {
                if parsed.write_key.is_none() {
                    if let Some(Value::String(k)) = value.get("writeKey") {
                        parsed.write_key = Some(k.clone());
                    }
                }
                normalize(value, &env, new_id)
            });
        parsed.record(Some(index), result);
    }
    Ok(parsed)
}

fn write_key_of(v: Option<&Value>) -> Result<Option<String>, RequestError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(RequestError::WrongType {
            field: "writeKey",
            expected: "a string",
        }),
    }
}

fn object_of(
    v: Option<Value>,
    field: &'static str,
) -> Result<Option<Map<String, Value>>, RequestError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(RequestError::WrongType {
            field,
            expected: "an object",
        }),
    }
}
