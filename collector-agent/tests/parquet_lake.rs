//! What is particular to the Parquet lake (the behaviour every sink shares is in
//! `conformance.rs`): its layout, files any Parquet reader can read, the manifest, and
//! what a crash before or after the commit leaves.

mod common;

use collector_agent::sinks::parquet::ParquetSink;
use collector_agent::sinks::{Idle, IdleStats, Load, Sink};
use common::events;
use serde_json::json;

/// The first column of `sql`'s rows, as text.
fn strings(conn: &duckdb::Connection, sql: &str) -> Vec<String> {
    conn.prepare(sql)
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn files(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                if !p.ends_with("_collector") {
                    stack.push(p);
                }
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Events as the edge stores them, received at `received` (RFC 3339).
fn received_at(received: &str, body: serde_json::Value) -> Vec<collector_core::StoredEvent> {
    let ms = collector_core::timestamp::parse_ms(received).unwrap();
    common::events_received_at(ms, body)
}

#[tokio::test]
async fn a_long_query_does_not_hold_loads_up() {
    let dir = tempfile::tempdir().unwrap();
    common::a_long_query_does_not_hold_loads_up(
        ParquetSink::open(&dir.path().join("lake")).unwrap(),
    )
    .await;
}

// One file per table, day received and load; two batches received either side of
// midnight make two days, whatever the events' own times.
#[tokio::test]
async fn lake_layout_is_partitioned_by_table_and_date_with_one_file_per_load() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("lake");
    let sink = ParquetSink::open(&root).unwrap();
    let b1 = received_at(
        "2026-11-23T23:59:50Z",
        json!({"batch": [
            {"type": "track", "messageId": "a", "userId": "u", "event": "E", "timestamp": "2026-11-23T23:59:00Z"},
            {"type": "track", "messageId": "b", "userId": "u", "event": "E", "timestamp": "2026-11-24T00:01:00Z"},
            {"type": "page", "messageId": "c", "userId": "u", "name": "Home", "timestamp": "2026-11-24T00:02:00Z"}
        ]}),
    );
    let b2 = received_at(
        "2026-11-24T08:00:05Z",
        json!({"batch": [{"type": "track", "messageId": "d", "userId": "u", "event": "E", "timestamp": "2026-11-24T08:00:00Z"}]}),
    );
    sink.load(&Load {
        shard: 3,
        batches: vec![
            collector_agent::sinks::LoadBatch::Decoded {
                batch_id: 41,
                events: b1,
            },
            collector_agent::sinks::LoadBatch::Decoded {
                batch_id: 42,
                events: b2,
            },
        ],
    })
    .await
    .unwrap();
    assert_eq!(
        files(&root),
        vec![
            // The per-event table of `E`, beside `tracks`; named after the load's
            // shard, first batch and load id.
            "table=e/date=2026-11-23/part-s3-b41-l1.parquet",
            "table=e/date=2026-11-24/part-s3-b41-l1.parquet",
            "table=pages/date=2026-11-23/part-s3-b41-l1.parquet",
            "table=tracks/date=2026-11-23/part-s3-b41-l1.parquet",
            "table=tracks/date=2026-11-24/part-s3-b41-l1.parquet",
        ]
    );
    // Any Parquet reader reads them as they are (here DuckDB, without our views).
    let conn = duckdb::Connection::open_in_memory().unwrap();
    let n: i64 = conn
        .query_row(
            &format!(
                "SELECT count(*) FROM read_parquet('{}/table=tracks/*/*.parquet', hive_partitioning = true) WHERE event_text = 'E' AND event = 'e' AND date IS NOT NULL",
                root.display()
            ),
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 3);
    let manifest = sink
        .query("SELECT shard, batch_id, table_name, date, rows, CAST(batch_ids AS VARCHAR), staged IS NULL FROM loaded_batches WHERE table_name <> 'e' ORDER BY file")
        .await
        .unwrap();
    assert_eq!(manifest.rows.len(), 3);
    // The file of tracks on the 23rd holds the two rows of the first batch, the one
    // on the 24th the second's.
    let row = |date: &str, first: &str, n: &str, batches: &str| {
        vec![
            Some("3".into()),
            Some(first.into()),
            Some("tracks".into()),
            Some(date.into()),
            Some(n.into()),
            Some(batches.into()),
            Some("true".into()),
        ]
    };
    assert_eq!(manifest.rows[1], row("2026-11-23", "41", "2", "[41]"));
    assert_eq!(manifest.rows[2], row("2026-11-24", "42", "1", "[42]"));
}

fn track_load(shard: u32, batch_id: i64, ids: &[&str]) -> Load {
    let batch: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| json!({"type": "track", "messageId": id, "userId": "u", "event": "E", "timestamp": "2026-11-24T10:00:00Z"}))
        .collect();
    Load::events(shard, batch_id, events(json!({ "batch": batch })))
}

async fn count(sink: &ParquetSink, table: &str) -> String {
    let r = sink
        .query(&format!("SELECT count(*) FROM {table}"))
        .await
        .unwrap();
    r.rows[0][0].clone().unwrap()
}

// A crash before the commit leaves only temp files, which no reader sees and the next
// open removes; the retry loads the rows (their ids were not committed) once.
#[tokio::test]
async fn a_crash_before_the_commit_leaves_nothing_a_reader_sees() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("lake");
    let sink = ParquetSink::open(&root).unwrap();
    sink.load(&track_load(0, 6, &["w1"])).await.unwrap();
    let before = files(&root);
    // What the killed load left: its temp files, named as the sink names them.
    let tmp = root.join("_collector/tmp");
    for t in ["tracks", "e"] {
        std::fs::copy(
            root.join(format!("table={t}/date=2026-11-24/part-s0-b6-l1.parquet")),
            tmp.join(format!("2-{t}-2026-11-24-part-s0-b7-l2.parquet")),
        )
        .unwrap();
    }
    assert_eq!(count(&sink, "tracks").await, "1");
    drop(sink);

    let sink = ParquetSink::open(&root).unwrap();
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "temp files no commit lists are removed at open"
    );
    assert_eq!(files(&root), before);
    let retry = sink.load(&track_load(0, 7, &["x1", "x2"])).await.unwrap();
    assert_eq!(retry.inserted, 2);
    assert_eq!(count(&sink, "tracks").await, "3");
    assert_eq!(count(&sink, "e").await, "3");
    let third = sink.load(&track_load(0, 7, &["x1", "x2"])).await.unwrap();
    assert_eq!((third.inserted, third.duplicates), (0, 2));
    assert_eq!(count(&sink, "tracks").await, "3");
}

// A crash after the commit, before the files were renamed into place: the manifest
// lists them as staged, and the next open (or the next load of a running agent whose
// rename failed) puts them in place. A redelivery writes nothing.
#[tokio::test]
async fn files_committed_but_not_in_place_are_published_later() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("lake");
    let sink = ParquetSink::open(&root).unwrap();
    let load = track_load(0, 7, &["x1", "x2"]);
    sink.load(&load).await.unwrap();
    let published = files(&root);
    assert_eq!(published.len(), 2);

    // Put the state back as it was between the commit and the renames.
    let unpublish = |sink_root: &std::path::Path| -> Vec<String> {
        let mut updates = Vec::new();
        for (i, f) in published.iter().enumerate() {
            let staged = format!("_collector/tmp/pending-{i}.parquet");
            std::fs::rename(sink_root.join(f), sink_root.join(&staged)).unwrap();
            updates.push(format!(
                "UPDATE loaded_batches SET staged = '{staged}' WHERE file = '{f}'"
            ));
        }
        updates
    };
    for sql in unpublish(&root) {
        sink.query(&sql).await.unwrap();
    }
    assert_eq!(count(&sink, "tracks").await, "0", "no reader sees them yet");
    drop(sink);

    let sink = ParquetSink::open(&root).unwrap();
    assert_eq!(files(&root), published);
    assert_eq!(count(&sink, "tracks").await, "2");
    let pending = sink
        .query("SELECT count(*) FROM loaded_batches WHERE staged IS NOT NULL")
        .await
        .unwrap();
    assert_eq!(pending.rows[0][0].as_deref(), Some("0"));
    let again = sink.load(&load).await.unwrap();
    assert_eq!((again.inserted, again.duplicates), (0, 2));

    // The same, found by the next load of a sink that stayed open.
    for sql in unpublish(&root) {
        sink.query(&sql).await.unwrap();
    }
    sink.load(&track_load(0, 8, &["y1"])).await.unwrap();
    assert_eq!(count(&sink, "tracks").await, "3");
    assert_eq!(files(&root).len(), 4);
}

