//! One identity run, in the warehouse, in one transaction:
//!
//! 1. **Scan** the events of the loads not read yet: every load that inserted rows
//!    adds its `load_id` to `identity_pending` in its own transaction, and the run
//!    deletes the ones it read in its own. A load is read exactly once, however late
//!    it commits and whatever order agents commit in (everything below is idempotent
//!    too, so reading twice would change nothing).
//! 2. **Ids and edges.** Every id becomes an `identities` row (its own person until
//!    joined); ids seen together in one event become an `identity_edges` row, one per
//!    pair, kept at its earliest event. Ids on the block list never become either; an
//!    edge touching one is stored as `blocked` and its refusal logged.
//! 3. **Region**, by label propagation in SQL to a fixed point: from the ids of new
//!    edges, follow every edge (joined or refused) until a pass adds nothing. Only that
//!    part of the graph is resolved again.
//! 4. **Resolve** the region's edges in canonical order with the limits
//!    ([`super::resolve`]), write each id's person, each edge's verdict, and log every
//!    merge of two people and every refusal (`identity_merges`).
//! 5. **Profiles** of every person touched are computed again (`profiles`), from the
//!    activity of their pairs of ids (`collector_id_activity`, `collector_id_traits`,
//!    `collector_id_consent`), which step 1 adds the scanned events to: a run reads the
//!    events of its loads once, never a person's whole history.

use foldhash::{HashMap, HashSet};

use collector_core::identity::BlockList;
use collector_core::EventKind;

use super::config::IdentityConfig;
use super::resolve::{resolve, Edge, Id, Verdict};
use crate::sinks::{sql_lit, Relational, SinkError, SqlSession};

/// What one run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct IdentityStats {
    /// Edges new or changed in this run.
    pub new_edges: u64,
    /// Ids in the region resolved again.
    pub region_ids: u64,
    /// Label-propagation passes until nothing changed.
    pub passes: u32,
    /// People merged into others, and merges refused by a limit.
    pub merges: u64,
    pub refused: u64,
    /// Ids that left a person because edges were removed.
    pub splits: u64,
    /// Profiles written.
    pub profiles: u64,
    /// Runs (transactions) it took: the loads waiting were read in runs of about
    /// `events_per_run` events.
    pub runs: u64,
}

/// The SQL of one dialect.
struct Sql(Relational);

impl Sql {
    fn text(&self) -> &'static str {
        match self.0 {
            Relational::DuckDb => "VARCHAR",
            Relational::Postgres => "text",
        }
    }
    fn ts(&self) -> &'static str {
        match self.0 {
            Relational::DuckDb => "TIMESTAMP",
            Relational::Postgres => "timestamptz",
        }
    }
    fn json(&self) -> &'static str {
        match self.0 {
            Relational::DuckDb => "JSON",
            Relational::Postgres => "jsonb",
        }
    }
    fn now(&self) -> &'static str {
        match self.0 {
            Relational::DuckDb => "now()::TIMESTAMP",
            Relational::Postgres => "now()",
        }
    }
    /// A text field of a JSON column.
    fn json_text(&self, col: &str, key: &str) -> String {
        match self.0 {
            Relational::DuckDb => format!("json_extract_string({col}, '$.\"{key}\"')"),
            Relational::Postgres => format!("({col}->>'{key}')"),
        }
    }
    /// A JSON path (object keys) of a JSON column, as JSON.
    fn json_path(&self, col: &str, keys: &[&str]) -> String {
        match self.0 {
            Relational::DuckDb => format!(
                "json_extract({col}, '$.{}')",
                keys.iter()
                    .map(|k| format!("\"{k}\""))
                    .collect::<Vec<_>>()
                    .join(".")
            ),
            Relational::Postgres => format!(
                "({col}{})",
                keys.iter().map(|k| format!("->'{k}'")).collect::<String>()
            ),
        }
    }
    /// Instants rendered the same in every dialect.
    fn ts_text(&self, e: &str) -> String {
        match self.0 {
            Relational::DuckDb => format!("strftime({e}, '%Y-%m-%dT%H:%M:%S.%gZ')"),
            Relational::Postgres => {
                format!("to_char({e} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')")
            }
        }
    }
    fn text_array_agg(&self, e: &str, filter: &str) -> String {
        match self.0 {
            Relational::DuckDb => format!(
                "COALESCE(to_json(list({e} ORDER BY {e}) FILTER (WHERE {filter})), '[]'::JSON)"
            ),
            Relational::Postgres => format!(
                "COALESCE(jsonb_agg({e} ORDER BY {e}) FILTER (WHERE {filter}), '[]'::jsonb)"
            ),
        }
    }
    fn object_agg(&self, k: &str, v: &str) -> String {
        match self.0 {
            Relational::DuckDb => format!("json_group_object({k}, {v})"),
            Relational::Postgres => format!("jsonb_object_agg({k}, {v})"),
        }
    }
    fn build_object(&self, pairs: &[(&str, String)]) -> String {
        let args = pairs
            .iter()
            .map(|(k, v)| format!("'{k}', {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        match self.0 {
            Relational::DuckDb => format!("json_object({args})"),
            Relational::Postgres => format!("jsonb_build_object({args})"),
        }
    }
    fn json_each(&self, col: &str) -> String {
        match self.0 {
            Relational::DuckDb => format!("json_each({col})"),
            Relational::Postgres => format!("jsonb_each({col})"),
        }
    }
    /// The elements of a JSON array of strings, one row each (in a select list).
    fn unnest_text(&self, json: &str) -> String {
        match self.0 {
            Relational::DuckDb => format!("unnest(CAST({json} AS VARCHAR[]))"),
            Relational::Postgres => format!("jsonb_array_elements_text({json})"),
        }
    }
    fn empty_object(&self) -> &'static str {
        match self.0 {
            Relational::DuckDb => "'{}'::JSON",
            Relational::Postgres => "'{}'::jsonb",
        }
    }
    fn all_digits_0_dash(&self, e: &str) -> String {
        match self.0 {
            Relational::DuckDb => format!("regexp_full_match({e}, '[0-]+')"),
            Relational::Postgres => format!("({e} ~ '^[0-]+$')"),
        }
    }

    /// True when the text `v` (not NULL) is on the block list: the rule of
    /// [`BlockList::blocked`], in SQL.
    fn blocked(&self, v: &str, list: &BlockList) -> String {
        let t = format!("trim({v})");
        let values = list.values().map(sql_lit).collect::<Vec<_>>().join(", ");
        format!(
            "({t} = '' OR (length({t}) >= 2 AND ((left({t}, 1) = '\"' AND right({t}, 1) = '\"') OR (left({t}, 1) = '''' AND right({t}, 1) = ''''))) OR {} OR lower({t}) IN ({values}))",
            self.all_digits_0_dash(&t)
        )
    }
}

