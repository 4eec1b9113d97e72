//! One identity run in ClickHouse: the same steps and the same rules as in DuckDB and
//! PostgreSQL ([`super::run`]), in ClickHouse 18.16's SQL. ClickHouse has no
//! transactions, no `UPDATE` and no unique keys, so every write is a new version of a
//! row (`ReplacingMergeTree`, read through the `FINAL` views `identities`,
//! `identity_edges`, `profiles`, …) and the loads read are marked last
//! (`collector_identity_read`): a run that stops half-way leaves its loads unread, and
//! the next run does the same work again, which changes nothing it already wrote.
//!
//! Scratch tables are temporary tables of the run's HTTP session. Profiles are computed
//! per chunk of people: ClickHouse finds each person's events, counts them and reduces
//! their consent evidence to one row per distinct decision; the agent folds traits and
//! consent (latest value per key and per category) and writes the rows.
//!
//! Two agents running identity on one ClickHouse database at the same moment may write
//! versions over each other's (ClickHouse has no lock to take); the next run repairs
//! the region it reads, but run identity from one agent (`[identity] enabled = false`
//! on the others).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use collector_core::identity::BlockList;
use collector_core::EventKind;
use serde_json::{json, Map, Value};

use super::config::IdentityConfig;
use super::run::{plan, IdentityStats};
use crate::sinks::clickhouse::version_now;
use crate::sinks::{lit, Dialect, QueryResult, SinkError, SqlSession};

/// People whose profiles one round of queries computes.
const PROFILE_CHUNK: usize = 50_000;

/// Prefix of the flattened consent evidence columns.
const CONSENT: &str = "context_consent_resolved_";

/// True when the text `v` is on the block list: [`BlockList::blocked`] in ClickHouse's
/// SQL (only spaces are trimmed, as there).
fn blocked(v: &str, list: &BlockList) -> String {
    let t = format!("replaceRegexpAll({v}, '^ +| +$', '')");
    let values = list
        .values()
        .map(|v| lit(Dialect::ClickHouse, v))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "({t} = '' OR (length({t}) >= 2 AND ((substring({t}, 1, 1) = '\"' AND substring({t}, length({t}), 1) = '\"') OR (substring({t}, 1, 1) = '''' AND substring({t}, length({t}), 1) = ''''))) OR match({t}, '^[0-]+$') OR lowerUTF8({t}) IN ({values}))"
    )
}

