//! One conformance suite, generic over the sink, run against every sink: a real DuckDB
//! file, a real PostgreSQL server started on loopback for the test, and a Parquet lake
//! in a folder (read back through DuckDB's `read_parquet`), and a real ClickHouse server
//! (Debian's 18.16) started on loopback. Every scenario
//! reads the warehouse back with SQL both dialects share, so "the same logical schema
//! in every sink" is checked, not assumed.

mod common;

use collector_agent::sinks::{Load, LoadBatch};
use collector_core::{EventKind, StoredEvent};
use collector_e2e::postgres::LocalPostgres;
use common::{events, one, order_completed, rows, s, Target};
use serde_json::json;

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

async fn loads_each_kind_into_its_segment_table(t: &Target) {
    let sink = t.open().await;
    let evs = events(json!({"batch": [
        {"type": "track", "messageId": "t1", "userId": "u1", "event": "Signed Up", "properties": {"plan": "pro"},
         "timestamp": "2026-11-24T13:54:00.000Z", "context": {"ip": "1.2.3.4"}, "extra": 1},
        {"type": "page", "messageId": "p1", "anonymousId": "a1", "name": "Home", "category": "Docs", "properties": {"path": "/"}},
        {"type": "screen", "messageId": "s1", "anonymousId": "a1", "name": "Main"},
        {"type": "identify", "messageId": "i1", "userId": "u1", "traits": {"plan": "pro"}},
        {"type": "group", "messageId": "g1", "userId": "u1", "groupId": "acme", "traits": {"size": 5}},
        {"type": "alias", "messageId": "al1", "userId": "u1", "previousId": "a1"}
    ]}));
    let stats = sink.load(&Load::events(0, 1, evs)).await.unwrap();
    assert_eq!((stats.inserted, stats.duplicates), (6, 0));
    assert_eq!(
        rows(
            &*sink,
            "SELECT message_id, user_id, event, event_text, timestamp, received_at FROM tracks"
        )
        .await,
        // Segment's `event` is the slug (the per-event table), `event_text` the name as sent.
        vec![vec![
            s("t1"),
            s("u1"),
            s("signed_up"),
            s("Signed Up"),
            s("2026-11-24T13:54:00.000Z"),
            s("2026-11-24T13:54:04.000Z")
        ]]
    );
    assert_eq!(
        t.json_at(&*sink, "tracks", "properties", "t1", &[json!("plan")])
            .await,
        s("pro")
    );
    // The whole event is kept, fields the schema has no column for included.
    assert_eq!(
        t.json_at(&*sink, "tracks", "raw", "t1", &[json!("extra")])
            .await,
        s("1")
    );
    assert_eq!(
        rows(&*sink, "SELECT name, category, anonymous_id FROM pages").await,
        vec![vec![s("Home"), s("Docs"), s("a1")]]
    );
    assert_eq!(one(&*sink, "SELECT name FROM screens").await, s("Main"));
    assert_eq!(
        t.json_at(&*sink, "identifies", "traits", "i1", &[json!("plan")])
            .await,
        s("pro")
    );
    assert_eq!(one(&*sink, "SELECT group_id FROM groups").await, s("acme"));
    assert_eq!(
        t.json_at(&*sink, "groups", "traits", "g1", &[json!("size")])
            .await,
        s("5")
    );
    assert_eq!(
        rows(&*sink, "SELECT previous_id, user_id FROM aliases").await,
        vec![vec![s("a1"), s("u1")]]
    );
}

async fn nulls_unicode_and_nested_json_round_trip(t: &Target) {
    let sink = t.open().await;
    let evs = events(json!({"batch": [
        {"type": "track", "messageId": "u-1", "userId": "Zoë 🚀", "event": "Größe geändert",
         "properties": {"city": "Zürich", "nested": {"deep": {"list": [1, "zwei", null, {"x": true}]}}, "none": null},
         "context": {"locale": "de-CH"}, "sentAt": null}
    ]}));
    sink.load(&Load::events(0, 1, evs)).await.unwrap();
    assert_eq!(
        rows(
            &*sink,
            "SELECT user_id, event_text, sent_at, integrations FROM tracks"
        )
        .await,
        vec![vec![s("Zoë 🚀"), s("Größe geändert"), None, None]]
    );
    assert_eq!(
        t.json_at(&*sink, "tracks", "properties", "u-1", &[json!("city")])
            .await,
        s("Zürich")
    );
    assert_eq!(
        t.json_at(
            &*sink,
            "tracks",
            "properties",
            "u-1",
            &[json!("nested"), json!("deep"), json!("list"), json!(1)]
        )
        .await,
        s("zwei")
    );
}

async fn same_events_twice_land_once(t: &Target) {
    let evs = events(json!({"batch": [
        {"type": "track", "messageId": "m1", "userId": "u", "event": "A"},
        {"type": "track", "messageId": "m1", "userId": "u", "event": "A again in the same load"},
        {"type": "identify", "messageId": "m2", "userId": "u"}
    ]}));
    {
        let sink = t.open().await;
        let s1 = sink.load(&Load::events(0, 1, evs.clone())).await.unwrap();
        assert_eq!((s1.inserted, s1.duplicates), (2, 1));
    }
    // Reopen: a second delivery after a restart is still deduplicated.
    let sink = t.open().await;
    let s2 = sink.load(&Load::events(0, 1, evs)).await.unwrap();
    assert_eq!((s2.inserted, s2.duplicates), (0, 3));
    assert_eq!(
        rows(&*sink, "SELECT (SELECT count(*) FROM tracks), (SELECT count(*) FROM identifies), (SELECT event_text FROM tracks)").await,
        vec![vec![s("1"), s("1"), s("A")]]
    );
}

async fn message_id_is_unique_across_tables(t: &Target) {
    let sink = t.open().await;
    let first = events(json!({"batch": [
        {"type": "track", "messageId": "same", "userId": "u", "event": "A"},
        {"type": "page", "messageId": "same", "userId": "u", "name": "P"}
    ]}));
    let s1 = sink.load(&Load::events(0, 1, first)).await.unwrap();
    assert_eq!((s1.inserted, s1.duplicates), (1, 1));
    let later = events(json!({"batch": [
        {"type": "identify", "messageId": "same", "userId": "u", "traits": {"plan": "from the duplicate"}},
        {"type": "identify", "messageId": "new", "userId": "u", "traits": {"plan": "real"}}
    ]}));
    let s2 = sink.load(&Load::events(0, 2, later)).await.unwrap();
    assert_eq!((s2.inserted, s2.duplicates), (1, 1));
    // The duplicate is not in `identifies`, so it says nothing of the user either.
    assert_eq!(one(&*sink, "SELECT plan FROM users").await, s("real"));
    assert_eq!(
        rows(&*sink, "SELECT (SELECT count(*) FROM tracks), (SELECT count(*) FROM pages), (SELECT count(*) FROM identifies), (SELECT count(*) FROM message_ids)").await,
        vec![vec![s("1"), s("0"), s("1"), s("2")]]
    );
}

async fn undecodable_batches_are_dead_letters_once(t: &Target) {
    let sink = t.open().await;
    let load = common::undecodable(2, 17, b"garbage");
    assert_eq!(sink.load(&load).await.unwrap().dead_letters, 1);
    assert_eq!(sink.load(&load).await.unwrap().dead_letters, 0);
    assert_eq!(
        rows(
            &*sink,
            &format!(
                "SELECT shard, batch_id, error, {} FROM dead_letters",
                t.bytes_len("blob")
            )
        )
        .await,
        vec![vec![s("2"), s("17"), s("bad magic"), s("7")]]
    );
}