/// The tables identity keeps (a migration of each SQL sink).
pub fn ddl(d: Relational) -> String {
    let s = Sql(d);
    let (t, ts, j) = (s.text(), s.ts(), s.json());
    let mut sql = format!(
        "CREATE TABLE identity_edges (a_type {t} NOT NULL, a_value {t} NOT NULL, b_type {t} NOT NULL, b_value {t} NOT NULL, message_id {t} NOT NULL, ts {ts} NOT NULL, status {t} NOT NULL, reason {t}, PRIMARY KEY (a_type, a_value, b_type, b_value));
CREATE TABLE identities (id_type {t} NOT NULL, id_value {t} NOT NULL, person_id {t} NOT NULL, first_seen {ts}, PRIMARY KEY (id_type, id_value));
CREATE TABLE identity_merges (message_id {t} NOT NULL, a_type {t} NOT NULL, a_value {t} NOT NULL, b_type {t} NOT NULL, b_value {t} NOT NULL, kind {t} NOT NULL, from_person {t}, into_person {t}, reason {t}, merged_at {ts} NOT NULL, PRIMARY KEY (message_id, a_type, a_value, b_type, b_value, kind));
CREATE TABLE profiles (person_id {t} PRIMARY KEY, user_ids {j} NOT NULL, anonymous_ids {j} NOT NULL, emails {j} NOT NULL, first_seen {ts}, last_seen {ts}, event_count BIGINT NOT NULL, traits {j} NOT NULL, consent {j} NOT NULL, updated_at {ts} NOT NULL);
CREATE TABLE collector_identity_state (name {t} PRIMARY KEY, value {ts} NOT NULL);
"
    );
    if d == Relational::Postgres {
        sql.push_str(
            "CREATE INDEX identities_person ON identities (person_id);
CREATE INDEX identity_edges_b ON identity_edges (b_type, b_value);
CREATE INDEX identity_edges_status ON identity_edges (status);
",
        );
    }
    sql
}

/// `identity_dirty` (a later migration): ids to resolve again at the next run although
/// no new edge touches them, e.g. after an erasure removed some of their edges.
pub fn ddl_dirty(d: Relational) -> String {
    let t = Sql(d).text();
    format!(
        "CREATE TABLE identity_dirty (id_type {t} NOT NULL, id_value {t} NOT NULL, reason {t}, PRIMARY KEY (id_type, id_value));\n"
    )
}

/// `identity_pending.loaded_at` (a later migration): the `loaded_at` a load stamped its
/// rows with, so a run reads only the rows of its loads ([`LoadBounds`]). Loads
/// pending from before it have none; a run that reads one of them reads the tables whole.
pub fn ddl_pending_stamp(d: Relational) -> String {
    format!(
        "ALTER TABLE identity_pending ADD COLUMN loaded_at {};\n",
        Sql(d).ts()
    )
}

/// `identity_pending` (a later migration): the loads an identity run has not read yet.
/// An upgraded warehouse reads once everything since its old time watermark (or
/// everything, when identity never ran on it); a new one, with nothing loaded, has
/// nothing to read but its loads.
pub fn ddl_pending(d: Relational) -> String {
    let ts = Sql(d).ts();
    format!(
        "CREATE TABLE identity_pending (load_id BIGINT PRIMARY KEY);
INSERT INTO collector_identity_state SELECT 'scan_from', CAST('1970-01-01 00:00:00' AS {ts})
  WHERE NOT EXISTS (SELECT 1 FROM collector_identity_state WHERE name = 'scan_from')
    AND EXISTS (SELECT 1 FROM message_ids);
"
    )
}

/// The base tables an identity run reads (`previous_id` of an alias and the `email`
/// trait of an identify add ids).
fn sources() -> impl Iterator<Item = &'static str> {
    EventKind::ALL.iter().map(|k| k.table())
}

/// `person_id` of an id: a stable digest of its type and value (the same in Rust and
/// in SQL's `md5`).
pub fn person_id(id: &Id) -> String {
    use md5::{Digest, Md5};
    hex::encode(Md5::digest(format!("{}:{}", id.0, id.1).as_bytes()))
}

/// Resolves identity: the loads waiting to be read now, in runs of about
/// `cfg.events_per_run` events, each in one transaction (a failed one is rolled back,
/// and the runs before it stay done). Loads that commit meanwhile wait for the next
/// call, so a call ends however fast other agents load.
pub async fn run(s: &mut dyn SqlSession, cfg: &IdentityConfig) -> Result<IdentityStats, SinkError> {
    let Some(rel) = s.dialect().relational() else {
        return super::clickhouse::run(s, cfg).await;
    };
    let upto = s
        .query("SELECT max(load_id) FROM identity_pending")
        .await?
        .rows
        .first()
        .and_then(|r| r[0].as_deref()?.parse::<i64>().ok());
    let mut total = IdentityStats::default();
    loop {
        s.batch("BEGIN").await?;
        match run_in_tx(s, rel, cfg, upto).await {
            Ok((stats, more)) => {
                s.batch("COMMIT").await?;
                total.add(&stats);
                if !more {
                    return Ok(total);
                }
            }
            Err(e) => {
                let _ = s.batch("ROLLBACK").await;
                return Err(e);
            }
        }
    }
}

