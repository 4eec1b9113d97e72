//! The part of the warehouse schema that grows with the data, the same in every sink:
//!
//! - **Flattened columns.** Every table gets `context` flattened into `context_*`
//!   columns; `pages`/`screens` also get `properties`, `identifies`/`groups` their
//!   `traits`, as un-prefixed columns. Nested objects flatten with `_`, arrays are kept
//!   as JSON. Names are Segment's snake_case (`context.userAgent` → `context_user_agent`).
//! - **One table per track event name** (`Order Completed` → `order_completed`) with
//!   `event` (the table name), `event_text` (the name as sent), the common columns, the
//!   flattened context and every property as a typed column.
//! - **`users`**: per user id, each trait's value from the latest `identify` that
//!   carries it (by `timestamp`, then `message_id`), whatever order identifies arrive
//!   in ([`merge_users`]).
//! - **Type drift never drops a value silently.** A column's type is set by the first
//!   non-null value (`BOOLEAN`, `DOUBLE`, `TIMESTAMP` for ISO 8601 date-times, `TEXT`,
//!   `JSON` for arrays) and never changes. A later value is cast when the cast loses
//!   nothing (`"12.5"` into a number column, `true` into a text column); otherwise the
//!   row is stored with that column NULL and `rejected_values` names the event, the
//!   column, the value and the reason.
//! - **Limits**: names are at most [`MAX_NAME_LEN`] bytes (PostgreSQL's limit, the lowest
//!   of the supported warehouses; longer names keep a prefix and a hash), tables at most
//!   [`MAX_COLUMNS`] columns, and at most [`MAX_EVENT_TABLES`] per-event tables (hostile
//!   or unbounded event names cannot flood the warehouse with tables). Every identifier
//!   is quoted by the sinks, so reserved words (`order`, `group`, `user`) are valid
//!   names. A property whose name is a fixed column of its table (`user_id`, `event`,
//!   `timestamp`, …) is not a column (its value stays in `properties`/`raw`), and that
//!   is recorded in `rejected_values` too.
//!
//! [`Catalog`] is what a sink knows of these columns (persisted in `collector_tables`
//! and `collector_columns`); [`Catalog::plan`] turns a prepared load into the DDL it
//! needs and the rows of every table, typed against the catalog.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use collector_core::timestamp::{format_us, parse_ms, parse_us};
use collector_core::EventKind;
use serde_json::Value;

use crate::sinks::schema::{self, col, Column, LogicalType, Prepared, PreparedRow};

/// One value of a table row, as text (`None` for NULL), borrowed from the prepared load
/// where it can be.
pub type Cell<'a> = Option<Cow<'a, str>>;
/// One row of a [`TableLoad`], in its `columns` order.
pub type TableRow<'a> = Vec<Cell<'a>>;

/// The longest table or column name (PostgreSQL truncates identifiers at 63 bytes).
pub const MAX_NAME_LEN: usize = 63;
/// The most columns one table gets, fixed ones included (PostgreSQL and Redshift allow
/// 1,600; a table this wide is a tracking-plan bug, and the rest are recorded).
pub const MAX_COLUMNS: usize = 1000;
/// The most per-event tables (Segment asks for a bounded event space too).
pub const MAX_EVENT_TABLES: usize = 2000;
/// How much of a rejected value `rejected_values` keeps.
pub const MAX_REJECTED_VALUE: usize = 1024;

/// Segment's snake_case (go-snakecase): word boundaries at non-alphanumerics and at
/// case changes (`userAgent`, `HTTPServer`), lowercased, joined by `_`. Non-ASCII
/// characters are boundaries too, so names are plain ASCII.
pub fn snake_case(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if !c.is_ascii_alphanumeric() {
            if !out.is_empty() && !out.ends_with('_') {
                out.push('_');
            }
            continue;
        }
        if c.is_ascii_uppercase() && i > 0 && !out.is_empty() && !out.ends_with('_') {
            let prev = chars[i - 1];
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
            if prev.is_ascii_lowercase()
                || ((prev.is_ascii_digit() || prev.is_ascii_uppercase()) && next_lower)
            {
                out.push('_');
            }
        }
        out.push(c.to_ascii_lowercase());
    }
    while out.ends_with('_') {
        out.pop();
    }
    out
}

/// A name within [`MAX_NAME_LEN`]: a leading digit gets a `_`; a longer name keeps its
/// first bytes and a hash of the whole, so two long names stay apart.
fn bounded(name: &str) -> Cow<'_, str> {
    let digit = name.starts_with(|c: char| c.is_ascii_digit());
    if !digit && name.len() <= MAX_NAME_LEN {
        return Cow::Borrowed(name);
    }
    let name = if digit {
        format!("_{name}")
    } else {
        name.to_string()
    };
    if name.len() <= MAX_NAME_LEN {
        return Cow::Owned(name);
    }
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    Cow::Owned(format!("{}_{:08x}", &name[..MAX_NAME_LEN - 9], h as u32))
}

/// Tables a per-event table may not be named after: the Segment tables and the agent's
/// own (loads, identity, audiences, activation, privacy), in every sink; names starting
/// with `collector_` or `stage_` are reserved too. The conformance suite names a track
/// event after every table and view of each sink's fresh warehouse, so a table added
/// later without its name here fails it.
const RESERVED_TABLES: &[&str] = &[
    "tracks",
    "pages",
    "screens",
    "identifies",
    "groups",
    "aliases",
    "users",
    "rejected_values",
    "message_ids",
    "quarantine",
    "dead_letters",
    "loaded_batches",
    "load_ids",
    "identities",
    "identity_edges",
    "identity_merges",
    "identity_dirty",
    "identity_pending",
    "profiles",
    "audience_membership",
    "activation_outbox",
    "activation_log",
    "privacy_requests",
    "privacy_request_stores",
    "policy_versions",
    // Indexes and sequences share PostgreSQL's namespace of relations.
    "load_ids",
    "message_ids_load_id",
    "activation_outbox_due",
    "identities_person",
    "identity_edges_b",
    "identity_edges_status",
];

/// Whether `table` is one of the warehouse's own relations (Segment's tables, the
/// agent's tables, views, indexes and sequences), which no per-event table is named
/// after. Besides the list: `collector_…` and `stage_…` (the agent's), `pg_…`
/// (PostgreSQL resolves an unqualified name in its own catalog first, so a table
/// `pg_class` would be the system's), and `…_pkey` (the index of every table's primary
/// key in PostgreSQL, per-event tables' too). An event so named blocked its shard in
/// PostgreSQL: its load failed, as transient, again and again.
pub fn is_reserved_table(table: &str) -> bool {
    RESERVED_TABLES.contains(&table)
        || table.starts_with("collector_")
        || table.starts_with("stage_")
        || table.starts_with("pg_")
        || table.ends_with("_pkey")
}

/// The table of a track event name: its snake_case, `event_` before a reserved or
/// internal name; `None` when nothing of the name is usable (`"🎉"`).
pub fn event_table_name(event: &str) -> Option<String> {
    let s = snake_case(event);
    if s.is_empty() {
        return None;
    }
    let s = if is_reserved_table(&s) {
        format!("event_{s}")
    } else {
        s
    };
    Some(bounded(&s).into_owned())
}