// A lake whose registry still has its primary key (its migration 2, before 6) is
// rebuilt without it, keeping every id: the events loaded before are still duplicates.
#[tokio::test]
async fn a_keyed_registry_in_the_state_file_is_rebuilt_without_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("lake");
    let ev = |ids: &[&str]| {
        events(
            json!({"batch": ids.iter().map(|id| json!({"type": "track", "messageId": id, "userId": "u", "event": "E"})).collect::<Vec<_>>()}),
        )
    };
    let sink = ParquetSink::open(&root).unwrap();
    sink.load(&Load::events(0, 1, ev(&["a", "b"])))
        .await
        .unwrap();
    drop(sink);
    duckdb::Connection::open(root.join("_collector/state.duckdb"))
        .unwrap()
        .execute_batch(
            "CREATE TABLE keyed (message_id VARCHAR PRIMARY KEY, table_name VARCHAR NOT NULL, load_id BIGINT NOT NULL);
             INSERT INTO keyed SELECT message_id, table_name, load_id FROM message_ids;
             DROP TABLE message_ids;
             ALTER TABLE keyed RENAME TO message_ids;
             DELETE FROM collector_migrations WHERE version = 6;",
        )
        .unwrap();
    let sink = ParquetSink::open(&root).unwrap();
    let st = sink
        .load(&Load::events(0, 2, ev(&["a", "b", "c"])))
        .await
        .unwrap();
    assert_eq!((st.inserted, st.duplicates), (1, 2));
    let n = sink.query("SELECT count(*) FROM tracks").await.unwrap();
    assert_eq!(n.rows[0][0].as_deref(), Some("3"));
    drop(sink);
    let keys: i64 = duckdb::Connection::open(root.join("_collector/state.duckdb"))
        .unwrap()
        .query_row(
            "SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'message_ids' AND constraint_type IN ('PRIMARY KEY', 'UNIQUE')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(keys, 0);
}

// The dashboard's figures, computed over a lake (its state file, its files through
// views), are the ones the same events give in a DuckDB warehouse.
#[tokio::test]
async fn the_dashboard_figures_of_a_lake_are_duckdbs() {
    let batch = json!({"batch": [
        {"type": "page", "messageId": "p1", "anonymousId": "a1", "properties": {"path": "/"},
         "context": {"consent": {"resolved": {"granted": ["analytics"], "denied": ["marketing"], "sources": {"analytics": "choice", "marketing": "region_default"}, "policy_version": "v1", "region": "EEA"}}}},
        {"type": "identify", "messageId": "i1", "anonymousId": "a1", "userId": "u1", "traits": {"plan": "pro"}},
        {"type": "track", "messageId": "t1", "userId": "u1", "event": "Order Completed", "properties": {"revenue": 3.5}},
        {"type": "page", "messageId": "p2", "anonymousId": "a2", "properties": {"path": "/x"},
         "context": {"consent": {"resolved": {"granted": ["analytics", "marketing"], "denied": [], "sources": {"analytics": "choice", "marketing": "choice"}, "policy_version": "v1", "region": "EEA"}}}}
    ]});
    let now = collector_agent::now_ms();
    let mut figures = Vec::new();
    for t in [common::Target::duckdb(), common::Target::parquet()] {
        let sink = t.open().await;
        sink.load(&Load::events(0, 1, events(batch.clone())))
            .await
            .unwrap();
        let mut s = sink.session().await.unwrap().unwrap();
        collector_agent::identity::run(&mut *s, &Default::default())
            .await
            .unwrap();
        let categories = vec!["analytics".to_string(), "marketing".to_string()];
        let d = collector_agent::dashboard::data::compute(&mut *s, &categories, 7, now)
            .await
            .unwrap();
        figures.push(serde_json::to_value(&d).unwrap());
    }
    assert_eq!(figures[0], figures[1]);
    assert_eq!(figures[0]["decisions"], 2, "{}", figures[0]);
    assert_eq!(
        figures[0]["by_source"]["marketing"]["region_default"]["decided"], 1,
        "{}",
        figures[0]
    );
}

// A lake that loaded an event named `Profiles` before such names were reserved has a
// per-event table `profiles` in its catalog and files under `table=profiles/`. Its
// view would hide the state file's `profiles` (the people identity resolves), so it
// gets none: `profiles` is the people's table, and the old files stay in place.
#[tokio::test]
async fn an_old_per_event_table_named_like_the_lakes_own_does_not_hide_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("lake");
    drop(ParquetSink::open(&root).unwrap());
    let old = root.join("table=profiles/date=2026-11-24/part-old.parquet");
    std::fs::create_dir_all(old.parent().unwrap()).unwrap();
    {
        let c = duckdb::Connection::open(root.join("_collector/state.duckdb")).unwrap();
        c.execute_batch(&format!(
            "INSERT INTO collector_tables VALUES ('profiles', 'Profiles', now()::TIMESTAMP);
             INSERT INTO collector_columns VALUES ('profiles', 'x', 'DOUBLE', 0, now()::TIMESTAMP);
             COPY (SELECT 'old-1' AS message_id, 'u' AS user_id, 1.0 AS x) TO '{}' (FORMAT parquet);",
            old.display()
        ))
        .unwrap();
    }
    let sink = ParquetSink::open(&root).unwrap();
    let r = sink.query("SELECT * FROM profiles").await.unwrap();
    assert_eq!(r.columns[0], "person_id", "{:?}", r.columns);
    assert!(r.rows.is_empty());
    assert!(old.exists(), "the old files stay in place");
    // A new `Profiles` event goes to `event_profiles`.
    let batch = json!({"batch": [{"type": "track", "messageId": "new-1", "userId": "u", "event": "Profiles", "properties": {"x": 2}}]});
    let st = sink.load(&Load::events(0, 1, events(batch))).await.unwrap();
    assert_eq!(st.inserted, 1, "{st:?}");
    assert_eq!(count(&sink, "event_profiles").await, "1");
    assert_eq!(count(&sink, "profiles").await, "0");
}

