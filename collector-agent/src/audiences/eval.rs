//! Audiences compiled to each dialect's SQL and evaluated in the warehouse: who is in
//! now, against a clock the caller gives; `audience_membership` records each entry and
//! exit, so the next step can sync diffs.

use std::time::Duration;

use collector_core::timestamp::format_ms;

use super::config::{Audience, Definition, EventRef, EventRule};
use crate::sinks::{lit, Dialect, Relational, SinkError, SqlSession};

/// `audience_membership` (a migration of DuckDB and PostgreSQL; ClickHouse has its own).
pub fn ddl(d: Relational) -> String {
    let (t, ts) = match d {
        Relational::DuckDb => ("VARCHAR", "TIMESTAMP"),
        Relational::Postgres => ("text", "timestamptz"),
    };
    format!(
        "CREATE TABLE audience_membership (audience {t} NOT NULL, person_id {t} NOT NULL, entered_at {ts} NOT NULL, exited_at {ts}, PRIMARY KEY (audience, person_id, entered_at));\n"
    )
}

/// An instant as a literal of the dialect's timestamp type (UTC).
pub(crate) fn at(d: Dialect, ms: i64) -> String {
    // format_ms: 2026-11-25T10:00:00.000Z
    let text = format_ms(ms)
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_string();
    match d {
        Dialect::DuckDb => format!("CAST('{text}' AS TIMESTAMP)"),
        Dialect::Postgres => format!("CAST('{text}+00' AS timestamptz)"),
        // Whole seconds, as ClickHouse 18.16 stores instants; a number has no time zone.
        Dialect::ClickHouse => format!("toDateTime({}, 'UTC')", ms.div_euclid(1000)),
    }
}