/// Which of a warehouse's tables a [`TableLoad`] fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// `tracks`, `pages`, …: keyed by `message_id`, registered in `message_ids`.
    Base(EventKind),
    /// One track event name's table: rows of `tracks`, loaded when their id is new.
    Event,
    /// `users`: upserted by `id`; per trait, the value of the latest identify that has
    /// it (see [`merge_users`]).
    Users,
}

/// Fixed columns of a per-event table, in row order.
pub const EVENT_TABLE: &[Column] = &[
    schema::MESSAGE_ID,
    col("anonymous_id", "anonymousId", LogicalType::Text),
    col("user_id", "userId", LogicalType::Text),
    col("timestamp", "timestamp", LogicalType::Timestamp),
    col("sent_at", "sentAt", LogicalType::Timestamp),
    col("received_at", "receivedAt", LogicalType::Timestamp),
    col(
        "original_timestamp",
        "originalTimestamp",
        LogicalType::Timestamp,
    ),
    col("event", "event", LogicalType::Text),
    col("event_text", "event", LogicalType::Text),
    col("id", "messageId", LogicalType::Text),
];

/// Fixed columns of `users`, in row order (`id` is the user id).
pub const USERS: &[Column] = &[
    Column {
        name: "id",
        field: Some("userId"),
        ty: LogicalType::Text,
    },
    col("anonymous_id", "anonymousId", LogicalType::Text),
    col("timestamp", "timestamp", LogicalType::Timestamp),
    col("received_at", "receivedAt", LogicalType::Timestamp),
];

/// The fixed columns of a table of this kind (without `loaded_at`).
pub fn fixed_columns(kind: TableKind) -> Vec<Column> {
    match kind {
        TableKind::Base(k) => schema::columns(k),
        TableKind::Event => EVENT_TABLE.to_vec(),
        TableKind::Users => USERS.to_vec(),
    }
}

/// Quotes an identifier the SQL-standard way (DuckDB, PostgreSQL): property names
/// such as `order` are keywords.
pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `CREATE TABLE` of a table's fixed columns in a dialect with standard quoting, its
/// types from `sql_type`: base tables are keyed by `message_id`, `users` by `id`;
/// per-event tables have no key (`message_ids` decides what is new).
pub fn create_fixed_table_sql(
    table: &str,
    kind: TableKind,
    sql_type: fn(LogicalType) -> &'static str,
) -> String {
    let mut cols = Vec::new();
    for c in fixed_columns(kind) {
        let mut def = format!("{} {}", quote(c.name), sql_type(c.ty));
        let key = match kind {
            TableKind::Base(_) => c == schema::MESSAGE_ID,
            TableKind::Users => c.name == "id",
            TableKind::Event => false,
        };
        if key {
            def.push_str(" PRIMARY KEY");
        } else if c == schema::RAW || c == schema::MESSAGE_ID {
            def.push_str(" NOT NULL");
        }
        cols.push(def);
    }
    cols.push(format!(
        "{} {} NOT NULL",
        quote(schema::LOADED_AT),
        sql_type(LogicalType::Timestamp)
    ));
    format!(
        "CREATE TABLE IF NOT EXISTS {} ({})",
        quote(table),
        cols.join(", ")
    )
}

/// Migration SQL giving the event tables of a warehouse created before it Segment's `id`
/// (the message id), filled for the rows already there (DuckDB and PostgreSQL).
pub fn add_segment_id_sql(text_type: &str) -> String {
    let mut sql = String::new();
    for kind in EventKind::ALL {
        let t = kind.table();
        sql.push_str(&format!(
            "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS id {text_type};\nUPDATE {t} SET id = message_id WHERE id IS NULL;\n"
        ));
    }
    sql
}

/// Migration of `tracks` to Segment's `event` (the slug, = the per-event table) and
/// `event_text` (the name as sent): earlier releases kept the name as sent in `event`.
/// Rows whose name got no per-event table keep it in both.
pub fn track_event_text_sql(text_type: &str) -> String {
    format!(
        "ALTER TABLE tracks ADD COLUMN IF NOT EXISTS event_text {text_type};
UPDATE tracks SET event_text = event WHERE event_text IS NULL;
UPDATE tracks SET event = c.table_name FROM collector_tables c
  WHERE c.event_text = tracks.event_text AND tracks.event = tracks.event_text;
"
    )
}