impl IdentityStats {
    fn add(&mut self, o: &IdentityStats) {
        self.new_edges += o.new_edges;
        self.region_ids += o.region_ids;
        self.passes += o.passes;
        self.merges += o.merges;
        self.refused += o.refused;
        self.splits += o.splits;
        self.profiles += o.profiles;
        self.runs += o.runs;
    }
}

/// One run: its stats, and whether loads up to `upto` are still waiting.
async fn run_in_tx(
    s: &mut dyn SqlSession,
    rel: Relational,
    cfg: &IdentityConfig,
    upto: Option<i64>,
) -> Result<(IdentityStats, bool), SinkError> {
    let q = Sql(rel);
    let list = BlockList::new(&cfg.block);
    let mut stats = IdentityStats {
        runs: 1,
        ..IdentityStats::default()
    };
    if q.0 == Relational::Postgres {
        // One identity run at a time across the agents sharing the database.
        s.query("SELECT pg_advisory_xact_lock(7415202612)").await?;
    }
    let (t, now) = (q.text(), q.now());
    // 1. What to scan: the loads not read yet (each load that inserted rows adds its id
    //    to `identity_pending` in its own transaction, so a load is read once, however
    //    late it committed), and, once after an upgrade from a release that kept a
    //    time watermark, everything loaded since it.
    let legacy = any(
        s,
        "SELECT count(*) FROM collector_identity_state WHERE name = 'scan_from'",
    )
    .await?;
    let backfill = any(
        s,
        &format!(
            "SELECT count(*) FROM collector_identity_state WHERE name = '{ACTIVITY_BACKFILL}'"
        ),
    )
    .await?;
    // The oldest loads waiting, whole, until `events_per_run` events (at least one
    // load). A run that reads more than its loads (after an upgrade, or to fill the
    // pairs' activity) takes every load waiting: a later run reading one of them again
    // would count its events twice in the activity.
    let loads = match upto {
        _ if legacy || backfill => "SELECT load_id, loaded_at FROM identity_pending".to_string(),
        // Nothing was waiting when the call began: no load is read (ids marked dirty
        // are still resolved).
        None => "SELECT load_id, loaded_at FROM identity_pending WHERE false".to_string(),
        Some(upto) => {
            // The registry's rows are appended in load order: a literal lower bound
            // lets DuckDB skip the row groups of older loads (zone maps).
            let from = s
                .query("SELECT min(load_id) FROM identity_pending")
                .await?
                .rows
                .first()
                .and_then(|r| r[0].as_deref()?.parse::<i64>().ok())
                .unwrap_or(upto);
            format!(
                "SELECT load_id, loaded_at FROM (
                   SELECT p.load_id, p.loaded_at, coalesce(sum(coalesce(c.n, 0)) OVER (ORDER BY p.load_id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before
                   FROM identity_pending p LEFT JOIN (
                     SELECT load_id, count(*) AS n FROM message_ids
                     WHERE load_id BETWEEN {from} AND {upto} AND load_id IN (SELECT load_id FROM identity_pending WHERE load_id <= {upto}) GROUP BY load_id
                   ) c ON c.load_id = p.load_id
                   WHERE p.load_id <= {upto}
                 ) w WHERE before < {max}",
                max = cfg.events_per_run
            )
        }
    };
    s.batch(&format!(
        "DROP TABLE IF EXISTS identity_loads;
         CREATE TEMP TABLE identity_loads AS {loads};"
    ))
    .await?;
    let bounds = LoadBounds::read(s, &q).await?;
    // Each event table's columns as a run reads them; the scan keeps its loads' rows.
    let selects: Vec<(&str, String)> = sources()
        .map(|tb| {
            let previous = if tb == "aliases" {
                "previous_id".to_string()
            } else {
                format!("CAST(NULL AS {t})")
            };
            let email = if tb == "identifies" {
                q.json_text("traits", "email")
            } else {
                format!("CAST(NULL AS {t})")
            };
            let columns = format!(
                "message_id, anonymous_id, user_id, {previous} AS previous_id, {email} AS email, timestamp AS ts, {activity}",
                activity = activity_columns(&q, tb)
            );
            (tb, columns)
        })
        .collect();
    let mut parts = Vec::new();
    for (tb, columns) in &selects {
        let of_loads = format!(
            "message_id IN (SELECT m.message_id FROM message_ids m JOIN identity_loads l ON m.load_id = l.load_id WHERE m.table_name = '{tb}'{})",
            bounds.registry()
        );
        let part = if legacy {
            format!(
                "SELECT {columns} FROM {tb} WHERE {of_loads} OR loaded_at >= (SELECT value FROM collector_identity_state WHERE name = 'scan_from')"
            )
        } else if let Some(rows) = s.rows_of_loads(tb).await? {
            // Only the rows the loads wrote (the lake: their files), not the table.
            format!("SELECT {columns} FROM {rows} {tb} WHERE {of_loads}")
        } else {
            format!(
                "SELECT {columns} FROM {tb} WHERE {}{of_loads}",
                bounds.rows(&q)
            )
        };
        parts.push(part);
    }
    // One statement per table, not one `UNION ALL`: DuckDB sets up every branch's
    // joins at once, which needs more than a 32MB pool holds (the README's lean
    // settings ran out of memory here in every run, and doubled their limit).
    let mut scan = "DROP TABLE IF EXISTS identity_scan;".to_string();
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            scan.push_str(&format!(" CREATE TEMP TABLE identity_scan AS {part};"));
        } else {
            scan.push_str(&format!(" INSERT INTO identity_scan {part};"));
        }
    }
    s.batch(&scan).await?;
    // 1b. What each pair of ids did (profiles are computed from it): the events just
    //     scanned added to it, or, once after the migration that made it, every event.
    if backfill {
        let every = selects
            .iter()
            .map(|(tb, columns)| format!("SELECT {columns} FROM {tb}"))
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        s.batch(
            "DELETE FROM collector_id_activity; DELETE FROM collector_id_traits; DELETE FROM collector_id_consent;",
        )
        .await?;
        add_activity(s, &q, &format!("({every})")).await?;
    } else if any(s, "SELECT count(*) FROM identity_scan").await? {
        add_activity(s, &q, "identity_scan").await?;
    }

    // 2. Ids (each its own person until joined) and edges.
    s.batch(&format!(
        "DROP TABLE IF EXISTS identity_scan_ids;
         CREATE TEMP TABLE identity_scan_ids AS
           SELECT 'anonymous_id' AS id_type, anonymous_id AS id_value, ts FROM identity_scan WHERE anonymous_id IS NOT NULL
           UNION ALL SELECT 'user_id', user_id, ts FROM identity_scan WHERE user_id IS NOT NULL
           UNION ALL SELECT 'email', email, ts FROM identity_scan WHERE email IS NOT NULL
           UNION ALL SELECT 'user_id', previous_id, ts FROM identity_scan WHERE previous_id IS NOT NULL AND (anonymous_id IS NULL OR previous_id <> anonymous_id);
         DELETE FROM identity_scan_ids WHERE {};",
        q.blocked("id_value", &list)
    ))
    .await?;
    s.execute(
        "INSERT INTO identities (id_type, id_value, person_id, first_seen)
         SELECT id_type, id_value, md5(id_type || ':' || id_value), min(ts) FROM identity_scan_ids GROUP BY id_type, id_value
         ON CONFLICT (id_type, id_value) DO UPDATE SET first_seen = excluded.first_seen
         WHERE excluded.first_seen < identities.first_seen",
    )
    .await?;
    s.batch(
        "DROP TABLE IF EXISTS identity_scan_edges;
         CREATE TEMP TABLE identity_scan_edges AS
           SELECT 'anonymous_id' AS a_type, anonymous_id AS a_value, 'user_id' AS b_type, user_id AS b_value, message_id, ts FROM identity_scan WHERE anonymous_id IS NOT NULL AND user_id IS NOT NULL
           UNION ALL SELECT 'user_id', user_id, 'email', email, message_id, ts FROM identity_scan WHERE user_id IS NOT NULL AND email IS NOT NULL
           UNION ALL SELECT 'anonymous_id', anonymous_id, 'email', email, message_id, ts FROM identity_scan WHERE user_id IS NULL AND anonymous_id IS NOT NULL AND email IS NOT NULL
           UNION ALL SELECT 'user_id', least(previous_id, user_id), 'user_id', greatest(previous_id, user_id), message_id, ts FROM identity_scan
             WHERE previous_id IS NOT NULL AND user_id IS NOT NULL AND previous_id <> user_id AND (anonymous_id IS NULL OR previous_id <> anonymous_id);",
    )
    .await?;
    let blocked_a = q.blocked("a_value", &list);
    let blocked_b = q.blocked("b_value", &list);
    stats.new_edges = s
        .execute(&format!(
            "INSERT INTO identity_edges (a_type, a_value, b_type, b_value, message_id, ts, status, reason)
             SELECT a_type, a_value, b_type, b_value, message_id, ts,
               CASE WHEN {blocked_a} OR {blocked_b} THEN 'blocked' ELSE 'new' END,
               CASE WHEN {blocked_a} THEN 'blocked id: ' || a_value WHEN {blocked_b} THEN 'blocked id: ' || b_value END
             FROM (SELECT DISTINCT ON (a_type, a_value, b_type, b_value) * FROM identity_scan_edges
                   ORDER BY a_type, a_value, b_type, b_value, ts, message_id) e
             ON CONFLICT (a_type, a_value, b_type, b_value) DO UPDATE SET message_id = excluded.message_id, ts = excluded.ts,
               status = CASE WHEN excluded.status = 'blocked' THEN 'blocked' ELSE 'new' END
             WHERE excluded.ts < identity_edges.ts OR (excluded.ts = identity_edges.ts AND excluded.message_id < identity_edges.message_id)"
        ))
        .await?;
    s.execute(&format!(
        "INSERT INTO identity_merges (message_id, a_type, a_value, b_type, b_value, kind, from_person, into_person, reason, merged_at)
         SELECT message_id, a_type, a_value, b_type, b_value, 'refused', NULL, NULL, reason, {now} FROM identity_edges WHERE status = 'blocked'
         ON CONFLICT DO NOTHING"
    ))
    .await?;

    // 3. The region to resolve again: label propagation from the new edges' ids.
    s.batch(&format!(
        "DROP TABLE IF EXISTS identity_region;
         CREATE TEMP TABLE identity_region (id_type {t} NOT NULL, id_value {t} NOT NULL, pass INTEGER NOT NULL, PRIMARY KEY (id_type, id_value));"
    ))
    .await?;
    let mut added = s
        .execute(
            "INSERT INTO identity_region SELECT DISTINCT id_type, id_value, 0 FROM (
               SELECT a_type AS id_type, a_value AS id_value FROM identity_edges WHERE status = 'new'
               UNION ALL SELECT b_type, b_value FROM identity_edges WHERE status = 'new'
               UNION ALL SELECT d.id_type, d.id_value FROM identity_dirty d) n
             ON CONFLICT DO NOTHING",
        )
        .await?;
    let mut pass = 0u32;
    while added > 0 {
        pass += 1;
        let prev = pass - 1;
        added = s
            .execute(&format!(
                "INSERT INTO identity_region SELECT DISTINCT id_type, id_value, {pass} FROM (
                   SELECT e.b_type AS id_type, e.b_value AS id_value FROM identity_edges e JOIN identity_region r
                     ON r.pass = {prev} AND e.a_type = r.id_type AND e.a_value = r.id_value WHERE e.status <> 'blocked'
                   UNION ALL
                   SELECT e.a_type, e.a_value FROM identity_edges e JOIN identity_region r
                     ON r.pass = {prev} AND e.b_type = r.id_type AND e.b_value = r.id_value WHERE e.status <> 'blocked') n
                 ON CONFLICT DO NOTHING"
            ))
            .await?;
    }
    stats.passes = pass;

    // 4. Resolve the region.
    let ids = s
        .query(
            "SELECT r.id_type, r.id_value, i.person_id FROM identity_region r
             LEFT JOIN identities i ON i.id_type = r.id_type AND i.id_value = r.id_value",
        )
        .await?;
    let edges = s
        .query(
            "SELECT e.a_type, e.a_value, e.b_type, e.b_value, e.message_id, e.ts, e.status, e.reason
             FROM identity_edges e JOIN identity_region r ON e.a_type = r.id_type AND e.a_value = r.id_value
             WHERE e.status <> 'blocked'",
        )
        .await?;
    let decided = plan(&ids, &edges, cfg, &mut stats);
    s.batch(&format!(
        "DROP TABLE IF EXISTS identity_verdicts;
         CREATE TEMP TABLE identity_verdicts (a_type {t}, a_value {t}, b_type {t}, b_value {t}, status {t}, reason {t});
         DROP TABLE IF EXISTS identity_people;
         CREATE TEMP TABLE identity_people (id_type {t}, id_value {t}, person_id {t});
         DROP TABLE IF EXISTS identity_touched;
         CREATE TEMP TABLE identity_touched (person_id {t});
         DROP TABLE IF EXISTS identity_log;
         CREATE TEMP TABLE identity_log (message_id {t}, a_type {t}, a_value {t}, b_type {t}, b_value {t}, kind {t}, from_person {t}, into_person {t}, reason {t});"
    ))
    .await?;
    decided.write_scratch(s).await?;
    s.execute(
        "UPDATE identity_edges SET status = v.status, reason = v.reason FROM identity_verdicts v
         WHERE identity_edges.a_type = v.a_type AND identity_edges.a_value = v.a_value
           AND identity_edges.b_type = v.b_type AND identity_edges.b_value = v.b_value",
    )
    .await?;
    s.execute(
        "UPDATE identities SET person_id = p.person_id FROM identity_people p
         WHERE identities.id_type = p.id_type AND identities.id_value = p.id_value",
    )
    .await?;
    s.execute(&format!(
        "INSERT INTO identity_merges (message_id, a_type, a_value, b_type, b_value, kind, from_person, into_person, reason, merged_at)
         SELECT *, {now} FROM identity_log ON CONFLICT DO NOTHING"
    ))
    .await?;
    s.execute("DELETE FROM identity_dirty").await?;

    // 5. Profiles of everyone touched: the people of the ids just scanned, and those
    //    that merged or changed.
    s.execute(
        "INSERT INTO identity_touched SELECT DISTINCT i.person_id FROM identities i
         JOIN identity_scan_ids n ON i.id_type = n.id_type AND i.id_value = n.id_value",
    )
    .await?;
    s.execute("DELETE FROM profiles WHERE person_id IN (SELECT person_id FROM identity_touched)")
        .await?;
    stats.profiles = s.execute(&profiles_sql(&q)).await?;
    // The loads read are done; a load that committed meanwhile stays pending.
    s.batch(&format!(
        "DELETE FROM identity_pending WHERE load_id IN (SELECT load_id FROM identity_loads);
         DELETE FROM collector_identity_state WHERE name IN ('scan_from', '{ACTIVITY_BACKFILL}');"
    ))
    .await?;
    let more = match upto {
        Some(upto) => {
            any(
                s,
                &format!("SELECT count(*) FROM identity_pending WHERE load_id <= {upto}"),
            )
            .await?
        }
        None => false,
    };
    Ok((stats, more))
}

