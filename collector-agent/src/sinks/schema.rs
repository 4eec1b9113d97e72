//! The warehouse schema, declared once as data: Segment's event tables, their columns
//! and logical types, and the agent's own tables. Each sink maps the logical types to its
//! dialect and owns nothing else of the schema.
//!
//! Also the part of a load every sink shares: turning a [`Load`] into rows, finding the
//! events no warehouse can take (quarantined with their reason), and deduplicating
//! inside the load.

use std::borrow::Cow;
use std::collections::HashSet;

use collector_core::timestamp::{format_ms, parse_ms};
use collector_core::{EventKind, StoredEvent};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::sinks::tables::{Flat, Names};
use crate::sinks::{tables, Load, LoadBatch};

/// A column's logical type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogicalType {
    Text,
    /// UTC instant, millisecond precision. Values are RFC 3339 text
    /// (`2026-11-25T10:00:00.000Z`) on the way in.
    Timestamp,
    /// JSON text.
    Json,
    /// 64-bit float (every JSON number of a flattened property).
    Double,
    Boolean,
}

impl LogicalType {
    /// Every logical type.
    pub const ALL: [LogicalType; 5] = [
        LogicalType::Text,
        LogicalType::Timestamp,
        LogicalType::Json,
        LogicalType::Double,
        LogicalType::Boolean,
    ];

    /// The name stored in `collector_columns`.
    pub fn name(self) -> &'static str {
        match self {
            LogicalType::Text => "text",
            LogicalType::Timestamp => "timestamp",
            LogicalType::Json => "json",
            LogicalType::Double => "double",
            LogicalType::Boolean => "boolean",
        }
    }

    pub fn parse(s: &str) -> Option<LogicalType> {
        LogicalType::ALL.into_iter().find(|t| t.name() == s)
    }
}

/// One column of an event table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    /// The event field it is read from (`None`: not from the event).
    pub field: Option<&'static str>,
    pub ty: LogicalType,
}

pub(crate) const fn col(name: &'static str, field: &'static str, ty: LogicalType) -> Column {
    Column {
        name,
        field: Some(field),
        ty,
    }
}

use LogicalType::{Json, Text, Timestamp};

/// The primary key of every event table (and unique across the warehouse).
pub const MESSAGE_ID: Column = Column {
    name: "message_id",
    field: None,
    ty: Text,
};

/// Columns every event table has, after `message_id`.
pub const COMMON: &[Column] = &[
    col("anonymous_id", "anonymousId", Text),
    col("user_id", "userId", Text),
    col("timestamp", "timestamp", Timestamp),
    col("sent_at", "sentAt", Timestamp),
    col("received_at", "receivedAt", Timestamp),
    col("original_timestamp", "originalTimestamp", Timestamp),
    col("context", "context", Json),
    col("integrations", "integrations", Json),
    // Segment's warehouses call the message id `id`; dbt models (Segment's own
    // package among them) select it by that name.
    col("id", "messageId", Text),
];

/// The whole normalised event, last of the loaded columns.
pub const RAW: Column = Column {
    name: "raw",
    field: None,
    ty: Json,
};

/// When the row was written (set by the warehouse, not loaded).
pub const LOADED_AT: &str = "loaded_at";

/// Columns of one event table beyond the common ones.
pub fn specific_columns(kind: EventKind) -> &'static [Column] {
    // As in Segment's warehouses: `event` is the slug (the per-event table's name, so
    // the two join), `event_text` the name as sent.
    const TRACK: &[Column] = &[
        col("event", "event", Text),
        col("event_text", "event", Text),
        col("properties", "properties", Json),
    ];
    const PAGE: &[Column] = &[
        col("name", "name", Text),
        col("category", "category", Text),
        col("properties", "properties", Json),
    ];
    const IDENTIFY: &[Column] = &[col("traits", "traits", Json)];
    const GROUP: &[Column] = &[
        col("group_id", "groupId", Text),
        col("traits", "traits", Json),
    ];
    const ALIAS: &[Column] = &[col("previous_id", "previousId", Text)];
    match kind {
        EventKind::Track => TRACK,
        EventKind::Page | EventKind::Screen => PAGE,
        EventKind::Identify => IDENTIFY,
        EventKind::Group => GROUP,
        EventKind::Alias => ALIAS,
    }
}