async fn poison_event_is_quarantined_and_replayed(t: &Target) {
    let sink = t.open().await;
    let mut batch = vec![
        raw_event(
            "bad-ts",
            EventKind::Track,
            r#"{"type":"track","event":"B","messageId":"bad-ts","anonymousId":"a","timestamp":"the day after tomorrow"}"#,
        ),
        raw_event("bad-json", EventKind::Identify, "{not json"),
    ];
    batch.extend(events(json!({"batch": [
        {"type": "track", "messageId": "ok-1", "userId": "u", "event": "A"},
        {"type": "page", "messageId": "ok-2", "userId": "u", "name": "Home"}
    ]})));
    let load = Load::events(3, 41, batch);
    let first = sink.load(&load).await.unwrap();
    assert_eq!(
        (first.inserted, first.quarantined, first.duplicates),
        (2, 2, 0)
    );
    let again = sink.load(&load).await.unwrap();
    assert_eq!(
        (again.inserted, again.duplicates, again.quarantined),
        (0, 4, 0)
    );
    let q = rows(
        &*sink,
        "SELECT message_id, type, shard, batch_id, reason FROM quarantine ORDER BY message_id",
    )
    .await;
    assert_eq!(q.len(), 2);
    assert_eq!(q[0][..4], [s("bad-json"), s("identify"), s("3"), s("41")]);
    assert!(q[0][4].as_deref().unwrap().contains("not JSON"), "{q:?}");
    assert!(
        q[1][4]
            .as_deref()
            .unwrap()
            .contains("`timestamp` is not a date-time"),
        "{q:?}"
    );

    t.edit_quarantined(
        &*sink,
        "bad-ts",
        r#"{"type":"track","event":"B","messageId":"bad-ts","anonymousId":"a","timestamp":"2026-11-25T10:00:00Z"}"#,
    )
    .await;
    let r = sink.replay_quarantine(&[]).await.unwrap();
    assert_eq!((r.inserted, r.quarantined), (1, 1));
    assert_eq!(
        rows(&*sink, "SELECT message_id, attempts FROM quarantine").await,
        vec![vec![s("bad-json"), s("2")]]
    );
    assert_eq!(
        rows(
            &*sink,
            "SELECT event_text, timestamp FROM tracks WHERE message_id = 'bad-ts'"
        )
        .await,
        vec![vec![s("B"), s("2026-11-25T10:00:00.000Z")]]
    );
    // Replaying only named ids leaves the others alone.
    let r = sink
        .replay_quarantine(&["nothing-here".into()])
        .await
        .unwrap();
    assert_eq!((r.inserted, r.quarantined), (0, 0));
}

async fn status_sql_reads_every_sink(t: &Target) {
    let sink = t.open().await;
    let empty = sink
        .query(collector_agent::status::WAREHOUSE_SQL)
        .await
        .unwrap();
    let status = |r: &collector_agent::sinks::QueryResult| {
        collector_agent::status::Status::new(0, Default::default(), r)
    };
    // Nothing loaded yet: no last load (ClickHouse's `max` of nothing is the epoch).
    let st = status(&empty);
    assert_eq!(
        (st.last_load, st.quarantined, st.dead_letters),
        (None, 0, 0),
        "{empty:?}"
    );
    let evs = events(json!({"batch": [{"type": "page", "messageId": "p", "userId": "u"}]}));
    sink.load(&Load::events(0, 1, evs)).await.unwrap();
    let after = sink
        .query(collector_agent::status::WAREHOUSE_SQL)
        .await
        .unwrap();
    assert!(
        status(&after).last_load.unwrap().ends_with('Z'),
        "{after:?}"
    );
}

async fn dead_letters_that_decode_now_are_replayed(t: &Target) {
    let sink = t.open().await;
    let evs = events(json!({"batch": [
        {"type": "track", "messageId": "dl-1", "userId": "u", "event": "A"},
        {"type": "identify", "messageId": "dl-2", "userId": "u"}
    ]}));
    let blob = collector_core::codec::encode_batch(&collector_core::codec::Batch {
        shard: 1,
        sealed_at_ms: 0,
        events: evs,
    })
    .unwrap();
    let load = Load {
        shard: 1,
        batches: vec![
            LoadBatch::Undecodable {
                batch_id: 5,
                blob,
                error: "simulated: an older agent could not read it".into(),
            },
            LoadBatch::Undecodable {
                batch_id: 6,
                blob: b"still garbage".to_vec(),
                error: "bad magic".into(),
            },
        ],
    };
    assert_eq!(sink.load(&load).await.unwrap().dead_letters, 2);
    let r = collector_agent::sinks::replay_all(&*sink, &[], &|_, _| {})
        .await
        .unwrap();
    assert_eq!(
        (r.dead_letters_loaded, r.dead_letters_left, r.loads.inserted),
        (1, 1, 2)
    );
    assert_eq!(
        rows(&*sink, "SELECT shard, batch_id FROM dead_letters").await,
        vec![vec![s("1"), s("6")]]
    );
    assert_eq!(
        rows(
            &*sink,
            "SELECT (SELECT count(*) FROM tracks), (SELECT count(*) FROM identifies)"
        )
        .await,
        vec![vec![s("1"), s("1")]]
    );
    // Replaying again changes nothing.
    let again = collector_agent::sinks::replay_all(&*sink, &[], &|_, _| {})
        .await
        .unwrap();
    assert_eq!((again.dead_letters_loaded, again.loads.inserted), (0, 0));
}