/// What bounds the rows of the loads a run reads (`identity_loads`), as literals a
/// scan can prune by: their lowest and highest `load_id` (the registry is appended in
/// load order) and their lowest and highest `loaded_at` (each load stamps its rows with
/// the same `loaded_at` as its `identity_pending` row, in one transaction). The event
/// tables are appended in load order too, so DuckDB's zone maps skip every row group
/// of other loads: a run reads what its loads wrote, not the warehouse's history, nor
/// the loads still waiting after it (a backlog read in runs of `events_per_run`).
struct LoadBounds {
    ids: Option<(i64, i64)>,
    /// The lowest and highest stamp; `None` when a load has none (pending from a
    /// release before migration 14).
    loaded_at: Option<(String, String)>,
}

impl LoadBounds {
    async fn read(s: &mut dyn SqlSession, q: &Sql) -> Result<LoadBounds, SinkError> {
        let r = s
            .query(&format!(
                "SELECT min(load_id), max(load_id), CAST(min(loaded_at) AS {t}), CAST(max(loaded_at) AS {t}), count(*) - count(loaded_at) FROM identity_loads",
                t = q.text()
            ))
            .await?;
        let row = r.rows.into_iter().next().unwrap_or_default();
        let cell = |i: usize| row.get(i).cloned().flatten();
        let id = |i: usize| cell(i).and_then(|v| v.parse::<i64>().ok());
        let unstamped = cell(4).is_none_or(|n| n != "0");
        Ok(LoadBounds {
            ids: id(0).zip(id(1)),
            loaded_at: cell(2).zip(cell(3)).filter(|_| !unstamped),
        })
    }

