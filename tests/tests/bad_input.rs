//! Bad input gets a 4xx and a JSON body naming the problem; never a 5xx; the good
//! events sent alongside are not lost; and every dropped event is counted by reason.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::Write;

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

#[tokio::test]
async fn bad_input_table_each_gets_its_4xx_and_reason() {
    let st = Stack::start();
    let url = |p: &str| format!("{}{p}", st.edge.url);
    let big = "x".repeat(33 * 1024);
    let huge_batch = json!({"batch": (0..20).map(|i| json!({"type": "track", "userId": "u", "event": format!("e{i}"),
        "properties": {"pad": "y".repeat(26 * 1024)}})).collect::<Vec<_>>()});

    // (name, request, status, code)
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "malformed json",
            st.http
                .post(url("/v1/track"))
                .basic_auth(WRITE_KEY, Some(""))
                .body("{\"event\": "),
            400,
            "malformed_json",
        ),
        (
            "body not an object",
            st.http
                .post(url("/v1/batch"))
                .basic_auth(WRITE_KEY, Some(""))
                .body("[1]"),
            400,
            "not_an_object",
        ),
        (
            "batch not an array",
            st.http
                .post(url("/v1/batch"))
                .basic_auth(WRITE_KEY, Some(""))
                .body("{\"batch\": 5}"),
            400,
            "wrong_type",
        ),
        (
            "missing batch",
            st.http
                .post(url("/v1/batch"))
                .basic_auth(WRITE_KEY, Some(""))
                .body("{}"),
            400,
            "missing_batch",
        ),
        (
            "missing ids",
            st.http
                .post(url("/v1/track"))
                .basic_auth(WRITE_KEY, Some(""))
                .body(json!({"event": "E"}).to_string()),
            400,
            "missing_identity",
        ),
        (
            "wrong type of properties",
            st.http
                .post(url("/v1/track"))
                .basic_auth(WRITE_KEY, Some(""))
                .body(json!({"event": "E", "userId": "u", "properties": [1]}).to_string()),
            400,
            "wrong_type",
        ),
        (
            "wrong type of userId",
            st.http
                .post(url("/v1/identify"))
                .basic_auth(WRITE_KEY, Some(""))
                .body(json!({"userId": {"id": 1}}).to_string()),
            400,
            "wrong_type",
        ),
        (
            "bad timestamp",
            st.http
                .post(url("/v1/page"))
                .basic_auth(WRITE_KEY, Some(""))
                .body(json!({"anonymousId": "a", "timestamp": "soon"}).to_string()),
            400,
            "bad_timestamp",
        ),
        (
            "oversized event",
            st.http
                .post(url("/v1/track"))
                .basic_auth(WRITE_KEY, Some(""))
                .body(json!({"event": "E", "userId": "u", "properties": {"big": big}}).to_string()),
            413,
            "event_too_large",
        ),
        (
            "oversized batch",
            st.http
                .post(url("/v1/batch"))
                .basic_auth(WRITE_KEY, Some(""))
                .body(huge_batch.to_string()),
            413,
            "request_too_large",
        ),
        (
            "bad gzip",
            st.http
                .post(url("/v1/track"))
                .basic_auth(WRITE_KEY, Some(""))
                .header("Content-Encoding", "gzip")
                .body("not gzip"),
            400,
            "bad_encoding",
        ),
        (
            // Cut off halfway: the runtime's inflater fails at the end of the stream.
            "truncated gzip",
            st.http
                .post(url("/v1/track"))
                .basic_auth(WRITE_KEY, Some(""))
                .header("Content-Encoding", "gzip")
                .body({
                    let full = gzip(
                        json!({"event": "E", "userId": "u", "properties": {"pad": "z".repeat(4000)}})
                            .to_string()
                            .as_bytes(),
                    );
                    full[..full.len() / 2].to_vec()
                }),
            400,
            "bad_encoding",
        ),
        (
            "unknown encoding",
            st.http
                .post(url("/v1/track"))
                .basic_auth(WRITE_KEY, Some(""))
                .header("Content-Encoding", "br")
                .body("{}"),
            415,
            "unsupported_encoding",
        ),
        (
            "no write key",
            st.http
                .post(url("/v1/track"))
                .body(json!({"event": "E", "userId": "u"}).to_string()),
            401,
            "missing_write_key",
        ),
        (
            "wrong write key (basic)",
            st.http
                .post(url("/v1/track"))
                .basic_auth("nope", Some(""))
                .body(json!({"event": "E", "userId": "u"}).to_string()),
            401,
            "invalid_write_key",
        ),
        (
            "wrong write key (body)",
            st.http
                .post(url("/v1/track"))
                .body(json!({"writeKey": "nope", "event": "E", "userId": "u"}).to_string()),
            401,
            "invalid_write_key",
        ),
        (
            "unknown path",
            st.http
                .post(url("/v1/nope"))
                .basic_auth(WRITE_KEY, Some(""))
                .body("{}"),
            404,
            "not_found",
        ),
        (
            "wrong method",
            st.http.get(url("/v1/track")),
            405,
            "method_not_allowed",
        ),
    ];
    for (name, req, status, code) in cases {
        let r = st.send(req).await;
        assert_eq!(r.status, status, "{name}: {}", r.body);
        assert_eq!(r.body["code"], code, "{name}: {}", r.body);
        assert_eq!(r.body["success"], false, "{name}");
        assert!(
            r.body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{name}: error names the problem"
        );
    }
}