async fn per_event_tables_and_flattened_columns(t: &Target) {
    let sink = t.open().await;
    let evs = events(json!({"batch": [
        {"type": "track", "messageId": "o1", "userId": "u1", "event": "Order Completed",
         "timestamp": "2026-11-24T13:54:00.000Z",
         "properties": {"revenue": 99.5, "currency": "EUR", "product": {"id": "p-1", "sku": null},
                        "tags": ["gift"], "orderId": "A1", "user_id": "spoofed", "Delivered At": "2026-11-26T09:00:00Z",
                        "express": true},
         "context": {"userAgent": "UA/1", "page": {"path": "/checkout"}}},
        {"type": "track", "messageId": "o2", "userId": "u2", "event": "order_completed", "properties": {"revenue": 5}},
        {"type": "track", "messageId": "pa1", "userId": "u1", "event": "Product Added", "properties": {"order": 1}},
        {"type": "page", "messageId": "p1", "anonymousId": "a1", "name": "Pricing", "properties": {"path": "/pricing", "title": "Pricing"}},
        {"type": "identify", "messageId": "i1", "userId": "u1", "traits": {"plan": "pro", "address": {"city": "Lyon"}}}
    ]}));
    let st = sink.load(&Load::events(0, 1, evs.clone())).await.unwrap();
    assert_eq!((st.inserted, st.duplicates), (5, 0));
    assert_eq!(
        rows(&*sink, &format!("SELECT message_id, event, event_text, user_id, revenue, currency, product_id, tags, order_id, {}, delivered_at, timestamp FROM order_completed ORDER BY message_id", t.text("express"))).await,
        vec![
            vec![s("o1"), s("order_completed"), s("Order Completed"), s("u1"), s("99.5"), s("EUR"), s("p-1"), s(r#"["gift"]"#), s("A1"), t.boolean(true), s("2026-11-26T09:00:00.000Z"), s("2026-11-24T13:54:00.000Z")],
            vec![s("o2"), s("order_completed"), s("order_completed"), s("u2"), s("5"), None, None, None, None, None, None, rows(&*sink, "SELECT timestamp FROM tracks WHERE message_id = 'o2'").await[0][0].clone()],
        ]
    );
    // Segment's `id` is the message id, in every event table.
    assert_eq!(
        rows(&*sink, "SELECT t.id, o.id FROM tracks t JOIN order_completed o ON o.message_id = t.message_id WHERE t.message_id = 'o1'").await,
        vec![vec![s("o1"), s("o1")]]
    );
    // A keyword is a column name like any other.
    assert_eq!(
        one(&*sink, "SELECT \"order\" FROM product_added").await,
        s("1")
    );
    // Context is flattened on every table; properties on pages; traits on identifies.
    assert_eq!(
        rows(
            &*sink,
            "SELECT context_user_agent, context_page_path FROM tracks WHERE message_id = 'o1'"
        )
        .await,
        vec![vec![s("UA/1"), s("/checkout")]]
    );
    assert_eq!(
        one(
            &*sink,
            "SELECT context_user_agent FROM order_completed WHERE message_id = 'o1'"
        )
        .await,
        s("UA/1")
    );
    assert_eq!(
        rows(&*sink, "SELECT path, title FROM pages").await,
        vec![vec![s("/pricing"), s("Pricing")]]
    );
    assert_eq!(
        rows(&*sink, "SELECT plan, address_city FROM identifies").await,
        vec![vec![s("pro"), s("Lyon")]]
    );
    // A property named like a fixed column is not a column, and says so.
    assert_eq!(
        rows(
            &*sink,
            "SELECT message_id, table_name, column_name, value FROM rejected_values"
        )
        .await,
        vec![vec![
            s("o1"),
            s("order_completed"),
            s("user_id"),
            s(r#""spoofed""#)
        ]]
    );
    // The same batch again adds nothing anywhere.
    let again = sink.load(&Load::events(0, 1, evs)).await.unwrap();
    assert_eq!((again.inserted, again.duplicates), (0, 5));
    assert_eq!(
        rows(&*sink, "SELECT (SELECT count(*) FROM order_completed), (SELECT count(*) FROM product_added), (SELECT count(*) FROM rejected_values)").await,
        vec![vec![s("2"), s("1"), s("1")]]
    );
    // Reopened, the sink knows its columns.
    drop(sink);
    let sink = t.open().await;
    let more = events(json!({"batch": [
        {"type": "track", "messageId": "o3", "userId": "u3", "event": "Order Completed", "properties": {"revenue": 7, "coupon": "X"}}
    ]}));
    sink.load(&Load::events(0, 2, more)).await.unwrap();
    assert_eq!(
        rows(
            &*sink,
            "SELECT revenue, coupon FROM order_completed WHERE message_id = 'o3'"
        )
        .await,
        vec![vec![s("7"), s("X")]]
    );
}

async fn type_drift_is_cast_or_recorded_never_dropped(t: &Target) {
    let sink = t.open().await;
    let evs = events(json!({"batch": [
        {"type": "track", "messageId": "d1", "userId": "u", "event": "Checkout", "properties": {"total": 10, "paid": true, "note": "x"}},
        {"type": "track", "messageId": "d2", "userId": "u", "event": "Checkout", "properties": {"total": "12.5", "paid": "false", "note": 3}},
        {"type": "track", "messageId": "d3", "userId": "u", "event": "Checkout", "properties": {"total": "lots", "paid": 1, "note": true}}
    ]}));
    sink.load(&Load::events(0, 1, evs)).await.unwrap();
    assert_eq!(
        rows(
            &*sink,
            &format!(
                "SELECT message_id, total, {}, note FROM checkout ORDER BY message_id",
                t.text("paid")
            )
        )
        .await,
        vec![
            vec![s("d1"), s("10"), t.boolean(true), s("x")],
            vec![s("d2"), s("12.5"), t.boolean(false), s("3")],
            vec![s("d3"), None, None, s("true")],
        ]
    );
    let rejected = rows(&*sink, "SELECT message_id, table_name, column_name, value, reason FROM rejected_values ORDER BY column_name").await;
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert_eq!(
        rejected[0][..4],
        [s("d3"), s("checkout"), s("paid"), s("1")]
    );
    assert_eq!(
        rejected[1][..4],
        [s("d3"), s("checkout"), s("total"), s(r#""lots""#)]
    );
    assert!(
        rejected[1][4].as_deref().unwrap().contains("not a number"),
        "{rejected:?}"
    );
    // Text with more significant digits than a DOUBLE holds (an order id sent as
    // text into a number column) is not stored rounded: NULL, and recorded.
    let evs = events(json!({"batch": [
        {"type": "track", "messageId": "d4", "userId": "u", "event": "Checkout", "properties": {"total": "12345678901234567891"}},
        {"type": "track", "messageId": "d5", "userId": "u", "event": "Checkout", "properties": {"total": "123456789012345"}}
    ]}));
    sink.load(&Load::events(0, 2, evs)).await.unwrap();
    assert_eq!(
        rows(
            &*sink,
            "SELECT message_id, total FROM checkout WHERE message_id IN ('d4', 'd5') ORDER BY message_id"
        )
        .await,
        vec![vec![s("d4"), None], vec![s("d5"), s("123456789012345")]]
    );
    assert_eq!(
        rows(
            &*sink,
            "SELECT column_name, value, reason FROM rejected_values WHERE message_id = 'd4'"
        )
        .await,
        vec![vec![
            s("total"),
            s(r#""12345678901234567891""#),
            s("number has more digits than a DOUBLE column holds without loss")
        ]]
    );
}

async fn users_hold_the_latest_traits(t: &Target) {
    let sink = t.open().await;
    let evs = events(json!({"batch": [
        {"type": "identify", "messageId": "u-1", "userId": "u1", "timestamp": "2026-11-20T10:00:00Z", "traits": {"plan": "free", "email_opt": "yes"}},
        {"type": "identify", "messageId": "u-2", "userId": "u1", "timestamp": "2026-11-21T10:00:00Z", "traits": {"plan": "pro"}},
        {"type": "identify", "messageId": "u-3", "userId": "u2", "timestamp": "2026-11-21T10:00:00Z", "traits": {"plan": "team"}}
    ]}));
    sink.load(&Load::events(0, 1, evs)).await.unwrap();
    // An older identify arriving late fills what is missing and overwrites nothing.
    let late = events(json!({"batch": [
        {"type": "identify", "messageId": "u-0", "userId": "u1", "timestamp": "2026-11-19T10:00:00Z", "traits": {"plan": "trial", "company": "Acme"}}
    ]}));
    sink.load(&Load::events(0, 2, late)).await.unwrap();
    assert_eq!(
        rows(
            &*sink,
            "SELECT id, plan, email_opt, company, timestamp FROM users ORDER BY id"
        )
        .await,
        vec![
            vec![
                s("u1"),
                s("pro"),
                s("yes"),
                s("Acme"),
                s("2026-11-21T10:00:00.000Z")
            ],
            vec![
                s("u2"),
                s("team"),
                None,
                None,
                s("2026-11-21T10:00:00.000Z")
            ],
        ]
    );
}

/// One user's identifies: `plan` set, then cleared by a later identify that says
/// nothing of it (NULL is not a value), then set by one sent in between that arrives
/// last; `city` set twice at the same instant (the later message id wins); an older
/// `anonymous_id`.
fn identifies_of(user: &str) -> Vec<serde_json::Value> {
    let e = |id: &str, ts: &str, anon: Option<&str>, traits: serde_json::Value| {
        json!({"type": "identify", "messageId": format!("{user}-{id}"), "userId": user,
               "anonymousId": anon, "timestamp": ts, "traits": traits})
    };
    vec![
        e(
            "i1",
            "2026-11-20T10:00:00Z",
            Some("a1"),
            json!({"plan": "free", "age": 30}),
        ),
        e(
            "i3",
            "2026-11-22T10:00:00Z",
            None,
            json!({"plan": null, "age": "31"}),
        ),
        e(
            "i4",
            "2026-11-21T10:00:00Z",
            None,
            json!({"plan": "pro", "city": "Lyon"}),
        ),
        e("i5", "2026-11-21T10:00:00Z", None, json!({"city": "Paris"})),
        e(
            "i0",
            "2026-11-19T10:00:00Z",
            Some("a0"),
            json!({"company": "Acme"}),
        ),
    ]
}

// `users` holds, per user and trait, the value of the latest identify that has it (by
// `timestamp`, then message id), whatever order the identifies arrive in and however
// they are split into loads: three users with the same history, loaded three ways,
// end up the same in every sink.
async fn users_do_not_depend_on_arrival_order(t: &Target) {
    let sink = t.open().await;
    let mut batch = 1;
    let mut load_of = |evs: Vec<serde_json::Value>| {
        batch += 1;
        Load::events(0, batch, events(json!({ "batch": evs })))
    };
    // All at once.
    sink.load(&load_of(identifies_of("ua"))).await.unwrap();
    // One a load, latest first.
    for e in identifies_of("ub").into_iter().rev() {
        sink.load(&load_of(vec![e])).await.unwrap();
    }
    // Two loads, interleaved.
    let c = identifies_of("uc");
    sink.load(&load_of(vec![c[4].clone(), c[1].clone(), c[3].clone()]))
        .await
        .unwrap();
    sink.load(&load_of(vec![c[2].clone(), c[0].clone()]))
        .await
        .unwrap();
    let expected = |id: &str| {
        vec![
            s(id),
            s("a1"),
            s("pro"),
            s("31"),
            s("Paris"),
            s("Acme"),
            s("2026-11-22T10:00:00.000Z"),
        ]
    };
    assert_eq!(
        rows(
            &*sink,
            "SELECT id, anonymous_id, plan, age, city, company, timestamp FROM users ORDER BY id"
        )
        .await,
        vec![expected("ua"), expected("ub"), expected("uc")]
    );
}

// A warehouse from before migration 11 has `users` but no keys: the migration gives
// each stored value its row's `timestamp`, so what was stored is kept against older
// identifies, filled where NULL, and replaced by newer ones.
async fn users_of_an_older_warehouse_keep_their_values(t: &Target) {
    let sink = t.open().await;
    common::load(&*sink, 1, json!([
        {"type": "identify", "messageId": "o1", "userId": "u", "timestamp": "2026-11-20T10:00:00Z", "traits": {"plan": "free", "city": "Lyon"}},
        {"type": "identify", "messageId": "o2", "userId": "u", "timestamp": "2026-11-21T10:00:00Z", "traits": {"age": 3}}
    ]))
    .await;
    for sql in [
        "DELETE FROM collector_user_traits",
        "DELETE FROM collector_migrations WHERE version = 11",
        "ALTER TABLE users ADD COLUMN tier VARCHAR",
    ] {
        sink.query(sql).await.unwrap();
    }
    drop(sink);
    let sink = t.open().await;
    let keys = one(&*sink, "SELECT keys FROM collector_user_traits")
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&keys).unwrap(),
        json!({"age": [1795255200000i64, ""], "city": [1795255200000i64, ""], "plan": [1795255200000i64, ""]})
    );
    common::load(&*sink, 2, json!([
        {"type": "identify", "messageId": "o3", "userId": "u", "timestamp": "2026-11-20T12:00:00Z", "traits": {"plan": "trial", "company": "Acme"}},
        {"type": "identify", "messageId": "o4", "userId": "u", "timestamp": "2026-11-22T10:00:00Z", "traits": {"city": "Paris"}}
    ]))
    .await;
    assert_eq!(
        rows(&*sink, "SELECT plan, city, age, company FROM users").await,
        vec![vec![s("free"), s("Paris"), s("3"), s("Acme")]]
    );
}

// A track event may be named like any table or view the agent keeps in the warehouse
// (`Profiles`, `Audience Membership`, `Privacy Requests`, or a hostile sender's
// `activation_outbox`): its per-event table gets the prefix `event_`, so it never
// writes into the agent's own tables or shadows them (the lake's views). Before, such
// an event was quarantined in DuckDB, shadowed the table in the lake, and failed its
// whole load in PostgreSQL, transiently, forever: the shard was blocked.
async fn events_named_after_the_agents_own_tables_get_their_own(t: &Target) {
    let sink = t.open().await;
    // Every relation: tables and views, and the indexes and sequences that share
    // PostgreSQL's namespace (and DuckDB's indexes).
    let lists: &[&str] = match t {
        Target::ClickHouse(_) => &["SELECT name FROM system.tables WHERE database = currentDatabase()"],
        Target::Postgres(_) => &["SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace"],
        _ => &[
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()",
            "SELECT index_name FROM duckdb_indexes() WHERE schema_name = current_schema()",
        ],
    };
    let mut names: Vec<String> = Vec::new();
    for list in lists {
        names.extend(
            rows(&*sink, list)
                .await
                .into_iter()
                .filter_map(|r| r[0].clone()),
        );
    }
    // A per-event table's own index, and the system catalog PostgreSQL searches first.
    names.extend(["order_completed_pkey".to_string(), "pg_class".to_string()]);
    names.sort();
    names.dedup();
    for own in [
        "profiles",
        "identities",
        "audience_membership",
        "privacy_requests",
    ] {
        assert!(names.iter().any(|n| n == own), "{own} not in {names:?}");
    }
    let batch: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| json!({"type": "track", "messageId": format!("own-{i}"), "userId": "u", "event": n, "properties": {"x": 1}}))
        .collect();
    let st = sink
        .load(&Load::events(0, 1, events(json!({ "batch": batch }))))
        .await
        .unwrap();
    assert_eq!(
        (st.inserted, st.quarantined),
        (names.len() as u64, 0),
        "{st:?}"
    );
    let made: Vec<String> = rows(&*sink, "SELECT table_name FROM collector_tables")
        .await
        .into_iter()
        .filter_map(|r| r[0].clone())
        .collect();
    assert_eq!(made.len(), names.len(), "{made:?}");
    for n in &names {
        assert!(
            !made.contains(n),
            "an event named {n:?} writes into the agent's own table"
        );
    }
    // The agent's tables are as they were; the events are where they belong.
    assert_eq!(one(&*sink, "SELECT count(*) FROM profiles").await, s("0"));
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM audience_membership").await,
        s("0")
    );
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM tracks").await,
        Some(names.len().to_string())
    );
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM event_profiles").await,
        s("1")
    );
}