fn first_number(r: &QueryResult) -> u64 {
    r.rows
        .first()
        .and_then(|r| r[0].as_deref().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

async fn count(s: &mut dyn SqlSession, sql: &str) -> Result<u64, SinkError> {
    Ok(first_number(&s.query(sql).await?))
}

/// The columns of the rows table behind `table`.
async fn columns_of(s: &mut dyn SqlSession, table: &str) -> Result<BTreeSet<String>, SinkError> {
    let r = s
        .query(&format!(
            "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = {}",
            lit(Dialect::ClickHouse, &format!("collector_rows_{table}"))
        ))
        .await?;
    Ok(r.rows.into_iter().filter_map(|r| r[0].clone()).collect())
}

/// An RFC 3339 instant as ClickHouse's `DateTime` text (`YYYY-MM-DD hh:mm:ss`, UTC).
fn datetime_text(rfc3339: &str) -> String {
    rfc3339.get(..19).unwrap_or(rfc3339).replace('T', " ")
}

pub(super) async fn run(
    s: &mut dyn SqlSession,
    cfg: &IdentityConfig,
) -> Result<IdentityStats, SinkError> {
    let list = BlockList::new(&cfg.block);
    let mut stats = IdentityStats {
        runs: 1,
        ..IdentityStats::default()
    };

    // 1. What to scan: the loads not read yet.
    s.batch(
        "DROP TEMPORARY TABLE IF EXISTS identity_loads;
         CREATE TEMPORARY TABLE identity_loads (load_id UInt64) ENGINE = Memory;
         INSERT INTO identity_loads SELECT load_id FROM identity_pending;
         DROP TEMPORARY TABLE IF EXISTS identity_scan;
         CREATE TEMPORARY TABLE identity_scan (message_id String, anonymous_id Nullable(String), user_id Nullable(String),
           previous_id Nullable(String), email Nullable(String), ts DateTime('UTC')) ENGINE = Memory",
    )
    .await?;
    // Nothing pending and nothing to redo: nothing can have changed (a run that
    // stopped half-way left its loads pending, so they are read again).
    if count(s, "SELECT count() FROM identity_loads").await? == 0
        && count(s, "SELECT count() FROM identity_dirty").await? == 0
    {
        return Ok(stats);
    }
    let has_email = columns_of(s, "identifies").await?.contains("email");
    for kind in EventKind::ALL {
        let tb = kind.table();
        let previous = if tb == "aliases" {
            "previous_id"
        } else {
            "CAST(NULL AS Nullable(String))"
        };
        // The `email` trait, flattened into its own column of `identifies`.
        let email = if tb == "identifies" && has_email {
            "CAST(email AS Nullable(String))"
        } else {
            "CAST(NULL AS Nullable(String))"
        };
        s.batch(&format!(
            "INSERT INTO identity_scan SELECT message_id, anonymous_id, user_id, {previous}, {email}, ifNull(timestamp, toDateTime(0, 'UTC')) FROM {tb}
             WHERE message_id IN (SELECT message_id FROM message_ids WHERE table_name = '{tb}' AND load_id IN (SELECT load_id FROM identity_loads))"
        ))
        .await?;
    }

    // 2. Ids (each its own person until joined) and edges.
    let v = version_now();
    s.batch(&format!(
        "DROP TEMPORARY TABLE IF EXISTS identity_scan_ids;
         CREATE TEMPORARY TABLE identity_scan_ids (id_type String, id_value String, ts DateTime('UTC')) ENGINE = Memory;
         INSERT INTO identity_scan_ids SELECT id_type, id_value, ts FROM (
           SELECT 'anonymous_id' AS id_type, assumeNotNull(anonymous_id) AS id_value, ts FROM identity_scan WHERE anonymous_id IS NOT NULL
           UNION ALL SELECT 'user_id', assumeNotNull(user_id), ts FROM identity_scan WHERE user_id IS NOT NULL
           UNION ALL SELECT 'email', assumeNotNull(email), ts FROM identity_scan WHERE email IS NOT NULL
           UNION ALL SELECT 'user_id', assumeNotNull(previous_id), ts FROM identity_scan
             WHERE previous_id IS NOT NULL AND (anonymous_id IS NULL OR previous_id != anonymous_id)
         ) WHERE NOT {blocked_id};
         INSERT INTO collector_identities (id_type, id_value, person_id, first_seen, _version)
           SELECT id_type, id_value, if(old_person = '', lower(hex(MD5(concat(id_type, ':', id_value)))), old_person), first_seen, {v}
           FROM (SELECT id_type, id_value, min(ts) AS first_seen FROM identity_scan_ids GROUP BY id_type, id_value) AS scanned
           ANY LEFT JOIN (SELECT id_type, id_value, person_id AS old_person, first_seen AS old_first FROM identities
             WHERE (id_type, id_value) IN (SELECT id_type, id_value FROM identity_scan_ids)) AS stored USING (id_type, id_value)
           WHERE old_person = '' OR first_seen < old_first;
         DROP TEMPORARY TABLE IF EXISTS identity_scan_edges;
         CREATE TEMPORARY TABLE identity_scan_edges (a_type String, a_value String, b_type String, b_value String, message_id String, ts DateTime('UTC')) ENGINE = Memory;
         INSERT INTO identity_scan_edges
           SELECT 'anonymous_id' AS a_type, assumeNotNull(anonymous_id) AS a_value, 'user_id' AS b_type, assumeNotNull(user_id) AS b_value, message_id, ts
             FROM identity_scan WHERE anonymous_id IS NOT NULL AND user_id IS NOT NULL
           UNION ALL SELECT 'user_id', assumeNotNull(user_id), 'email', assumeNotNull(email), message_id, ts
             FROM identity_scan WHERE user_id IS NOT NULL AND email IS NOT NULL
           UNION ALL SELECT 'anonymous_id', assumeNotNull(anonymous_id), 'email', assumeNotNull(email), message_id, ts
             FROM identity_scan WHERE user_id IS NULL AND anonymous_id IS NOT NULL AND email IS NOT NULL
           UNION ALL SELECT 'user_id', if(assumeNotNull(previous_id) < assumeNotNull(user_id), assumeNotNull(previous_id), assumeNotNull(user_id)),
             'user_id', if(assumeNotNull(previous_id) < assumeNotNull(user_id), assumeNotNull(user_id), assumeNotNull(previous_id)), message_id, ts
             FROM identity_scan WHERE previous_id IS NOT NULL AND user_id IS NOT NULL AND previous_id != user_id
               AND (anonymous_id IS NULL OR previous_id != anonymous_id)",
        blocked_id = blocked("id_value", &list),
    ))
    .await?;
    // Each pair once, at its earliest event; kept when new or earlier than the stored one.
    let (blocked_a, blocked_b) = (blocked("a_value", &list), blocked("b_value", &list));
    s.batch(&format!(
        "DROP TEMPORARY TABLE IF EXISTS identity_new_edges;
         CREATE TEMPORARY TABLE identity_new_edges (a_type String, a_value String, b_type String, b_value String, message_id String,
           ts DateTime('UTC'), status String, reason Nullable(String)) ENGINE = Memory;
         INSERT INTO identity_new_edges
           SELECT a_type, a_value, b_type, b_value, message_id, ts,
             if({blocked_a} OR {blocked_b}, 'blocked', 'new'),
             multiIf({blocked_a}, concat('blocked id: ', a_value), {blocked_b}, concat('blocked id: ', b_value), CAST(NULL AS Nullable(String)))
           FROM (SELECT a_type, a_value, b_type, b_value, tupleElement(first, 1) AS ts, tupleElement(first, 2) AS message_id
                 FROM (SELECT a_type, a_value, b_type, b_value, min((ts, message_id)) AS first FROM identity_scan_edges
                       GROUP BY a_type, a_value, b_type, b_value)) AS scanned
           ANY LEFT JOIN (SELECT a_type, a_value, b_type, b_value, message_id AS old_message_id, ts AS old_ts, status AS old_status FROM identity_edges
               WHERE (a_type, a_value, b_type, b_value) IN (SELECT a_type, a_value, b_type, b_value FROM identity_scan_edges)) AS stored
             USING (a_type, a_value, b_type, b_value)
           WHERE old_status = '' OR ts < old_ts OR (ts = old_ts AND message_id < old_message_id);
         INSERT INTO collector_identity_edges SELECT *, {v} FROM identity_new_edges;
         INSERT INTO collector_identity_merges
           SELECT message_id, a_type, a_value, b_type, b_value, 'refused', CAST(NULL AS Nullable(String)), CAST(NULL AS Nullable(String)), reason, now()
           FROM identity_new_edges WHERE status = 'blocked'
             AND (message_id, a_type, a_value, b_type, b_value) NOT IN
               (SELECT message_id, a_type, a_value, b_type, b_value FROM identity_merges WHERE kind = 'refused')"
    ))
    .await?;
    stats.new_edges = count(s, "SELECT count() FROM identity_new_edges").await?;

    // 3. The region to resolve again: label propagation from the ids of the edges
    //    just scanned (not only the new ones: an edge a stopped run wrote stays `new`
    //    in the table, and reading the whole table for those is what this avoids;
    //    the region is whole components, so resolving more of them changes nothing).
    s.batch(&format!(
        "DROP TEMPORARY TABLE IF EXISTS identity_region;
         CREATE TEMPORARY TABLE identity_region (id_type String, id_value String, pass UInt32) ENGINE = Memory;
         INSERT INTO identity_region SELECT DISTINCT id_type, id_value, toUInt32(0) FROM (
           SELECT a_type AS id_type, a_value AS id_value FROM identity_scan_edges WHERE NOT ({blocked_a} OR {blocked_b})
           UNION ALL SELECT b_type, b_value FROM identity_scan_edges WHERE NOT ({blocked_a} OR {blocked_b})
           UNION ALL SELECT id_type, id_value FROM identity_dirty)",
    ))
    .await?;
    let mut added = count(s, "SELECT count() FROM identity_region").await?;
    let mut pass = 0u32;
    while added > 0 {
        pass += 1;
        let prev = pass - 1;
        s.batch(&format!(
            "INSERT INTO identity_region SELECT DISTINCT id_type, id_value, toUInt32({pass}) FROM (
               SELECT b_type AS id_type, b_value AS id_value FROM identity_edges WHERE status != 'blocked'
                 AND (a_type, a_value) IN (SELECT id_type, id_value FROM identity_region WHERE pass = {prev})
               UNION ALL
               SELECT a_type, a_value FROM identity_edges WHERE status != 'blocked'
                 AND (b_type, b_value) IN (SELECT id_type, id_value FROM identity_region WHERE pass = {prev}))
             WHERE (id_type, id_value) NOT IN (SELECT id_type, id_value FROM identity_region)"
        ))
        .await?;
        added = count(
            s,
            &format!("SELECT count() FROM identity_region WHERE pass = {pass}"),
        )
        .await?;
    }
    stats.passes = pass;

    // 4. Resolve the region, in Rust, with the limits.
    let ids = s
        .query(
            "SELECT id_type, id_value, nullIf(person_id, '') FROM identity_region
             ANY LEFT JOIN (SELECT id_type, id_value, person_id FROM identities) AS stored USING (id_type, id_value)",
        )
        .await?;
    let edges = s
        .query(
            "SELECT a_type, a_value, b_type, b_value, message_id, ts, status, reason FROM identity_edges
             WHERE status != 'blocked' AND (a_type, a_value) IN (SELECT id_type, id_value FROM identity_region)",
        )
        .await?;
    let decided = plan(&ids, &edges, cfg, &mut stats);
    s.batch(
        "DROP TEMPORARY TABLE IF EXISTS identity_verdicts;
         CREATE TEMPORARY TABLE identity_verdicts (a_type String, a_value String, b_type String, b_value String, status String, reason Nullable(String)) ENGINE = Memory;
         DROP TEMPORARY TABLE IF EXISTS identity_people;
         CREATE TEMPORARY TABLE identity_people (id_type String, id_value String, person_id String) ENGINE = Memory;
         DROP TEMPORARY TABLE IF EXISTS identity_touched;
         CREATE TEMPORARY TABLE identity_touched (person_id String) ENGINE = Memory;
         DROP TEMPORARY TABLE IF EXISTS identity_log;
         CREATE TEMPORARY TABLE identity_log (message_id String, a_type String, a_value String, b_type String, b_value String, kind String,
           from_person Nullable(String), into_person Nullable(String), reason Nullable(String)) ENGINE = Memory",
    )
    .await?;
    decided.write_scratch(s).await?;
    let v = version_now();
    s.batch(&format!(
        "INSERT INTO collector_identity_edges
           SELECT a_type, a_value, b_type, b_value, message_id, ts, new_status, new_reason, {v} FROM identity_edges
           ALL INNER JOIN (SELECT a_type, a_value, b_type, b_value, status AS new_status, reason AS new_reason FROM identity_verdicts) AS verdicts
           USING (a_type, a_value, b_type, b_value);
         INSERT INTO collector_identities
           SELECT id_type, id_value, new_person, first_seen, {v} FROM identities
           ALL INNER JOIN (SELECT id_type, id_value, person_id AS new_person FROM identity_people) AS people USING (id_type, id_value);
         INSERT INTO collector_identity_merges
           SELECT *, now() FROM identity_log WHERE (message_id, a_type, a_value, b_type, b_value, kind) NOT IN
             (SELECT message_id, a_type, a_value, b_type, b_value, kind FROM identity_merges);
         INSERT INTO collector_identity_dirty
           SELECT id_type, id_value, reason, 1, {v} FROM identity_dirty
           WHERE (id_type, id_value) IN (SELECT id_type, id_value FROM identity_region WHERE pass = 0)"
    ))
    .await?;

    // 5. Profiles of everyone touched: the people of the ids just scanned, and those
    //    that merged or changed.
    s.batch(
        "INSERT INTO identity_touched SELECT DISTINCT person_id FROM identities
         WHERE (id_type, id_value) IN (SELECT id_type, id_value FROM identity_scan_ids)",
    )
    .await?;
    let people: Vec<String> = s
        .query("SELECT DISTINCT person_id FROM identity_touched ORDER BY person_id")
        .await?
        .rows
        .into_iter()
        .filter_map(|r| r[0].clone())
        .collect();
    let tables = consent_columns(s).await?;
    for chunk in people.chunks(PROFILE_CHUNK) {
        stats.profiles += profiles(s, chunk, &tables).await?;
    }
    // The loads read are done; a load that committed meanwhile stays pending.
    s.batch("INSERT INTO collector_identity_read SELECT load_id, now() FROM identity_loads")
        .await?;
    Ok(stats)
}

/// Per event table, the consent evidence columns it has (`granted`, `denied`,
/// `policy_version`, and `sources_<category>`), without the prefix.
async fn consent_columns(
    s: &mut dyn SqlSession,
) -> Result<Vec<(&'static str, Vec<String>)>, SinkError> {
    let mut out = Vec::new();
    for kind in EventKind::ALL {
        let cols: Vec<String> = columns_of(s, kind.table())
            .await?
            .into_iter()
            .filter_map(|c| c.strip_prefix(CONSENT).map(str::to_string))
            .collect();
        out.push((kind.table(), cols));
    }
    Ok(out)
}

/// Writes the profiles of `people` (a version each; a person left without ids, merged
/// into another, gets a deleted version). The number of profiles written.
async fn profiles(
    s: &mut dyn SqlSession,
    people: &[String],
    consent_cols: &[(&'static str, Vec<String>)],
) -> Result<u64, SinkError> {
    s.batch(
        "DROP TEMPORARY TABLE IF EXISTS profile_people;
         DROP TEMPORARY TABLE IF EXISTS profile_ids;
         DROP TEMPORARY TABLE IF EXISTS profile_events;
         CREATE TEMPORARY TABLE profile_people (person_id String) ENGINE = Memory;
         CREATE TEMPORARY TABLE profile_ids (id_type String, id_value String, person_id String) ENGINE = Memory;
         CREATE TEMPORARY TABLE profile_events (person_id String, message_id String, ts DateTime('UTC'), source String) ENGINE = Memory",
    )
    .await?;
    s.insert(
        "profile_people",
        people.iter().map(|p| vec![Some(p.clone())]).collect(),
    )
    .await?;
    s.batch(
        "INSERT INTO profile_ids SELECT id_type, id_value, person_id FROM identities
         WHERE person_id IN (SELECT person_id FROM profile_people)",
    )
    .await?;
    // Each person's events, by anonymous id and by user id (an event found both ways
    // counts once).
    for kind in EventKind::ALL {
        let tb = kind.table();
        for col in ["anonymous_id", "user_id"] {
            s.batch(&format!(
                "INSERT INTO profile_events SELECT person_id, message_id, ts, '{tb}' FROM
                   (SELECT message_id, {col} AS id_value, ifNull(timestamp, toDateTime(0, 'UTC')) AS ts FROM {tb}
                    WHERE {col} IN (SELECT id_value FROM profile_ids WHERE id_type = '{col}')) AS events
                 ALL INNER JOIN (SELECT id_value, person_id FROM profile_ids WHERE id_type = '{col}') AS ids USING id_value"
            ))
            .await?;
        }
    }
    let mut out: BTreeMap<String, Profile> = people
        .iter()
        .map(|p| (p.clone(), Profile::default()))
        .collect();
    let ids = s
        .query("SELECT person_id, id_type, id_value FROM profile_ids ORDER BY person_id, id_type, id_value")
        .await?;
    for r in ids.rows {
        let (Some(p), Some(t), Some(v)) = (&r[0], &r[1], &r[2]) else {
            continue;
        };
        if let Some(pr) = out.get_mut(p) {
            pr.has_ids = true;
            match t.as_str() {
                "user_id" => pr.user_ids.push(v.clone()),
                "anonymous_id" => pr.anonymous_ids.push(v.clone()),
                _ => pr.emails.push(v.clone()),
            }
        }
    }
    let st = s
        .query(
            "SELECT person_id, min(ts), max(ts), count() FROM
               (SELECT DISTINCT person_id, message_id, ts FROM profile_events) GROUP BY person_id",
        )
        .await?;
    for r in st.rows {
        if let Some(pr) = r[0].as_ref().and_then(|p| out.get_mut(p)) {
            pr.first_seen = r[1].clone();
            pr.last_seen = r[2].clone();
            pr.event_count = r[3].as_deref().and_then(|n| n.parse().ok()).unwrap_or(0);
        }
    }
    // Traits: each identify's, oldest first, so a later value of a key wins.
    let traits = s
        .query(
            "SELECT person_id, traits FROM
               (SELECT DISTINCT person_id, message_id, ts FROM profile_events WHERE source = 'identifies') AS events
             ALL INNER JOIN (SELECT message_id, traits FROM identifies
               WHERE traits IS NOT NULL AND message_id IN (SELECT message_id FROM profile_events WHERE source = 'identifies')) AS identify_traits USING message_id
             ORDER BY person_id, ts, message_id",
        )
        .await?;
    for r in traits.rows {
        let (Some(p), Some(t)) = (&r[0], &r[1]) else {
            continue;
        };
        if let (Some(pr), Ok(Value::Object(m))) = (out.get_mut(p), serde_json::from_str(t)) {
            pr.traits.extend(m);
        }
    }
    // Consent: per person, each distinct decision with its latest event; the agent
    // keeps the latest per category.
    for (tb, cols) in consent_cols {
        if !cols.iter().any(|c| c == "granted" || c == "denied") {
            continue;
        }
        let col = |c: &str| {
            if cols.iter().any(|x| x == c) {
                format!("CAST({CONSENT}{c} AS Nullable(String))")
            } else {
                "CAST(NULL AS Nullable(String))".to_string()
            }
        };
        let sources: Vec<&str> = cols
            .iter()
            .filter_map(|c| c.strip_prefix("sources_"))
            .collect();
        let mut fields = vec![col("granted"), col("denied"), col("policy_version")];
        fields.extend(sources.iter().map(|c| col(&format!("sources_{c}"))));
        let names: Vec<String> = (0..fields.len()).map(|i| format!("f{i}")).collect();
        let select = fields
            .iter()
            .zip(&names)
            .map(|(f, n)| format!("{f} AS {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let r = s
            .query(&format!(
                "SELECT person_id, {names}, tupleElement(latest, 1), tupleElement(latest, 2) FROM (
                   SELECT person_id, {names}, max((ts, message_id)) AS latest FROM
                     (SELECT DISTINCT person_id, message_id, ts FROM profile_events WHERE source = '{tb}') AS events
                   ALL INNER JOIN (SELECT message_id, {select} FROM {tb}
                     WHERE message_id IN (SELECT message_id FROM profile_events WHERE source = '{tb}')) AS fields USING message_id
                   GROUP BY person_id, {names})",
                names = names.join(", "),
            ))
            .await?;
        for row in r.rows {
            let Some(pr) = row[0].as_ref().and_then(|p| out.get_mut(p)) else {
                continue;
            };
            let n = fields.len();
            let (ts, mid) = (
                row[n + 1].clone().unwrap_or_default(),
                row[n + 2].clone().unwrap_or_default(),
            );
            let list = |v: &Option<String>| -> Vec<String> {
                v.as_deref()
                    .and_then(|t| serde_json::from_str(t).ok())
                    .unwrap_or_default()
            };
            let policy = row[3].clone();
            let source_of: HashMap<&str, Option<String>> = sources
                .iter()
                .enumerate()
                .map(|(i, c)| (*c, row[4 + i].clone()))
                .collect();
            for (granted, cats) in [(true, list(&row[1])), (false, list(&row[2]))] {
                for c in cats {
                    let key = (ts.clone(), mid.clone());
                    if pr.consent.get(&c).is_some_and(|(k, _)| *k >= key) {
                        continue;
                    }
                    let source = source_of.get(c.as_str()).cloned().flatten();
                    let entry = json!({"granted": granted, "source": source, "policy_version": policy, "at": ts});
                    pr.consent.insert(c, (key, entry));
                }
            }
        }
    }
    let v = version_now();
    let mut written = 0;
    let rows: Vec<Vec<Option<String>>> = out
        .into_iter()
        .map(|(person, p)| {
            let arr = |a: Vec<String>| Some(Value::from(a).to_string());
            let deleted = !p.has_ids;
            written += u64::from(!deleted);
            let consent: Map<String, Value> =
                p.consent.into_iter().map(|(k, (_, e))| (k, e)).collect();
            vec![
                Some(person),
                arr(p.user_ids),
                arr(p.anonymous_ids),
                arr(p.emails),
                p.first_seen.as_deref().map(datetime_text),
                p.last_seen.as_deref().map(datetime_text),
                Some(p.event_count.to_string()),
                Some(Value::Object(p.traits).to_string()),
                Some(Value::Object(consent).to_string()),
                Some(datetime_text(&collector_core::timestamp::format_ms(
                    (v / 1000) as i64,
                ))),
                Some(u8::from(deleted).to_string()),
                Some(v.to_string()),
            ]
        })
        .collect();
    s.insert("collector_profiles", rows).await?;
    Ok(written)
}

/// One profile as it is assembled.
#[derive(Default)]
struct Profile {
    has_ids: bool,
    user_ids: Vec<String>,
    anonymous_ids: Vec<String>,
    emails: Vec<String>,
    first_seen: Option<String>,
    last_seen: Option<String>,
    event_count: u64,
    traits: Map<String, Value>,
    /// Category → ((instant, message id) of the decision, the entry).
    consent: BTreeMap<String, ((String, String), Value)>,
}