// `table` and `date` are the layout's partition keys, which readers that discover
// partitions (Spark, BigQuery, DuckDB's `hive_partitioning`) add to every table: a
// file with a column of either name makes Spark refuse the table, and DuckDB showed the
// partition's date instead of the property's and dropped `table`. Such a property is
// not a column in the lake (like a fixed column's name): `rejected_values` records it
// and it stays in the event's JSON.
#[tokio::test]
async fn properties_named_like_the_partition_keys_are_not_columns() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("lake");
    let sink = ParquetSink::open(&root).unwrap();
    let batch = json!({"batch": [
        {"type": "track", "messageId": "b1", "userId": "u", "event": "Booked", "timestamp": "2026-11-24T10:00:00Z",
         "properties": {"date": "2026-01-01", "table": "t4", "x": 1}},
        {"type": "page", "messageId": "b2", "userId": "u", "timestamp": "2026-11-24T10:00:00Z",
         "properties": {"date": "2026-01-02", "table": "t5"}},
        {"type": "identify", "messageId": "b3", "userId": "u", "timestamp": "2026-11-24T10:00:00Z",
         "traits": {"date": "2026-01-03", "table": "t6"}}
    ]});
    let st = sink.load(&Load::events(0, 1, events(batch))).await.unwrap();
    assert_eq!((st.inserted, st.quarantined), (3, 0), "{st:?}");
    let r = sink
        .query("SELECT message_id, table_name, column_name, value FROM rejected_values ORDER BY 1, 2, 3")
        .await
        .unwrap();
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        r.rows,
        vec![
            vec![s("b1"), s("booked"), s("date"), s("\"2026-01-01\"")],
            vec![s("b1"), s("booked"), s("table"), s("\"t4\"")],
            vec![s("b2"), s("pages"), s("date"), s("\"2026-01-02\"")],
            vec![s("b2"), s("pages"), s("table"), s("\"t5\"")],
            vec![s("b3"), s("identifies"), s("date"), s("\"2026-01-03\"")],
            vec![s("b3"), s("identifies"), s("table"), s("\"t6\"")],
        ]
    );
    // `users` is a table of the state file, not files: such traits are its columns,
    // as in every other warehouse.
    let r = sink
        .query("SELECT id, date, \"table\" FROM users")
        .await
        .unwrap();
    assert_eq!(r.rows, vec![vec![s("u"), s("2026-01-03"), s("t6")]]);
    // The view's `date` is the partition's; the property is in the JSON.
    let r = sink
        .query("SELECT date, x, (SELECT properties->>'date' FROM tracks) FROM booked")
        .await
        .unwrap();
    assert_eq!(r.rows, vec![vec![s("2026-11-24"), s("1"), s("2026-01-01")]]);
    // No file holds a column named like a partition key.
    let conn = duckdb::Connection::open_in_memory().unwrap();
    for f in files(&root) {
        let cols = strings(
            &conn,
            &format!("SELECT name FROM parquet_schema('{}/{f}')", root.display()),
        );
        assert!(
            !cols.iter().any(|c| c == "date" || c == "table"),
            "{f}: {cols:?}"
        );
    }
}

// The partition is the day the edge received an event, not the `timestamp` its client
// chose: one load of events from 40 different days (a history import, or a hostile
// client) is still one file per table, and every event is in it.
#[tokio::test]
async fn a_load_of_many_event_days_is_one_file_per_table() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("lake");
    let sink = ParquetSink::open(&root).unwrap();
    let batch: Vec<serde_json::Value> = (0..40)
        .map(|d| json!({"type": "track", "messageId": format!("d{d}"), "userId": "u", "event": "Imported",
            "timestamp": format!("2024-01-{:02}T10:00:00Z", d % 28 + 1).replace("2024-01", if d < 28 { "2024-01" } else { "2024-02" })}))
        .collect();
    let st = sink
        .load(&Load::events(0, 1, events(json!({ "batch": batch }))))
        .await
        .unwrap();
    assert_eq!(st.inserted, 40);
    let listed = files(&root);
    assert_eq!(listed.len(), 2, "{listed:?}");
    let r = sink
        .query("SELECT count(*), count(DISTINCT CAST(\"timestamp\" AS DATE)), min(date), max(date) FROM tracks")
        .await
        .unwrap();
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        r.rows,
        vec![vec![s("40"), s("40"), s("2026-11-24"), s("2026-11-24")]]
    );
    assert_eq!(count(&sink, "imported").await, "40");
}

// A lake from before migration 9 had `users` as a view over `identifies`' columns
// (which lost traits named like them). At its next open `users` becomes a table of the
// state file, filled from the identifies already in its files, one file at a
// time: it ends up holding exactly what the loads write into it now (values, and the
// identify each value came from), so later identifies merge with it as usual.
#[tokio::test]
async fn a_lake_from_before_users_was_a_table_fills_it_from_its_identifies() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("lake");
    // 6,000 identifies of 300 users, in three loads, each load's out of time order;
    // traits that change, one named like a column of `identifies`, one whose type
    // drifts (a number column, then text the column cannot hold).
    let identify = |n: usize| {
        let user = n % 300;
        let day = 1 + (n * 7919) % 28;
        let mut traits = json!({"plan": format!("p{}", n % 5), "visits": n});
        if n.is_multiple_of(3) {
            traits["context_ip"] = json!(format!("trait-{n}"));
        }
        if n.is_multiple_of(11) {
            traits["visits"] = json!(format!("many-{n}"));
        }
        json!({"type": "identify", "messageId": format!("m{n:05}"), "userId": format!("u{user:03}"),
               "anonymousId": format!("a{n}"), "timestamp": format!("2026-10-{day:02}T10:00:00Z"),
               "context": {"ip": "1.1.1.1"}, "traits": traits})
    };
    let sink = ParquetSink::open(&root).unwrap();
    for (batch, range) in [(1, 0..2_000), (2, 2_000..4_000), (3, 4_000..6_000)] {
        let evs: Vec<_> = range.rev().map(identify).collect();
        sink.load(&Load::events(0, batch, events(json!({ "batch": evs }))))
            .await
            .unwrap();
    }
    let users_sql = "SELECT * EXCLUDE (loaded_at) FROM users ORDER BY id";
    let keys_sql = "SELECT id, keys FROM collector_user_traits ORDER BY id";
    let users = sink.query(users_sql).await.unwrap();
    let keys = sink.query(keys_sql).await.unwrap();
    assert_eq!(users.rows.len(), 300);
    assert!(
        users.columns.iter().any(|c| c == "context_ip"),
        "{:?}",
        users.columns
    );
    drop(sink);
    // As the release before left it: no `users` table, no keys, migration 9 not run.
    duckdb::Connection::open(root.join("_collector/state.duckdb"))
        .unwrap()
        .execute_batch(
            "DROP TABLE users; DROP TABLE collector_user_traits;
             DELETE FROM collector_migrations WHERE version = 9;",
        )
        .unwrap();
    let sink = ParquetSink::open(&root).unwrap();
    assert_eq!(sink.query(users_sql).await.unwrap(), users);
    assert_eq!(sink.query(keys_sql).await.unwrap(), keys);
    // Done once: the mark is gone, and a later identify merges as in any warehouse
    // (an older one changes nothing, a newer one its traits).
    drop(sink);
    let sink = ParquetSink::open(&root).unwrap();
    sink.load(&Load::events(0, 4, events(json!({"batch": [
        {"type": "identify", "messageId": "late-old", "userId": "u001", "timestamp": "2026-09-01T00:00:00Z", "traits": {"plan": "ancient"}},
        {"type": "identify", "messageId": "late-new", "userId": "u002", "timestamp": "2026-12-01T00:00:00Z", "traits": {"plan": "newest"}}
    ]}))))
    .await
    .unwrap();
    let plans = sink
        .query("SELECT id, plan FROM users WHERE id IN ('u001', 'u002') ORDER BY id")
        .await
        .unwrap();
    let before: Vec<_> = users
        .rows
        .iter()
        .filter(|r| r[0].as_deref() == Some("u001"))
        .cloned()
        .collect();
    let plan_at = users.columns.iter().position(|c| c == "plan").unwrap();
    assert_eq!(
        plans.rows,
        vec![
            vec![Some("u001".into()), before[0][plan_at].clone()],
            vec![Some("u002".into()), Some("newest".into())]
        ]
    );
}

/// What Apache Arrow's Parquet reader (pyarrow, `lake_reader.py`) sees in the lake at
/// `root`: per table, its unified schema, the files' logical types and the rows.
fn read_with_arrow(root: &std::path::Path) -> serde_json::Value {
    let tools = collector_e2e::toolchain::Toolchain::discover();
    let python = tools.dbt_venv().join("bin/python");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lake_reader.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg(root)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "run {} ({e}); `cargo xtask setup` installs pyarrow",
                python.display()
            )
        });
    assert!(
        out.status.success(),
        "lake_reader.py failed (`cargo xtask setup` installs pyarrow):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A value as Arrow read it, in the agent's text form (instants to the microsecond).
fn arrow_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(
            collector_core::timestamp::parse_us(s)
                .filter(|_| s.len() >= 19 && s.as_bytes()[10] == b'T')
                .map(|us| us.to_string())
                .unwrap_or_else(|| s.clone()),
        ),
        // Python writes a double that is whole as `41.0`; the agent as `41`.
        serde_json::Value::Number(n) => n.as_f64().map(|f| f.to_string()),
        other => Some(other.to_string()),
    }
}