// An analyst's table or view in the warehouse's schema (a dbt model, say) whose name an
// event's per-event table would take: the event's table becomes `event_<name>`, and
// the analyst's relation is left as it was. Before, DuckDB and PostgreSQL failed the
// load, as transient, forever (a blocked shard), and ClickHouse dropped the analyst's
// table to put its view in its place.
async fn an_analysts_table_keeps_its_name(t: &Target) {
    let sink = t.open().await;
    let ddl = if t.is_clickhouse() {
        [
            "CREATE VIEW signups AS SELECT 1 AS n",
            "CREATE TABLE orders (id String) ENGINE = MergeTree ORDER BY id",
        ]
    } else {
        [
            "CREATE VIEW signups AS SELECT 1 AS n",
            "CREATE TABLE orders (id VARCHAR)",
        ]
    };
    for sql in ddl {
        sink.query(sql).await.unwrap();
    }
    let st = sink
        .load(&Load::events(0, 1, events(json!({"batch": [
            {"type": "track", "messageId": "s1", "userId": "u", "event": "Signups", "properties": {"plan": "pro"}},
            {"type": "track", "messageId": "s2", "userId": "u", "event": "Orders", "properties": {"total": 3}}
        ]}))))
        .await
        .unwrap();
    assert_eq!((st.inserted, st.quarantined), (2, 0), "{st:?}");
    assert_eq!(
        one(&*sink, "SELECT plan FROM event_signups").await,
        s("pro")
    );
    assert_eq!(one(&*sink, "SELECT total FROM event_orders").await, s("3"));
    assert_eq!(
        rows(&*sink, "SELECT message_id, event FROM tracks ORDER BY 1").await,
        vec![
            vec![s("s1"), s("event_signups")],
            vec![s("s2"), s("event_orders")]
        ]
    );
    // The analyst's relations, as they were.
    let r = sink.query("SELECT * FROM orders").await.unwrap();
    assert_eq!((r.columns, r.rows.len()), (vec!["id".to_string()], 0));
    assert_eq!(
        rows(&*sink, "SELECT n FROM signups").await,
        vec![vec![s("1")]]
    );
    // The next events of those names go where the first went.
    let st = sink
        .load(&Load::events(0, 2, events(json!({"batch": [
            {"type": "track", "messageId": "s3", "userId": "u", "event": "Orders", "properties": {"total": 4}}
        ]}))))
        .await
        .unwrap();
    assert_eq!(st.inserted, 1);
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM event_orders").await,
        s("2")
    );
}

// A name that would be empty (a property `""`, or one in another script, `ключ`) is
// the column `_`, and one starting with a digit gets a `_` before it (`_123abc`).
// ClickHouse's views left out every column starting with `_` (they were meant to
// leave out only the rows tables' own `_version`, `_received` and `_mid`), so these
// values were in no view there.
async fn columns_named_with_a_leading_underscore_are_seen(t: &Target) {
    let sink = t.open().await;
    sink.load(&Load::events(0, 1, events(json!({"batch": [
        {"type": "track", "messageId": "n1", "userId": "u", "event": "Order Placed",
         "properties": {"123abc": 1.5, "ключ": "значение", "plain": "p"}},
        {"type": "page", "messageId": "n2", "userId": "u", "name": "Home", "properties": {"": "empty", "2fa": true}},
        {"type": "identify", "messageId": "n3", "userId": "u", "traits": {"9lives": "cat"}}
    ]}))))
    .await
    .unwrap();
    assert_eq!(
        rows(&*sink, "SELECT \"_123abc\", \"_\", plain FROM order_placed").await,
        vec![vec![s("1.5"), s("значение"), s("p")]]
    );
    assert_eq!(
        rows(
            &*sink,
            &format!("SELECT \"_\", {} FROM pages", t.text("\"_2fa\""))
        )
        .await,
        vec![vec![s("empty"), t.boolean(true)]]
    );
    assert_eq!(
        rows(&*sink, "SELECT \"_9lives\" FROM identifies").await,
        vec![vec![s("cat")]]
    );
    assert_eq!(
        rows(&*sink, "SELECT \"_9lives\" FROM users").await,
        vec![vec![s("cat")]]
    );
}