/// `collector_user_traits` (migration 11): per user, the key of the identify each of
/// its `users` values came from ([`TraitKey`]), as one JSON object (`{"plan":
/// [1795255200000, "m-1"], …}`: one row per user, read and written whole). A warehouse
/// made before gets, for each non-NULL value, its row's `timestamp` as the key (and
/// an empty message id, below any identify of the same instant): what the row-level
/// rule before it knew.
pub fn user_traits_ddl(d: crate::sinks::Relational) -> String {
    match d {
        crate::sinks::Relational::DuckDb => "CREATE TABLE IF NOT EXISTS collector_user_traits (id VARCHAR PRIMARY KEY, keys VARCHAR NOT NULL);
INSERT OR IGNORE INTO collector_user_traits SELECT id, CAST(json_group_object(name, json_array(coalesce(epoch_ms(\"timestamp\"), 0), '')) AS VARCHAR) FROM (UNPIVOT (SELECT id, \"timestamp\", COLUMNS(* EXCLUDE (id, \"timestamp\", received_at, loaded_at))::VARCHAR FROM users) ON COLUMNS(* EXCLUDE (id, \"timestamp\")) INTO NAME name VALUE v) GROUP BY id;
".into(),
        crate::sinks::Relational::Postgres => "CREATE TABLE IF NOT EXISTS collector_user_traits (id text PRIMARY KEY, keys text NOT NULL);
INSERT INTO collector_user_traits SELECT u.id, jsonb_object_agg(j.key, jsonb_build_array(coalesce((extract(epoch FROM u.\"timestamp\") * 1000)::bigint, 0), ''))::text FROM users u CROSS JOIN LATERAL jsonb_each(to_jsonb(u) - 'id' - 'timestamp' - 'received_at' - 'loaded_at') j WHERE j.value <> 'null'::jsonb GROUP BY u.id ON CONFLICT DO NOTHING;
".into(),
    }
}

/// Adds a user's keys as `collector_user_traits` stores them to `into`.
pub fn read_user_keys(id: &str, json: &str, into: &mut StoredKeys) {
    let Ok(keys) = serde_json::from_str::<HashMap<String, (i64, String)>>(json) else {
        return;
    };
    into.insert(
        id.to_string(),
        keys.into_iter()
            .map(|(column, (ts_ms, message_id))| (column, TraitKey { ts_ms, message_id }))
            .collect(),
    );
}

/// The rows of `collector_user_traits` to write after a merge: each user with a value
/// that won, and all its keys (those stored, and those that won) as JSON.
pub fn user_keys_rows(
    stored: &StoredKeys,
    won: &[(String, String, TraitKey)],
) -> Vec<(String, String)> {
    let mut users: BTreeMap<&str, BTreeMap<&str, &TraitKey>> = BTreeMap::new();
    for (id, column, key) in won {
        users.entry(id).or_default().insert(column, key);
    }
    let mut out = Vec::with_capacity(users.len());
    for (id, mut keys) in users {
        for (column, key) in stored.get(id).into_iter().flatten() {
            keys.entry(column).or_insert(key);
        }
        let mut json = String::from("{");
        for (n, (column, key)) in keys.into_iter().enumerate() {
            if n > 0 {
                json.push(',');
            }
            json.push_str(&Value::from(column).to_string());
            json.push_str(&format!(":[{},", key.ts_ms));
            json.push_str(&Value::from(key.message_id.as_str()).to_string());
            json.push(']');
        }
        json.push('}');
        out.push((id.to_string(), json));
    }
    out
}

/// The `SET` list of the `users` upsert (DuckDB and PostgreSQL) of rows merged by
/// [`merge_users`]: a keyed cell is set only where it won, so it replaces the stored
/// value where it is not NULL; `timestamp` and `received_at` keep the latest.
pub fn users_merge_set(columns: &[(String, LogicalType)], new: &str, old: &str) -> String {
    let mut set: Vec<String> = columns
        .iter()
        .filter(|(n, _)| n != "id")
        .map(|(n, _)| {
            let c = quote(n);
            if keyed_users_column(n) {
                format!("{c} = coalesce({new}.{c}, {old}.{c})")
            } else {
                format!("{c} = greatest({new}.{c}, {old}.{c})")
            }
        })
        .collect();
    set.push(format!("{0} = {new}.{0}", quote(schema::LOADED_AT)));
    set.join(", ")
}

/// A value's rejection, as kept in `rejected_values`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub message_id: String,
    pub table_name: String,
    pub column_name: String,
    /// The value as JSON, cut at [`MAX_REJECTED_VALUE`] bytes.
    pub value: String,
    pub reason: String,
}

/// The logical type a first value gives its column.
fn infer(v: &Value) -> LogicalType {
    match v {
        Value::Bool(_) => LogicalType::Boolean,
        Value::Number(_) => LogicalType::Double,
        Value::String(s) if timestamp_text(s).is_some() => LogicalType::Timestamp,
        Value::Array(_) | Value::Object(_) => LogicalType::Json,
        _ => LogicalType::Text,
    }
}

/// Instants every supported warehouse can store (ClickHouse's `DateTime` ends in 2105).
const MIN_DYNAMIC_MS: i64 = 0;
const MAX_DYNAMIC_MS: i64 = 4_291_747_199_000; // 2105-12-31T23:59:59Z

/// A string that is an ISO 8601 date-time (`2026-11-25T10:00:00Z`, with an offset or
/// fraction), normalised; plain dates and numbers stay text.
fn timestamp_text(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let shaped = b.len() >= 19
        && b.len() <= 35
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[7] == b'-'
        && (b[10] == b'T' || b[10] == b't')
        && b[13] == b':';
    if !shaped {
        return None;
    }
    // To the microsecond, which DuckDB, PostgreSQL and Parquet keep (a backend's
    // `isoformat()` sends them); ClickHouse keeps what its type holds.
    let us = parse_us(s)?;
    (MIN_DYNAMIC_MS..=MAX_DYNAMIC_MS)
        .contains(&us.div_euclid(1000))
        .then(|| format_us(us))
}

/// `v` as text a column of type `ty` takes (cast without loss), or why not.
fn convert(v: &Value, ty: LogicalType) -> Result<Cow<'_, str>, String> {
    let bool_text = |b: bool| Cow::Borrowed(if b { "true" } else { "false" });
    match (ty, v) {
        (LogicalType::Text, Value::String(s)) => Ok(Cow::Borrowed(s)),
        (LogicalType::Text | LogicalType::Boolean, Value::Bool(b)) => Ok(bool_text(*b)),
        (LogicalType::Json | LogicalType::Text, v) => Ok(Cow::Owned(v.to_string())),
        (LogicalType::Boolean, Value::String(s)) if s == "true" || s == "false" => {
            Ok(Cow::Borrowed(s))
        }
        (LogicalType::Double, Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                if i.unsigned_abs() > 1 << 53 {
                    return Err("integer too large for a DOUBLE column without loss".into());
                }
            } else if let Some(u) = n.as_u64() {
                if u > 1 << 53 {
                    return Err("integer too large for a DOUBLE column without loss".into());
                }
            }
            n.as_f64()
                .filter(|f| f.is_finite())
                .map(|f| Cow::Owned(f.to_string()))
                .ok_or_else(|| "not a finite number".into())
        }
        (LogicalType::Double, Value::String(s)) => match s.trim().parse::<f64>() {
            Ok(f) if f.is_finite() && !s.trim().is_empty() => {
                // A DOUBLE holds 15–17 significant digits: an id sent as text
                // ("12345678901234567891") would be stored rounded.
                if decimal(s.trim()) == decimal(&format!("{f:e}")) {
                    Ok(Cow::Owned(f.to_string()))
                } else {
                    Err("number has more digits than a DOUBLE column holds without loss".into())
                }
            }
            _ => Err(format!("{} is not a number", type_name(v))),
        },
        (LogicalType::Timestamp, Value::String(s)) => timestamp_text(s)
            .map(Cow::Owned)
            .ok_or_else(|| "string is not an ISO 8601 date-time between 1970 and 2105".to_string()),
        (ty, v) => Err(format!(
            "{} does not fit a {} column",
            type_name(v),
            ty.name()
        )),
    }
}

/// A decimal number's value, written one way: (negative, significant digits without
/// leading or trailing zeros, power of ten of the last digit); zero is `(false, "",
/// 0)`. `None` for what is not `[+-]digits[.digits][e[+-]digits]` (also `.5`, `5.`).
fn decimal(s: &str) -> Option<(bool, String, i64)> {
    let (negative, rest) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], rest[i + 1..].parse::<i64>().ok()?),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let all = format!("{int}{frac}");
    let digits = all.trim_start_matches('0');
    let trimmed = digits.trim_end_matches('0');
    if trimmed.is_empty() {
        return Some((false, String::new(), 0));
    }
    let power = exponent - frac.len() as i64 + (digits.len() - trimmed.len()) as i64;
    Some((negative, trimmed.to_string(), power))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A flattened column name, shared by every row of a load that has it.
pub type Name = Arc<str>;

/// One flattened value: its column name and the JSON leaf.
pub type Flat = (Name, Value);

/// The flattened column names a load has met, per parent name and JSON key, so each
/// is computed (snake_case, joined) and allocated once per load, not once per event.
#[derive(Debug, Default)]
pub struct Names {
    /// Per name id: the name.
    names: Vec<Name>,
    /// Per name id: its children's ids by JSON key.
    children: Vec<HashMap<Box<str>, usize>>,
    /// The ids of the root prefixes (`context`, `""`).
    roots: Vec<(&'static str, usize)>,
}

impl Names {
    fn root(&mut self, prefix: &'static str) -> usize {
        if let Some(&(_, id)) = self.roots.iter().find(|(p, _)| *p == prefix) {
            return id;
        }
        let id = self.push(prefix.into());
        self.roots.push((prefix, id));
        id
    }

    fn push(&mut self, name: Name) -> usize {
        self.names.push(name);
        self.children.push(HashMap::new());
        self.names.len() - 1
    }

    /// The id of `key` under `parent`: objects nest with `_`; a key with no usable
    /// characters (`"🎉"`, `""`) becomes `_` under its parent, kept and visible.
    fn child(&mut self, parent: usize, key: &str) -> usize {
        if let Some(&id) = self.children[parent].get(key) {
            return id;
        }
        let prefix = &self.names[parent];
        let part = snake_case(key);
        let name: Name = match (prefix.is_empty(), part.is_empty()) {
            (true, true) => "_".into(),
            (false, true) => format!("{prefix}__").into(),
            (true, false) => part.into(),
            (false, false) => format!("{prefix}_{part}").into(),
        };
        let id = self.push(name);
        self.children[parent].insert(key.into(), id);
        id
    }
}

/// Flattens the JSON object `raw` under the column prefix `prefix` into `(column,
/// leaf)` pairs, reading the text once (no intermediate object): objects recurse with
/// `_`, nulls make no column, arrays stay JSON leaves. Anything but an object (or text
/// that does not parse) flattens to nothing.
pub fn flatten(prefix: &'static str, raw: &str, names: &mut Names, out: &mut Vec<Flat>) {
    use serde::de::DeserializeSeed;
    if !raw.trim_start().starts_with('{') {
        return;
    }
    let start = out.len();
    let root = names.root(prefix);
    let mut de = serde_json::Deserializer::from_str(raw);
    let seed = FlattenSeed {
        names,
        node: root,
        out,
    };
    if seed.deserialize(&mut de).is_err() {
        out.truncate(start);
    }
}

struct FlattenSeed<'n, 'o> {
    names: &'n mut Names,
    node: usize,
    out: &'o mut Vec<Flat>,
}

impl FlattenSeed<'_, '_> {
    fn leaf(self, v: Value) {
        self.out.push((self.names.names[self.node].clone(), v));
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for FlattenSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for FlattenSeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.leaf(Value::Bool(v));
        Ok(())
    }
    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.leaf(Value::from(v));
        Ok(())
    }
    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.leaf(Value::from(v));
        Ok(())
    }
    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.leaf(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number));
        Ok(())
    }
    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.leaf(Value::String(v.to_string()));
        Ok(())
    }
    fn visit_string<E>(self, v: String) -> Result<(), E> {
        self.leaf(Value::String(v));
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element::<Value>()? {
            items.push(v);
        }
        self.leaf(Value::Array(items));
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key_seed(StrSeed)? {
            let node = self.names.child(self.node, &key);
            map.next_value_seed(FlattenSeed {
                names: self.names,
                node,
                out: self.out,
            })?;
        }
        Ok(())
    }
}

/// A JSON string (an object key or a value), borrowed from the JSON text unless it has
/// escapes.
pub(crate) struct StrSeed;

impl<'de> serde::de::DeserializeSeed<'de> for StrSeed {
    type Value = Cow<'de, str>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for StrSeed {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v))
    }
}

/// What a sink knows of the growing part of its schema: per table, the columns added
/// beyond the fixed ones (in order, with their types); and which per-event tables exist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    tables: BTreeMap<String, Vec<(String, LogicalType)>>,
    /// Column names every table of this sink keeps for itself besides the fixed ones
    /// (the lake's partition keys, `table` and `date`).
    reserved: &'static [&'static str],
    /// `reserved` is kept out of the event tables only, not out of `users` (the lake's
    /// `users` is a table of its state file, not files with partition keys).
    reserved_in_files_only: bool,
    /// Relations in the warehouse's schema that the agent did not make (an analyst's
    /// table or view, a dbt model): no per-event table takes their names.
    foreign: BTreeSet<String>,
}