/// A value as the agent's SQL renders it, in the same form.
fn agent_text(v: &Option<String>) -> Option<String> {
    let s = v.as_ref()?;
    Some(
        collector_core::timestamp::parse_us(s)
            .filter(|_| s.len() >= 19 && s.as_bytes()[10] == b'T' && s.ends_with('Z'))
            .map(|us| us.to_string())
            .unwrap_or_else(|| s.clone()),
    )
}

// The issue promises a lake that engines other than DuckDB read as they are. Apache
// Arrow's Parquet implementation (pyarrow, `lake_reader.py`) reads every table's files
// with their Hive partitions, unifying the files of a table whose later loads added a
// column, and finds exactly the rows and values the agent's own SQL reads; instants
// are marked as UTC (before, they were local date-times: BigQuery loads those as
// `DATETIME`, Spark as `TIMESTAMP_NTZ`), JSON columns as JSON, numbers and booleans
// typed.
#[tokio::test]
async fn another_parquet_implementation_reads_the_lake() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("lake");
    let sink = ParquetSink::open(&root).unwrap();
    common::load(&sink, 1, json!([
        {"type": "track", "messageId": "o1", "userId": "u1", "event": "Order Completed",
         "timestamp": "2026-11-24T13:54:00.250Z",
         "context": {"locale": "fr-FR", "page": {"title": "Caf\u{e9} \u{2615} \u{1F600}"}},
         "properties": {"revenue": 12.5, "currency": "EUR", "items": [{"sku": "a", "qty": 2}], "paid": true, "paid_at": "2026-11-24T13:55:00.123456Z", "n": 3}},
        {"type": "page", "messageId": "p1", "anonymousId": "a1", "name": "Home", "timestamp": "2026-11-24T13:53:00Z",
         "properties": {"path": "/"}},
        {"type": "identify", "messageId": "i1", "userId": "u1", "anonymousId": "a1", "timestamp": "2026-11-24T13:52:00Z",
         "traits": {"plan": "pro", "age": 41}},
        {"type": "track", "messageId": "o3", "userId": "u3", "event": "Order Completed",
         "timestamp": "2026-11-24T13:51:00Z", "properties": {"revenue": 3, "currency": "EUR"}}
    ])).await;
    // A later load adds a column (`coupon`) and sends a revenue that is no number.
    common::load(&sink, 2, json!([
        {"type": "track", "messageId": "o2", "userId": "u2", "event": "Order Completed",
         "timestamp": "2026-11-24T13:50:00Z",
         "properties": {"revenue": "not a number", "currency": "USD", "coupon": "XMAS", "n": 4, "paid": false}}
    ])).await;
    let seen = read_with_arrow(&root);
    let tables: Vec<&String> = seen.as_object().unwrap().keys().collect();
    assert_eq!(tables, ["identifies", "order_completed", "pages", "tracks"]);

    let oc = &seen["order_completed"];
    assert_eq!(oc["files"], 2);
    let ty = |t: &str, c: &str| {
        seen[t]["schema"][c]
            .as_str()
            .unwrap_or("missing")
            .to_string()
    };
    for t in ["tracks", "pages", "identifies", "order_completed"] {
        for c in [
            "timestamp",
            "received_at",
            "sent_at",
            "original_timestamp",
            "loaded_at",
        ] {
            assert_eq!(ty(t, c), "timestamp[us, tz=UTC]", "{t}.{c}");
            for logical in seen[t]["logical"][c].as_array().unwrap() {
                assert!(
                    logical.as_str().unwrap().contains("isAdjustedToUTC=true"),
                    "{t}.{c}: {logical}"
                );
            }
        }
        assert_eq!(ty(t, "message_id"), "string");
        if t != "order_completed" {
            assert_eq!(ty(t, "raw"), "extension<arrow.json>", "{t}.raw");
        }
        // The partition key, from the path.
        assert_eq!(ty(t, "date"), "string");
    }
    assert_eq!(ty("order_completed", "paid_at"), "timestamp[us, tz=UTC]");
    assert_eq!(ty("order_completed", "revenue"), "double");
    assert_eq!(ty("order_completed", "paid"), "bool");
    assert_eq!(ty("order_completed", "coupon"), "string");
    assert_eq!(ty("order_completed", "items"), "extension<arrow.json>");
    assert_eq!(ty("identifies", "age"), "double");

    let rows = oc["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    // The first file has no `coupon`: null there. The text that is no number is not
    // in the column (`rejected_values` has it).
    assert_eq!(rows[0]["coupon"], serde_json::Value::Null);
    assert_eq!(rows[1]["coupon"], "XMAS");
    assert_eq!(rows[0]["revenue"], 12.5);
    assert_eq!(rows[1]["revenue"], serde_json::Value::Null);
    assert_eq!(rows[0]["paid_at"], "2026-11-24T13:55:00.123456+00:00");
    assert_eq!(rows[0]["timestamp"], "2026-11-24T13:54:00.250000+00:00");
    assert_eq!(
        seen["tracks"]["rows"][0]["context_page_title"],
        "Caf\u{e9} \u{2615} \u{1F600}"
    );

    same_as_the_agents_sql(&sink, &seen).await;

    // An erasure rewrites the files that hold the person's rows: they stay readable,
    // with the file's own columns only (it once wrote the partition keys into them).
    let erased = sink
        .erase_files(&["u1".to_string()], &["a1".to_string()])
        .await
        .unwrap();
    assert_eq!(
        erased,
        vec![
            ("identifies".to_string(), 1),
            ("order_completed".to_string(), 1),
            ("pages".to_string(), 1),
            ("tracks".to_string(), 1)
        ]
    );
    let seen = read_with_arrow(&root);
    let tables: Vec<&String> = seen.as_object().unwrap().keys().collect();
    assert_eq!(tables, ["order_completed", "tracks"]);
    for (table, t) in seen.as_object().unwrap() {
        let in_files: Vec<&String> = t["logical"].as_object().unwrap().keys().collect();
        assert!(
            !in_files.iter().any(|c| *c == "date" || *c == "table"),
            "{table}: {in_files:?}"
        );
        let ids: Vec<&str> = t["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["message_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["o2", "o3"], "{table}");
        assert_eq!(
            t["schema"]["received_at"].as_str(),
            Some("timestamp[us, tz=UTC]")
        );
    }
    same_as_the_agents_sql(&sink, &seen).await;
}

/// Every value of every table Arrow read is what the agent's SQL reads.
async fn same_as_the_agents_sql(sink: &ParquetSink, seen: &serde_json::Value) {
    for (table, t) in seen.as_object().unwrap() {
        let ours = sink
            .query(&format!("SELECT * FROM {table} ORDER BY message_id"))
            .await
            .unwrap();
        let arrow_rows = t["rows"].as_array().unwrap();
        assert_eq!(arrow_rows.len(), ours.rows.len(), "{table}");
        let arrow_columns: Vec<&String> = t["schema"].as_object().unwrap().keys().collect();
        let mut our_columns = ours.columns.clone();
        our_columns.sort();
        assert_eq!(
            arrow_columns,
            our_columns.iter().collect::<Vec<_>>(),
            "{table}"
        );
        for (a, o) in arrow_rows.iter().zip(&ours.rows) {
            for (i, c) in ours.columns.iter().enumerate() {
                assert_eq!(
                    arrow_text(&a[c]),
                    agent_text(&o[i]),
                    "{table}.{c} of {}",
                    a["message_id"]
                );
            }
        }
    }
}