    /// A condition (with its leading `AND`) on the registry's rows `m`.
    fn registry(&self) -> String {
        match self.ids {
            Some((lo, hi)) => format!(" AND m.load_id BETWEEN {lo} AND {hi}"),
            None => String::new(),
        }
    }

    /// A condition (with its trailing `AND`) on an event table's rows.
    fn rows(&self, q: &Sql) -> String {
        match &self.loaded_at {
            Some((lo, hi)) => format!(
                "loaded_at BETWEEN CAST({} AS {ts}) AND CAST({} AS {ts}) AND ",
                sql_lit(lo),
                sql_lit(hi),
                ts = q.ts()
            ),
            None => String::new(),
        }
    }
}

/// Whether a `SELECT count(*)` counts anything.
async fn any(s: &mut dyn SqlSession, count_sql: &str) -> Result<bool, SinkError> {
    Ok(s.query(count_sql)
        .await?
        .rows
        .first()
        .and_then(|r| r[0].as_deref())
        .is_some_and(|n| n != "0"))
}

/// What one run writes, decided in Rust from the region's ids and edges.
pub(super) struct Plan {
    /// `(a_type, a_value, b_type, b_value, status, reason)` of edges whose verdict changed.
    pub verdict_rows: Vec<Vec<Option<String>>>,
    /// `(id_type, id_value, person_id)` of ids whose person changed.
    pub people_rows: Vec<Vec<Option<String>>>,
    /// People whose profile must be computed again.
    pub touched: HashSet<String>,
    /// `identity_merges` rows (without `merged_at`).
    pub log_rows: Vec<Vec<Option<String>>>,
}

