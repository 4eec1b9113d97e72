//! A request reaches a DuckDB row through the real Workers runtime: every endpoint,
//! both auth styles, gzip, text/plain, Segment's nulls and short paths.

mod common;

use std::io::Write;

use common::*;
use serde_json::json;

#[tokio::test]
async fn every_endpoint_lands_as_exact_rows_in_duckdb() {
    let st = Stack::start();
    let ok = |r: &Reply| assert_eq!((r.status, r.body.clone()), (200, json!({"success": true})));

    ok(&st
        .post(
            "/v1/track",
            &json!({"messageId": "t-1", "userId": "u1", "anonymousId": null, "event": "Signed Up",
        "properties": {"plan": "pro", "seats": 3}, "context": {"library": {"name": "e2e"}},
        "timestamp": "2026-11-24T10:00:00.000Z", "sentAt": null, "custom_field": "kept"}),
        )
        .await);
    ok(&st
        .post(
            "/v1/page",
            &json!({"messageId": "p-1", "anonymousId": "a1", "name": "Pricing", "category": "Docs",
        "properties": {"path": "/pricing"}}),
        )
        .await);
    ok(&st
        .post(
            "/v1/identify",
            &json!({"messageId": "i-1", "userId": "u1", "traits": {"plan": "pro"}}),
        )
        .await);
    ok(&st
        .post(
            "/v1/group",
            &json!({"messageId": "g-1", "userId": "u1", "groupId": "acme", "traits": {"size": 10}}),
        )
        .await);
    ok(&st
        .post(
            "/v1/alias",
            &json!({"messageId": "al-1", "userId": "u1", "previousId": "a1"}),
        )
        .await);
    ok(&st
        .post(
            "/v1/screen",
            &json!({"messageId": "s-1", "userId": "u1", "name": "Home"}),
        )
        .await);
    // Segment's browser short paths, write key in a text/plain body (no preflight).
    let r = st
        .send(st.http.post(format!("{}/v1/t", st.edge.url)).header("Content-Type", "text/plain")
            .body(json!({"writeKey": WRITE_KEY, "messageId": "t-2", "anonymousId": "a1", "event": "Clicked"}).to_string()))
        .await;
    ok(&r);
    ok(&st
        .post("/v1/p", &json!({"messageId": "p-2", "anonymousId": "a1"}))
        .await);
    // A batch with batch-level context and sentAt, gzip-encoded.
    let batch = json!({"sentAt": "2026-11-24T10:00:10.000Z", "context": {"library": {"name": "batcher"}}, "batch": [
        {"type": "track", "messageId": "b-1", "userId": "u2", "event": "A", "timestamp": "2026-11-24T10:00:05.000Z"},
        {"type": "identify", "messageId": "b-2", "userId": "u2", "traits": {"email_domain": "example.com"}}
    ]});
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(batch.to_string().as_bytes()).unwrap();
    let r = st
        .send(
            st.http
                .post(format!("{}/v1/batch", st.edge.url))
                .basic_auth(WRITE_KEY, Some(""))
                .header("Content-Type", "application/json")
                .header("Content-Encoding", "gzip")
                .body(gz.finish().unwrap()),
        )
        .await;
    ok(&r);

    let summary = st.drain().await;
    assert_eq!(summary.inserted, 10, "{summary:?}");
    assert_eq!(summary.duplicates, 0);

    assert_eq!(
        st.query("SELECT message_id, anonymous_id, user_id, event_text, properties->>'plan', properties->>'seats', \
                  context->'library'->>'name', raw->>'custom_field' FROM tracks ORDER BY message_id"),
        vec![
            vec![s("b-1"), None, s("u2"), s("A"), None, None, s("batcher"), None],
            vec![s("t-1"), None, s("u1"), s("Signed Up"), s("pro"), s("3"), s("e2e"), s("kept")],
            vec![s("t-2"), s("a1"), None, s("Clicked"), None, None, None, None],
        ]
    );
    // A client timestamp without sentAt is kept as is.
    assert_eq!(
        st.query(
            "SELECT timestamp, original_timestamp, sent_at FROM tracks WHERE message_id = 't-1'"
        ),
        vec![vec![
            s("2026-11-24T10:00:00.000Z"),
            s("2026-11-24T10:00:00.000Z"),
            None
        ]]
    );
    // Skew correction: b-1 happened 5 s before the batch was sent.
    let skew = st.query("SELECT epoch_ms(received_at) - epoch_ms(timestamp), sent_at, original_timestamp FROM tracks WHERE message_id = 'b-1'");
    assert_eq!(
        skew[0],
        vec![
            s("5000"),
            s("2026-11-24T10:00:10.000Z"),
            s("2026-11-24T10:00:05.000Z")
        ]
    );
    // The write key is never stored.
    assert_eq!(
        st.query("SELECT count(*) FROM tracks WHERE raw::VARCHAR LIKE '%writeKey%'")[0][0],
        s("0")
    );

    assert_eq!(
        st.query("SELECT message_id, anonymous_id, name, category, properties->>'path' FROM pages ORDER BY message_id"),
        vec![vec![s("p-1"), s("a1"), s("Pricing"), s("Docs"), s("/pricing")], vec![s("p-2"), s("a1"), None, None, None]]
    );
    assert_eq!(
        st.query("SELECT message_id, user_id, traits->>'plan', traits->>'email_domain' FROM identifies ORDER BY message_id"),
        vec![vec![s("b-2"), s("u2"), None, s("example.com")], vec![s("i-1"), s("u1"), s("pro"), None]]
    );
    assert_eq!(
        st.query("SELECT message_id, group_id, traits->>'size' FROM groups"),
        vec![vec![s("g-1"), s("acme"), s("10")]]
    );
    assert_eq!(
        st.query("SELECT message_id, user_id, previous_id FROM aliases"),
        vec![vec![s("al-1"), s("u1"), s("a1")]]
    );
    assert_eq!(
        st.query("SELECT message_id, user_id, name FROM screens"),
        vec![vec![s("s-1"), s("u1"), s("Home")]]
    );
    // Every row has server-set receivedAt.
    assert_eq!(
        st.query("SELECT count(*) FROM tracks WHERE received_at IS NULL")[0][0],
        s("0")
    );
}