/// Every loaded column of a kind's table, in row order: `message_id`, the common ones,
/// the kind's own, `raw`.
pub fn columns(kind: EventKind) -> Vec<Column> {
    let mut cols = vec![MESSAGE_ID];
    cols.extend_from_slice(COMMON);
    cols.extend_from_slice(specific_columns(kind));
    cols.push(RAW);
    cols
}

/// The position of a fixed column in a kind's rows (see [`columns`]), without building
/// the column list.
pub fn column_index(kind: EventKind, name: &str) -> Option<usize> {
    if name == MESSAGE_ID.name {
        return Some(0);
    }
    if let Some(i) = COMMON.iter().position(|c| c.name == name) {
        return Some(1 + i);
    }
    let specific = specific_columns(kind);
    if let Some(i) = specific.iter().position(|c| c.name == name) {
        return Some(1 + COMMON.len() + i);
    }
    (name == RAW.name).then_some(1 + COMMON.len() + specific.len())
}

/// One event's values, as text in [`columns`] order (`None` for NULL).
pub type Row = Vec<Option<String>>;

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Turns one event into a row, or says why no warehouse can take it. Everything that
/// could make an insert fail for this event alone is checked here, so one bad event
/// never fails the others' SQL.
pub fn prepare_row(ev: &StoredEvent) -> Result<Row, String> {
    prepare_parsed(ev).map(|(mut row, _)| {
        row.push(Some(ev.json.clone()));
        row
    })
}

/// A JSON string's text, borrowed unless it has escapes.
fn json_str(t: &str) -> Result<Cow<'_, str>, serde_json::Error> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_str(t);
    let s = tables::StrSeed.deserialize(&mut de)?;
    de.end()?;
    Ok(s)
}

/// [`prepare_row`] without `raw` (the caller adds the event, moved or copied), also
/// returning the parsed event.
fn prepare_parsed(ev: &StoredEvent) -> Result<(Row, Fields<'_>), String> {
    if ev.message_id.is_empty() {
        return Err("event has an empty messageId".into());
    }
    // Only the top level is parsed; nested values stay borrowed JSON text (a JSON
    // column takes them as they are, and only `context` and the payload are read
    // again, to flatten them).
    let fields: Fields<'_> = serde_json::from_str(&ev.json).map_err(|e| {
        if serde_json::from_str::<Value>(&ev.json).is_ok() {
            "event is not a JSON object".to_string()
        } else {
            format!("event is not JSON: {e}")
        }
    })?;
    let mut row = Vec::with_capacity(COMMON.len() + 6);
    row.push(Some(ev.message_id.clone()));
    for c in COMMON.iter().chain(specific_columns(ev.kind)) {
        let field = c.field.unwrap_or(c.name);
        // The message id is the stored event's, whatever its JSON says.
        if field == "messageId" {
            row.push(Some(ev.message_id.clone()));
            continue;
        }
        let raw = fields.get(field).map(|r| r.get()).filter(|t| *t != "null");
        row.push(match (c.ty, raw) {
            (_, None) => None,
            (Json, Some(t)) => Some(t.to_string()),
            (Timestamp, Some(t)) => {
                let s = json_str(t)
                    .map_err(|_| format!("`{field}` is not a date-time: {}", truncate(t)))?;
                Some(
                    parse_ms(&s).map(format_ms).ok_or_else(|| {
                        format!("`{field}` is not a date-time: {:?}", truncate(&s))
                    })?,
                )
            }
            (_, Some(t)) if t.starts_with('"') => Some(
                json_str(t)
                    .map_err(|e| format!("`{field}`: {e}"))?
                    .into_owned(),
            ),
            (_, Some(t)) => Some(t.to_string()),
        });
    }
    Ok((row, fields))
}

/// The top-level fields a table reads, in this order in [`Fields`].
const FIELDS: &[&str] = &[
    "anonymousId",
    "userId",
    "timestamp",
    "sentAt",
    "receivedAt",
    "originalTimestamp",
    "context",
    "integrations",
    "messageId",
    "event",
    "name",
    "category",
    "properties",
    "traits",
    "groupId",
    "previousId",
];

/// An event's top-level fields that tables read, their values borrowed as JSON text
/// (read in one pass; other fields are skipped; a repeated key's last value wins).
struct Fields<'a>([Option<&'a RawValue>; FIELDS.len()]);