/// `e` plus `secs` seconds.
fn plus_seconds(d: Dialect, e: &str, secs: u64) -> String {
    match d {
        Dialect::DuckDb | Dialect::Postgres => format!("{e} + INTERVAL '{secs} seconds'"),
        Dialect::ClickHouse => format!("{e} + INTERVAL {secs} SECOND"),
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub(crate) fn json_text(d: Dialect, col: &str, path: &[&str]) -> String {
    match d {
        Dialect::DuckDb => format!(
            "json_extract_string({col}, '$.{}')",
            path.iter()
                .map(|k| format!("\"{}\"", k.replace('\'', "''").replace('"', "\\\"")))
                .collect::<Vec<_>>()
                .join(".")
        ),
        Dialect::Postgres => {
            let (last, init) = path.split_last().expect("a path");
            format!(
                "({col}{}->>{})",
                init.iter()
                    .map(|k| format!("->{}", lit(d, k)))
                    .collect::<String>(),
                lit(d, last)
            )
        }
        // ClickHouse 18.16 has no JSON paths, only `visitParam*`, which finds the first
        // occurrence of a key at any depth: exact for flat objects (properties as
        // sent, and the traits and consent the agent writes).
        Dialect::ClickHouse => {
            let (last, init) = path.split_last().expect("a path");
            let obj = init.iter().fold(col.to_string(), |o, k| {
                format!("visitParamExtractRaw({o}, {})", lit(d, k))
            });
            let raw = format!("visitParamExtractRaw({obj}, {})", lit(d, last));
            format!(
                "if(substring({raw}, 1, 1) = '\"', visitParamExtractString({obj}, {}), {raw})",
                lit(d, last)
            )
        }
    }
}

/// `(person_id, message_id, ts)` of the events a rule counts, attributed to people.
fn person_events(d: Dialect, r: &EventRule) -> String {
    let (table, mut conds) = match &r.what {
        EventRef::Track(name) => ("tracks", vec![format!("event_text = {}", lit(d, name))]),
        EventRef::View(kind) => (
            if *kind == "page" { "pages" } else { "screens" },
            Vec::new(),
        ),
    };
    for (k, v) in &r.filters {
        if k == "name" && matches!(r.what, EventRef::View(_)) {
            conds.push(format!("name = {}", lit(d, v)));
        } else {
            conds.push(format!(
                "{} = {}",
                json_text(d, "properties", &[k]),
                lit(d, v)
            ));
        }
    }
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    let src =
        format!("SELECT message_id, anonymous_id, user_id, timestamp AS ts FROM {table}{filter}");
    format!(
        "SELECT DISTINCT person_id, message_id, ts FROM (
           SELECT i.person_id, e.message_id, e.ts FROM ({src}) e JOIN (SELECT id_value, person_id FROM identities WHERE id_type = 'anonymous_id') i ON i.id_value = e.anonymous_id
           UNION ALL
           SELECT i.person_id, e.message_id, e.ts FROM ({src}) e JOIN (SELECT id_value, person_id FROM identities WHERE id_type = 'user_id') i ON i.id_value = e.user_id) u"
    )
}

/// The query of an audience's current members (`person_id`), at `now_ms`.
pub fn members_sql(a: &Audience, d: Dialect, now_ms: i64) -> String {
    let now = at(d, now_ms);
    let mut conds: Vec<String> = a
        .requires
        .iter()
        .map(|c| format!("{} = 'true'", json_text(d, "p.consent", &[c, "granted"])))
        .collect();
    match &a.definition {
        Definition::Sql(sql) => {
            conds.push(format!("p.person_id IN (SELECT person_id FROM ({sql}) q)"));
            format!(
                "SELECT p.person_id FROM profiles p WHERE {}",
                conds.join(" AND ")
            )
        }
        Definition::Rule {
            performed,
            not_performed_after,
            traits,
        } => {
            for (k, v) in traits {
                conds.push(format!(
                    "{} = {}",
                    json_text(d, "p.traits", &[k]),
                    lit(d, v)
                ));
            }
            let Some(perf) = performed else {
                let w = if conds.is_empty() {
                    String::new()
                } else {
                    format!(" WHERE {}", conds.join(" AND "))
                };
                return format!("SELECT p.person_id FROM profiles p{w}");
            };
            let mut window = vec![format!("ts <= {now}")];
            if let Some(w) = perf.within {
                window.push(format!("ts > {}", at(d, now_ms - ms(w))));
            }
            let mut having = vec![format!("count(*) >= {}", perf.at_least)];
            if let Some(o) = perf.older_than {
                having.push(format!("max(ts) <= {}", at(d, now_ms - ms(o))));
            }
            // Subqueries, not `WITH`: ClickHouse 18.16 has no common table expressions.
            let perf_sql = format!(
                "SELECT person_id, max(ts) AS last_ts FROM ({}) x WHERE {} GROUP BY person_id HAVING {}",
                person_events(d, perf),
                window.join(" AND "),
                having.join(" AND ")
            );
            if let Some(y) = not_performed_after {
                let mut after = vec!["y.ts > p2.last_ts".to_string(), format!("y.ts <= {now}")];
                if let Some(w) = y.within {
                    after.push(format!(
                        "y.ts <= {}",
                        plus_seconds(d, "p2.last_ts", w.as_secs())
                    ));
                }
                conds.push(format!(
                    "p.person_id NOT IN (SELECT y.person_id FROM ({}) y JOIN ({perf_sql}) p2 ON y.person_id = p2.person_id WHERE {})",
                    person_events(d, y),
                    after.join(" AND ")
                ));
            }
            conds.insert(0, "1 = 1".into());
            format!(
                "SELECT p.person_id FROM profiles p JOIN ({perf_sql}) perf ON perf.person_id = p.person_id WHERE {}",
                conds.join(" AND ")
            )
        }
    }
}

/// Entries and exits of one evaluation.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Evaluation {
    pub audience: String,
    pub members: u64,
    pub entered: u64,
    pub exited: u64,
}

/// Evaluates every audience at `now_ms`, in one transaction: who entered (a row with
/// `entered_at` = now) and who left (`exited_at` = now).
pub async fn evaluate(
    s: &mut dyn SqlSession,
    audiences: &[Audience],
    now_ms: i64,
) -> Result<Vec<Evaluation>, SinkError> {
    if s.dialect() == Dialect::ClickHouse {
        let mut out = Vec::new();
        for a in audiences {
            out.push(
                evaluate_clickhouse(s, a, now_ms)
                    .await
                    .map_err(|e| SinkError::Permanent(format!("audience {}: {e}", a.name)))?,
            );
        }
        return Ok(out);
    }
    s.batch("BEGIN").await?;
    let mut out = Vec::new();
    for a in audiences {
        match evaluate_one(s, a, now_ms).await {
            Ok(e) => out.push(e),
            Err(e) => {
                let _ = s.batch("ROLLBACK").await;
                return Err(SinkError::Permanent(format!("audience {}: {e}", a.name)));
            }
        }
    }
    s.batch("COMMIT").await?;
    Ok(out)
}

