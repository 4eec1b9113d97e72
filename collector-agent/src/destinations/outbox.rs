//! `activation_outbox` and `activation_log` (DuckDB, PostgreSQL, the lake's state
//! file), and the SQL that fills the outbox.

use crate::audiences::eval::{at, json_text};
use crate::sinks::{sql_lit, Dialect, Relational};

/// The tables (a migration of each SQL warehouse).
pub fn ddl(d: Relational) -> String {
    let (t, ts, j) = match d {
        Relational::DuckDb => ("VARCHAR", "TIMESTAMP", "JSON"),
        Relational::Postgres => ("text", "timestamptz", "jsonb"),
    };
    let mut sql = format!(
        "CREATE TABLE activation_outbox (key {t} PRIMARY KEY, destination {t} NOT NULL, kind {t} NOT NULL, person_id {t}, audience {t}, transition {t}, entered_at {ts}, message_id {t}, created_at {ts} NOT NULL, attempts INTEGER NOT NULL, next_attempt_at {ts} NOT NULL, status {t} NOT NULL, last_error {t}, done_at {ts});
CREATE TABLE activation_log (logged_at {ts} NOT NULL, destination {t} NOT NULL, key {t} NOT NULL, person_id {t}, action {t} NOT NULL, categories {t}, consent {j}, detail {t});
"
    );
    if d == Relational::Postgres {
        sql.push_str(
            "CREATE INDEX activation_outbox_due ON activation_outbox (destination, status, next_attempt_at);\n",
        );
    }
    sql
}

/// An instant as text, the same in both dialects (for keys).
fn ts_key(d: Dialect, e: &str) -> String {
    match d {
        Dialect::Postgres => {
            format!("to_char({e} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')")
        }
        _ => format!("strftime({e}, '%Y-%m-%dT%H:%M:%S.%gZ')"),
    }
}

