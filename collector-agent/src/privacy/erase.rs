//! Carrying a request out: resolving the subject to every id of their person(s),
//! finding their rows in every table ([`stores`]), erasing, exporting.

use std::collections::BTreeSet;

use collector_core::drain::SuppressedId;
use serde_json::{json, Map, Value};

use super::{cell, record_run, set_status, set_store, values_of, Kind, Request, Subject};
use crate::destinations::{Contacts, Destination, DestinationConfig, Erasure, SendError};
use crate::edge::EdgeClient;
use crate::sinks::{list, lit, Dialect, SinkError, SqlSession};

/// Everyone a request is about: their ids (`(type, value)`; types `user_id`,
/// `anonymous_id`, `email`) and their persons in the identity graph.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Person {
    pub ids: BTreeSet<(String, String)>,
    pub person_ids: BTreeSet<String>,
}

impl Person {
    /// The ids the edge can suppress (events carry user and anonymous ids).
    pub fn suppressible(&self) -> Vec<SuppressedId> {
        self.ids
            .iter()
            .filter(|(t, _)| t == "user_id" || t == "anonymous_id")
            .map(|(t, v)| SuppressedId::new(t, v))
            .filter(|id| id.validate().is_ok())
            .collect()
    }

    fn values(&self, id_type: &str) -> Vec<String> {
        self.ids
            .iter()
            .filter(|(t, _)| t == id_type)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// `col IN (values)`, or a predicate that matches nothing when there are none (every
/// dialect, ClickHouse 18.16 included, reads it).
fn isin<'a>(d: Dialect, col: &str, values: impl Iterator<Item = &'a String>) -> String {
    let list: Vec<String> = values.map(|v| lit(d, v)).collect();
    if list.is_empty() {
        NOTHING.into()
    } else {
        format!("{col} IN ({})", list.join(", "))
    }
}

/// A predicate that matches nothing.
const NOTHING: &str = "1 = 0";

/// `(type_col, value_col)` is one of `ids`.
fn id_match(
    d: Dialect,
    ids: &BTreeSet<(String, String)>,
    type_col: &str,
    value_col: &str,
) -> String {
    let mut parts = Vec::new();
    for t in ["user_id", "anonymous_id", "email"] {
        if ids.iter().any(|(ty, _)| ty == t) {
            parts.push(format!(
                "({type_col} = '{t}' AND {value_col} IN ({}))",
                values_of(d, ids, t)
            ));
        }
    }
    if parts.is_empty() {
        NOTHING.into()
    } else {
        format!("({})", parts.join(" OR "))
    }
}

/// Resolves a subject (and the ids an earlier run found) through the identity graph:
/// every id of every person one of its ids belongs to. Emails are also matched in
/// `identifies` traits, for a warehouse whose graph has not been built.
pub async fn resolve(
    s: &mut dyn SqlSession,
    subject: &Subject,
    known: &[(String, String)],
) -> Result<Person, SinkError> {
    let d = s.dialect();
    let mut ids = subject.ids();
    ids.extend(known.iter().cloned());
    let kinds = table_kinds(s).await?;
    if !kinds.contains_key("identities") {
        // No identity graph (a store without its tables; every sink has them now,
        // the lake since its migration 7): ids that one identify event carries
        // together are the same person.
        let r = s
            .query(&format!(
                "SELECT DISTINCT user_id, anonymous_id FROM identifies WHERE user_id IN ({}) OR anonymous_id IN ({})",
                values_of(d, &ids, "user_id"),
                values_of(d, &ids, "anonymous_id")
            ))
            .await?;
        for row in r.rows {
            if let Some(u) = row[0].clone() {
                ids.insert(("user_id".into(), u));
            }
            if let Some(a) = row[1].clone() {
                ids.insert(("anonymous_id".into(), a));
            }
        }
        return Ok(Person {
            ids,
            person_ids: BTreeSet::new(),
        });
    }
    let persons = s
        .query(&format!(
            "SELECT DISTINCT person_id FROM identities WHERE {}",
            id_match(d, &ids, "id_type", "id_value")
        ))
        .await?;
    let person_ids: BTreeSet<String> = persons
        .rows
        .into_iter()
        .filter_map(|r| r[0].clone())
        .collect();
    if !person_ids.is_empty() {
        let r = s
            .query(&format!(
                "SELECT id_type, id_value FROM identities WHERE person_id IN ({})",
                list(d, person_ids.iter())
            ))
            .await?;
        for row in r.rows {
            if let (Some(t), Some(v)) = (row[0].clone(), row[1].clone()) {
                ids.insert((t, v));
            }
        }
    }
    if !subject.email_hashes.is_empty() {
        let email = crate::audiences::eval::json_text(d, "traits", &["email"]);
        let r = s
            .query(&format!(
                "SELECT DISTINCT user_id, anonymous_id FROM identifies WHERE {email} IN ({})",
                list(d, subject.email_hashes.iter())
            ))
            .await?;
        for row in r.rows {
            if let Some(u) = row[0].clone() {
                ids.insert(("user_id".into(), u));
            }
            if let Some(a) = row[1].clone() {
                ids.insert(("anonymous_id".into(), a));
            }
        }
    }
    Ok(Person { ids, person_ids })
}

/// The tables and views of the session's schema, by name: `true` for a base table.
async fn table_kinds(
    s: &mut dyn SqlSession,
) -> Result<std::collections::BTreeMap<String, bool>, SinkError> {
    let ch = s.dialect() == Dialect::ClickHouse;
    let sql = if ch {
        "SELECT name, engine FROM system.tables WHERE database = currentDatabase()"
    } else {
        "SELECT table_name, table_type FROM information_schema.tables WHERE table_schema = current_schema()"
    };
    let r = s.query(sql).await?;
    Ok(r.rows
        .into_iter()
        .filter_map(|row| {
            let t = row[1].as_deref();
            let base = if ch {
                t != Some("View")
            } else {
                t == Some("BASE TABLE")
            };
            Some((row[0].clone()?, base))
        })
        .collect())
}

/// Where a view's rows are erased: on ClickHouse, the versioned table behind it
/// (`collector_rows_<name>` or `collector_<name>`); elsewhere none (a view of the
/// warehouse's is derived from tables erased on their own).
fn base_of(
    d: Dialect,
    kinds: &std::collections::BTreeMap<String, bool>,
    table: &str,
) -> Option<String> {
    if d != Dialect::ClickHouse || kinds.get(table) == Some(&true) {
        return None;
    }
    [
        format!("collector_rows_{table}"),
        format!("collector_{table}"),
    ]
    .into_iter()
    .find(|b| kinds.get(b) == Some(&true))
}

/// A place that holds rows about a person, and how to find them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    /// A view (a lake's tables over its files): counted and exported, erased by the
    /// sink's own means.
    pub view: bool,
    /// Where the rows of a view are erased (ClickHouse's versioned table behind it).
    pub base: Option<String>,
    pub table: String,
    /// The `WHERE` of their rows.
    pub predicate: String,
    /// `SET …` that strips the identifiers instead of deleting the row (the
    /// activation log's tombstone).
    pub tombstone: Option<String>,
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Every place in the warehouse that holds rows about `person`: the event tables (the
/// six Segment tables and every per-event table: any table with `user_id` and
/// `anonymous_id` columns), `users`, the quarantine and rejected values of their
/// events, the identity graph, profiles, audience membership, the activation outbox,
/// and the activation log (a tombstone).
/// `lake`: the event tables are views over files (counted and exported here, erased by
/// [`crate::sinks::Sink::erase_files`]).
pub async fn stores(
    s: &mut dyn SqlSession,
    person: &Person,
    lake: bool,
) -> Result<Vec<Store>, SinkError> {
    let kinds = table_kinds(s).await?;
    let d = s.dialect();
    let users = person.values("user_id");
    let anons = person.values("anonymous_id");
    let persons = &person.person_ids;
    // Not `users`, which is keyed by `id` (below): a trait `user_id` would make it look
    // like an event table.
    let discover = if d == Dialect::ClickHouse {
        // The logical tables are views over `collector_rows_*` (erased there).
        "SELECT table FROM system.columns WHERE database = currentDatabase() AND name IN ('user_id', 'anonymous_id') AND NOT startsWith(table, 'collector_') AND table != 'users' GROUP BY table HAVING count() = 2 ORDER BY table".to_string()
    } else {
        format!(
            "SELECT c.table_name FROM information_schema.columns c
               JOIN information_schema.tables t ON t.table_schema = c.table_schema AND t.table_name = c.table_name
             WHERE c.table_schema = current_schema() AND (t.table_type = 'BASE TABLE' OR {lake})
               AND c.column_name IN ('user_id', 'anonymous_id') AND c.table_name <> 'users'
             GROUP BY c.table_name HAVING COUNT(*) = 2 ORDER BY c.table_name",
            lake = if lake { "1 = 1" } else { NOTHING }
        )
    };
    let event_tables = s.query(&discover).await?;
    let mut out = Vec::new();
    let both: Vec<String> = person
        .values("user_id")
        .into_iter()
        .chain(person.values("anonymous_id"))
        .collect();
    for row in event_tables.rows {
        let Some(table) = row[0].clone() else {
            continue;
        };
        let mut predicate = format!(
            "({} OR {})",
            isin(d, "user_id", users.iter()),
            isin(d, "anonymous_id", anons.iter())
        );
        if table == "aliases" {
            predicate = format!("({predicate} OR {})", isin(d, "previous_id", both.iter()));
        }
        out.push(Store {
            view: kinds.get(&table) != Some(&true),
            base: base_of(d, &kinds, &table),
            table,
            predicate,
            tombstone: None,
        });
    }
    // The message ids of their events, for what is keyed by message id.
    let mut message_ids: Vec<String> = Vec::new();
    for table in collector_core::EventKind::ALL.map(collector_core::EventKind::table) {
        if let Some(st) = out.iter().find(|s| s.table == table) {
            let r = s
                .query(&format!(
                    "SELECT message_id FROM {table} WHERE {}",
                    st.predicate
                ))
                .await?;
            message_ids.extend(r.rows.into_iter().filter_map(|r| r[0].clone()));
        }
    }
    let messages = |col: &str| isin(d, col, message_ids.iter());
    let mut needles = Vec::new();
    for (t, key) in [("user_id", "userId"), ("anonymous_id", "anonymousId")] {
        for v in person.values(t) {
            let needle = format!("\"{key}\":{}", Value::String(v));
            needles.push(match d {
                Dialect::ClickHouse => format!("position(event, {}) > 0", lit(d, &needle)),
                _ => format!("strpos(event, {}) > 0", lit(d, &needle)),
            });
        }
    }
    let quarantine = if needles.is_empty() {
        NOTHING.to_string()
    } else {
        format!("({})", needles.join(" OR "))
    };
    let ids = &person.ids;
    let fixed = [
        ("users", isin(d, "id", users.iter()), None),
        // Where each of their `users` values came from (DuckDB, PostgreSQL, the lake).
        ("collector_user_traits", isin(d, "id", users.iter()), None),
        ("quarantine", quarantine, None),
        ("rejected_values", messages("message_id"), None),
        // The registry that makes loads exactly once: an erased event's id goes too
        // (its batch is gone from the edge, and its ids are suppressed there).
        ("message_ids", messages("message_id"), None),
        (
            "identities",
            format!(
                "({} OR {})",
                isin(d, "person_id", persons.iter()),
                id_match(d, ids, "id_type", "id_value")
            ),
            None,
        ),
        (
            "identity_edges",
            format!(
                "({} OR {})",
                id_match(d, ids, "a_type", "a_value"),
                id_match(d, ids, "b_type", "b_value")
            ),
            None,
        ),
        (
            "identity_merges",
            format!(
                "({} OR {} OR {} OR {})",
                id_match(d, ids, "a_type", "a_value"),
                id_match(d, ids, "b_type", "b_value"),
                isin(d, "from_person", persons.iter()),
                isin(d, "into_person", persons.iter())
            ),
            None,
        ),
        (
            "identity_dirty",
            id_match(d, ids, "id_type", "id_value"),
            None,
        ),
        ("profiles", isin(d, "person_id", persons.iter()), None),
        (
            "audience_membership",
            isin(d, "person_id", persons.iter()),
            None,
        ),
        (
            "activation_outbox",
            format!(
                "({} OR {})",
                isin(d, "person_id", persons.iter()),
                messages("message_id")
            ),
            None,
        ),
        (
            "activation_log",
            isin(d, "person_id", persons.iter()),
            Some("person_id = NULL, key = 'erased', detail = NULL".to_string()),
        ),
    ];
    for (table, predicate, tombstone) in fixed {
        // What this warehouse does not have (`collector_user_traits` in
        // ClickHouse).
        let Some(base) = kinds.get(table) else {
            continue;
        };
        out.push(Store {
            view: !base,
            base: base_of(d, &kinds, table),
            table: table.to_string(),
            predicate,
            tombstone,
        });
    }
    Ok(out)
}

/// Waits until ClickHouse has carried out this database's mutations (its deletes run
/// in the background; 18.16 cannot wait for them in the statement).
async fn wait_for_mutations(s: &mut dyn SqlSession) -> Result<(), SinkError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let r = s
            .query("SELECT count() FROM system.mutations WHERE database = currentDatabase() AND is_done = 0")
            .await?;
        if r.rows.first().and_then(|r| r[0].as_deref()) == Some("0") {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(SinkError::Transient(
                "ClickHouse has not finished the deletes after 300 s; the next pass checks again"
                    .into(),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn count(s: &mut dyn SqlSession, st: &Store) -> Result<i64, SinkError> {
    let r = s
        .query(&format!(
            "SELECT COUNT(*) FROM {} WHERE {}",
            quote(&st.table),
            st.predicate
        ))
        .await?;
    Ok(r.rows
        .first()
        .and_then(|r| r[0].as_deref())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// Everything stored about a person, as one JSON document: per table, their rows
/// (column → value; JSON columns as JSON).
pub async fn export(
    s: &mut dyn SqlSession,
    request: &Request,
    lake: bool,
    now_ms: i64,
) -> Result<Value, SinkError> {
    let person = resolve(s, &request.subject, &request.resolved).await?;
    let mut tables = Map::new();
    for st in stores(s, &person, lake).await? {
        let r = s
            .query(&format!(
                "SELECT * FROM {} WHERE {}",
                quote(&st.table),
                st.predicate
            ))
            .await?;
        set_store(
            s,
            &request.id,
            &st.table,
            "done",
            Some((r.rows.len() as i64, r.rows.len() as i64)),
            Some("exported"),
            now_ms,
        )
        .await?;
        if r.rows.is_empty() {
            continue;
        }
        let rows: Vec<Value> = r
            .rows
            .iter()
            .map(|row| {
                Value::Object(
                    r.columns
                        .iter()
                        .zip(row)
                        .map(|(c, v)| (c.clone(), cell(v)))
                        .collect(),
                )
            })
            .collect();
        tables.insert(st.table.clone(), Value::Array(rows));
    }
    set_status(s, &request.id, "completed", None, now_ms).await?;
    Ok(json!({
        "request_id": request.id,
        "generated_at": collector_core::timestamp::format_ms(now_ms),
        "subject": request.subject,
        "person_ids": person.person_ids,
        "ids": person.ids.iter().map(|(t, v)| json!({"type": t, "value": v})).collect::<Vec<_>>(),
        "tables": tables,
    }))
}

/// What the agent brings to a request: the edge (suppression list), the destinations
/// that can delete people, the key that opens their sealed contacts, and a hook that
/// updates the agent's own copy of the suppression list.
pub struct Context<'a> {
    pub edge: &'a EdgeClient,
    pub destinations: Vec<(&'a DestinationConfig, &'a dyn Destination)>,
    pub contacts: Option<&'a Contacts>,
    pub on_suppress: &'a (dyn Fn(&[SuppressedId], bool) + Send + Sync),
    /// The sink, for rows kept in files (a lake).
    pub sink: &'a dyn crate::sinks::Sink,
}

/// Carries out one run of a suppress, unsuppress or erase request (see the module
/// docs); returns the request as it stands after it.
pub async fn process(
    s: &mut dyn SqlSession,
    ctx: &Context<'_>,
    request: &Request,
    now_ms: i64,
) -> Result<(), SinkError> {
    let id = request.id.as_str();
    match request.kind {
        Kind::Export => Ok(()),
        Kind::Suppress | Kind::Unsuppress => {
            let person = Person {
                ids: request.subject.ids(),
                person_ids: BTreeSet::new(),
            };
            record_run(s, id, &person.ids).await?;
            let add = request.kind == Kind::Suppress;
            if edge_step(s, ctx, id, &person.suppressible(), add, now_ms).await? {
                set_status(s, id, "completed", None, now_ms).await?;
            }
            Ok(())
        }
        Kind::Erase => erase(s, ctx, request, now_ms).await,
    }
}

/// Adds the ids to the edge's suppression list (or removes them) and to this agent's
/// copy, recording the `edge` store. `false` when the edge could not be reached: the
/// request stays running and is retried at the next pass.
async fn edge_step(
    s: &mut dyn SqlSession,
    ctx: &Context<'_>,
    id: &str,
    list: &[SuppressedId],
    add: bool,
    now_ms: i64,
) -> Result<bool, SinkError> {
    let (a, r) = if add {
        (list.to_vec(), Vec::new())
    } else {
        (Vec::new(), list.to_vec())
    };
    match ctx.edge.suppress(a, r).await {
        Ok(total) => {
            (ctx.on_suppress)(list, add);
            let what = if add {
                "suppressed at the edge; queued events dropped at drain"
            } else {
                "removed from the edge's suppression list"
            };
            let detail = format!("{} id(s) {what} ({total} suppressed in all)", list.len());
            set_store(s, id, "edge", "done", None, Some(&detail), now_ms).await?;
            Ok(true)
        }
        Err(e) => {
            set_store(
                s,
                id,
                "edge",
                "retrying",
                None,
                Some(&e.to_string()),
                now_ms,
            )
            .await?;
            set_status(
                s,
                id,
                "running",
                Some("the edge is unreachable; retried every pass"),
                now_ms,
            )
            .await?;
            Ok(false)
        }
    }
}

async fn erase(
    s: &mut dyn SqlSession,
    ctx: &Context<'_>,
    request: &Request,
    now_ms: i64,
) -> Result<(), SinkError> {
    let id = request.id.as_str();
    let person = resolve(s, &request.subject, &request.resolved).await?;
    record_run(s, id, &person.ids).await?;
    let first_run = request.runs == 0;
    // 1. Nothing new: the edge drops their events from now on, and this agent drops
    //    those already queued.
    if !edge_step(s, ctx, id, &person.suppressible(), true, now_ms).await? {
        return Ok(());
    }
    // 2. The destinations that can delete a person, while their contact can still be
    //    opened from the warehouse.
    let done: BTreeSet<String> = super::get(s, id)
        .await?
        .map(|r| {
            r.stores
                .into_iter()
                .filter(|st| {
                    st.status == "done" || st.status == "failed" || st.status == "not_supported"
                })
                .map(|st| st.store)
                .collect()
        })
        .unwrap_or_default();
    let mut waiting = false;
    let people: Vec<&String> = person.person_ids.iter().collect();
    for (cfg, dest) in &ctx.destinations {
        let store = format!("destination:{}", cfg.name);
        if done.contains(&store) {
            continue;
        }
        let contact = crate::destinations::sync::person_contact(
            s,
            ctx.contacts,
            dest.contact_kinds(),
            &people,
        )
        .await?;
        let who = Erasure {
            request_id: id.to_string(),
            person_ids: person.person_ids.iter().cloned().collect(),
            user_ids: person.values("user_id"),
            anonymous_ids: person.values("anonymous_id"),
            contact,
        };
        match dest.erase(&who).await {
            None => set_store(
                s,
                id,
                &store,
                "not_supported",
                None,
                Some("this destination has no deletion endpoint; delete the person there by hand"),
                now_ms,
            )
            .await?,
            Some(Ok(answer)) => {
                set_store(
                    s,
                    id,
                    &store,
                    "done",
                    None,
                    Some(&crate::destinations::sync::redact(&answer, &who.contact)),
                    now_ms,
                )
                .await?
            }
            Some(Err(SendError::Retry { error, .. })) => {
                waiting = true;
                set_store(
                    s,
                    id,
                    &store,
                    "retrying",
                    None,
                    Some(&crate::destinations::sync::redact(&error, &who.contact)),
                    now_ms,
                )
                .await?
            }
            Some(Err(SendError::Reject { error })) => {
                set_store(
                    s,
                    id,
                    &store,
                    "failed",
                    None,
                    Some(&crate::destinations::sync::redact(&error, &who.contact)),
                    now_ms,
                )
                .await?
            }
        }
    }
    if waiting {
        return set_status(s, id, "running", Some("a destination failed transiently; retried every pass before the warehouse is erased"), now_ms).await;
    }
    // 3. Every table, in one transaction.
    let lake = ctx.sink.rows_in_files();
    let stores = stores(s, &person, lake).await?;
    s.batch("BEGIN").await?;
    let mut found = Vec::new();
    let ch = s.dialect() == Dialect::ClickHouse;
    let mut mutated = false;
    let erased: Result<(), SinkError> = async {
        for st in &stores {
            let n = count(s, st).await?;
            if n > 0 && (!st.view || st.base.is_some()) {
                let target = quote(st.base.as_deref().unwrap_or(&st.table));
                let sql = match (&st.tombstone, ch) {
                    (Some(set), false) => {
                        format!("UPDATE {target} SET {set} WHERE {}", st.predicate)
                    }
                    (None, false) => format!("DELETE FROM {target} WHERE {}", st.predicate),
                    // ClickHouse deletes with a mutation (every version of the rows);
                    // it keeps no activation log to tombstone.
                    (_, true) => format!("ALTER TABLE {target} DELETE WHERE {}", st.predicate),
                };
                s.execute(&sql).await?;
                mutated = true;
            }
            found.push(n);
        }
        Ok(())
    }
    .await;
    if let Err(e) = erased {
        let _ = s.batch("ROLLBACK").await;
        return Err(e);
    }
    s.batch("COMMIT").await?;
    if ch && mutated {
        wait_for_mutations(s).await?;
    }
    // What was found is on record before the files are touched.
    for (st, n) in stores.iter().zip(&found) {
        set_store(s, id, &st.table, "erasing", Some((*n, *n)), None, now_ms).await?;
    }
    // A lake's files: after the registry (a crash between leaves rows the next run
    // finds and removes). Its tables are counted again through fresh views.
    let mut fresh = None;
    if lake {
        ctx.sink
            .erase_files(&person.values("user_id"), &person.values("anonymous_id"))
            .await?;
        fresh = ctx.sink.privacy_session().await?;
    }
    let mut total = 0;
    for (st, n) in stores.iter().zip(&found) {
        let after = match fresh.as_mut() {
            Some(f) => count(&mut **f, st).await?,
            None => count(s, st).await?,
        };
        total += n;
        let detail = match (&st.tombstone, n) {
            (Some(_), n) if *n > 0 => Some("identifiers removed; the rows stay as tombstones"),
            _ => None,
        };
        set_store(
            s,
            id,
            &st.table,
            if after == 0 { "done" } else { "retrying" },
            Some((0, after)),
            detail,
            now_ms,
        )
        .await?;
    }
    drop(fresh);
    let failed = super::get(s, id)
        .await?
        .map(|r| r.stores.iter().any(|st| st.status == "failed"))
        .unwrap_or(false);
    if !first_run && total == 0 {
        let detail =
            failed.then_some("completed, but a destination refused the deletion (see its store)");
        set_status(s, id, "completed", detail, now_ms).await
    } else {
        set_status(
            s,
            id,
            "running",
            Some("erased; a later pass checks that nothing came back"),
            now_ms,
        )
        .await
    }
}