#[tokio::test]
async fn server_fills_missing_message_id_with_a_uuid_v4() {
    let st = Stack::start();
    let r = st
        .post("/v1/track", &json!({"userId": "u", "event": "No Id"}))
        .await;
    assert_eq!(r.status, 200);
    st.drain().await;
    let id = st.query("SELECT message_id FROM tracks")[0][0]
        .clone()
        .unwrap();
    let parts: Vec<&str> = id.split('-').collect();
    assert_eq!(
        parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
        vec![8, 4, 4, 4, 12],
        "{id}"
    );
    assert!(parts[2].starts_with('4'), "version 4: {id}");
}

#[tokio::test]
async fn cors_preflight_and_origins_follow_allowed_origins() {
    let st = Stack::start_with(&[(
        "ALLOWED_ORIGINS",
        "https://shop.example,http://localhost:3000",
    )]);
    let pre = st
        .send(
            st.http
                .request(
                    reqwest::Method::OPTIONS,
                    format!("{}/v1/batch", st.edge.url),
                )
                .header("Origin", "https://shop.example")
                .header("Access-Control-Request-Method", "POST")
                .header(
                    "Access-Control-Request-Headers",
                    "content-type,authorization",
                ),
        )
        .await;
    assert_eq!(pre.status, 204);
    assert_eq!(
        pre.headers["access-control-allow-origin"],
        "https://shop.example"
    );
    assert!(pre.headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("Authorization"));
    assert!(pre.headers["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));

    let denied = st
        .send(
            st.http
                .request(reqwest::Method::OPTIONS, format!("{}/v1/t", st.edge.url))
                .header("Origin", "https://evil.example"),
        )
        .await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.body["code"], "origin_not_allowed");

    let body = json!({"writeKey": WRITE_KEY, "anonymousId": "a", "event": "E"}).to_string();
    let ok = st
        .send(
            st.http
                .post(format!("{}/v1/t", st.edge.url))
                .header("Origin", "http://localhost:3000")
                .header("Content-Type", "text/plain")
                .body(body.clone()),
        )
        .await;
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.headers["access-control-allow-origin"],
        "http://localhost:3000"
    );
    let bad = st
        .send(
            st.http
                .post(format!("{}/v1/t", st.edge.url))
                .header("Origin", "https://evil.example")
                .body(body),
        )
        .await;
    assert_eq!(bad.status, 403);
    st.drain().await;
    assert_eq!(st.count("tracks"), 1);
}