impl Plan {
    /// Writes the plan into the run's scratch tables `identity_verdicts`,
    /// `identity_people`, `identity_touched` and `identity_log` (made by the caller in
    /// its dialect).
    pub(super) async fn write_scratch(self, s: &mut dyn SqlSession) -> Result<(), SinkError> {
        s.insert("identity_verdicts", self.verdict_rows).await?;
        s.insert("identity_people", self.people_rows).await?;
        s.insert(
            "identity_touched",
            self.touched.into_iter().map(|p| vec![Some(p)]).collect(),
        )
        .await?;
        s.insert("identity_log", self.log_rows).await
    }
}

/// Resolves a region: `ids` are `(id_type, id_value, person_id or NULL)`, `edges`
/// `(a_type, a_value, b_type, b_value, message_id, ts, status, reason)`.
pub(super) fn plan(
    ids: &crate::sinks::QueryResult,
    edges: &crate::sinks::QueryResult,
    cfg: &IdentityConfig,
    stats: &mut IdentityStats,
) -> Plan {
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    let region: Vec<Id> = ids
        .rows
        .iter()
        .map(|r| (text(&r[0]), text(&r[1])))
        .collect();
    stats.region_ids = region.len() as u64;
    let old_person: HashMap<Id, String> = ids
        .rows
        .iter()
        .map(|r| {
            let id = (text(&r[0]), text(&r[1]));
            let p = r[2].clone().unwrap_or_else(|| person_id(&id));
            (id, p)
        })
        .collect();
    let region_edges: Vec<Edge> = edges
        .rows
        .iter()
        .map(|r| Edge {
            a: (text(&r[0]), text(&r[1])),
            b: (text(&r[2]), text(&r[3])),
            message_id: text(&r[4]),
            ts: text(&r[5]),
        })
        .collect();
    // Each edge's stored verdict, by its ids (borrowed: a region can have millions).
    let old_status: HashMap<(&Id, &Id), (&str, Option<&str>)> = region_edges
        .iter()
        .zip(&edges.rows)
        .map(|(e, r)| {
            (
                (&e.a, &e.b),
                (r[6].as_deref().unwrap_or_default(), r[7].as_deref()),
            )
        })
        .collect();
    let res = resolve(&region, &region_edges, &cfg.limits);
    // One digest per person, not per id.
    let mut digest: HashMap<&Id, String> = HashMap::default();
    let new_person: HashMap<&Id, String> = res
        .person_of
        .iter()
        .map(|(id, canon)| {
            let p = digest
                .entry(canon)
                .or_insert_with(|| person_id(canon))
                .clone();
            (id, p)
        })
        .collect();

    // Verdicts that changed, people that changed, the merge log.
    let mut verdict_rows = Vec::new();
    let mut log_rows = Vec::new();
    let text_row =
        |v: &[&str]| -> Vec<Option<String>> { v.iter().map(|x| Some(x.to_string())).collect() };
    for (e, v) in &res.verdicts {
        let (status, reason) = match v {
            Verdict::Accepted => ("accepted", None),
            Verdict::Refused(r) => ("refused", Some(r.clone())),
        };
        if old_status.get(&(&e.a, &e.b)).copied() != Some((status, reason.as_deref())) {
            let mut row = text_row(&[&e.a.0, &e.a.1, &e.b.0, &e.b.1, status]);
            row.push(reason.clone());
            verdict_rows.push(row);
        }
        let edge = [e.message_id.as_str(), &e.a.0, &e.a.1, &e.b.0, &e.b.1];
        match v {
            Verdict::Refused(r) => {
                stats.refused += 1;
                let mut row = text_row(&edge);
                row.extend([Some("refused".into()), None, None, Some(r.clone())]);
                log_rows.push(row);
            }
            Verdict::Accepted => {
                // Two people became one: the side whose person changed was merged.
                let (pa, pb) = (&old_person[&e.a], &old_person[&e.b]);
                if pa != pb {
                    let into = &new_person[&e.a];
                    let from = if pb != into { pb } else { pa };
                    if from != into {
                        stats.merges += 1;
                        let mut row = text_row(&edge);
                        row.extend([
                            Some("merged".into()),
                            Some(from.clone()),
                            Some(into.clone()),
                            None,
                        ]);
                        log_rows.push(row);
                    }
                }
            }
        }
    }
    let mut people_rows = Vec::new();
    let mut touched: HashSet<String> = HashSet::default();
    // Old person → the people its ids belong to now: more than one is a split (its
    // edges were removed), logged for every id that left.
    let mut now_in: HashMap<&String, HashSet<&String>> = HashMap::default();
    for (id, p) in &new_person {
        let old = &old_person[*id];
        now_in.entry(old).or_default().insert(p);
        if old != p {
            people_rows.push(text_row(&[&id.0, &id.1, p]));
            touched.insert(old.clone());
            touched.insert(p.clone());
        }
    }
    for (id, p) in &new_person {
        let old = &old_person[*id];
        if old != p && now_in[old].len() > 1 {
            stats.splits += 1;
            let mut row = text_row(&["split", &id.0, &id.1, "person_id", old]);
            row.extend([
                Some("split".into()),
                Some(old.clone()),
                Some(p.clone()),
                Some("no longer joined to this person: an edge was removed, or an earlier event now takes precedence".into()),
            ]);
            log_rows.push(row);
        }
    }
    Plan {
        verdict_rows,
        people_rows,
        touched,
        log_rows,
    }
}