/// A new column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewColumn {
    pub table: String,
    pub name: String,
    pub ty: LogicalType,
    /// Its position among the table's added columns.
    pub position: usize,
}

/// Rows for one table, every value as text in `columns` order (fixed, then added).
#[derive(Debug, Clone, PartialEq)]
pub struct TableLoad<'a> {
    pub table: String,
    pub kind: TableKind,
    pub columns: Vec<(String, LogicalType)>,
    pub rows: Vec<TableRow<'a>>,
    /// The batch each row came from (`None` for `users`).
    pub batch_ids: Vec<Option<i64>>,
    /// The event each row came from (for `users`, one row per identify, not yet
    /// merged: [`merge_users`]).
    pub message_ids: Vec<&'a str>,
}

/// What a prepared load needs: DDL first (new per-event tables, then new columns), then
/// rows for every table, and the values that did not fit their column.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan<'a> {
    /// Per-event tables to create (fixed columns; their added ones are in `new_columns`).
    pub new_tables: Vec<(String, String)>,
    pub new_columns: Vec<NewColumn>,
    pub loads: Vec<TableLoad<'a>>,
    pub rejected: Vec<Rejected>,
    /// The catalog once this plan is committed.
    pub catalog: Catalog,
}

impl Plan<'_> {
    pub fn changes_schema(&self) -> bool {
        !self.new_tables.is_empty() || !self.new_columns.is_empty()
    }
}

/// A rejected value cut at [`MAX_REJECTED_VALUE`] bytes (at a character boundary).
pub(crate) fn cut(s: String) -> String {
    if s.len() <= MAX_REJECTED_VALUE {
        return s;
    }
    let mut end = MAX_REJECTED_VALUE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Builds one table's rows while growing its columns.
struct Builder<'a, 'c> {
    table: String,
    kind: TableKind,
    fixed: Vec<Column>,
    /// [`Catalog::reserved`].
    reserved: &'static [&'static str],
    added: &'c mut Vec<(String, LogicalType)>,
    index: HashMap<String, usize>,
    rows: Vec<TableRow<'a>>,
    batch_ids: Vec<Option<i64>>,
    message_ids: Vec<&'a str>,
    /// Scratch: which added columns the row being pushed has filled.
    seen: Vec<bool>,
    /// The type a new column takes when it is named here (`users` takes `identifies'`
    /// types); otherwise its first value's.
    types: HashMap<String, LogicalType>,
}