// A trait named like one of `identifies`' own columns (`user_id`, `sent_at`,
// `context_ip`) is not a column of `identifies` (the event's own value is), but it is
// a trait like any other in `users`, in every sink. The lake's `users` was a view over
// `identifies`' columns, so there the column was missing (`user_id`, `sent_at`) or
// held the identify's own value (`context_ip`: the context's `ip`).
async fn traits_named_like_identifies_columns_are_users_traits(t: &Target) {
    let sink = t.open().await;
    common::load(&*sink, 1, json!([
        {"type": "identify", "messageId": "c1", "userId": "u", "timestamp": "2026-11-20T10:00:00Z",
         "sentAt": "2026-11-20T10:00:01Z", "context": {"ip": "1.1.1.1"},
         "traits": {"user_id": "legacy-7", "sent_at": "by post", "context_ip": "9.9.9.9", "plan": "pro"}},
        {"type": "identify", "messageId": "c2", "userId": "v", "timestamp": "2026-11-20T10:00:00Z",
         "context": {"ip": "2.2.2.2"}, "traits": {"plan": "free"}}
    ]))
    .await;
    assert_eq!(
        rows(
            &*sink,
            "SELECT id, user_id, sent_at, context_ip, plan FROM users ORDER BY id"
        )
        .await,
        vec![
            vec![s("u"), s("legacy-7"), s("by post"), s("9.9.9.9"), s("pro")],
            vec![s("v"), None, None, None, s("free")],
        ]
    );
    // `identifies` keeps its own values.
    assert_eq!(
        rows(
            &*sink,
            "SELECT user_id, context_ip FROM identifies ORDER BY user_id"
        )
        .await,
        vec![vec![s("u"), s("1.1.1.1")], vec![s("v"), s("2.2.2.2")]]
    );
}

// An instant with microseconds (Python's `isoformat()`, a database's `now()`) keeps
// them in a timestamp column: DuckDB, PostgreSQL and Parquet hold microseconds (it was
// cut to the millisecond, silently). ClickHouse keeps what its type holds (whole
// seconds in 18.16's `DateTime`).
async fn instants_keep_their_microseconds(t: &Target) {
    let sink = t.open().await;
    common::load(&*sink, 1, json!([
        {"type": "track", "messageId": "t1", "userId": "u", "event": "Shipped",
         "properties": {"shipped_at": "2026-11-20T11:00:00.123456+01:00", "paid_at": "2026-11-20T10:00:00.5Z"}},
        {"type": "track", "messageId": "t2", "userId": "u", "event": "Shipped",
         "properties": {"shipped_at": "2026-11-20T10:00:00.000001Z", "paid_at": "2026-11-20T10:00:00.123456789Z"}},
        {"type": "identify", "messageId": "i1", "userId": "u", "traits": {"seen_at": "2026-11-20T10:00:00.654321Z"}}
    ]))
    .await;
    // Microseconds; ClickHouse from 20.1 keeps milliseconds (`DateTime64(3)`), 18.16
    // whole seconds (`DateTime`).
    let expected = |us: &str, ms: &str, seconds: &str| {
        if t.whole_seconds() {
            s(seconds)
        } else if t.is_clickhouse() {
            s(ms)
        } else {
            s(us)
        }
    };
    let second = "2026-11-20T10:00:00.000Z";
    assert_eq!(
        rows(
            &*sink,
            "SELECT shipped_at, paid_at FROM shipped ORDER BY message_id"
        )
        .await,
        vec![
            vec![
                expected(
                    "2026-11-20T10:00:00.123456Z",
                    "2026-11-20T10:00:00.123Z",
                    second
                ),
                expected(
                    "2026-11-20T10:00:00.500Z",
                    "2026-11-20T10:00:00.500Z",
                    second
                ),
            ],
            vec![
                expected(
                    "2026-11-20T10:00:00.000001Z",
                    "2026-11-20T10:00:00.000Z",
                    second
                ),
                // Past the microsecond: dropped (no warehouse here holds them).
                expected(
                    "2026-11-20T10:00:00.123456Z",
                    "2026-11-20T10:00:00.123Z",
                    second
                ),
            ],
        ]
    );
    assert_eq!(
        rows(&*sink, "SELECT seen_at FROM users").await,
        vec![vec![expected(
            "2026-11-20T10:00:00.654321Z",
            "2026-11-20T10:00:00.654Z",
            second
        )]]
    );
}

// Several fields of one event can map to one column (`orderId`, `order_id` and
// `Order ID` are all `order_id`; `{"a": {"b": 1}}` and `a_b` are both `a_b`): the first
// is stored, and `rejected_values` (one row per event, table and column) names the
// next one and counts the others. ClickHouse kept the last one and the others the
// next, so the sinks disagreed, and a third field was in no row.
async fn fields_that_map_to_one_column_are_recorded_once(t: &Target) {
    let sink = t.open().await;
    common::load(&*sink, 1, json!([
        {"type": "track", "messageId": "c1", "userId": "u", "event": "Coll",
         "properties": {"orderId": 1, "order_id": "two", "Order ID": true, "a": {"b": 5}, "a_b": "x",
                        "userId": "p", "user_id": "q"}},
        {"type": "track", "messageId": "c2", "userId": "u", "event": "Coll", "properties": {"order_id": 7, "a_b": 6}}
    ]))
    .await;
    assert_eq!(
        rows(
            &*sink,
            "SELECT message_id, order_id, a_b FROM coll ORDER BY message_id"
        )
        .await,
        vec![vec![s("c1"), s("1"), s("5")], vec![s("c2"), s("7"), s("6")]]
    );
    let more = " (and 1 more field of this event that map to this column, not stored either; all are in the event's JSON)";
    assert_eq!(
        rows(
            &*sink,
            "SELECT column_name, value, reason FROM rejected_values WHERE table_name = 'coll' ORDER BY column_name"
        )
        .await,
        vec![
            vec![
                s("a_b"),
                s(r#""x""#),
                s("another field of this event already maps to column `a_b`")
            ],
            vec![
                s("order_id"),
                s(r#""two""#),
                Some(format!(
                    "another field of this event already maps to column `order_id`{more}"
                ))
            ],
            vec![
                s("user_id"),
                s(r#""p""#),
                Some(format!(
                    "`user_id` is a reserved column of this table; the value stays in the event's JSON{more}"
                ))
            ],
        ]
    );
}

// A trait's column in `users` has the type of its column in `identifies`. Typed by
// its own first value, `users.plan` became a number (the first identify with a user
// id sent `5`) where `identifies.plan` was text (an anonymous identify sent "pro"
// first): a later "enterprise" was in `identifies` and silently not in `users`, which
// kept `5`, and no `rejected_values` row said so.
async fn users_traits_take_identifies_types(t: &Target) {
    let sink = t.open().await;
    common::load(&*sink, 1, json!([
        {"type": "identify", "messageId": "i1", "anonymousId": "a", "timestamp": "2026-11-20T10:00:00Z", "traits": {"plan": "pro"}},
        {"type": "identify", "messageId": "i2", "userId": "u", "timestamp": "2026-11-20T11:00:00Z", "traits": {"plan": 5}}
    ]))
    .await;
    common::load(&*sink, 2, json!([
        {"type": "identify", "messageId": "i3", "userId": "u", "timestamp": "2026-11-20T12:00:00Z", "traits": {"plan": "enterprise"}}
    ]))
    .await;
    assert_eq!(
        rows(&*sink, "SELECT id, plan FROM users").await,
        vec![vec![s("u"), s("enterprise")]]
    );
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM rejected_values").await,
        s("0")
    );
}

// A redelivered event whose content differs from the stored copy (same `messageId`,
// other properties: a client bug, or a hostile sender) changes nothing: the load
// plans its columns from the events new to the warehouse only. Before, the duplicate's
// properties added columns (typed by their values) and tables that no stored row
// filled, and a later event's values were cast to, or refused by, that type.
async fn a_redelivery_with_other_content_changes_no_schema(t: &Target) {
    let sink = t.open().await;
    common::load(&*sink, 1, json!([
        {"type": "track", "messageId": "m1", "userId": "u", "event": "Order Completed", "properties": {"revenue": 10}},
        {"type": "identify", "messageId": "i1", "userId": "u", "traits": {"plan": "pro"}},
        {"type": "page", "messageId": "p1", "userId": "u", "name": "Home"}
    ]))
    .await;
    // The same ids, other content, beside one new event.
    let st = sink
        .load(&Load::events(0, 2, events(json!({"batch": [
            {"type": "track", "messageId": "m1", "userId": "u", "event": "Order Completed", "properties": {"revenue": "ten", "coupon": "X"}},
            {"type": "track", "messageId": "i1", "userId": "u", "event": "Secret Event", "properties": {"a": 1}},
            {"type": "identify", "messageId": "p1", "userId": "u", "traits": {"plan": 7, "age": "thirty"}},
            {"type": "page", "messageId": "m1", "userId": "u", "name": "Home", "properties": {"ref": "dup"}},
            {"type": "track", "messageId": "m2", "userId": "u", "event": "Order Completed", "properties": {"revenue": 5}}
        ]}))))
        .await
        .unwrap();
    assert_eq!((st.inserted, st.duplicates), (1, 4));
    assert_eq!(
        rows(
            &*sink,
            "SELECT table_name FROM collector_tables ORDER BY table_name"
        )
        .await,
        vec![vec![s("order_completed")]]
    );
    assert_eq!(
        rows(&*sink, "SELECT table_name, column_name FROM collector_columns WHERE column_name IN ('coupon', 'a', 'age', 'ref') ORDER BY table_name, column_name").await,
        Vec::<Vec<Option<String>>>::new()
    );
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM rejected_values").await,
        s("0")
    );
    // A later event types the columns the duplicate would have.
    common::load(&*sink, 3, json!([
        {"type": "track", "messageId": "m3", "userId": "u", "event": "Order Completed", "properties": {"revenue": 7, "coupon": 20}},
        {"type": "identify", "messageId": "i2", "userId": "u", "traits": {"age": 30}}
    ]))
    .await;
    assert_eq!(
        rows(&*sink, "SELECT table_name, column_name, type FROM collector_columns WHERE column_name IN ('coupon', 'age') ORDER BY table_name, column_name").await,
        vec![
            vec![s("identifies"), s("age"), s("double")],
            vec![s("order_completed"), s("coupon"), s("double")],
            vec![s("users"), s("age"), s("double")],
        ]
    );
    assert_eq!(
        rows(
            &*sink,
            "SELECT message_id, revenue FROM order_completed ORDER BY message_id"
        )
        .await,
        vec![
            vec![s("m1"), s("10")],
            vec![s("m2"), s("5")],
            vec![s("m3"), s("7")],
        ]
    );
    assert_eq!(
        rows(&*sink, "SELECT plan, age FROM users").await,
        vec![vec![s("pro"), s("30")]]
    );
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM rejected_values").await,
        s("0")
    );
}

