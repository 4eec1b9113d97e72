//! The DuckDB sink against real DuckDB files.

use collector_agent::sinks::duckdb::{run_query, DuckDbSink};
use collector_agent::sinks::{Load, LoadBatch, Sink};
use collector_core::ingest::{parse_body, Endpoint};
use collector_core::{EventKind, StoredEvent};
use serde_json::json;

fn events(body: serde_json::Value) -> Vec<collector_core::StoredEvent> {
    let mut n = 0;
    let p = parse_body(
        Endpoint::Batch,
        body.to_string().as_bytes(),
        1_795_528_444_000,
        &mut || {
            n += 1;
            format!("gen-{n}")
        },
    )
    .unwrap();
    assert!(p.rejected.is_empty(), "{:?}", p.rejected);
    p.accepted
}

#[test]
fn loads_each_kind_into_its_segment_table_with_typed_columns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.duckdb");
    let mut sink = DuckDbSink::open(&path).unwrap();
    let evs = events(json!({"batch": [
        {"type": "track", "messageId": "t1", "userId": "u1", "event": "Signed Up", "properties": {"plan": "pro"},
         "timestamp": "2026-11-24T13:54:00.000Z", "context": {"ip": "1.2.3.4"}, "extra": 1},
        {"type": "page", "messageId": "p1", "anonymousId": "a1", "name": "Home", "category": "Docs", "properties": {"path": "/"}},
        {"type": "screen", "messageId": "s1", "anonymousId": "a1", "name": "Main"},
        {"type": "identify", "messageId": "i1", "userId": "u1", "traits": {"plan": "pro"}},
        {"type": "group", "messageId": "g1", "userId": "u1", "groupId": "acme", "traits": {"size": 5}},
        {"type": "alias", "messageId": "al1", "userId": "u1", "previousId": "a1"}
    ]}));
    let stats = sink.load(&Load::events(0, 1, evs)).unwrap();
    assert_eq!((stats.inserted, stats.duplicates), (6, 0));

    let r = sink
        .query("SELECT message_id, user_id, event, properties->>'plan', timestamp, received_at, raw->>'extra' FROM tracks")
        .unwrap();
    assert_eq!(
        r.rows,
        vec![vec![
            Some("t1".into()),
            Some("u1".into()),
            Some("Signed Up".into()),
            Some("pro".into()),
            Some("2026-11-24T13:54:00.000Z".into()),
            Some("2026-11-24T13:54:04.000Z".into()),
            Some("1".into()),
        ]]
    );
    let one = |sql: &str| sink.query(sql).unwrap().rows[0].clone();
    assert_eq!(
        one("SELECT name, category, anonymous_id FROM pages"),
        vec![Some("Home".into()), Some("Docs".into()), Some("a1".into())]
    );
    assert_eq!(one("SELECT name FROM screens"), vec![Some("Main".into())]);
    assert_eq!(
        one("SELECT traits->>'plan' FROM identifies"),
        vec![Some("pro".into())]
    );
    assert_eq!(
        one("SELECT group_id, traits->>'size' FROM groups"),
        vec![Some("acme".into()), Some("5".into())]
    );
    assert_eq!(
        one("SELECT previous_id, user_id FROM aliases"),
        vec![Some("a1".into()), Some("u1".into())]
    );
    assert_eq!(
        one("SELECT typeof(timestamp), typeof(properties) FROM tracks"),
        vec![Some("TIMESTAMP".into()), Some("JSON".into())]
    );
}

#[test]
fn loading_the_same_events_twice_lands_them_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.duckdb");
    let evs = events(json!({"batch": [
        {"type": "track", "messageId": "m1", "userId": "u", "event": "A"},
        {"type": "track", "messageId": "m1", "userId": "u", "event": "A again in the same load"},
        {"type": "identify", "messageId": "m2", "userId": "u"}
    ]}));
    {
        let mut sink = DuckDbSink::open(&path).unwrap();
        let s = sink.load(&Load::events(0, 1, evs.clone())).unwrap();
        assert_eq!((s.inserted, s.duplicates), (2, 1));
    }
    // Reopen the file: a second delivery after a restart is still deduplicated.
    let mut sink = DuckDbSink::open(&path).unwrap();
    let s = sink.load(&Load::events(0, 1, evs.clone())).unwrap();
    assert_eq!((s.inserted, s.duplicates), (0, 3));
    drop(sink);
    let conn = DuckDbSink::open_read_only(&path).unwrap();
    let r = run_query(&conn, "SELECT (SELECT count(*) FROM tracks), (SELECT count(*) FROM identifies), (SELECT event FROM tracks)").unwrap();
    assert_eq!(
        r.rows[0],
        vec![Some("1".into()), Some("1".into()), Some("A".into())]
    );
}

fn dead_letter_load() -> Load {
    Load {
        shard: 2,
        batches: vec![LoadBatch::Undecodable {
            batch_id: 17,
            blob: b"garbage".to_vec(),
            error: "bad magic".into(),
        }],
    }
}