impl<'a, 'c> Builder<'a, 'c> {
    fn new(
        table: String,
        kind: TableKind,
        added: &'c mut Vec<(String, LogicalType)>,
        reserved: &'static [&'static str],
    ) -> Self {
        let fixed = fixed_columns(kind);
        let index = added
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        Builder {
            table,
            kind,
            fixed,
            reserved,
            added,
            index,
            rows: Vec::new(),
            batch_ids: Vec::new(),
            message_ids: Vec::new(),
            seen: Vec::new(),
            types: HashMap::new(),
        }
    }

    /// Adds one row: its fixed values and its flattened ones, growing columns and
    /// recording what does not fit.
    fn push(
        &mut self,
        message_id: &'a str,
        batch_id: Option<i64>,
        fixed: TableRow<'a>,
        flat: impl Iterator<Item = &'a Flat>,
        new_columns: &mut Vec<NewColumn>,
        rejected: &mut Vec<Rejected>,
    ) {
        // The row: its fixed values, then one cell per added column.
        let mut row = fixed;
        let base = row.len();
        row.resize(base + self.added.len(), None);
        let seen = &mut self.seen;
        seen.clear();
        seen.resize(self.added.len(), false);
        // This row's rejections, one per column (`rejected_values` is keyed so), with
        // how many more fields of the event mapped to that column and were not stored.
        let mut row_rejected: Vec<(Rejected, usize)> = Vec::new();
        for (name, v) in flat.map(|p| (&p.0, &p.1)) {
            let name = bounded(name);
            let mut reject = |reason: String| match row_rejected
                .iter_mut()
                .find(|(r, _)| r.column_name == name.as_ref())
            {
                Some((_, more)) => *more += 1,
                None => row_rejected.push((
                    Rejected {
                        message_id: message_id.to_string(),
                        table_name: self.table.clone(),
                        column_name: name.to_string(),
                        value: cut(v.to_string()),
                        reason,
                    },
                    0,
                )),
            };
            if self.fixed.iter().any(|c| c.name == name)
                || name == schema::LOADED_AT
                || self.reserved.contains(&name.as_ref())
            {
                reject(format!(
                    "`{name}` is a reserved column of this table; the value stays in the event's JSON"
                ));
                continue;
            }
            let i = match self.index.get(name.as_ref()) {
                Some(&i) => i,
                None => {
                    if self.fixed.len() + self.added.len() + 1 >= MAX_COLUMNS {
                        reject(format!(
                            "table `{}` has reached {MAX_COLUMNS} columns",
                            self.table
                        ));
                        continue;
                    }
                    let ty = self
                        .types
                        .get(name.as_ref())
                        .copied()
                        .unwrap_or_else(|| infer(v));
                    self.added.push((name.to_string(), ty));
                    self.index.insert(name.to_string(), self.added.len() - 1);
                    new_columns.push(NewColumn {
                        table: self.table.clone(),
                        name: name.to_string(),
                        ty,
                        position: self.added.len() - 1,
                    });
                    for r in &mut self.rows {
                        r.push(None);
                    }
                    row.push(None);
                    seen.push(false);
                    self.added.len() - 1
                }
            };
            if std::mem::replace(&mut seen[i], true) {
                reject(format!(
                    "another field of this event already maps to column `{name}`"
                ));
                continue;
            }
            match convert(v, self.added[i].1) {
                Ok(text) => row[base + i] = Some(text),
                Err(reason) => reject(reason),
            }
        }
        for (mut r, more) in row_rejected {
            if more > 0 {
                let fields = if more == 1 { "field" } else { "fields" };
                r.reason.push_str(&format!(
                    " (and {more} more {fields} of this event that map to this column, not stored either; all are in the event's JSON)"
                ));
            }
            rejected.push(r);
        }
        self.rows.push(row);
        self.batch_ids.push(batch_id);
        self.message_ids.push(message_id);
    }

    fn finish(self) -> TableLoad<'a> {
        let mut columns: Vec<(String, LogicalType)> = self
            .fixed
            .iter()
            .map(|c| (c.name.to_string(), c.ty))
            .collect();
        columns.extend(self.added.iter().cloned());
        TableLoad {
            table: self.table,
            kind: self.kind,
            columns,
            rows: self.rows,
            batch_ids: self.batch_ids,
            message_ids: self.message_ids,
        }
    }
}