/// Rewrites a lake file as `sql` (a `SELECT` over `src`, the file's rows) makes it.
fn rewrite_file(conn: &duckdb::Connection, path: &std::path::Path, sql: &str) {
    let tmp = path.with_extension("tmp");
    let src = format!("read_parquet('{}')", path.display());
    conn.execute_batch(&format!(
        "COPY ({}) TO '{}' (FORMAT parquet)",
        sql.replace("{src}", &src),
        tmp.display()
    ))
    .unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// A lake written before migration 11 holds instants as local date-times (`TIMESTAMP`),
// and the files an erasure rewrote hold the path's `table` and `date` as columns.
// At the next open each such file is rewritten once, with the same rows: Arrow reads
// the lake, its instants are the same UTC instants, and a `date` column that is not
// the path's (a property so named, kept by older releases) stays.
#[tokio::test]
async fn a_lake_from_before_utc_instants_is_rewritten_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("lake");
    let before = {
        let sink = ParquetSink::open(&root).unwrap();
        common::load(&sink, 1, json!([
            {"type": "track", "messageId": "o1", "userId": "u1", "event": "Order Completed",
             "timestamp": "2026-11-24T13:54:00.250Z",
             "properties": {"revenue": 12.5, "paid_at": "2026-11-24T13:55:00.123456Z"}},
            {"type": "page", "messageId": "p1", "anonymousId": "a1", "name": "Home", "timestamp": "2026-11-24T13:53:00Z"}
        ])).await;
        let mut out = Vec::new();
        for t in ["tracks", "order_completed", "pages"] {
            out.push(sink.query(&format!("SELECT * FROM {t}")).await.unwrap());
        }
        out
    };
    // As an older release left it: naive instants everywhere; an erasure's rewrite of
    // `tracks` (the path's keys in the file); a property `date` in `pages`.
    let conn = duckdb::Connection::open_in_memory().unwrap();
    conn.execute_batch("SET TimeZone = 'UTC'").unwrap();
    let mut naive_files = 0;
    for f in files(&root) {
        let path = root.join(&f);
        let naive = strings(
            &conn,
            &format!(
                "SELECT column_name FROM (DESCRIBE SELECT * FROM read_parquet('{}', hive_partitioning = false)) WHERE column_type = 'TIMESTAMP WITH TIME ZONE'",
                path.display()
            ),
        );
        let replace = naive
            .iter()
            .map(|c| format!("CAST(\"{c}\" AS TIMESTAMP) AS \"{c}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = if f.starts_with("table=tracks/") {
            // DuckDB adds the path's keys: what the erasure wrote.
            format!("SELECT * REPLACE ({replace}) FROM {{src}}")
        } else if f.starts_with("table=pages/") {
            format!("SELECT * REPLACE ({replace}), DATE '2026-01-01' AS \"date\" FROM read_parquet('{}', hive_partitioning = false)", path.display())
        } else {
            format!(
                "SELECT * REPLACE ({replace}) FROM read_parquet('{}', hive_partitioning = false)",
                path.display()
            )
        };
        rewrite_file(&conn, &path, &sql);
        naive_files += 1;
    }
    assert_eq!(naive_files, 3);
    let schema_of = |conn: &duckdb::Connection, f: &str| -> Vec<(String, String)> {
        conn.prepare(&format!(
            "SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet('{}', hive_partitioning = false))",
            root.join(f).display()
        ))
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
    };
    let tracks_file = files(&root)
        .into_iter()
        .find(|f| f.starts_with("table=tracks/"))
        .unwrap();
    assert!(schema_of(&conn, &tracks_file)
        .iter()
        .any(|(n, t)| n == "table" || t == "TIMESTAMP"));
    // The mark migration 11 leaves.
    {
        let state = duckdb::Connection::open(root.join("_collector/state.duckdb")).unwrap();
        state
            .execute_batch("CREATE TABLE collector_files_rewrite (pending BOOLEAN)")
            .unwrap();
    }
    let sink = ParquetSink::open(&root).unwrap();
    for f in files(&root) {
        let cols = schema_of(&conn, &f);
        assert!(!cols.iter().any(|(_, t)| t == "TIMESTAMP"), "{f}: {cols:?}");
        assert!(!cols.iter().any(|(n, _)| n == "table"), "{f}: {cols:?}");
        let dated = cols.iter().any(|(n, _)| n == "date");
        assert_eq!(dated, f.starts_with("table=pages/"), "{f}: {cols:?}");
    }
    // The same rows and instants as before, through the agent's SQL.
    for (i, t) in ["tracks", "order_completed", "pages"].iter().enumerate() {
        let now = sink.query(&format!("SELECT * FROM {t}")).await.unwrap();
        if *t == "pages" {
            // The view shows the path's date for `date`, as before.
            assert_eq!(now.rows, before[i].rows, "{t}");
        } else {
            assert_eq!(now, before[i], "{t}");
        }
    }
    // Arrow reads what it could not (pages still holds its own `date`, which every
    // engine that discovers partitions refuses: out of the read).
    std::fs::rename(root.join("table=pages"), dir.path().join("pages")).unwrap();
    let seen = read_with_arrow(&root);
    assert_eq!(
        seen["tracks"]["schema"]["timestamp"].as_str(),
        Some("timestamp[us, tz=UTC]")
    );
    assert_eq!(
        seen["order_completed"]["rows"][0]["paid_at"],
        "2026-11-24T13:55:00.123456+00:00"
    );
    same_as_the_agents_sql(&sink, &seen).await;
    // Once: the mark is gone.
    let r = sink
        .query("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'collector_files_rewrite'")
        .await
        .unwrap();
    assert_eq!(r.rows[0][0].as_deref(), Some("0"));
}

fn lake_config(root: &std::path::Path) -> collector_agent::config::ParquetConfig {
    collector_agent::config::ParquetConfig::at(root)
}

// The lake's DuckDB takes the DuckDB warehouse's memory keys. Before, it ran with
// DuckDB's own default limit (80% of the host's RAM), and nothing could lower it.
#[tokio::test]
async fn the_lakes_duckdb_takes_its_memory_keys() {
    let dir = tempfile::tempdir().unwrap();
    let sink = ParquetSink::open_config(&collector_agent::config::ParquetConfig {
        memory_limit: Some("64MB".into()),
        threads: Some(1),
        ..lake_config(&dir.path().join("configured"))
    })
    .unwrap();
    assert_eq!(common::setting(&sink, "threads").await, "1");
    assert_eq!(common::setting(&sink, "memory_limit").await, "61.0 MiB");
    let sink = ParquetSink::open_config(&collector_agent::config::ParquetConfig {
        memory_cap: Some("32MB".into()),
        ..lake_config(&dir.path().join("capped"))
    })
    .unwrap();
    // The cap and the indexes' room (a few blocks of 256 KiB), fitted after each call.
    let limit = common::memory_limit_mib(&sink).await;
    assert!((30.5..=34.0).contains(&limit), "{limit} MiB");
    // By default, capped at 1 GiB (plus the indexes' room) like a DuckDB warehouse,
    // unless the host has less.
    let sink = ParquetSink::open(&dir.path().join("default")).unwrap();
    let limit = common::memory_limit_mib(&sink).await;
    let conn = duckdb::Connection::open_in_memory().unwrap();
    let own = strings(&conn, "SELECT current_setting('memory_limit')").remove(0);
    assert!(limit <= 1024.0, "{limit} MiB (DuckDB's own: {own})");
}

// Identity, audiences and activation run their SQL in sessions over the lake's views:
// one that runs out of memory under the capped default limit raises it, as a load's
// error does, so the run after it finds room.
#[tokio::test]
async fn a_lake_session_out_of_memory_raises_its_capped_limit() {
    let dir = tempfile::tempdir().unwrap();
    let sink = ParquetSink::open_config(&collector_agent::config::ParquetConfig {
        memory_cap: Some("32MB".into()),
        ..lake_config(&dir.path().join("lake"))
    })
    .unwrap();
    // The cap, and room for twice what the fresh state file's indexes measure (a few
    // blocks of 256 KiB), fitted after each call (the query that reads it is one).
    let limit = common::memory_limit_mib(&sink).await;
    assert!((30.5..=34.0).contains(&limit), "{limit} MiB");
    assert!(common::out_of_memory_until_raised(&sink).await >= 1);
    let limit = common::memory_limit_mib(&sink).await;
    assert!(limit >= 4.0 * 30.5, "{limit} MiB");
}

// A load that runs out of memory under a small cap raises the limit and is tried again
// at once, in the same call. Before, the call failed: the drain loop left the shard
// for its next pass, after a backoff, and `run --once` ended in an error (the drain
// bench with `memory_cap = "32MB"`).
#[tokio::test]
async fn a_load_out_of_memory_raises_the_limit_and_loads_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let sink = ParquetSink::open_config(&collector_agent::config::ParquetConfig {
        memory_cap: Some("32MB".into()),
        threads: Some(2),
        ..lake_config(&dir.path().join("lake"))
    })
    .unwrap();
    let stats = sink.load(&common::wide_lease(0..10)).await.unwrap();
    assert_eq!(stats.inserted, 5000);
    let limit = common::memory_limit_mib(&sink).await;
    assert!(limit >= 2.0 * 30.5, "{limit} MiB");
    assert_eq!(
        common::rows(&sink, "SELECT count(*) FROM tracks").await,
        vec![vec![common::s("3500")]]
    );
}