/// True when the person's current consent (`p.consent`) grants every category.
pub fn consent_sql(d: Dialect, col: &str, categories: &[String]) -> String {
    if categories.is_empty() {
        return "1 = 1".into();
    }
    categories
        .iter()
        .map(|c| {
            format!(
                "COALESCE({} = 'true', false)",
                json_text(d, col, &[c, "granted"])
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

fn list(v: &[String]) -> String {
    v.iter().map(|s| sql_lit(s)).collect::<Vec<_>>().join(", ")
}

/// The columns an enqueue query selects (the rest of an outbox row is its state).
pub const NEW_ROW: &str =
    "key, destination, kind, person_id, audience, transition, entered_at, message_id";

/// The queries of what `destination` should be sent at `now_ms`, each selecting
/// [`NEW_ROW`]: entries of open stays, exits of stays whose entry was sent, removals of
/// people whose consent no longer allows the destination, and recent events of the
/// configured names. Keys make enqueueing them idempotent.
pub fn candidates_sql(
    d: Dialect,
    destination: &str,
    audiences: &[String],
    events: &[String],
    categories: &[String],
    max_event_age_ms: i64,
    now_ms: i64,
) -> Vec<String> {
    let dl = sql_lit(destination);
    let mut out = Vec::new();
    if !audiences.is_empty() {
        let auds = list(audiences);
        out.push(format!(
            "SELECT {dl} || ':' || m.person_id || ':' || m.audience || ':entered:' || {k} AS key, {dl} AS destination, 'audience' AS kind,
               m.person_id, m.audience, 'entered' AS transition, m.entered_at, CAST(NULL AS {t}) AS message_id
             FROM audience_membership m WHERE m.audience IN ({auds}) AND m.exited_at IS NULL",
            k = ts_key(d, "m.entered_at"),
            t = text(d)
        ));
        // Both exits share one key per stay: a person leaves a destination's audience
        // once, for whichever reason comes first.
        let exit = |from: &str, cond: &str, transition: &str| {
            format!(
                "SELECT {dl} || ':' || o.person_id || ':' || o.audience || ':exited:' || {k} AS key, {dl} AS destination, 'audience' AS kind,
                   o.person_id, o.audience, '{transition}' AS transition, o.entered_at, CAST(NULL AS {t}) AS message_id
                 FROM activation_outbox o {from}
                 WHERE o.destination = {dl} AND o.transition = 'entered' AND o.status IN ('sent', 'continued') AND {cond}",
                k = ts_key(d, "o.entered_at"),
                t = text(d)
            )
        };
        // Consent withdrawn (whether or not the audience still holds them): removed,
        // and never added again in this stay (its entry key is spent). First, so that
        // when both happen at once the destination forgets them rather than untags.
        out.push(exit(
            "JOIN profiles p ON p.person_id = o.person_id",
            &format!("NOT ({})", consent_sql(d, "p.consent", categories)),
            "withdrawn",
        ));
        // The stay ended.
        out.push(exit(
            "JOIN audience_membership m ON m.audience = o.audience AND m.person_id = o.person_id AND m.entered_at = o.entered_at",
            "m.exited_at IS NOT NULL",
            "exited",
        ));
    }
    if !events.is_empty() {
        out.push(format!(
            "SELECT {dl} || ':' || t.message_id AS key, {dl} AS destination, 'event' AS kind, CAST(NULL AS {tx}) AS person_id,
               CAST(NULL AS {tx}) AS audience, CAST(NULL AS {tx}) AS transition, CAST(NULL AS {ts}) AS entered_at, t.message_id
             FROM tracks t WHERE t.event_text IN ({}) AND t.timestamp > {}",
            list(events),
            at(d, now_ms - max_event_age_ms),
            tx = text(d),
            ts = ts_type(d)
        ));
    }
    out
}

/// The dialect's text type.
pub(super) fn text(d: Dialect) -> &'static str {
    match d {
        Dialect::Postgres => "text",
        _ => "VARCHAR",
    }
}

fn ts_type(d: Dialect) -> &'static str {
    match d {
        Dialect::Postgres => "timestamptz",
        _ => "TIMESTAMP",
    }
}

/// The statements that enqueue the candidates at `now_ms`.
pub fn enqueue_sql(candidates: &[String], d: Dialect, now_ms: i64) -> Vec<String> {
    let now = at(d, now_ms);
    candidates
        .iter()
        .map(|c| {
            format!(
                "INSERT INTO activation_outbox ({NEW_ROW}, created_at, attempts, next_attempt_at, status)
                 SELECT {NEW_ROW}, {now}, 0, {now}, 'pending' FROM ({c}) x
                 ON CONFLICT (key) DO NOTHING"
            )
        })
        .collect()
}

/// `(count, update)`: how many dead letters `destination` has, and the statement that
/// makes them pending again from `now_ms` (a fresh `retry_for`, consent checked again).
pub fn replay_dead_sql(d: Dialect, destination: &str, now_ms: i64) -> (String, String) {
    let (dl, now) = (sql_lit(destination), at(d, now_ms));
    (
        format!("SELECT count(*) FROM activation_outbox WHERE destination = {dl} AND status = 'dead'"),
        format!(
            "UPDATE activation_outbox SET status = 'pending', attempts = 0, created_at = {now}, next_attempt_at = {now}, last_error = NULL, done_at = NULL
             WHERE destination = {dl} AND status = 'dead'"
        ),
    )
}

/// When two people merge while one of them was in an audience a destination had been
/// sent, the stay goes on under the surviving person without a second send: the
/// survivor's entry is recorded as `continued` (nothing is sent for it, and its exit
/// later is sent as usual), and the merged-away person's exit too (so it is never
/// sent). Run before the candidates, so those see the continuation.
pub fn continuation_sql(
    d: Dialect,
    destination: &str,
    audiences: &[String],
    now_ms: i64,
) -> Vec<String> {
    if audiences.is_empty() {
        return Vec::new();
    }
    let dl = sql_lit(destination);
    let now = at(d, now_ms);
    let auds = list(audiences);
    let cols = format!("{NEW_ROW}, created_at, attempts, next_attempt_at, status, done_at");
    let key = |who: &str, transition: &str, at: &str| {
        format!(
            "{dl} || ':' || {who} || ':' || m.audience || ':{transition}:' || {}",
            ts_key(d, at)
        )
    };
    vec![
        // The survivor's open stay continues one that was sent (and not left).
        format!(
            "INSERT INTO activation_outbox ({cols})
             SELECT DISTINCT {k}, {dl}, 'audience', m.person_id, m.audience, 'entered', m.entered_at, CAST(NULL AS {t}), {now}, 0, {now}, 'continued', {now}
             FROM audience_membership m
             JOIN identity_merges g ON g.into_person = m.person_id AND g.kind = 'merged'
             JOIN activation_outbox o ON o.person_id = g.from_person AND o.audience = m.audience AND o.destination = {dl}
               AND o.transition = 'entered' AND o.status IN ('sent', 'continued')
             WHERE m.audience IN ({auds}) AND m.exited_at IS NULL
               AND NOT EXISTS (SELECT 1 FROM activation_outbox x WHERE x.destination = {dl} AND x.person_id = o.person_id
                 AND x.audience = o.audience AND x.entered_at = o.entered_at AND x.transition <> 'entered')
             ON CONFLICT (key) DO NOTHING",
            k = key("m.person_id", "entered", "m.entered_at"),
            t = text(d)
        ),
        // The merged-away person's stay is handed over to the survivor's open one (a
        // continuation, or one already sent): its exit is spent, not sent.
        format!(
            "INSERT INTO activation_outbox ({cols})
             SELECT DISTINCT {k}, {dl}, 'audience', o.person_id, o.audience, 'exited', o.entered_at, CAST(NULL AS {t}), {now}, 0, {now}, 'continued', {now}
             FROM activation_outbox o
             JOIN identity_merges g ON g.from_person = o.person_id AND g.kind = 'merged'
             JOIN activation_outbox c ON c.person_id = g.into_person AND c.audience = o.audience AND c.destination = {dl}
               AND c.transition = 'entered' AND c.status IN ('sent', 'continued')
             JOIN audience_membership p ON p.person_id = c.person_id AND p.audience = c.audience
               AND p.entered_at = c.entered_at AND p.exited_at IS NULL
             JOIN audience_membership m ON m.person_id = o.person_id AND m.audience = o.audience AND m.entered_at = o.entered_at
             WHERE o.destination = {dl} AND o.transition = 'entered' AND o.status IN ('sent', 'continued')
             ON CONFLICT (key) DO NOTHING",
            k = key("o.person_id", "exited", "o.entered_at"),
            t = text(d)
        ),
    ]
}