// A table stops growing at `tables::MAX_COLUMNS` (1,000) columns, in every sink: the
// properties past it are recorded in `rejected_values`, with the reason, and stay in
// the event's JSON; the event and its other properties load, and so do later events.
async fn a_table_stops_at_its_column_limit(t: &Target) {
    let sink = t.open().await;
    let mut props = serde_json::Map::new();
    for i in 0..1100 {
        props.insert(format!("p{i}"), json!(i as f64 + 0.5));
    }
    let st = sink
        .load(&Load::events(0, 1, events(json!({"batch": [
            {"type": "track", "messageId": "w1", "userId": "u", "event": "Wide", "properties": props}
        ]}))))
        .await
        .unwrap();
    assert_eq!((st.inserted, st.quarantined), (1, 0), "{st:?}");
    let more = events(json!({"batch": [
        {"type": "track", "messageId": "w2", "userId": "u", "event": "Wide", "properties": {"p0": 1, "q": "new"}}
    ]}));
    sink.load(&Load::events(0, 2, more)).await.unwrap();
    let over = rows(
        &*sink,
        "SELECT message_id, reason, count(*) FROM rejected_values WHERE table_name = 'wide' GROUP BY message_id, reason ORDER BY message_id",
    )
    .await;
    let reason = s("table `wide` has reached 1000 columns");
    // 1,000 columns, of which the per-event table's own take 11.
    assert_eq!(
        over,
        vec![
            vec![s("w1"), reason.clone(), s("111")],
            vec![s("w2"), reason, s("1")]
        ]
    );
    let refused = one(
        &*sink,
        "SELECT column_name FROM rejected_values WHERE message_id = 'w2'",
    )
    .await
    .unwrap();
    assert_eq!(refused, "q");
    assert_eq!(
        t.json_at(&*sink, "tracks", "properties", "w2", &[json!("q")])
            .await,
        s("new")
    );
    assert_eq!(
        rows(
            &*sink,
            "SELECT message_id, p0 FROM wide ORDER BY message_id"
        )
        .await,
        vec![vec![s("w1"), s("0.5")], vec![s("w2"), s("1")]]
    );
}