impl<'a> Fields<'a> {
    fn get(&self, field: &str) -> Option<&'a RawValue> {
        FIELDS
            .iter()
            .position(|f| *f == field)
            .and_then(|i| self.0[i])
    }
}

impl<'de> serde::Deserialize<'de> for Fields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Fields<'de>, A::Error> {
                let mut fields = Fields([None; FIELDS.len()]);
                while let Some(key) = map.next_key_seed(tables::StrSeed)? {
                    match FIELDS.iter().position(|f| *f == key) {
                        Some(i) => fields.0[i] = Some(map.next_value()?),
                        None => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(fields)
            }
        }
        d.deserialize_map(V)
    }
}

/// The payload a kind's table flattens into un-prefixed columns.
fn payload_field(kind: EventKind) -> Option<&'static str> {
    match kind {
        EventKind::Track | EventKind::Page | EventKind::Screen => Some("properties"),
        EventKind::Identify | EventKind::Group => Some("traits"),
        EventKind::Alias => None,
    }
}

/// `field`, flattened under `prefix`, when it is an object.
fn flatten_field(
    fields: &Fields<'_>,
    field: &str,
    prefix: &'static str,
    names: &mut Names,
) -> Vec<Flat> {
    let mut out = Vec::new();
    if let Some(raw) = fields.get(field) {
        tables::flatten(prefix, raw.get(), names, &mut out);
    }
    out
}

/// A prepared row of a parsed event, with its flattened context and payload.
fn prepared_row(
    kind: EventKind,
    values: Row,
    fields: &Fields<'_>,
    batch_id: Option<i64>,
    names: &mut Names,
) -> PreparedRow {
    let context = flatten_field(fields, "context", "context", names);
    let payload = payload_field(kind)
        .map(|f| flatten_field(fields, f, "", names))
        .unwrap_or_default();
    let mut row = PreparedRow {
        kind,
        values,
        batch_id,
        event_table: None,
        context,
        payload,
    };
    if kind == EventKind::Track {
        row.event_table = row.value("event_text").and_then(tables::event_table_name);
        if let (Some(slug), Some(i)) = (&row.event_table, column_index(kind, "event")) {
            row.values[i] = Some(slug.clone());
        }
    }
    row
}

/// An event no warehouse can take as is, as kept in `quarantine`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    pub message_id: String,
    pub kind: EventKind,
    pub shard: u32,
    pub batch_id: Option<i64>,
    pub reason: String,
    pub event: String,
}

/// A batch that did not decode, as kept in `dead_letters`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub shard: u32,
    pub batch_id: i64,
    pub blob: Vec<u8>,
    pub error: String,
}

/// One row to write. Its first value is the `message_id` and its last the whole event
/// (`raw`), so the event can be quarantined from the row alone if the warehouse refuses
/// it (no second copy of the event is kept).
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedRow {
    pub kind: EventKind,
    pub values: Row,
    pub batch_id: Option<i64>,
    /// A track's per-event table (`None` when its name has nothing usable).
    pub event_table: Option<String>,
    /// `context`, flattened into `context_*` columns.
    pub context: Vec<Flat>,
    /// `properties` or `traits`, flattened into un-prefixed columns.
    pub payload: Vec<Flat>,
}

impl PreparedRow {
    /// The value of one of the kind's fixed columns.
    pub fn value(&self, column: &str) -> Option<&str> {
        self.values
            .get(column_index(self.kind, column)?)?
            .as_deref()
    }

    /// A track's event name as sent.
    pub fn event_name(&self) -> &str {
        self.value("event_text").unwrap_or("")
    }

    /// The flattened columns of the kind's own table: the context, and the payload
    /// except for `tracks` (whose properties go to the per-event table).
    pub fn base_flat(&self) -> impl Iterator<Item = &Flat> {
        let payload: &[Flat] = if self.kind == EventKind::Track {
            &[]
        } else {
            &self.payload
        };
        self.context.iter().chain(payload.iter())
    }