// The lake's state file gives its memory back when the agent idles, as a DuckDB
// warehouse does (`duckdb_sink::idle_gives_the_memory_back_and_keeps_the_limit`): not
// with a session open, and with the limit as it was after.
#[tokio::test]
async fn an_idle_lake_gives_its_memory_back() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("lake");
    let wal = || std::fs::metadata(root.join("_collector/state.duckdb.wal")).map_or(0, |m| m.len());
    let sink = ParquetSink::open_config(&lake_config(&root)).unwrap();
    sink.load(&common::wide_lease(0..4)).await.unwrap();
    let held = "SELECT sum(memory_usage_bytes)::BIGINT FROM duckdb_memory()";
    let limit = common::setting(&sink, "memory_limit").await;
    let before: i64 = common::one(&sink, held).await.unwrap().parse().unwrap();
    assert!(wal() > 0);

    let session = sink.session().await.unwrap().unwrap();
    sink.idle(Idle::Waiting).await.unwrap();
    assert!(wal() > 0, "checkpointed with a session open");
    drop(session);
    // Before an exit (`run --once`), nothing to give back: the process does.
    sink.idle(Idle::Exiting).await.unwrap();
    assert!(wal() > 0, "checkpointed before an exit");

    sink.idle(Idle::Waiting).await.unwrap();
    let after: i64 = common::one(&sink, held).await.unwrap().parse().unwrap();
    assert!(after * 2 < before, "{before} → {after} bytes");
    assert_eq!(wal(), 0);
    assert_eq!(common::setting(&sink, "memory_limit").await, limit);
    sink.load(&common::wide_lease(4..6)).await.unwrap();
    assert_eq!(
        common::rows(&sink, "SELECT count(*) FROM message_ids").await,
        vec![vec![common::s("3000")]]
    );
}

// ---- Compaction of small files ----

/// A policy for a lake whose loads were received on 2026-11-24 (`common::events`):
/// with `today` after it, that day is over.
fn policy(today: &str, min_files: usize) -> collector_agent::sinks::parquet::CompactPolicy {
    collector_agent::sinks::parquet::CompactPolicy {
        min_files,
        today: today.into(),
        budget: None,
        max_input_bytes: collector_agent::sinks::parquet::TARGET_FILE_BYTES,
        crash_at: None,
    }
}

/// Every row of `table` as text, ordered by `message_id`, through the agent's views.
async fn table_rows(sink: &ParquetSink, table: &str) -> Vec<Vec<Option<String>>> {
    common::rows(
        sink,
        &format!("SELECT * EXCLUDE (date) FROM {table} ORDER BY message_id"),
    )
    .await
}

