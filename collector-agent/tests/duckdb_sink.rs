//! The DuckDB sink against real DuckDB files.

use collector_agent::sinks::duckdb::{run_query, DuckDbSink};
use collector_agent::sinks::Sink;
use collector_core::ingest::{parse_body, Endpoint};
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
    let stats = sink.load(&evs).unwrap();
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
        let s = sink.load(&evs).unwrap();
        assert_eq!((s.inserted, s.duplicates), (2, 1));
    }
    // Reopen the file: a second delivery after a restart is still deduplicated.
    let mut sink = DuckDbSink::open(&path).unwrap();
    let s = sink.load(&evs).unwrap();
    assert_eq!((s.inserted, s.duplicates), (0, 3));
    drop(sink);
    let conn = DuckDbSink::open_read_only(&path).unwrap();
    let r = run_query(&conn, "SELECT (SELECT count(*) FROM tracks), (SELECT count(*) FROM identifies), (SELECT event FROM tracks)").unwrap();
    assert_eq!(
        r.rows[0],
        vec![Some("1".into()), Some("1".into()), Some("A".into())]
    );
}

#[test]
fn undecodable_batches_are_kept_as_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = DuckDbSink::open(&dir.path().join("w.duckdb")).unwrap();
    sink.dead_letter(2, 17, b"garbage", "bad magic").unwrap();
    let r = sink
        .query("SELECT shard, batch_id, error, blob FROM dead_letters")
        .unwrap();
    assert_eq!(
        r.rows[0],
        vec![
            Some("2".into()),
            Some("17".into()),
            Some("bad magic".into()),
            Some("\\x67617262616765".into())
        ]
    );
}

#[test]
fn bad_sql_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let sink = DuckDbSink::open(&dir.path().join("w.duckdb")).unwrap();
    let err = sink.query("SELEC nonsense").unwrap_err();
    assert!(err.to_string().contains("syntax"), "{err}");
}