async fn evaluate_one(
    s: &mut dyn SqlSession,
    a: &Audience,
    now_ms: i64,
) -> Result<Evaluation, SinkError> {
    let d = s.dialect();
    let now = at(d, now_ms);
    let name = lit(d, &a.name);
    s.batch(&format!(
        "DROP TABLE IF EXISTS audience_now; CREATE TEMP TABLE audience_now AS {};",
        members_sql(a, d, now_ms)
    ))
    .await?;
    let entered = s
        .execute(&format!(
            "INSERT INTO audience_membership (audience, person_id, entered_at, exited_at)
             SELECT DISTINCT {name}, n.person_id, {now}, CAST(NULL AS {ts}) FROM audience_now n
             WHERE NOT EXISTS (SELECT 1 FROM audience_membership m WHERE m.audience = {name} AND m.person_id = n.person_id AND m.exited_at IS NULL)",
            ts = if d == Dialect::DuckDb { "TIMESTAMP" } else { "timestamptz" }
        ))
        .await?;
    let exited = s
        .execute(&format!(
            "UPDATE audience_membership SET exited_at = {now}
             WHERE audience = {name} AND exited_at IS NULL
               AND NOT EXISTS (SELECT 1 FROM audience_now n WHERE n.person_id = audience_membership.person_id)"
        ))
        .await?;
    let members = s
        .query("SELECT count(DISTINCT person_id) FROM audience_now")
        .await?
        .rows
        .first()
        .and_then(|r| r[0].as_deref().and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    Ok(Evaluation {
        audience: a.name.clone(),
        members,
        entered,
        exited,
    })
}

/// One audience in ClickHouse, which has no transactions and no `UPDATE`: an exit is a
/// new version of the stay (`collector_audience_membership`, read through the `FINAL`
/// view `audience_membership`). Interrupted between its two inserts, the next
/// evaluation finishes the job: both inserts only add what is still missing.
async fn evaluate_clickhouse(
    s: &mut dyn SqlSession,
    a: &Audience,
    now_ms: i64,
) -> Result<Evaluation, SinkError> {
    let d = Dialect::ClickHouse;
    let now = at(d, now_ms);
    let name = lit(d, &a.name);
    let version = crate::sinks::clickhouse::version_now();
    s.batch(&format!(
        "DROP TEMPORARY TABLE IF EXISTS audience_now;
         CREATE TEMPORARY TABLE audience_now (person_id String) ENGINE = Memory;
         INSERT INTO audience_now SELECT DISTINCT person_id FROM ({})",
        members_sql(a, d, now_ms)
    ))
    .await?;
    let count = |r: crate::sinks::QueryResult| -> u64 {
        r.rows
            .first()
            .and_then(|r| r[0].as_deref().and_then(|n| n.parse().ok()))
            .unwrap_or(0)
    };
    let open = format!(
        "SELECT person_id FROM audience_membership WHERE audience = {name} AND exited_at IS NULL"
    );
    let entering = format!("FROM audience_now WHERE person_id NOT IN ({open})");
    let leaving = format!(
        "FROM audience_membership WHERE audience = {name} AND exited_at IS NULL AND person_id NOT IN (SELECT person_id FROM audience_now)"
    );
    let entered = count(s.query(&format!("SELECT count() {entering}")).await?);
    let exited = count(s.query(&format!("SELECT count() {leaving}")).await?);
    s.batch(&format!(
        "INSERT INTO collector_audience_membership (audience, person_id, entered_at, exited_at, _version)
         SELECT audience, person_id, entered_at, {now}, {version} {leaving};
         INSERT INTO collector_audience_membership (audience, person_id, entered_at, exited_at, _version)
         SELECT {name}, person_id, {now}, CAST(NULL AS Nullable(DateTime('UTC'))), {version} {entering}"
    ))
    .await?;
    let members = count(s.query("SELECT count() FROM audience_now").await?);
    Ok(Evaluation {
        audience: a.name.clone(),
        members,
        entered,
        exited,
    })
}