// Issue #8: dead letters are written in the load's transaction, keyed by (shard, batch
// id), so a load that is retried (its ack was lost) does not store them twice.
#[test]
fn undecodable_batches_are_kept_once_as_dead_letters_keyed_by_shard_and_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = DuckDbSink::open(&dir.path().join("w.duckdb")).unwrap();
    assert_eq!(sink.load(&dead_letter_load()).unwrap().dead_letters, 1);
    assert_eq!(sink.load(&dead_letter_load()).unwrap().dead_letters, 0);
    let r = sink
        .query("SELECT shard, batch_id, error, blob FROM dead_letters")
        .unwrap();
    assert_eq!(
        r.rows,
        vec![vec![
            Some("2".into()),
            Some("17".into()),
            Some("bad magic".into()),
            Some("\\x67617262616765".into())
        ]]
    );
}

fn raw_event(id: &str, kind: EventKind, json: &str) -> StoredEvent {
    StoredEvent {
        message_id: id.into(),
        kind,
        anonymous_id: Some("a".into()),
        user_id: None,
        received_at_ms: 0,
        timestamp_ms: 0,
        json: json.into(),
    }
}

// Issue #8: a poison event (decodes, but the warehouse can never take it) is quarantined
// with its reason; the rest of its batch loads; it can be fixed and replayed.
#[test]
fn poison_event_is_quarantined_and_the_rest_of_the_batch_loads() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = DuckDbSink::open(&dir.path().join("w.duckdb")).unwrap();
    let good = events(json!({"batch": [
        {"type": "track", "messageId": "ok-1", "userId": "u", "event": "A"},
        {"type": "page", "messageId": "ok-2", "userId": "u", "name": "Home"}
    ]}));
    let mut batch = vec![raw_event(
        "bad-ts",
        EventKind::Track,
        r#"{"type":"track","event":"B","messageId":"bad-ts","anonymousId":"a","timestamp":"the day after tomorrow"}"#,
    )];
    batch.push(raw_event("bad-json", EventKind::Identify, "{not json"));
    batch.extend(good);
    let load = Load::events(3, 41, batch);
    let s = sink.load(&load).unwrap();
    assert_eq!((s.inserted, s.quarantined, s.duplicates), (2, 2, 0));
    // Loading the same lease again (a lost ack) changes nothing.
    let again = sink.load(&load).unwrap();
    assert_eq!(
        (again.inserted, again.duplicates, again.quarantined),
        (0, 4, 0)
    );
    let q = sink
        .query(
            "SELECT message_id, type, shard, batch_id, reason FROM quarantine ORDER BY message_id",
        )
        .unwrap();
    assert_eq!(q.rows.len(), 2);
    assert_eq!(
        q.rows[0][..4],
        [
            Some("bad-json".into()),
            Some("identify".into()),
            Some("3".into()),
            Some("41".into())
        ]
    );
    assert!(
        q.rows[0][4].as_deref().unwrap().contains("not JSON"),
        "{:?}",
        q.rows[0]
    );
    assert!(
        q.rows[1][4]
            .as_deref()
            .unwrap()
            .contains("`timestamp` is not a date-time"),
        "{:?}",
        q.rows[1]
    );

    // Fix one event in place and replay: it loads and leaves the quarantine; the other stays.
    sink.query(r#"UPDATE quarantine SET event = '{"type":"track","event":"B","messageId":"bad-ts","anonymousId":"a","timestamp":"2026-11-25T10:00:00Z"}' WHERE message_id = 'bad-ts'"#).unwrap();
    let r = sink.replay_quarantine(&[]).unwrap();
    assert_eq!((r.inserted, r.quarantined), (1, 1));
    assert_eq!(
        sink.query("SELECT message_id, attempts FROM quarantine")
            .unwrap()
            .rows,
        vec![vec![Some("bad-json".into()), Some("2".into())]]
    );
    assert_eq!(
        sink.query("SELECT event, timestamp FROM tracks WHERE message_id = 'bad-ts'")
            .unwrap()
            .rows,
        vec![vec![
            Some("B".into()),
            Some("2026-11-25T10:00:00.000Z".into())
        ]]
    );
}

/// The `tracks` table as the first release created it, with `event_check` on `event`.
fn tracks_ddl(event_check: &str) -> String {
    format!(
        "CREATE TABLE tracks (message_id VARCHAR PRIMARY KEY, anonymous_id VARCHAR, user_id VARCHAR,
         timestamp TIMESTAMP, sent_at TIMESTAMP, received_at TIMESTAMP, original_timestamp TIMESTAMP,
         context JSON, integrations JSON, event VARCHAR {event_check}, properties JSON,
         raw JSON NOT NULL, loaded_at TIMESTAMP NOT NULL);"
    )
}