/// `(rows, distinct message_ids)` of `table`'s files as any reader lists them.
fn read_as_a_reader(root: &std::path::Path, table: &str) -> duckdb::Result<(i64, i64)> {
    let conn = duckdb::Connection::open_in_memory().unwrap();
    conn.query_row(
        &format!(
            "SELECT count(*), count(DISTINCT message_id) FROM read_parquet('{}/table={table}/*/*.parquet', union_by_name = true)",
            root.display()
        ),
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

/// Five loads into one day, the later ones with a property the first ones lack.
async fn five_small_loads(sink: &ParquetSink) {
    for b in 0..5i64 {
        let batch: Vec<serde_json::Value> = (0..3)
            .map(|i| {
                let mut props = json!({"plan": "pro", "n": i});
                if b >= 3 {
                    props["coupon"] = json!(format!("C{b}"));
                }
                json!({"type": "track", "messageId": format!("m{b}-{i}"), "userId": "u", "event": "E", "properties": props, "timestamp": "2026-11-24T10:00:00Z"})
            })
            .collect();
        sink.load(&Load::events(0, b, events(json!({ "batch": batch }))))
            .await
            .unwrap();
    }
}

/// A fresh lake (in a temp folder, kept while the first value lives) after
/// [`five_small_loads`].
async fn lake_of_five_small_loads() -> (tempfile::TempDir, std::path::PathBuf, ParquetSink) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("lake");
    let sink = ParquetSink::open(&root).unwrap();
    five_small_loads(&sink).await;
    (dir, root, sink)
}

/// Whether `_collector/tmp/` holds nothing (no compaction's folder left behind).
fn tmp_is_empty(root: &std::path::Path) -> bool {
    std::fs::read_dir(root.join("_collector/tmp"))
        .unwrap()
        .next()
        .is_none()
}

fn in_partition(root: &std::path::Path, part: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.join(part))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

// A day that is over is merged into one file per table: the same rows, column for
// column (a property that appeared during the day is NULL in the rows before it), read
// the same by the agent and by any reader; the manifest says where the loads went. A
// file the lake did not write stays as it is; a late load into that day is merged with
// the compacted file at the next compaction; a redelivery still loads nothing.
#[tokio::test]
async fn a_days_small_files_are_compacted_into_one_and_read_the_same() {
    let (_dir, root, sink) = lake_of_five_small_loads().await;
    let part = "table=tracks/date=2026-11-24";
    assert_eq!(in_partition(&root, part).len(), 5);
    std::fs::write(root.join(part).join("_SUCCESS"), b"").unwrap();
    let before = (
        table_rows(&sink, "tracks").await,
        table_rows(&sink, "e").await,
    );
    assert_eq!(before.0.len(), 15);

    // The day is not over, and has fewer files than the open day collects.
    assert!(sink
        .compact(policy("2026-11-24", 64))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(in_partition(&root, part).len(), 6);

    let done = sink.compact(policy("2026-11-28", 64)).await.unwrap();
    let mut summary: Vec<(String, usize, usize, i64)> = done
        .iter()
        .map(|c| (c.table.clone(), c.files_before, c.files_after, c.rows))
        .collect();
    summary.sort();
    assert_eq!(
        summary,
        vec![("e".into(), 5, 1, 15), ("tracks".into(), 5, 1, 15)]
    );
    assert_eq!(
        in_partition(&root, part),
        vec!["_SUCCESS", "part-c2-0.parquet"]
    );
    assert_eq!(
        (
            table_rows(&sink, "tracks").await,
            table_rows(&sink, "e").await
        ),
        before
    );
    assert_eq!(read_as_a_reader(&root, "tracks").unwrap(), (15, 15));
    assert_eq!(
        common::rows(
            &sink,
            "SELECT count(*), count(compacted_into), (SELECT count(*) FROM collector_compactions WHERE finished_at IS NOT NULL) FROM loaded_batches"
        )
        .await,
        vec![vec![common::s("10"), common::s("10"), common::s("2")]]
    );
    assert!(tmp_is_empty(&root), "the old files are gone");
    // Nothing more is due.
    assert!(sink
        .compact(policy("2026-11-28", 64))
        .await
        .unwrap()
        .is_empty());

    // A redelivery loads nothing; a late load is merged with the compacted file.
    let again = sink
        .load(&Load::events(0, 1, events(json!({"batch": [{"type": "track", "messageId": "m1-0", "userId": "u", "event": "E", "timestamp": "2026-11-24T10:00:00Z"}]}))))
        .await
        .unwrap();
    assert_eq!((again.inserted, again.duplicates), (0, 1));
    sink.load(&track_load(0, 9, &["late"])).await.unwrap();
    assert_eq!(in_partition(&root, part).len(), 3);
    let done = sink.compact(policy("2026-11-28", 64)).await.unwrap();
    assert_eq!(done.len(), 2);
    assert!(done
        .iter()
        .all(|c| (c.files_before, c.files_after, c.rows) == (2, 1, 16)));
    assert_eq!(
        in_partition(&root, part),
        vec!["_SUCCESS", "part-c4-0.parquet"]
    );
    assert_eq!(read_as_a_reader(&root, "tracks").unwrap(), (16, 16));
    assert_eq!(count(&sink, "e").await, "16");
    let coupons = common::rows(
        &sink,
        "SELECT count(coupon), count(*) FILTER (WHERE coupon IS NULL) FROM e",
    )
    .await;
    assert_eq!(coupons, vec![vec![common::s("6"), common::s("10")]]);
}

// The day still receiving events is compacted once it has `min_files` small files.
#[tokio::test]
async fn the_open_day_is_compacted_once_it_has_enough_files() {
    let (_dir, root, sink) = lake_of_five_small_loads().await;
    assert!(sink
        .compact(policy("2026-11-24", 6))
        .await
        .unwrap()
        .is_empty());
    let done = sink.compact(policy("2026-11-24", 5)).await.unwrap();
    assert_eq!(done.len(), 2);
    assert_eq!(
        in_partition(&root, "table=tracks/date=2026-11-24"),
        vec!["part-c2-0.parquet"]
    );
    assert_eq!(count(&sink, "tracks").await, "15");
}

// One compaction reads at most `max_input_bytes` of small files (smallest first, at
// least two), so a partition larger than that is merged in steps, each bounded, until
// one file is left; the rows are the same.
#[tokio::test]
async fn a_large_partition_is_compacted_in_bounded_steps() {
    let (_dir, root, sink) = lake_of_five_small_loads().await;
    let before = table_rows(&sink, "tracks").await;
    let part = root.join("table=tracks/date=2026-11-24");
    let mut sizes: Vec<u64> = in_partition(&root, "table=tracks/date=2026-11-24")
        .iter()
        .map(|f| std::fs::metadata(part.join(f)).unwrap().len())
        .collect();
    sizes.sort();
    let cap = sizes[0] + sizes[1];
    let done = sink
        .compact(collector_agent::sinks::parquet::CompactPolicy {
            max_input_bytes: cap,
            ..policy("2026-11-28", 64)
        })
        .await
        .unwrap();
    let tracks: Vec<_> = done.iter().filter(|c| c.table == "tracks").collect();
    assert!(tracks.len() >= 3, "{done:?}");
    for c in &tracks {
        assert!(c.files_before == 2 || c.bytes_before <= cap, "{c:?}");
    }
    assert_eq!(
        tracks
            .iter()
            .map(|c| c.files_before - c.files_after)
            .sum::<usize>(),
        4
    );
    assert_eq!(in_partition(&root, "table=tracks/date=2026-11-24").len(), 1);
    assert_eq!(table_rows(&sink, "tracks").await, before);
}

// `compact = true` (the default): an idle agent compacts the days that are over (here,
// 2026-11-24); with `compact = false` it leaves the files as loads wrote them.
#[tokio::test]
async fn an_idle_agent_compacts_unless_told_not_to() {
    let dir = tempfile::tempdir().unwrap();
    let off = ParquetSink::open_config(&collector_agent::config::ParquetConfig {
        compact: false,
        ..lake_config(&dir.path().join("off"))
    })
    .unwrap();
    five_small_loads(&off).await;
    assert_eq!(off.idle(Idle::Waiting).await.unwrap(), IdleStats::default());
    assert_eq!(
        in_partition(&dir.path().join("off"), "table=tracks/date=2026-11-24").len(),
        5
    );

    let root = dir.path().join("on");
    let on = ParquetSink::open_config(&lake_config(&root)).unwrap();
    five_small_loads(&on).await;
    // Not while a session reads the files.
    let session = on.session().await.unwrap().unwrap();
    assert_eq!(on.idle(Idle::Waiting).await.unwrap(), IdleStats::default());
    assert_eq!(in_partition(&root, "table=tracks/date=2026-11-24").len(), 5);
    drop(session);
    // `tracks` and the per-event table of 2026-11-24, five files each; before an exit
    // too (a lake drained from cron with `run --once`).
    assert_eq!(
        on.idle(Idle::Exiting).await.unwrap(),
        IdleStats {
            compactions: 2,
            files_merged: 10,
            files_written: 2,
            compaction_failed: false
        }
    );
    assert_eq!(in_partition(&root, "table=tracks/date=2026-11-24").len(), 1);
    assert_eq!(on.idle(Idle::Waiting).await.unwrap(), IdleStats::default());
    assert_eq!(count(&on, "tracks").await, "15");
}

// A compaction stopped at any point (as by kill -9) is finished, or undone, at the next
// open: the rows are the same, none twice, nothing is left under `_collector/tmp/`, and
// the lake compacts as before.
#[tokio::test]
async fn a_compaction_stopped_at_any_point_is_finished_or_undone_at_open() {
    use collector_agent::sinks::parquet::CrashPoint;
    for at in [
        CrashPoint::Written,
        CrashPoint::Committed,
        CrashPoint::Exchanged,
        CrashPoint::OldRemoved,
    ] {
        let (_dir, root, sink) = lake_of_five_small_loads().await;
        let before = table_rows(&sink, "tracks").await;
        let stopped = sink
            .compact(collector_agent::sinks::parquet::CompactPolicy {
                crash_at: Some(at),
                ..policy("2026-11-28", 64)
            })
            .await
            .unwrap();
        assert!(stopped.is_empty(), "{at:?}");
        // Until the next open, a reader sees the old files or the new ones, once.
        assert_eq!(
            read_as_a_reader(&root, "tracks").unwrap(),
            (15, 15),
            "{at:?}"
        );
        drop(sink);

        let sink = ParquetSink::open(&root).unwrap();
        assert_eq!(table_rows(&sink, "tracks").await, before, "{at:?}");
        assert_eq!(
            read_as_a_reader(&root, "tracks").unwrap(),
            (15, 15),
            "{at:?}"
        );
        assert!(tmp_is_empty(&root), "{at:?}: left under tmp");
        let unfinished = common::one(
            &sink,
            "SELECT count(*) FROM collector_compactions WHERE finished_at IS NULL",
        )
        .await;
        assert_eq!(unfinished.as_deref(), Some("0"), "{at:?}");
        // The stop came in the first partition due (`e`, before `tracks`).
        let expected_files = if at == CrashPoint::Written { 5 } else { 1 };
        assert_eq!(
            in_partition(&root, "table=e/date=2026-11-24").len(),
            expected_files,
            "{at:?}"
        );
        assert_eq!(
            in_partition(&root, "table=tracks/date=2026-11-24").len(),
            5,
            "{at:?}"
        );
        // Compaction goes on: whatever the stop left uncompacted is compacted now.
        sink.compact(policy("2026-11-28", 64)).await.unwrap();
        assert_eq!(
            in_partition(&root, "table=tracks/date=2026-11-24").len(),
            1,
            "{at:?}"
        );
        assert_eq!(table_rows(&sink, "tracks").await, before, "{at:?}");
        let compacted = common::one(
            &sink,
            "SELECT count(*) FROM loaded_batches WHERE compacted_into IS NULL",
        )
        .await;
        assert_eq!(compacted.as_deref(), Some("0"), "{at:?}");
    }
}

// Readers that list the files while partitions are compacted again and again (loads
// in between) never see a row twice, nor miss one they saw before: each partition's
// folder is exchanged whole. A reader that listed the old files and opens one after
// the exchange gets an error (and retries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_a_row_twice_while_files_are_compacted() {
    let (_dir, root, sink) = lake_of_five_small_loads().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (root, stop) = (root.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed, mut seen) = (0u32, 0u32, 0i64);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match read_as_a_reader(&root, "tracks") {
                    Ok((rows, distinct)) => {
                        assert_eq!(rows, distinct, "a row read twice");
                        assert!(rows >= seen, "{rows} rows after {seen}");
                        seen = rows;
                        ok += 1;
                    }
                    Err(e) => {
                        assert!(
                            e.to_string().contains("No files found")
                                || e.to_string().contains("No such file")
                                || e.to_string().contains("IO Error"),
                            "{e}"
                        );
                        failed += 1;
                    }
                }
            }
            (ok, failed, seen)
        })
    };
    for round in 0..20i64 {
        for b in 0..3i64 {
            let id = format!("r{round}-{b}");
            sink.load(&track_load(1, 100 + round * 3 + b, &[&id]))
                .await
                .unwrap();
        }
        let done = sink.compact(policy("2026-11-28", 64)).await.unwrap();
        assert!(!done.is_empty());
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed, seen) = reader.join().unwrap();
    assert!(ok >= 5, "{ok} reads succeeded, {failed} failed");
    assert!(seen <= 75);
    assert_eq!(read_as_a_reader(&root, "tracks").unwrap(), (75, 75));
    assert_eq!(in_partition(&root, "table=tracks/date=2026-11-24").len(), 1);
}