#[tokio::test]
async fn good_events_next_to_bad_ones_are_kept_and_drops_are_counted() {
    let st = Stack::start();
    let r = st
        .post("/v1/batch", &json!({"batch": [
            {"type": "track", "messageId": "good-0", "userId": "u1", "event": "Kept"},
            {"type": "track", "messageId": "bad-1", "event": "no ids"},
            {"type": "nonsense", "messageId": "bad-2", "userId": "u1"},
            {"type": "identify", "messageId": "good-3", "anonymousId": "a9", "traits": {"x": 1}},
            {"type": "track", "messageId": "bad-4", "userId": "u1", "event": "big", "properties": {"p": "z".repeat(40_000)}},
            {"type": "page", "messageId": "good-5", "userId": "u7"}
        ]}))
        .await;
    assert_eq!(
        r.status, 413,
        "an oversized event in the batch decides the status: {}",
        r.body
    );
    assert_eq!(r.body["accepted"], 3);
    let rejected: Vec<(u64, String)> = r.body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["index"].as_u64().unwrap(),
                x["code"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        rejected,
        vec![
            (1, "missing_identity".into()),
            (2, "unknown_type".into()),
            (4, "event_too_large".into())
        ]
    );
    assert!(r.body["rejected"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("anonymousId"));

    // An authenticated but unreadable request is counted too.
    let r = st
        .send(
            st.http
                .post(format!("{}/v1/track", st.edge.url))
                .basic_auth(WRITE_KEY, Some(""))
                .body("{oops"),
        )
        .await;
    assert_eq!(r.status, 400);

    st.drain().await;
    let ids: Vec<String> = st
        .query("SELECT message_id FROM tracks UNION ALL SELECT message_id FROM identifies UNION ALL SELECT message_id FROM pages ORDER BY 1")
        .into_iter()
        .map(|r| r[0].clone().unwrap())
        .collect();
    assert_eq!(ids, vec!["good-0", "good-3", "good-5"]);

    let stats = st.edge_stats().await;
    let drops = &stats["drops"];
    assert_eq!(drops["missing_identity"], json!(1), "{stats}");
    assert_eq!(drops["unknown_type"], json!(1), "{stats}");
    assert_eq!(drops["event_too_large"], json!(1), "{stats}");
    assert_eq!(drops["request_malformed_json"], json!(1), "{stats}");
    let total: u64 = drops
        .as_object()
        .unwrap()
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(total, 4);
}
