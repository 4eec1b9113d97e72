//! The drain API answers only correctly signed, fresh requests.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn drain_api_rejects_unsigned_wrong_secret_and_stale_requests() {
    let st = Stack::start();
    assert_eq!(
        st.post("/v1/track", &json!({"userId": "u", "event": "E"}))
            .await
            .status,
        200
    );
    let body = json!({"shard": 0, "max_batches": 10, "lease_ms": 30000, "flush": true}).to_string();

    let unsigned = st
        .send(
            st.http
                .post(format!("{}/drain/lease", st.edge.url))
                .body(body.clone()),
        )
        .await;
    assert_eq!(unsigned.status, 401);
    assert!(unsigned.body["error"]
        .as_str()
        .unwrap()
        .contains("not signed"));

    let wrong = st
        .signed("POST", "/drain/lease", &body, "not-the-secret", now_s())
        .await;
    assert_eq!(
        (wrong.status, wrong.body["error"].as_str().unwrap()),
        (401, "signature does not match")
    );

    let stale = st
        .signed("POST", "/drain/lease", &body, SECRET, now_s() - 301)
        .await;
    assert_eq!(stale.status, 401);
    assert!(stale.body["error"].as_str().unwrap().contains("window"));

    let future = st
        .signed("POST", "/drain/lease", &body, SECRET, now_s() + 301)
        .await;
    assert_eq!(future.status, 401);

    // A signature for one body does not authorise another.
    let ts = now_s();
    let sig = collector_core::sign::sign(
        SECRET.as_bytes(),
        "POST",
        "/drain/lease",
        ts,
        body.as_bytes(),
    );
    let tampered = st
        .send(
            st.http
                .post(format!("{}/drain/lease", st.edge.url))
                .header(collector_core::sign::TIMESTAMP_HEADER, ts.to_string())
                .header(collector_core::sign::SIGNATURE_HEADER, sig)
                .body(body.replace("\"shard\":0", "\"shard\":1")),
        )
        .await;
    assert_eq!(tampered.status, 401);

    for path in ["/drain/info", "/drain/stats"] {
        assert_eq!(
            st.send(st.http.get(format!("{}{path}", st.edge.url)))
                .await
                .status,
            401,
            "{path}"
        );
        assert_eq!(
            st.signed("GET", path, "", SECRET, now_s()).await.status,
            200,
            "{path}"
        );
    }
    let ack = st
        .signed(
            "POST",
            "/drain/ack",
            &json!({"shard": 0, "lease_id": "x"}).to_string(),
            "wrong",
            now_s(),
        )
        .await;
    assert_eq!(ack.status, 401);

    // Nothing was leased by the rejected requests: the event drains normally.
    let summary = st.drain().await;
    assert_eq!(summary.inserted, 1);
    assert_eq!(st.count("tracks"), 1);
}

#[tokio::test]
async fn drain_api_validates_its_own_requests() {
    let st = Stack::start();
    let bad_shard = st
        .signed(
            "POST",
            "/drain/lease",
            &json!({"shard": 99}).to_string(),
            SECRET,
            now_s(),
        )
        .await;
    assert_eq!(
        (bad_shard.status, bad_shard.body["code"].as_str()),
        (400, Some("bad_shard"))
    );
    let bad_body = st
        .signed(
            "POST",
            "/drain/lease",
            "{\"shard\": \"zero\"}",
            SECRET,
            now_s(),
        )
        .await;
    assert_eq!(bad_body.status, 400);
    // The limits are collector_core::drain's, the same the agent checks its config with.
    let too_many = st
        .signed(
            "POST",
            "/drain/lease",
            &json!({"shard": 0, "max_batches": collector_core::drain::MAX_LEASE_BATCHES + 1})
                .to_string(),
            SECRET,
            now_s(),
        )
        .await;
    assert_eq!(
        (too_many.status, too_many.body["code"].as_str()),
        (400, Some("bad_lease_request"))
    );
    assert!(too_many.body["error"]
        .as_str()
        .unwrap()
        .contains("max_batches"));
    let info = st.signed("GET", "/drain/info", "", SECRET, now_s()).await;
    assert_eq!(
        info.body,
        json!({"shards": 4, "format_version": 1, "formats": {"batch": 1, "lease": 1}})
    );
    // What the agent reads from it, and checks before leasing anything.
    let parsed: collector_core::drain::DrainInfo = serde_json::from_value(info.body).unwrap();
    assert!(parsed.formats.readable());
}
