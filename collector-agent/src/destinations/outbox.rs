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

/// The statements that enqueue, at `now_ms`, what `destination` should be sent:
/// entries of open stays, exits of stays whose entry was sent, removals of people whose
/// consent no longer allows the destination, and recent events of the configured names.
/// Keys make each idempotent.
pub fn enqueue_sql(
    d: Dialect,
    destination: &str,
    audiences: &[String],
    events: &[String],
    categories: &[String],
    max_event_age_ms: i64,
    now_ms: i64,
) -> Vec<String> {
    let dl = sql_lit(destination);
    let now = at(d, now_ms);
    let cols = "key, destination, kind, person_id, audience, transition, entered_at, message_id, created_at, attempts, next_attempt_at, status";
    let mut out = Vec::new();
    if !audiences.is_empty() {
        let auds = list(audiences);
        out.push(format!(
            "INSERT INTO activation_outbox ({cols})
             SELECT {dl} || ':' || m.person_id || ':' || m.audience || ':entered:' || {k}, {dl}, 'audience', m.person_id, m.audience,
               'entered', m.entered_at, NULL, {now}, 0, {now}, 'pending'
             FROM audience_membership m WHERE m.audience IN ({auds}) AND m.exited_at IS NULL
             ON CONFLICT (key) DO NOTHING",
            k = ts_key(d, "m.entered_at")
        ));
        let exit = |from: &str, cond: &str| {
            format!(
                "INSERT INTO activation_outbox ({cols})
                 SELECT {dl} || ':' || o.person_id || ':' || o.audience || ':exited:' || {k}, {dl}, 'audience', o.person_id, o.audience,
                   'exited', o.entered_at, NULL, {now}, 0, {now}, 'pending'
                 FROM activation_outbox o {from}
                 WHERE o.destination = {dl} AND o.transition = 'entered' AND o.status = 'sent' AND {cond}
                 ON CONFLICT (key) DO NOTHING",
                k = ts_key(d, "o.entered_at")
            )
        };
        // The stay ended.
        out.push(exit(
            "JOIN audience_membership m ON m.audience = o.audience AND m.person_id = o.person_id AND m.entered_at = o.entered_at",
            "m.exited_at IS NOT NULL",
        ));
        // Still in, but consent withdrawn: removed, and never added again in this stay
        // (its entry key is spent).
        out.push(exit(
            "JOIN profiles p ON p.person_id = o.person_id",
            &format!("NOT ({})", consent_sql(d, "p.consent", categories)),
        ));
    }
    if !events.is_empty() {
        out.push(format!(
            "INSERT INTO activation_outbox ({cols})
             SELECT {dl} || ':' || t.message_id, {dl}, 'event', NULL, NULL, NULL, NULL, t.message_id, {now}, 0, {now}, 'pending'
             FROM tracks t WHERE t.event_text IN ({}) AND t.timestamp > {}
             ON CONFLICT (key) DO NOTHING",
            list(events),
            at(d, now_ms - max_event_age_ms)
        ));
    }
    out
}
