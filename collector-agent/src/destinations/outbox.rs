//! `activation_outbox` and `activation_log` (DuckDB and PostgreSQL), and the SQL that
//! fills the outbox.

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
                 WHERE o.destination = {dl} AND o.transition = 'entered' AND o.status = 'sent' AND {cond}",
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

fn text(d: Dialect) -> &'static str {
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