// A `users` column made before its type followed `identifies'` can still differ
// from it: a trait value `identifies` holds and `users` cannot is then recorded in
// `rejected_values` under `users` (before, nowhere), and the user keeps the latest
// value it could hold.
async fn users_values_an_older_column_cannot_hold_are_recorded(t: &Target) {
    let sink = t.open().await;
    let double = if matches!(t, Target::Postgres(..)) {
        "double precision"
    } else {
        "DOUBLE"
    };
    for sql in [
        format!("ALTER TABLE users ADD COLUMN plan {double}"),
        "INSERT INTO collector_columns VALUES ('users', 'plan', 'double', 0, now())".to_string(),
    ] {
        sink.query(&sql).await.unwrap();
    }
    drop(sink);
    let sink = t.open().await;
    common::load(&*sink, 1, json!([
        {"type": "identify", "messageId": "i0", "anonymousId": "a", "timestamp": "2026-11-20T10:00:00Z", "traits": {"plan": "pro"}},
        {"type": "identify", "messageId": "i1", "userId": "u", "timestamp": "2026-11-20T11:00:00Z", "traits": {"plan": 5}},
        {"type": "identify", "messageId": "i2", "userId": "u", "timestamp": "2026-11-20T12:00:00Z", "traits": {"plan": "enterprise"}}
    ]))
    .await;
    assert_eq!(
        rows(&*sink, "SELECT id, plan FROM users").await,
        vec![vec![s("u"), s("5")]]
    );
    assert_eq!(
        rows(
            &*sink,
            "SELECT message_id, table_name, column_name, value FROM rejected_values"
        )
        .await,
        vec![vec![s("i2"), s("users"), s("plan"), s(r#""enterprise""#)]]
    );
}

// (In a module of their own: the shared scenarios' modules are `duckdb`, `postgres`, ….)
mod upgraded {
    use super::*;
    crate::per_target!(
        [duckdb, postgres, postgres_pooled]
        [users_of_an_older_warehouse_keep_their_values,
        users_values_an_older_column_cannot_hold_are_recorded,]
    );
}

// Not the lake: its tables are folders of files, which no analyst's relation shares a
// namespace with.
mod analysts {
    use super::*;
    crate::per_target!(
        [duckdb, postgres, postgres_pooled, clickhouse, clickhouse_current]
        [an_analysts_table_keeps_its_name,]
    );
}

crate::per_target!(
    [duckdb, postgres, postgres_pooled, parquet, clickhouse, clickhouse_current]
    [loads_each_kind_into_its_segment_table,
    nulls_unicode_and_nested_json_round_trip,
    same_events_twice_land_once,
    message_id_is_unique_across_tables,
    undecodable_batches_are_dead_letters_once,
    poison_event_is_quarantined_and_replayed,
    status_sql_reads_every_sink,
    dead_letters_that_decode_now_are_replayed,
    per_event_tables_and_flattened_columns,
    type_drift_is_cast_or_recorded_never_dropped,
    users_hold_the_latest_traits,
    users_do_not_depend_on_arrival_order,
    events_named_after_the_agents_own_tables_get_their_own,
    columns_named_with_a_leading_underscore_are_seen,
    a_table_stops_at_its_column_limit,
    traits_named_like_identifies_columns_are_users_traits,
    instants_keep_their_microseconds,
    fields_that_map_to_one_column_are_recorded_once,
    users_traits_take_identifies_types,
    a_redelivery_with_other_content_changes_no_schema,]
);

// Every PostgreSQL table has hidden system columns (`xmin`, `ctid`, …), which no
// column may be named: `ADD COLUMN xmin` failed, as transient, so one event with a
// property `xmin` (a map's bounding box) blocked its shard for good. Such a property
// is not a column in PostgreSQL: `rejected_values` records it and the value stays in
// the event's JSON; the other properties load.
#[tokio::test]
async fn postgres_system_column_names_are_not_columns() {
    let t = Target::postgres();
    let sink = t.open().await;
    let props = json!({"xmin": 1.5, "xmax": 2.5, "ctid": "c", "tableoid": 5, "oid": 6, "cmin": 3, "cmax": 4, "zoom": 7});
    let st = sink
        .load(&Load::events(0, 1, events(json!({"batch": [
            {"type": "track", "messageId": "g1", "userId": "u", "event": "Map Moved", "properties": props},
            {"type": "page", "messageId": "g2", "userId": "u", "properties": props},
            {"type": "identify", "messageId": "g3", "userId": "u", "traits": props}
        ]}))))
        .await
        .unwrap();
    assert_eq!((st.inserted, st.quarantined), (3, 0), "{st:?}");
    assert_eq!(one(&*sink, "SELECT zoom FROM map_moved").await, s("7"));
    assert_eq!(
        one(&*sink, "SELECT properties->>'xmin' FROM tracks").await,
        s("1.5")
    );
    let refused = rows(
        &*sink,
        "SELECT table_name, count(*) FROM rejected_values WHERE column_name IN ('xmin', 'xmax', 'ctid', 'tableoid', 'oid', 'cmin', 'cmax') GROUP BY 1 ORDER BY 1",
    )
    .await;
    assert_eq!(
        refused,
        vec![
            vec![s("identifies"), s("7")],
            vec![s("map_moved"), s("7")],
            vec![s("pages"), s("7")],
        ]
    );
    // `users` takes the other traits.
    assert_eq!(one(&*sink, "SELECT zoom FROM users").await, s("7"));
}

// A row PostgreSQL cannot store (over its 8 KB row limit: 900 short text properties,
// within the edge's 32 KB per event) is the event's problem, not the warehouse's: it
// is quarantined with PostgreSQL's reason and the rest of the load lands. It was
// retried as transient, forever: a blocked shard.
#[tokio::test]
async fn postgres_row_too_big_is_quarantined_not_retried_forever() {
    let t = Target::postgres();
    let sink = t.open().await;
    let mut wide = serde_json::Map::new();
    for i in 0..900 {
        wide.insert(format!("p{i}"), json!(format!("v{i:0>18}")));
    }
    let st = sink
        .load(&Load::events(0, 1, events(json!({"batch": [
            {"type": "track", "messageId": "w1", "userId": "u", "event": "Wide", "properties": wide},
            {"type": "track", "messageId": "w2", "userId": "u", "event": "Fine", "properties": {"a": 1}}
        ]}))))
        .await
        .unwrap();
    assert_eq!((st.inserted, st.quarantined), (1, 1), "{st:?}");
    let q = rows(&*sink, "SELECT message_id, reason FROM quarantine").await;
    assert_eq!(q.len(), 1);
    assert_eq!(q[0][0], s("w1"));
    assert!(
        q[0][1].as_deref().unwrap().contains("row is too big"),
        "{q:?}"
    );
    assert_eq!(one(&*sink, "SELECT a FROM fine").await, s("1"));
}

// PostgreSQL itself refuses a value (here an analyst's CHECK constraint): that event
// alone is isolated and quarantined with PostgreSQL's reason; the rest of the load lands.
#[tokio::test]
async fn postgres_refused_value_is_isolated_and_quarantined() {
    let t = Target::postgres();
    let sink = t.open().await;
    common::load(
        &*sink,
        1,
        json!([{"type": "track", "messageId": "first", "userId": "u", "event": "E"}]),
    )
    .await;
    sink.query("ALTER TABLE tracks ADD CONSTRAINT no_bots CHECK (user_id <> 'bot')")
        .await
        .unwrap();
    let mut evs = events(json!({"batch": [
        {"type": "track", "messageId": "fine-1", "userId": "u", "event": "E"},
        {"type": "track", "messageId": "bot-1", "userId": "bot", "event": "E"},
        {"type": "identify", "messageId": "fine-2", "userId": "u"}
    ]}));
    evs.rotate_left(1);
    let st = sink.load(&Load::events(1, 9, evs)).await.unwrap();
    assert_eq!((st.inserted, st.quarantined), (2, 1));
    let q = rows(&*sink, "SELECT message_id, reason FROM quarantine").await;
    assert_eq!(q[0][0], s("bot-1"));
    assert!(
        q[0][1].as_deref().unwrap().contains("23514"),
        "a check violation: {q:?}"
    );
}

// PostgreSQL's text and jsonb cannot hold U+0000, which the other warehouses store: the
// event loads with U+FFFD in its place, and rejected_values names each column changed
// and the value as sent (an event is not refused for one character).
#[tokio::test]
async fn postgres_stores_nul_as_the_replacement_character_and_says_so() {
    let t = Target::postgres();
    let sink = t.open().await;
    let evs = events(json!({"batch": [
        {"type": "track", "messageId": "n1", "userId": "u\u{0}x", "event": "E", "properties": {"p": "a\u{0}b", "ok": "fine"}},
        {"type": "identify", "messageId": "n2", "userId": "u", "traits": {"t": "\u{0}"}}
    ]}));
    let st = sink.load(&Load::events(0, 1, evs.clone())).await.unwrap();
    assert_eq!((st.inserted, st.quarantined), (2, 0));
    assert_eq!(
        rows(&*sink, "SELECT user_id, p, ok FROM e").await,
        vec![vec![s("u\u{FFFD}x"), s("a\u{FFFD}b"), s("fine")]]
    );
    assert_eq!(
        rows(
            &*sink,
            "SELECT properties->>'p', raw->'properties'->>'p', user_id FROM tracks"
        )
        .await,
        vec![vec![s("a\u{FFFD}b"), s("a\u{FFFD}b"), s("u\u{FFFD}x")]]
    );
    assert_eq!(
        rows(&*sink, "SELECT t FROM users").await,
        vec![vec![s("\u{FFFD}")]]
    );
    let rejected = rows(
        &*sink,
        "SELECT message_id, table_name, column_name, value, reason FROM rejected_values ORDER BY 1, 2, 3",
    )
    .await;
    let named: Vec<[&str; 3]> = rejected
        .iter()
        .map(|r| [0, 1, 2].map(|i| r[i].as_deref().unwrap()))
        .collect();
    assert_eq!(
        named,
        vec![
            ["n1", "e", "p"],
            ["n1", "e", "user_id"],
            ["n1", "tracks", "properties"],
            ["n1", "tracks", "raw"],
            ["n1", "tracks", "user_id"],
            ["n2", "identifies", "raw"],
            ["n2", "identifies", "t"],
            ["n2", "identifies", "traits"],
        ]
    );
    assert_eq!(rejected[0][3], s(r#""a\u0000b""#));
    assert!(rejected
        .iter()
        .all(|r| r[4].as_deref().unwrap().contains("U+0000")));
    // Redelivered: nothing new.
    let again = sink.load(&Load::events(0, 1, evs)).await.unwrap();
    assert_eq!((again.inserted, again.duplicates), (0, 2));
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM rejected_values").await,
        s("8")
    );
}

// PostgreSQL finds a person's pairs of ids by user id through an index (migration 15):
// the identity bench's runs read all of `collector_id_activity` without it (BENCHMARKS,
// "The identity bench in every SQL warehouse").
#[tokio::test]
async fn postgres_finds_pairs_by_user_id_through_an_index() {
    let t = Target::postgres();
    let sink = t.open().await;
    assert_eq!(
        rows(
            &*sink,
            "SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() AND tablename = 'collector_id_activity' AND indexname = 'collector_id_activity_user'"
        )
        .await,
        vec![vec![s(
            "CREATE INDEX collector_id_activity_user ON analytics.collector_id_activity USING btree (user_id)"
        )]]
    );
}

// PostgreSQL stopped mid-drain: the load is a transient error (retried, nothing
// committed); once the server is back the same load lands exactly once.
#[tokio::test]
async fn postgres_outage_is_transient_and_the_retry_lands_once() {
    let pg = LocalPostgres::start().unwrap();
    let t = Target::Postgres(pg);
    let sink = t.open().await;
    let evs = events(
        json!({"batch": [{"type": "track", "messageId": "o-1", "userId": "u", "event": "E"}]}),
    );
    let Target::Postgres(pg) = &t else {
        unreachable!()
    };
    pg.stop().unwrap();
    let err = sink
        .load(&Load::events(0, 1, evs.clone()))
        .await
        .unwrap_err();
    assert!(err.retryable(), "{err}");
    pg.restart().unwrap();
    let ok = sink.load(&Load::events(0, 1, evs.clone())).await.unwrap();
    assert_eq!(ok.inserted, 1);
    assert_eq!(
        sink.load(&Load::events(0, 1, evs))
            .await
            .unwrap()
            .duplicates,
        1
    );
}

// Rows go to PostgreSQL in binary while the tables have the sink's own types. An
// operator who retypes a column (a property to `numeric`, an instant to `timestamp`)
// gets CSV for that table, cast by the server: the next loads land with the same
// values, and the untouched tables keep loading.
#[tokio::test]
async fn postgres_loads_into_columns_an_operator_retyped() {
    let t = Target::postgres();
    let sink = t.open().await;
    let st = sink
        .load(&Load::events(0, 1, order_completed("o1", 0.1)))
        .await
        .unwrap();
    assert_eq!(st.inserted, 1);
    sink.query("ALTER TABLE order_completed ALTER COLUMN revenue TYPE numeric")
        .await
        .unwrap();
    sink.query("ALTER TABLE tracks ALTER COLUMN \"timestamp\" TYPE timestamp")
        .await
        .unwrap();
    let st = sink
        .load(&Load::events(0, 2, order_completed("o2", 12.75)))
        .await
        .unwrap();
    assert_eq!((st.inserted, st.quarantined), (1, 0));
    assert_eq!(
        rows(&*sink, "SELECT message_id, revenue::text, paid::text, paid_at, timestamp FROM order_completed ORDER BY message_id").await,
        vec![
            vec![s("o1"), s("0.1"), s("true"), s("2026-11-24T13:55:00.000Z"), s("2026-11-24T13:54:00.250Z")],
            vec![s("o2"), s("12.75"), s("true"), s("2026-11-24T13:55:00.000Z"), s("2026-11-24T13:54:00.250Z")],
        ]
    );
    assert_eq!(
        rows(
            &*sink,
            "SELECT message_id, timestamp::text FROM tracks ORDER BY message_id"
        )
        .await,
        vec![
            vec![s("o1"), s("2026-11-24 13:54:00.25")],
            vec![s("o2"), s("2026-11-24 13:54:00.25")],
        ]
    );
}

/// Names a hostile or careless sender can choose: event names that snake_case onto the
/// warehouse's own tables, or to nothing, or past the length limit; property names that
/// collide after snake_case or flattening, that are reserved columns (the agent's and
/// ClickHouse's own among them), keywords, quotes, control characters; numbers no
/// DOUBLE holds exactly; nesting 40 deep.
fn hostile_batch() -> serde_json::Value {
    let long = "p".repeat(70);
    let mut props = serde_json::Map::new();
    for (k, v) in [
        ("", json!("empty")),
        ("🚀", json!("rocket")),
        ("a.b", json!(1)),
        ("a_b", json!(2)),
        ("A", json!("upper")),
        ("a", json!("lower")),
        ("_version", json!(5)),
        ("_received", json!("r")),
        ("loaded_at", json!("x")),
        ("id", json!("spoof")),
        ("message_id", json!("m")),
        ("select", json!(true)),
        ("\"q\"", json!("quoted")),
        ("back`tick", json!("bt")),
        ("semi;colon", json!("sc")),
        ("new\nline", json!("nl")),
        ("big", json!(9_007_199_254_740_993u64)),
        ("huge", json!(1e308)),
    ] {
        props.insert(k.into(), v);
    }
    props.insert(format!("{long}1"), json!("l1"));
    props.insert(format!("{long}2"), json!("l2"));
    let mut deep = json!("leaf");
    for _ in 0..40 {
        deep = json!({ "d": deep });
    }
    props.insert("deep".into(), deep);
    let named = |id: &str, event: &str| json!({"type": "track", "messageId": id, "userId": "u", "event": event, "properties": {"x": 1}});
    json!({"batch": [
        {"type": "track", "messageId": "h1", "userId": "u", "event": "Tracks", "properties": props},
        named("h2", "Message IDs"),
        named("h3", "collector_tables"),
        named("h4", "Users"),
        named("h5", "🚀🚀"),
        named("h6", "123 go"),
        named("h7", &"e".repeat(300)),
        named("h8", "Rejected Values"),
        named("h9", "Quarantine"),
        {"type": "identify", "messageId": "h10", "userId": "u", "traits": {"Loaded At": 1, "id": "x", "user id": "y"}},
        {"type": "page", "messageId": "h11", "userId": "u", "properties": {"name": "n", "Path": "/x", "path": "/y"}}
    ]})
}

/// What a warehouse made of [`hostile_batch`]: its tables, columns and types, the
/// values it refused and why, and its event counts.
async fn hostile_outcome(t: &Target) -> Vec<Vec<Vec<Option<String>>>> {
    let sink = t.open().await;
    let st = sink
        .load(&Load::events(0, 1, events(hostile_batch())))
        .await
        .unwrap();
    assert_eq!((st.inserted, st.quarantined), (11, 0), "{st:?}");
    let mut out = Vec::new();
    for sql in [
        "SELECT table_name FROM collector_tables ORDER BY table_name",
        "SELECT table_name, column_name, type FROM collector_columns ORDER BY table_name, column_name",
        "SELECT message_id, table_name, column_name, value, reason FROM rejected_values ORDER BY message_id, table_name, column_name",
        "SELECT (SELECT count(*) FROM tracks), (SELECT count(*) FROM identifies), (SELECT count(*) FROM pages), (SELECT count(*) FROM event_tracks), (SELECT count(*) FROM message_i_ds)",
    ] {
        out.push(rows(&*sink, sql).await);
    }
    out
}

// The same hostile names make the same schema, and the same refusals, in every sink:
// the mapping is decided once (`sinks/tables.rs`), and no warehouse's own rules
// (ClickHouse's `_version`, PostgreSQL's 63-byte names, quoting) change it.
#[tokio::test]
async fn hostile_names_make_the_same_schema_in_every_sink() {
    let duckdb = hostile_outcome(&Target::duckdb()).await;
    let [tables, columns, rejected, counts] = &duckdb[..] else {
        unreachable!()
    };
    // Names of the warehouse's own tables get `event_`; no letters, no table.
    let tables: Vec<&str> = tables.iter().map(|r| r[0].as_deref().unwrap()).collect();
    for t in [
        "event_tracks",
        "event_collector_tables",
        "event_users",
        "event_rejected_values",
        "event_quarantine",
        "message_i_ds",
        "_123_go",
    ] {
        assert!(tables.contains(&t), "{t} not in {tables:?}");
    }
    assert!(tables.iter().all(|t| t.len() <= 63), "{tables:?}");
    assert_eq!(tables.len(), 8, "{tables:?}");
    // Two long names stay two columns, within 63 bytes.
    let long: Vec<&str> = columns
        .iter()
        .filter_map(|r| r[1].as_deref().filter(|c| c.starts_with("ppp")))
        .collect();
    assert_eq!(long.len(), 2);
    assert!(long.iter().all(|c| c.len() <= 63) && long[0] != long[1]);
    // Every collision and reserved name is a row of `rejected_values`, with its value.
    let refused: Vec<(&str, &str, &str)> = rejected
        .iter()
        .map(|r| {
            (
                r[0].as_deref().unwrap(),
                r[2].as_deref().unwrap(),
                r[3].as_deref().unwrap(),
            )
        })
        .collect();
    for r in [
        ("h1", "a", r#""lower""#),
        ("h1", "a_b", "2"),
        ("h1", "big", "9007199254740993"),
        ("h1", "id", r#""spoof""#),
        ("h1", "loaded_at", r#""x""#),
        ("h1", "message_id", r#""m""#),
        ("h10", "user_id", r#""y""#),
        ("h11", "path", r#""/y""#),
        ("h5", "event", r#""🚀🚀""#),
    ] {
        assert!(refused.contains(&r), "{r:?} not in {refused:?}");
    }
    assert_eq!(counts, &vec![vec![s("9"), s("1"), s("1"), s("1"), s("1")]]);
    for (name, t) in [
        ("postgres", Target::postgres()),
        ("parquet", Target::parquet()),
        ("clickhouse", Target::clickhouse()),
        ("clickhouse current", Target::clickhouse_current()),
    ] {
        let outcome = hostile_outcome(&t).await;
        for (i, what) in ["tables", "columns", "rejected values", "counts"]
            .iter()
            .enumerate()
        {
            assert_eq!(outcome[i], duckdb[i], "{name}: {what} differ from DuckDB's");
        }
    }
}