/// The mark (in `collector_identity_state`) of a warehouse whose activity tables must be
/// computed from every event at the next run: set by the migration that made them.
const ACTIVITY_BACKFILL: &str = "activity_backfill";

/// The tables a profile is computed from (a migration of each SQL sink): what each pair
/// `(anonymous_id, user_id)` of an event did (`''` for the id it lacks, which is never a
/// person's id: a blank id is blocked). `collector_id_activity`: first and last event
/// time and the number of events; `collector_id_traits`: each trait's latest value from
/// the pair's identifies; `collector_id_consent`: each consent category's latest
/// decision. Every part merges (min, max, sum, latest by event time then message id),
/// so each run adds only the events it scanned, and a person's profile reads the rows
/// of the pairs with one of their ids instead of every event they ever sent. An
/// erasure deletes the rows of the person's ids with their events (like any table with
/// `user_id` and `anonymous_id`). The warehouse's events before the migration are added
/// at the next identity run.
pub fn ddl_activity(d: Relational) -> String {
    let s = Sql(d);
    let (t, ts, j, now) = (s.text(), s.ts(), s.json(), s.now());
    // DuckDB keeps them without an index (its index lives in memory and grows with
    // every pair); a run matches the pairs it needs with a join. A warehouse that has
    // loaded events is marked to fill them from every event at its next run; a new one
    // has none to fill them from (and its first runs read its backlog in bounded runs).
    let key = |cols: &str| match d {
        Relational::DuckDb => String::new(),
        Relational::Postgres => format!(", PRIMARY KEY ({cols})"),
    };
    format!(
        "CREATE TABLE collector_id_activity (anonymous_id {t} NOT NULL, user_id {t} NOT NULL, first_seen {ts}, last_seen {ts}, event_count BIGINT NOT NULL{});
CREATE TABLE collector_id_traits (anonymous_id {t} NOT NULL, user_id {t} NOT NULL, key {t} NOT NULL, value {j}, ts {ts}, message_id {t} NOT NULL{});
CREATE TABLE collector_id_consent (anonymous_id {t} NOT NULL, user_id {t} NOT NULL, category {t} NOT NULL, granted BOOLEAN NOT NULL, source {t}, policy_version {t}, ts {ts}, message_id {t} NOT NULL{});
INSERT INTO collector_identity_state SELECT '{ACTIVITY_BACKFILL}', {now} WHERE EXISTS (SELECT 1 FROM message_ids);
",
        key("anonymous_id, user_id"),
        key("anonymous_id, user_id, key"),
        key("anonymous_id, user_id, category"),
    )
}

/// What an event of `tb` brings to its pair's activity, beside its ids and time:
/// `traits` (identifies only) and `consent_r`, the consent the edge resolved (only that
/// of `context`, which is most of an event's bytes).
fn activity_columns(q: &Sql, tb: &str) -> String {
    let traits = if tb == "identifies" {
        "traits".to_string()
    } else {
        format!("CAST(NULL AS {})", q.json())
    };
    format!(
        "{traits} AS traits, {} AS consent_r",
        q.json_path("context", &["consent", "resolved"])
    )
}

/// Adds the events of `src` (a relation with `message_id`, `anonymous_id`, `user_id`,
/// `ts`, `traits` and `consent_r`; each event once, none added before) to the activity
/// tables: each pair's new rows are its old ones merged with the new events, written in
/// place of the old.
async fn add_activity(s: &mut dyn SqlSession, q: &Sql, src: &str) -> Result<(), SinkError> {
    let pair = "COALESCE(anonymous_id, '') AS anonymous_id, COALESCE(user_id, '') AS user_id";
    let pair_s = "COALESCE(s.anonymous_id, '') AS anonymous_id, COALESCE(s.user_id, '') AS user_id";
    let of_new = |tb: &str| {
        format!(
            "EXISTS (SELECT 1 FROM identity_act_new n WHERE n.anonymous_id = {tb}.anonymous_id AND n.user_id = {tb}.user_id)"
        )
    };
    s.batch(&format!(
        "DROP TABLE IF EXISTS identity_act_new;
         CREATE TEMP TABLE identity_act_new AS
           SELECT n.anonymous_id, n.user_id,
             CASE WHEN a.first_seen IS NULL OR n.first_seen < a.first_seen THEN n.first_seen ELSE a.first_seen END AS first_seen,
             CASE WHEN a.last_seen IS NULL OR n.last_seen > a.last_seen THEN n.last_seen ELSE a.last_seen END AS last_seen,
             n.event_count + COALESCE(a.event_count, 0) AS event_count
           FROM (SELECT anonymous_id, user_id, min(ts) AS first_seen, max(ts) AS last_seen, count(*) AS event_count
                 FROM (SELECT {pair}, ts FROM {src} s0) s GROUP BY anonymous_id, user_id) n
           LEFT JOIN collector_id_activity a ON a.anonymous_id = n.anonymous_id AND a.user_id = n.user_id;
         DELETE FROM collector_id_activity WHERE {};
         INSERT INTO collector_id_activity (anonymous_id, user_id, first_seen, last_seen, event_count)
           SELECT anonymous_id, user_id, first_seen, last_seen, event_count FROM identity_act_new;",
        of_new("collector_id_activity")
    ))
    .await?;
    s.batch(&format!(
        "DROP TABLE IF EXISTS identity_act_traits;
         CREATE TEMP TABLE identity_act_traits AS
           SELECT DISTINCT ON (anonymous_id, user_id, key) anonymous_id, user_id, key, value, ts, message_id FROM (
             SELECT {pair_s}, kv.key, kv.value, s.ts, s.message_id FROM {src} s, {each} AS kv WHERE s.traits IS NOT NULL
             UNION ALL
             SELECT anonymous_id, user_id, key, value, ts, message_id FROM collector_id_traits WHERE {old}
           ) x ORDER BY anonymous_id, user_id, key, ts DESC, message_id DESC;
         DELETE FROM collector_id_traits WHERE {old};
         INSERT INTO collector_id_traits (anonymous_id, user_id, key, value, ts, message_id)
           SELECT anonymous_id, user_id, key, value, ts, message_id FROM identity_act_traits;",
        each = q.json_each("s.traits"),
        old = of_new("collector_id_traits"),
    ))
    .await?;
    let source = match q.0 {
        Relational::DuckDb => {
            "json_extract_string(r, '$.sources.\"' || category || '\"')".to_string()
        }
        Relational::Postgres => "(r->'sources'->>category)".to_string(),
    };
    s.batch(&format!(
        "DROP TABLE IF EXISTS identity_act_consent;
         CREATE TEMP TABLE identity_act_consent AS
           SELECT DISTINCT ON (anonymous_id, user_id, category) anonymous_id, user_id, category, granted, source, policy_version, ts, message_id FROM (
             SELECT anonymous_id, user_id, category, granted, {source} AS source, {policy} AS policy_version, ts, message_id FROM (
               SELECT {pair_s}, s.message_id, s.ts, s.consent_r AS r, {granted} AS category, true AS granted FROM {src} s WHERE s.consent_r IS NOT NULL
               UNION ALL
               SELECT {pair_s}, s.message_id, s.ts, s.consent_r AS r, {denied} AS category, false AS granted FROM {src} s WHERE s.consent_r IS NOT NULL
             ) c
             UNION ALL
             SELECT anonymous_id, user_id, category, granted, source, policy_version, ts, message_id FROM collector_id_consent WHERE {old}
           ) x ORDER BY anonymous_id, user_id, category, ts DESC, message_id DESC;
         DELETE FROM collector_id_consent WHERE {old};
         INSERT INTO collector_id_consent (anonymous_id, user_id, category, granted, source, policy_version, ts, message_id)
           SELECT anonymous_id, user_id, category, granted, source, policy_version, ts, message_id FROM identity_act_consent;",
        granted = q.unnest_text(&q.json_path("s.consent_r", &["granted"])),
        denied = q.unnest_text(&q.json_path("s.consent_r", &["denied"])),
        policy = q.json_text("r", "policy_version"),
        old = of_new("collector_id_consent"),
    ))
    .await
}