async fn track_a1(sink: &ParquetSink, batch: i64) {
    let load = Load::events(
        0,
        batch,
        events(
            json!({"batch": [{"type": "track", "messageId": format!("t{batch}"), "anonymousId": "a1", "userId": "u1", "event": "E", "timestamp": "2026-11-24T10:00:00Z"}]}),
        ),
    );
    sink.load(&load).await.unwrap();
}

async fn resolve(sink: &ParquetSink) {
    let mut session = sink.session().await.unwrap().unwrap();
    collector_agent::identity::run(&mut *session, &Default::default())
        .await
        .unwrap();
}

async fn events_counted(sink: &ParquetSink) -> String {
    common::one(sink, "SELECT sum(event_count) FROM collector_id_activity")
        .await
        .unwrap()
}

// An identity run reads each load once, compacted or not: a load compacted before the
// run is read from its partition (only its own rows), a load written after the
// compaction into the same partition from its file, once.
#[tokio::test]
async fn identity_reads_compacted_loads_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("lake");
    let sink = ParquetSink::open(&root).unwrap();
    track_a1(&sink, 1).await;
    track_a1(&sink, 2).await;
    resolve(&sink).await;
    assert_eq!(events_counted(&sink).await, "2");
    // Load 3 is compacted with 1 and 2 before identity reads it; load 4 comes after.
    track_a1(&sink, 3).await;
    assert_eq!(
        sink.compact(policy("2026-11-28", 64)).await.unwrap().len(),
        2
    );
    track_a1(&sink, 4).await;
    resolve(&sink).await;
    assert_eq!(events_counted(&sink).await, "4");
    assert_eq!(
        common::one(&sink, "SELECT count(*) FROM identity_pending")
            .await
            .as_deref(),
        Some("0")
    );
}

// The drain loop's idle step counts what the lake's compaction did in `/metrics`.
#[tokio::test]
async fn an_idle_agent_counts_its_compactions_in_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::agent_config(
        dir.path(),
        "agent.toml",
        &format!(
            "[warehouse]\nkind = \"parquet\"\npath = \"{}\"\n",
            dir.path().join("lake").display()
        ),
    );
    let sink = collector_agent::sinks::open(&cfg.warehouse).await.unwrap();
    for b in 0..3i64 {
        let batch = json!({"batch": [{"type": "track", "messageId": format!("m{b}"), "userId": "u", "event": "E", "timestamp": "2026-11-24T10:00:00Z"}]});
        sink.load(&Load::events(0, b, events(batch))).await.unwrap();
    }
    let drainer = collector_agent::Drainer::new(cfg, sink).unwrap();
    drainer.idle(Idle::Waiting).await;
    let text = drainer.metrics().render();
    assert!(
        text.contains("collector_agent_lake_compactions_total 2\n"),
        "{text}"
    );
    // (Every counter's rendering is `metrics.rs`' unit test.)
    assert!(text.contains("collector_agent_lake_files_merged_total 6\n"));
}

/// `(file, rows, erased_rows)` of the manifest's entries of `table`, by file.
fn manifest(root: &std::path::Path, table: &str) -> Vec<(String, i64, i64)> {
    let conn = duckdb::Connection::open(root.join("_collector/state.duckdb")).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT file, rows, erased_rows FROM loaded_batches WHERE table_name = ? ORDER BY file",
        )
        .unwrap();
    let rows = stmt
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

// An erasure says in the manifest what it removed from each file: all of a file it
// removed (which compaction then no longer counts: a partition whose files an erasure
// emptied is not looked at again and again), part of one it rewrote.
#[tokio::test]
async fn the_manifest_counts_what_an_erasure_removed() {
    let (_dir, root, sink) = lake_of_five_small_loads().await;
    // A sixth load: one event of `u`, one of `v`.
    let mixed = json!({"batch": [
        {"type": "track", "messageId": "x-u", "userId": "u", "event": "E", "timestamp": "2026-11-24T10:00:00Z"},
        {"type": "track", "messageId": "x-v", "userId": "v", "event": "E", "timestamp": "2026-11-24T10:00:00Z"}
    ]});
    sink.load(&Load::events(0, 5, events(mixed))).await.unwrap();
    let over = || policy("2026-11-25", 64);
    let both = vec![
        ("e".to_string(), "2026-11-24".to_string()),
        ("tracks".to_string(), "2026-11-24".to_string()),
    ];
    assert_eq!(sink.compaction_candidates(over()).await.unwrap(), both);
    assert!(manifest(&root, "tracks")
        .iter()
        .all(|(_, _, erased)| *erased == 0));

    sink.erase_files(&["u".to_string()], &[]).await.unwrap();
    drop(sink);
    for table in ["tracks", "e"] {
        let m = manifest(&root, table);
        assert_eq!(m.len(), 6, "{table}");
        for (file, rows, erased) in &m {
            let kept = root.join(file).exists();
            if file.contains("-b5-") {
                assert_eq!((*rows, *erased, kept), (2, 1, true), "{file}");
            } else {
                assert_eq!((*rows, *erased, kept), (3, 3, false), "{file}");
            }
        }
    }
    let sink = ParquetSink::open(&root).unwrap();
    // One file with rows per partition: not due, and not listed.
    assert_eq!(sink.compaction_candidates(over()).await.unwrap(), vec![]);
    assert_eq!(count(&sink, "tracks").await, "1");

    // Another load of `v` makes the day due again; compaction merges the two files.
    let more = json!({"batch": [
        {"type": "track", "messageId": "y-v", "userId": "v", "event": "E", "timestamp": "2026-11-24T11:00:00Z"}
    ]});
    sink.load(&Load::events(0, 6, events(more))).await.unwrap();
    assert_eq!(sink.compaction_candidates(over()).await.unwrap(), both);
    let done = sink.compact(over()).await.unwrap();
    assert_eq!(done.len(), 2);
    assert!(
        done.iter().all(|c| c.files_before == 2 && c.rows == 2),
        "{done:?}"
    );
    assert_eq!(count(&sink, "tracks").await, "2");
    assert_eq!(read_as_a_reader(&root, "tracks").unwrap(), (2, 2));
}