impl Catalog {
    /// This catalog, with `names` kept out of every table's columns (a value of a
    /// property so named is recorded in `rejected_values` and stays in the event's
    /// JSON, as for a fixed column).
    pub fn reserving(mut self, names: &'static [&'static str]) -> Catalog {
        self.reserved = names;
        self
    }

    /// [`Catalog::reserving`], for the tables whose rows are files (every table but
    /// `users`).
    pub fn reserving_in_files(mut self, names: &'static [&'static str]) -> Catalog {
        self.reserved = names;
        self.reserved_in_files_only = true;
        self
    }

    /// This catalog, knowing the names of every relation in the warehouse's schema (its
    /// tables, views, indexes); those it did not make are an analyst's, which a
    /// per-event table must neither write into nor replace.
    pub fn with_relations(mut self, names: impl IntoIterator<Item = String>) -> Catalog {
        self.set_relations(names);
        self
    }

    /// [`Catalog::with_relations`], in place.
    pub fn set_relations(&mut self, names: impl IntoIterator<Item = String>) {
        self.foreign = names
            .into_iter()
            .filter(|n| !self.tables.contains_key(n) && !is_reserved_table(n))
            .collect();
    }

    /// The per-event table of the event slug `slug`: the slug, unless the warehouse has
    /// a relation of that name the agent did not make; then `event_<slug>` (the rule for
    /// the agent's own names), or `event_<slug>_2`, … while that is taken too. A table
    /// the agent made keeps its name, so an event's table never moves once made.
    /// Borrowed when it is the slug (the usual case), owned when an analyst's relation
    /// moved it.
    fn table_for<'s>(&self, slug: &'s str) -> Cow<'s, str> {
        if self.tables.contains_key(slug) || !self.foreign.contains(slug) {
            return Cow::Borrowed(slug);
        }
        let mut name = bounded(&format!("event_{slug}")).into_owned();
        let mut n = 2;
        while self.foreign.contains(&name) && !self.tables.contains_key(&name) {
            name = bounded(&format!("event_{slug}_{n}")).into_owned();
            n += 1;
        }
        Cow::Owned(name)
    }

    /// A catalog from `(table, column, type name, position)` rows as stored.
    pub fn from_rows(tables: Vec<String>, columns: Vec<(String, String, String, i64)>) -> Catalog {
        let mut c = Catalog::default();
        for t in tables {
            c.tables.entry(t).or_default();
        }
        let mut cols = columns;
        cols.sort_by_key(|r| (r.0.clone(), r.3));
        for (t, name, ty, _) in cols {
            let ty = LogicalType::parse(&ty).unwrap_or(LogicalType::Text);
            c.tables.entry(t).or_default().push((name, ty));
        }
        c
    }

    /// The added columns of a table.
    pub fn columns(&self, table: &str) -> &[(String, LogicalType)] {
        self.tables.get(table).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The per-event and `users` tables known (base tables always exist).
    pub fn has_table(&self, table: &str) -> bool {
        self.tables.contains_key(table)
    }

    /// The per-event tables.
    pub fn event_tables(&self) -> impl Iterator<Item = &str> {
        self.tables
            .keys()
            .map(String::as_str)
            .filter(|t| !EventKind::ALL.iter().any(|k| k.table() == *t) && *t != "users")
    }

    /// Plans a prepared load against this catalog.
    pub fn plan<'a>(&self, p: &'a Prepared) -> Plan<'a> {
        let mut catalog = self.clone();
        let mut plan = Plan::default();
        for kind in EventKind::ALL {
            catalog.tables.entry(kind.table().to_string()).or_default();
        }
        catalog.tables.entry("users".into()).or_default();
        let mut event_tables = catalog.event_tables().count();

        // Which table each track row also goes to.
        let mut per_event: BTreeMap<String, Vec<&PreparedRow>> = BTreeMap::new();
        for r in p.rows.iter().filter(|r| r.kind == EventKind::Track) {
            let Some(slug) = &r.event_table else {
                plan.rejected.push(Rejected {
                    message_id: r.message_id().to_string(),
                    table_name: "tracks".into(),
                    column_name: "event".into(),
                    value: cut(Value::String(r.event_name().to_string()).to_string()),
                    reason: "the event name has no letters or digits to name a table; the event is in `tracks` only".into(),
                });
                continue;
            };
            let name = self.table_for(slug);
            if !catalog.has_table(&name) && !per_event.contains_key(name.as_ref()) {
                if event_tables >= MAX_EVENT_TABLES {
                    plan.rejected.push(Rejected {
                        message_id: r.message_id().to_string(),
                        table_name: name.into_owned(),
                        column_name: "event".into(),
                        value: cut(Value::String(r.event_name().to_string()).to_string()),
                        reason: format!("the warehouse has reached {MAX_EVENT_TABLES} per-event tables; the event is in `tracks` only"),
                    });
                    continue;
                }
                event_tables += 1;
            }
            per_event.entry(name.into_owned()).or_default().push(r);
        }

        let tables = &mut catalog.tables;
        for kind in EventKind::ALL {
            let rows: Vec<&PreparedRow> = p.rows.iter().filter(|r| r.kind == kind).collect();
            if rows.is_empty() {
                continue;
            }
            let added = tables.get_mut(kind.table()).expect("base table");
            let mut b = Builder::new(
                kind.table().to_string(),
                TableKind::Base(kind),
                added,
                self.reserved,
            );
            let event_at = schema::column_index(kind, "event");
            for r in rows {
                let mut fixed: TableRow<'a> = r
                    .values
                    .iter()
                    .map(|v| v.as_deref().map(Cow::Borrowed))
                    .collect();
                // `tracks.event` names the per-event table, which an analyst's
                // relation of the slug's name moved.
                if let (Some(slug), Some(i)) = (&r.event_table, event_at) {
                    if let Cow::Owned(table) = self.table_for(slug) {
                        fixed[i] = Some(Cow::Owned(table));
                    }
                }
                b.push(
                    r.message_id(),
                    r.batch_id,
                    fixed,
                    r.base_flat(),
                    &mut plan.new_columns,
                    &mut plan.rejected,
                );
            }
            plan.loads.push(b.finish());
        }

        for (name, rows) in per_event {
            if !tables.contains_key(&name) {
                plan.new_tables
                    .push((name.clone(), rows[0].event_name().to_string()));
            }
            let added = tables.entry(name.clone()).or_default();
            let mut b = Builder::new(name.clone(), TableKind::Event, added, self.reserved);
            let event_at = EVENT_TABLE.iter().position(|c| c.name == "event");
            for r in rows {
                let mut fixed = r.event_table_values();
                if let Some(i) = event_at {
                    if r.event_table.as_deref() != Some(name.as_str()) {
                        fixed[i] = Some(Cow::Owned(name.clone()));
                    }
                }
                b.push(
                    r.message_id(),
                    r.batch_id,
                    fixed,
                    r.context.iter().chain(r.payload.iter()),
                    &mut plan.new_columns,
                    &mut plan.rejected,
                );
            }
            plan.loads.push(b.finish());
        }

        let users = users_rows(p);
        if !users.is_empty() {
            // A trait's column in `users` has the type of its column in `identifies`,
            // so a value `identifies` holds, `users` holds too (typed by its own first
            // value, `users.plan` could be a number where `identifies.plan` is text,
            // and a later "enterprise" would fit one and not the other).
            let types = tables
                .get("identifies")
                .map(|c| c.iter().cloned().collect())
                .unwrap_or_default();
            let added = tables.get_mut("users").expect("users");
            let reserved = if self.reserved_in_files_only {
                &[]
            } else {
                self.reserved
            };
            let mut b = Builder::new("users".into(), TableKind::Users, added, reserved);
            b.types = types;
            for (message_id, fixed, traits) in users {
                b.push(
                    message_id,
                    None,
                    fixed,
                    traits.iter(),
                    &mut plan.new_columns,
                    &mut plan.rejected,
                );
            }
            plan.loads.push(b.finish());
        }
        // A trait `users` could not hold is recorded under `users` only when
        // `identifies` held it (otherwise `identifies`' row says it already): a
        // column `users` got before its types followed `identifies'`.
        let on_identifies: BTreeSet<(String, String)> = plan
            .rejected
            .iter()
            .filter(|r| r.table_name == "identifies")
            .map(|r| (r.message_id.clone(), r.column_name.clone()))
            .collect();
        plan.rejected.retain(|r| {
            r.table_name != "users"
                || !on_identifies.contains(&(r.message_id.clone(), r.column_name.clone()))
        });
        plan.catalog = catalog;
        plan
    }
}

/// One identify's `users` row: its message id, fixed values and traits.
type UserRow<'a> = (&'a str, TableRow<'a>, &'a [Flat]);

/// The `users` rows of a load: one per identify with a user id, in (`timestamp`,
/// `message_id`) order. They are merged with each other and with what the warehouse
/// holds by [`merge_users`] (or, in ClickHouse, by its `users` view).
fn users_rows(p: &Prepared) -> Vec<UserRow<'_>> {
    let mut rows: Vec<&PreparedRow> = p
        .rows
        .iter()
        .filter(|r| r.kind == EventKind::Identify && r.value("user_id").is_some())
        .collect();
    rows.sort_by(|a, b| {
        (a.value("timestamp"), a.message_id()).cmp(&(b.value("timestamp"), b.message_id()))
    });
    rows.into_iter()
        .map(|r| {
            let fixed: TableRow<'_> = ["user_id", "anonymous_id", "timestamp", "received_at"]
                .iter()
                .map(|c| r.value(c).map(Cow::Borrowed))
                .collect();
            (r.message_id(), fixed, &r.payload[..])
        })
        .collect()
}

/// Where a value of a `users` column came from: the identify's `timestamp` (ms) and
/// `message_id`. A later key wins: `users` holds, per user and column, the value of
/// the latest identify that has it non-null, whatever order identifies arrive in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TraitKey {
    pub ts_ms: i64,
    pub message_id: String,
}

/// The columns of `users` that are merged per key (`timestamp` and `received_at` take
/// the latest; `id` is the key).
pub fn keyed_users_column(name: &str) -> bool {
    !matches!(name, "id" | "timestamp" | "received_at")
}

/// A `users` load merged against the warehouse (DuckDB, PostgreSQL).
#[derive(Debug, Default, PartialEq)]
pub struct MergedUsers<'a> {
    /// One row per user, in the load's columns: a keyed cell is set only where its
    /// value beats what the warehouse holds (the upsert keeps the stored value where it
    /// is NULL: [`users_merge_set`]); `timestamp`/`received_at` are the load's latest.
    pub rows: Vec<TableRow<'a>>,
    /// The keys of the cells set: `(user id, column, key)` ([`user_keys_rows`]).
    pub keys: Vec<(String, String, TraitKey)>,
}

/// The keys `collector_user_traits` holds: user id → column → key.
pub type StoredKeys = HashMap<String, HashMap<String, TraitKey>>;