/// `INSERT INTO profiles` for the people in `identity_touched`, from the activity of
/// the pairs of ids with one of theirs (each pair once per person: an event whose
/// anonymous id and user id are both theirs counts once; one whose ids belong to two
/// people, after a refused merge, counts for both).
fn profiles_sql(q: &Sql) -> String {
    let consent_entry = q.build_object(&[
        ("granted", "granted".into()),
        ("source", "source".into()),
        ("policy_version", "policy_version".into()),
        ("at", q.ts_text("ts")),
    ]);
    format!(
        "INSERT INTO profiles (person_id, user_ids, anonymous_ids, emails, first_seen, last_seen, event_count, traits, consent, updated_at)
WITH ids AS (SELECT id_type, id_value, person_id FROM identities WHERE person_id IN (SELECT person_id FROM identity_touched)),
pairs AS (
  SELECT ids.person_id, a.anonymous_id, a.user_id, a.first_seen, a.last_seen, a.event_count
    FROM collector_id_activity a JOIN ids ON ids.id_type = 'anonymous_id' AND a.anonymous_id = ids.id_value
  UNION
  SELECT ids.person_id, a.anonymous_id, a.user_id, a.first_seen, a.last_seen, a.event_count
    FROM collector_id_activity a JOIN ids ON ids.id_type = 'user_id' AND a.user_id = ids.id_value),
stats AS (SELECT person_id, min(first_seen) AS first_seen, max(last_seen) AS last_seen, sum(event_count) AS event_count FROM pairs GROUP BY person_id),
idl AS (SELECT person_id, {users} AS user_ids, {anons} AS anonymous_ids, {emails} AS emails FROM ids GROUP BY person_id),
tr AS (SELECT DISTINCT ON (p.person_id, t.key) p.person_id, t.key, t.value FROM pairs p
       JOIN collector_id_traits t ON t.anonymous_id = p.anonymous_id AND t.user_id = p.user_id
       ORDER BY p.person_id, t.key, t.ts DESC, t.message_id DESC),
tro AS (SELECT person_id, {traits_obj} AS traits FROM tr GROUP BY person_id),
cs AS (SELECT DISTINCT ON (p.person_id, c.category) p.person_id, c.category, c.granted, c.source, c.policy_version, c.ts FROM pairs p
       JOIN collector_id_consent c ON c.anonymous_id = p.anonymous_id AND c.user_id = p.user_id
       ORDER BY p.person_id, c.category, c.ts DESC, c.message_id DESC),
cso AS (SELECT person_id, {consent_obj} AS consent FROM cs GROUP BY person_id)
SELECT idl.person_id, idl.user_ids, idl.anonymous_ids, idl.emails, stats.first_seen, stats.last_seen,
  COALESCE(stats.event_count, 0), COALESCE(tro.traits, {empty}), COALESCE(cso.consent, {empty}), {now}
FROM idl LEFT JOIN stats ON stats.person_id = idl.person_id LEFT JOIN tro ON tro.person_id = idl.person_id
  LEFT JOIN cso ON cso.person_id = idl.person_id",
        users = q.text_array_agg("id_value", "id_type = 'user_id'"),
        anons = q.text_array_agg("id_value", "id_type = 'anonymous_id'"),
        emails = q.text_array_agg("id_value", "id_type = 'email'"),
        traits_obj = q.object_agg("key", "value"),
        consent_obj = q.object_agg("category", &consent_entry),
        empty = q.empty_object(),
        now = q.now(),
    )
}