    /// The fixed values of this track's per-event table (see [`tables::EVENT_TABLE`]).
    pub fn event_table_values(&self) -> tables::TableRow<'_> {
        tables::EVENT_TABLE
            .iter()
            .map(|c| match c.name {
                "event" => self.event_table.as_deref().map(Cow::Borrowed),
                "event_text" => Some(Cow::Borrowed(self.event_name())),
                name => self.value(name).map(Cow::Borrowed),
            })
            .collect()
    }

    pub fn message_id(&self) -> &str {
        self.values.first().and_then(|v| v.as_deref()).unwrap_or("")
    }

    /// The event as stored (the `raw` column).
    pub fn event_json(&self) -> &str {
        self.values.last().and_then(|v| v.as_deref()).unwrap_or("")
    }
}

/// A load, checked and turned into rows before any SQL runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prepared {
    pub shard: u32,
    /// A replay of quarantined events: a refusal updates the quarantined row (reason,
    /// attempts) instead of leaving it as it was.
    pub replay: bool,
    pub rows: Vec<PreparedRow>,
    pub quarantine: Vec<Quarantined>,
    pub dead: Vec<DeadLetter>,
    /// Duplicates within this load (the first occurrence wins).
    pub in_load_duplicates: u64,
    /// Dead letters whose batch now decoded and is in `rows`/`quarantine`: removed from
    /// `dead_letters` in the same transaction.
    pub resolved_dead: Vec<(u32, i64)>,
}

impl Prepared {
    /// How a quarantine insert treats an event already quarantined (the same SQL in every
    /// dialect): a replay updates its reason and attempts; a redelivery leaves it.
    pub fn quarantine_on_conflict(&self) -> &'static str {
        if self.replay {
            "DO UPDATE SET reason = excluded.reason, attempts = quarantine.attempts + 1"
        } else {
            "DO NOTHING"
        }
    }

    /// The event of `row`, quarantined with `reason`.
    pub fn quarantined(&self, row: &PreparedRow, reason: String) -> Quarantined {
        Quarantined {
            message_id: row.message_id().to_string(),
            kind: row.kind,
            shard: self.shard,
            batch_id: row.batch_id,
            reason,
            event: row.event_json().to_string(),
        }
    }

    /// The rows to plan and write: those `is_new` says the warehouse does not hold yet
    /// (borrowed when all are, the usual case). A redelivered event whose content
    /// differs from the stored copy must not grow the schema with columns or tables
    /// that no stored row fills. Only the rows are kept: quarantine and dead letters
    /// are written from the whole load.
    pub fn new_rows(&self, is_new: impl Fn(&PreparedRow) -> bool) -> Cow<'_, Prepared> {
        if self.rows.iter().all(&is_new) {
            return Cow::Borrowed(self);
        }
        Cow::Owned(Prepared {
            shard: self.shard,
            replay: self.replay,
            rows: self.rows.iter().filter(|r| is_new(r)).cloned().collect(),
            ..Prepared::default()
        })
    }
}

/// The message id that makes [`prepare`] panic, in this crate's unit tests.
#[cfg(test)]
pub(crate) const PANIC_IN_PREPARE: &str = "test-panic-in-prepare";

/// Prepares a load: rows for what the warehouse can take, quarantine entries for what it
/// cannot, dead letters for undecodable batches, in-load duplicates skipped.
pub fn prepare(load: Load) -> Prepared {
    let mut p = Prepared {
        shard: load.shard,
        ..Prepared::default()
    };
    // Which events repeat one before them in this load (the first occurrence wins).
    let repeated: Vec<bool> = {
        let mut seen: HashSet<&str> = HashSet::new();
        load.batches
            .iter()
            .flat_map(|b| match b {
                LoadBatch::Decoded { events, .. } => events.as_slice(),
                LoadBatch::Undecodable { .. } => &[],
            })
            .map(|ev| !seen.insert(ev.message_id.as_str()))
            .collect()
    };
    let mut repeated = repeated.into_iter();
    let mut names = Names::default();
    for b in load.batches {
        match b {
            LoadBatch::Undecodable {
                batch_id,
                blob,
                error,
            } => p.dead.push(DeadLetter {
                shard: load.shard,
                batch_id,
                blob,
                error,
            }),
            LoadBatch::Decoded { batch_id, events } => {
                for ev in events {
                    if repeated.next().unwrap_or(false) {
                        p.in_load_duplicates += 1;
                        continue;
                    }
                    // A panic here is a bug an event reached: that event is
                    // quarantined with it, instead of failing every retry of the load.
                    let row = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        #[cfg(test)]
                        if ev.message_id == PANIC_IN_PREPARE {
                            panic!("a test's planted bug");
                        }
                        prepare_parsed(&ev).map(|(values, fields)| {
                            prepared_row(ev.kind, values, &fields, Some(batch_id), &mut names)
                        })
                    }))
                    .unwrap_or_else(|panic| {
                        Err(format!(
                            "the agent failed on this event ({}); please report it",
                            super::panic_text(&*panic)
                        ))
                    });
                    match row {
                        Ok(mut row) => {
                            // The event itself is `raw`, the row's last value.
                            row.values.push(Some(ev.json));
                            p.rows.push(row);
                        }
                        Err(reason) => p.quarantine.push(Quarantined {
                            message_id: ev.message_id,
                            kind: ev.kind,
                            shard: load.shard,
                            batch_id: Some(batch_id),
                            reason,
                            event: ev.json,
                        }),
                    }
                }
            }
        }
    }
    p
}