/// Merges a `users` load (one row per identify: [`users_rows`]) with the keys the
/// warehouse holds for its users. Order-free: the result depends only on the
/// identifies, never on how they were split into loads.
///
/// The load holds only identifies new to the warehouse (sinks plan from those,
/// [`Prepared::new_rows`]): one whose id the warehouse already had (a redelivery, or
/// another event's id) is not in `identifies`, so it says nothing of the user either.
pub fn merge_users<'a>(load: &TableLoad<'a>, stored: &StoredKeys) -> MergedUsers<'a> {
    let col = |name: &str| load.columns.iter().position(|(n, _)| n == name);
    let (ts_at, received_at) = (col("timestamp"), col("received_at"));
    let keyed: Vec<usize> = (0..load.columns.len())
        .filter(|&i| keyed_users_column(&load.columns[i].0))
        .collect();
    let no_keys = HashMap::new();
    // Per user: its merged row, and the key (instant, message id) of each keyed cell
    // set in it.
    type Won<'m> = Vec<(usize, (i64, &'m str))>;
    // Per user also the latest `timestamp` and `received_at` seen (ms).
    let mut users: BTreeMap<&str, (TableRow<'a>, Won<'_>, [Option<i64>; 2])> = BTreeMap::new();
    for (row, message_id) in load.rows.iter().zip(&load.message_ids) {
        let Some(id) = row.first().and_then(|c| c.as_deref()) else {
            continue;
        };
        let ts_ms = ts_at
            .and_then(|i| row.get(i)?.as_deref())
            .and_then(parse_ms)
            .unwrap_or(i64::MIN);
        let key = (ts_ms, *message_id);
        let held = stored.get(id).unwrap_or(&no_keys);
        let (merged, won, latest) = users.entry(id).or_insert_with(|| {
            let mut r: TableRow<'a> = vec![None; load.columns.len()];
            r[0] = row[0].clone();
            (r, Vec::new(), [None, None])
        });
        for (slot, i) in [ts_at, received_at].into_iter().enumerate() {
            let Some(i) = i else { continue };
            let ms = if Some(i) == ts_at {
                Some(ts_ms).filter(|&t| t != i64::MIN)
            } else {
                row[i].as_deref().and_then(parse_ms)
            };
            if ms.is_some() && (merged[i].is_none() || ms > latest[slot]) {
                merged[i] = row[i].clone();
                latest[slot] = ms;
            }
        }
        for &i in &keyed {
            if row.get(i).is_none_or(Option::is_none) {
                continue;
            }
            let at = won.iter().position(|(c, _)| *c == i);
            let wins = at.is_none_or(|w| key > won[w].1)
                && held
                    .get(load.columns[i].0.as_str())
                    .is_none_or(|k| key > (k.ts_ms, k.message_id.as_str()));
            if wins {
                merged[i] = row[i].clone();
                match at {
                    Some(w) => won[w].1 = key,
                    None => won.push((i, key)),
                }
            }
        }
    }
    let mut out = MergedUsers::default();
    for (id, (row, mut won, _)) in users {
        won.sort();
        for (i, (ts_ms, message_id)) in won {
            out.keys.push((
                id.to_string(),
                load.columns[i].0.clone(),
                TraitKey {
                    ts_ms,
                    message_id: message_id.to_string(),
                },
            ));
        }
        out.rows.push(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A `users` load of rows `(message id, user, timestamp, plan)`.
    fn users_load<'a>(rows: &[(&'a str, &'a str, &'a str, Option<&'a str>)]) -> TableLoad<'a> {
        let c = |v: &'a str| Some(Cow::Borrowed(v));
        TableLoad {
            table: "users".into(),
            kind: TableKind::Users,
            columns: ["id", "anonymous_id", "timestamp", "received_at", "plan"]
                .map(|n| (n.to_string(), LogicalType::Text))
                .to_vec(),
            rows: rows
                .iter()
                .map(|(_, u, ts, plan)| vec![c(u), None, c(ts), None, plan.map(Cow::Borrowed)])
                .collect(),
            batch_ids: vec![None; rows.len()],
            message_ids: rows.iter().map(|r| r.0).collect(),
        }
    }

    fn key(ts: &str, m: &str) -> TraitKey {
        TraitKey {
            ts_ms: parse_ms(ts).unwrap(),
            message_id: m.into(),
        }
    }

    #[test]
    fn text_into_a_number_column_is_cast_only_without_loss() {
        let d = |s: &str| convert(&json!(s), LogicalType::Double).map(Cow::into_owned);
        for (text, stored) in [
            ("12.5", "12.5"),
            (" 3 ", "3"),
            ("0.1", "0.1"),
            ("-0.000", "-0"),
            ("1e3", "1000"),
            ("+.5", "0.5"),
            ("5.", "5"),
            ("9007199254740992", "9007199254740992"),
            ("1e21", "1000000000000000000000"),
            ("1.7976931348623157e308", &f64::MAX.to_string()),
        ] {
            assert_eq!(d(text).as_deref(), Ok(stored), "{text}");
        }
        // 9007199254740993 is 2^53 + 1; the others have more significant digits than a
        // DOUBLE.
        for text in [
            "9007199254740993",
            "12345678901234567891",
            "123456789012345678000",
            "0.12345678901234567891",
            "1.00000000000000000001",
        ] {
            assert_eq!(
                d(text),
                Err("number has more digits than a DOUBLE column holds without loss".into()),
                "{text}"
            );
        }
        for text in ["", "abc", "1e400", "NaN", "inf", "0x10", "1_000", "."] {
            assert!(d(text).is_err(), "{text}");
        }
        assert_eq!(decimal("0012.3400e-1"), Some((false, "1234".into(), -3)));
        assert_eq!(decimal("-1200"), Some((true, "12".into(), 2)));
        assert_eq!(decimal("0.0"), Some((false, String::new(), 0)));
    }

    #[test]
    fn users_merge_per_trait_by_instant_then_message_id() {
        let load = users_load(&[
            ("m1", "u", "2026-11-20T00:00:00.000Z", Some("free")),
            ("m3", "u", "2026-11-22T00:00:00.000Z", None),
            ("m2", "u", "2026-11-21T00:00:00.000Z", Some("pro")),
            ("m0", "u", "2026-11-21T00:00:00.000Z", Some("team")),
        ]);
        let m = merge_users(&load, &HashMap::new());
        assert_eq!(m.rows.len(), 1);
        // `plan` from the latest identify that has it (m2 over m0 at one instant);
        // `timestamp` the latest of all.
        assert_eq!(m.rows[0][4].as_deref(), Some("pro"));
        assert_eq!(m.rows[0][2].as_deref(), Some("2026-11-22T00:00:00.000Z"));
        assert_eq!(
            m.keys,
            vec![(
                "u".into(),
                "plan".into(),
                key("2026-11-21T00:00:00.000Z", "m2")
            )]
        );
        // What the warehouse holds wins over anything older: the cell stays NULL (the
        // upsert keeps the stored value) and no key is written.
        let stored = StoredKeys::from([(
            "u".to_string(),
            HashMap::from([("plan".to_string(), key("2026-11-21T12:00:00.000Z", "x"))]),
        )]);
        let m = merge_users(&load, &stored);
        assert_eq!(m.rows[0][4], None);
        assert!(m.keys.is_empty());
        // The same identifies in any order, in any split, give the same result.
        let whole = merge_users(&load, &HashMap::new());
        let mut rev = users_load(&[]);
        rev.rows = load.rows.iter().rev().cloned().collect();
        rev.message_ids = load.message_ids.iter().rev().copied().collect();
        assert_eq!(merge_users(&rev, &HashMap::new()), whole);
        let mut stored = StoredKeys::new();
        let mut last = None;
        for i in [3, 0, 2, 1] {
            let mut one = users_load(&[]);
            one.rows = vec![load.rows[i].clone()];
            one.message_ids = vec![load.message_ids[i]];
            let m = merge_users(&one, &stored);
            for (id, json) in user_keys_rows(&stored, &m.keys) {
                read_user_keys(&id, &json, &mut stored);
            }
            if m.rows[0][4].is_some() {
                last = m.rows[0][4].clone();
            }
        }
        assert_eq!(last.as_deref(), Some("pro"));
    }

    #[test]
    fn snake_case_follows_segment() {
        for (from, to) in [
            ("Order Completed", "order_completed"),
            ("orderCompleted", "order_completed"),
            ("userAgent", "user_agent"),
            ("HTTPServer", "http_server"),
            ("product_id", "product_id"),
            ("Product  ID!", "product_id"),
            ("  leading", "leading"),
            ("v2Checkout", "v2_checkout"),
            ("café crème", "caf_cr_me"),
            ("🎉", ""),
        ] {
            assert_eq!(snake_case(from), to, "{from}");
        }
    }

    #[test]
    fn table_names_avoid_reserved_and_stay_short() {
        assert_eq!(
            event_table_name("Order Completed").unwrap(),
            "order_completed"
        );
        assert_eq!(event_table_name("Tracks").unwrap(), "event_tracks");
        assert_eq!(event_table_name("users").unwrap(), "event_users");
        assert_eq!(event_table_name("Profiles").unwrap(), "event_profiles");
        assert_eq!(
            event_table_name("Audience Membership").unwrap(),
            "event_audience_membership"
        );
        assert_eq!(event_table_name("3D Viewed").unwrap(), "_3d_viewed");
        assert_eq!(event_table_name("🎉"), None);
        let long = "a".repeat(100);
        let t = event_table_name(&long).unwrap();
        assert_eq!(t.len(), MAX_NAME_LEN);
        assert_ne!(t, event_table_name(&format!("{long}b")).unwrap());
    }

    // At `MAX_EVENT_TABLES` per-event tables, an event name the warehouse has no table
    // for stays in `tracks` only, with a row in `rejected_values`; events of the
    // tables it has still get their rows.
    #[test]
    fn per_event_tables_stop_at_their_limit() {
        let catalog = Catalog::from_rows(
            (0..MAX_EVENT_TABLES).map(|i| format!("e{i}")).collect(),
            Vec::new(),
        );
        let track = |id: &str, event: &str| {
            let json = json!({"type": "track", "messageId": id, "userId": "u", "event": event});
            collector_core::StoredEvent {
                message_id: id.into(),
                kind: EventKind::Track,
                anonymous_id: None,
                user_id: Some("u".into()),
                received_at_ms: 0,
                timestamp_ms: 0,
                json: json.to_string(),
            }
        };
        let p = crate::sinks::schema::prepare(crate::sinks::Load::events(
            0,
            1,
            vec![track("m1", "E7"), track("m2", "Brand New")],
        ));
        let plan = catalog.plan(&p);
        assert!(plan.new_tables.is_empty());
        let tables: Vec<(&str, usize)> = plan
            .loads
            .iter()
            .map(|l| (l.table.as_str(), l.rows.len()))
            .collect();
        assert!(tables.contains(&("e7", 1)), "{tables:?}");
        assert!(tables.contains(&("tracks", 2)), "{tables:?}");
        assert_eq!(plan.rejected.len(), 1);
        let r = &plan.rejected[0];
        assert_eq!(
            (
                r.message_id.as_str(),
                r.table_name.as_str(),
                r.column_name.as_str()
            ),
            ("m2", "brand_new", "event")
        );
        assert!(r.reason.contains("2000 per-event tables"), "{}", r.reason);
    }

    #[test]
    fn flatten_nests_with_underscores_and_skips_nulls() {
        let mut out = Vec::new();
        let mut names = Names::default();
        let raw = json!({"userAgent": "UA", "page": {"path": "/", "x": null, "n": -2, "f": 1.5},
                         "list": [1, {"a": null}], "🎉": {"": true}, "empty": {}})
        .to_string();
        flatten("context", &raw, &mut names, &mut out);
        flatten("context", &raw, &mut names, &mut out);
        let flat: Vec<(&str, Value)> = out.iter().map(|(n, v)| (&**n, v.clone())).collect();
        let once = vec![
            ("context_user_agent", json!("UA")),
            ("context_page_path", json!("/")),
            ("context_page_n", json!(-2)),
            ("context_page_f", json!(1.5)),
            ("context_list", json!([1, {"a": null}])),
            ("context____", json!(true)),
        ];
        assert_eq!(flat, [once.clone(), once].concat());
        // The same name is one allocation, shared.
        assert!(Arc::ptr_eq(&out[0].0, &out[6].0));
        let mut top = Vec::new();
        flatten(
            "",
            r#"{"Revenue": 5, "": "x", "a\u0062": 1}"#,
            &mut names,
            &mut top,
        );
        let flat: Vec<&str> = top.iter().map(|(n, _)| &**n).collect();
        assert_eq!(flat, ["revenue", "_", "ab"]);
        for not_object in ["[1]", "\"s\"", "{\"a\": ", "null"] {
            let mut none = Vec::new();
            flatten("", not_object, &mut names, &mut none);
            assert!(none.is_empty(), "{not_object}");
        }
    }

    #[test]
    fn conversions_are_lossless_or_refused() {
        use LogicalType::*;
        let convert = |v: &Value, ty| convert(v, ty).map(|c| c.into_owned());
        assert_eq!(convert(&json!(12), Double).unwrap(), "12");
        assert_eq!(convert(&json!("12.5"), Double).unwrap(), "12.5");
        assert!(convert(&json!("abc"), Double).is_err());
        assert!(convert(&json!(9_007_199_254_740_993u64), Double).is_err());
        assert_eq!(convert(&json!(true), Text).unwrap(), "true");
        assert_eq!(convert(&json!(1.5), Text).unwrap(), "1.5");
        assert_eq!(convert(&json!("false"), Boolean).unwrap(), "false");
        assert!(convert(&json!(1), Boolean).is_err());
        assert_eq!(
            convert(&json!("2026-11-25T11:00:00+01:00"), Timestamp).unwrap(),
            "2026-11-25T10:00:00.000Z"
        );
        assert!(convert(&json!("tomorrow"), Timestamp).is_err());
        assert!(convert(&json!("2200-01-01T00:00:00Z"), Timestamp).is_err());
        assert_eq!(convert(&json!([1, "a"]), Json).unwrap(), r#"[1,"a"]"#);
        assert_eq!(infer(&json!("2026-11-25T10:00:00Z")), Timestamp);
        assert_eq!(infer(&json!("2026-11-25")), Text);
        assert_eq!(infer(&json!(1)), Double);
    }
}