/// A warehouse file prepared by `sql` before the sink first opens it.
fn prepared_warehouse(dir: &tempfile::TempDir, sql: &str) -> std::path::PathBuf {
    let path = dir.path().join("w.duckdb");
    duckdb::Connection::open(&path)
        .unwrap()
        .execute_batch(sql)
        .unwrap();
    path
}

// Issue #8: when the warehouse itself refuses one event (here a CHECK constraint an
// analyst added), that event alone is isolated and quarantined.
#[test]
fn event_the_warehouse_refuses_is_isolated_and_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let path = prepared_warehouse(&dir, &tracks_ddl("CHECK (event <> 'Forbidden')"));
    let mut sink = DuckDbSink::open(&path).unwrap();
    let evs = events(json!({"batch": [
        {"type": "track", "messageId": "t1", "userId": "u", "event": "Fine"},
        {"type": "track", "messageId": "t2", "userId": "u", "event": "Forbidden"},
        {"type": "identify", "messageId": "i1", "userId": "u"}
    ]}));
    let s = sink.load(&Load::events(1, 9, evs)).unwrap();
    assert_eq!((s.inserted, s.quarantined), (2, 1));
    let q = sink
        .query("SELECT message_id, reason FROM quarantine")
        .unwrap();
    assert_eq!(q.rows[0][0].as_deref(), Some("t2"));
    assert!(
        q.rows[0][1].as_deref().unwrap().contains("Constraint"),
        "{:?}",
        q.rows
    );
    assert_eq!(
        sink.query("SELECT count(*) FROM tracks").unwrap().rows[0][0].as_deref(),
        Some("1")
    );
}

// Issue #8: one scope for dedup: a message_id is unique across the warehouse, inside a
// load and across loads alike (the first one loaded wins, whatever its table).
#[test]
fn message_id_is_unique_across_tables_inside_a_load_and_across_loads() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = DuckDbSink::open(&dir.path().join("w.duckdb")).unwrap();
    let first = events(json!({"batch": [
        {"type": "track", "messageId": "same", "userId": "u", "event": "A"},
        {"type": "page", "messageId": "same", "userId": "u", "name": "P"}
    ]}));
    let s = sink.load(&Load::events(0, 1, first)).unwrap();
    assert_eq!((s.inserted, s.duplicates), (1, 1));
    let later = events(json!({"batch": [
        {"type": "identify", "messageId": "same", "userId": "u"},
        {"type": "identify", "messageId": "new", "userId": "u"}
    ]}));
    let s = sink.load(&Load::events(0, 2, later)).unwrap();
    assert_eq!((s.inserted, s.duplicates), (1, 1));
    let r = sink
        .query("SELECT (SELECT count(*) FROM tracks), (SELECT count(*) FROM pages), (SELECT count(*) FROM identifies), (SELECT string_agg(table_name, ',' ORDER BY message_id) FROM message_ids)")
        .unwrap();
    assert_eq!(
        r.rows[0],
        vec![
            Some("1".into()),
            Some("0".into()),
            Some("1".into()),
            Some("identifies,tracks".into())
        ]
    );
}

// A warehouse written before the migrations existed is brought up to date: its rows are
// registered (so they still dedup) and its unkeyed dead letters are merged.
#[test]
fn warehouse_from_an_earlier_release_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = prepared_warehouse(
        &dir,
        &(tracks_ddl("")
            + "INSERT INTO tracks (message_id, event, raw, loaded_at) VALUES ('old-1', 'A', '{}', now()::TIMESTAMP);
             CREATE TABLE dead_letters (shard INTEGER, batch_id BIGINT, error VARCHAR, blob BLOB, loaded_at TIMESTAMP);
             INSERT INTO dead_letters VALUES (1, 5, 'x', 'b'::BLOB, now()::TIMESTAMP), (1, 5, 'x', 'b'::BLOB, now()::TIMESTAMP);"),
    );
    let mut sink = DuckDbSink::open(&path).unwrap();
    let one = |sql: &str| sink.query(sql).unwrap().rows[0][0].clone();
    assert_eq!(
        one("SELECT count(*) FROM dead_letters").as_deref(),
        Some("1")
    );
    assert_eq!(
        one("SELECT max(version) FROM collector_migrations").as_deref(),
        Some("2")
    );
    let evs = events(json!({"batch": [{"type": "page", "messageId": "old-1", "userId": "u"}]}));
    let s = sink.load(&Load::events(0, 1, evs)).unwrap();
    assert_eq!((s.inserted, s.duplicates), (0, 1));
    drop(sink);
    // Opening again applies nothing twice.
    let sink = DuckDbSink::open(&path).unwrap();
    assert_eq!(
        sink.query("SELECT count(*) FROM collector_migrations")
            .unwrap()
            .rows[0][0]
            .as_deref(),
        Some("2")
    );
}

#[test]
fn bad_sql_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let sink = DuckDbSink::open(&dir.path().join("w.duckdb")).unwrap();
    let err = sink.query("SELEC nonsense").unwrap_err();
    assert!(err.to_string().contains("syntax"), "{err}");
}