/// A quarantined event read back for a replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedEvent {
    pub message_id: String,
    pub kind: String,
    pub shard: Option<u32>,
    pub batch_id: Option<i64>,
    pub event: String,
}

/// A dead letter read back for a replay.
impl DeadLetter {
    /// The replay of a dead letter whose batch decodes now (an agent that learned its
    /// format), as a prepared load that also removes the dead letter; `None` while it
    /// still does not decode.
    pub fn prepared(&self) -> Option<Prepared> {
        let batch = collector_core::codec::decode_batch(&self.blob).ok()?;
        let load = Load::events(self.shard, self.batch_id, batch.events);
        let mut p = prepare(load);
        p.resolved_dead.push((self.shard, self.batch_id));
        Some(p)
    }
}

impl QuarantinedEvent {
    /// The replay of one quarantined event, as a prepared load.
    pub fn prepared(self) -> Option<Prepared> {
        let kind = EventKind::parse(&self.kind)?;
        let ev = StoredEvent {
            message_id: self.message_id,
            kind,
            anonymous_id: None,
            user_id: None,
            received_at_ms: 0,
            timestamp_ms: 0,
            json: self.event,
        };
        let load = Load::events(
            self.shard.unwrap_or(0),
            self.batch_id.unwrap_or(0),
            vec![ev],
        );
        let mut p = prepare(load);
        p.replay = true;
        Some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_a_table_reads_is_parsed() {
        for kind in EventKind::ALL {
            for c in columns(kind) {
                if let Some(field) = c.field {
                    assert!(FIELDS.contains(&field), "{field} is not in FIELDS");
                }
            }
            if let Some(p) = payload_field(kind) {
                assert!(FIELDS.contains(&p), "{p} is not in FIELDS");
            }
        }
        assert!(FIELDS.contains(&"context"));
    }

    #[test]
    fn every_table_starts_with_message_id_and_ends_with_raw() {
        for kind in EventKind::ALL {
            let cols = columns(kind);
            assert_eq!(cols[0].name, "message_id");
            assert_eq!(cols.last().unwrap().name, "raw");
            let mut names: Vec<_> = cols.iter().map(|c| c.name).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), cols.len(), "{kind:?} has duplicate columns");
        }
    }

    #[test]
    fn rows_normalise_timestamps_and_refuse_what_no_warehouse_takes() {
        let ev = |json: &str| StoredEvent {
            message_id: "m".into(),
            kind: EventKind::Track,
            anonymous_id: None,
            user_id: None,
            received_at_ms: 0,
            timestamp_ms: 0,
            json: json.into(),
        };
        let row = prepare_row(&ev(
            r#"{"event":"E","timestamp":"2026-11-25T11:00:00+01:00","properties":{"a":1}}"#,
        ))
        .unwrap();
        assert_eq!(row[3].as_deref(), Some("2026-11-25T10:00:00.000Z"));
        assert_eq!(row[9].as_deref(), Some("m"));
        assert_eq!(row[10].as_deref(), Some("E"));
        assert_eq!(row[11].as_deref(), Some("E"));
        assert_eq!(row[12].as_deref(), Some(r#"{"a":1}"#));
        assert!(prepare_row(&ev("[1]"))
            .unwrap_err()
            .contains("not a JSON object"));
        assert!(prepare_row(&ev(r#"{"sentAt": 5}"#))
            .unwrap_err()
            .contains("`sentAt` is not a date-time"));
    }
}
