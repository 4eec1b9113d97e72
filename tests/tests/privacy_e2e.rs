//! Consent and PII through the real worker: events carrying emails, phones, IPs and URL
//! tokens under each consent state; then the Durable Object storage and the DuckDB
//! warehouse are scanned byte for byte for the raw values.

mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};

const RAW: &[&str] = &[
    "jane.doe@example.com",
    "buyer.one@example.com",
    "anon.user@example.com",
    "4155550132",
    "555-0132",
    "203.0.113.9",
    "198.51.100.77",
    "tok-secret-123",
    "gclid-xyz-789",
    // The safety net (issue #8): paths no rule names, and PII inside other values.
    "9876 5432",
    "5550 1234",
    "ceo.secret@example.com",
    "title.person@example.com",
    "url.person",
    "7946 0958",
    "4111 1111 1111 1111",
];

fn tc_string() -> String {
    let line = include_str!("../../collector-core/tests/fixtures/tcf/tcf-v2.jsonl")
        .lines()
        .nth(2)
        .unwrap();
    serde_json::from_str::<Value>(line).unwrap()["tc_string"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Every file under `dir`, lower-cased, searched for every raw value.
fn scan(dir: &Path) -> Vec<String> {
    scan_for(dir, RAW)
}

/// (path, country, extra headers, event) of one request.
type Send<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, Value);

async fn send(st: &Stack, path: &str, country: &str, extra: &[(&str, &str)], body: Value) -> u16 {
    let mut req = st
        .http
        .post(format!("{}{path}", st.edge.url))
        .basic_auth(WRITE_KEY, Some(""))
        .header("Content-Type", "application/json")
        .header("X-Collector-Country", country);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    st.send(req.body(body.to_string())).await.status
}

#[tokio::test]
async fn consent_is_enforced_and_no_raw_pii_reaches_storage_or_the_warehouse() {
    let st = Stack::start();
    let tc = tc_string();
    let cookie = format!("other=1; euconsent-v2={tc}");
    // (path, country, extra headers, event)
    let sends: Vec<Send<'_>> = vec![
        // EEA, nothing granted: an analytics event is anonymised...
        (
            "/v1/track",
            "FR",
            vec![("CF-Connecting-IP", "198.51.100.77")],
            json!({
            "messageId": "fr-click", "event": "Clicked", "userId": "user-fr", "anonymousId": "anon-fr",
            "properties": {"email": "Jane.Doe@Example.com"},
            "context": {"traits": {"email": "jane.doe@example.com"}, "ip": "203.0.113.9",
                        "userAgent": "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
                        "page": {"url": "https://shop.test/reset?token=tok-secret-123&lang=fr"}}}),
        ),
        // ...and a marketing event is dropped.
        (
            "/v1/track",
            "FR",
            vec![],
            json!({"messageId": "fr-order", "event": "Order Completed", "userId": "user-fr"}),
        ),
        // US, opt-out region: kept, PII hashed.
        (
            "/v1/identify",
            "US",
            vec![],
            json!({"messageId": "us-identify", "userId": "user-us",
            "traits": {"email": " BUYER.ONE@example.com", "phone": "+1 (415) 555-0132", "plan": "pro"}}),
        ),
        // US with Sec-GPC: 1: the marketing event is dropped.
        (
            "/v1/track",
            "US",
            vec![("Sec-GPC", "1")],
            json!({"messageId": "us-gpc-order", "event": "Order Completed", "userId": "user-us"}),
        ),
        // EEA with a TCF string granting marketing and an explicit analytics grant: kept.
        (
            "/v1/track",
            "DE",
            vec![],
            json!({"messageId": "de-tcf-order", "event": "Order Completed", "userId": "user-de",
            "properties": {"email": "anon.user@example.com"},
            "context": {"consent": {"tcf": tc, "categoryPreferences": {"analytics": true}}}}),
        ),
        // EEA with the TC string in the euconsent-v2 cookie (no analytics purposes): anonymised.
        (
            "/v1/page",
            "DE",
            vec![("Cookie", cookie.as_str())],
            json!({"messageId": "de-cookie-page", "name": "Home",
            "userId": "user-de2", "anonymousId": "anon-de2"}),
        ),
        // A malformed TC string is not an error: the region default applies.
        (
            "/v1/track",
            "DE",
            vec![],
            json!({"messageId": "de-bad-tcf", "event": "Clicked", "anonymousId": "anon-de3",
            "context": {"consent": {"tcf": "CO"}}}),
        ),
        // Rest of the world: URL tokens scrubbed.
        (
            "/v1/page",
            "BR",
            vec![],
            json!({"messageId": "br-page", "anonymousId": "anon-br",
            "context": {"page": {"url": "https://x.test/?gclid=gclid-xyz-789&lang=pt"}}}),
        ),
        // Issue #8: the safety net. A phone in context.traits on a track call (where many
        // Segment clients put traits), a mobile number nested deep in properties, a
        // card number in free text...
        (
            "/v1/track",
            "US",
            vec![],
            json!({"messageId": "us-safety-track", "event": "Clicked", "anonymousId": "anon-us2",
            "context": {"traits": {"phone": "+49 151 9876 5432"}},
            "properties": {"customer": {"contact": {"mobile_number": "+49 151 5550 1234"}},
                           "note": "paid with 4111 1111 1111 1111"}}),
        ),
        // ...and e-mails and phones in ids, titles, URLs and referrers.
        (
            "/v1/page",
            "US",
            vec![],
            json!({"messageId": "us-safety-page", "userId": "CEO.Secret@example.com", "name": "Welcome",
            "context": {"page": {"title": "Hello title.person@example.com",
                                 "url": "https://shop.test/welcome?ref=url.person%40example.com",
                                 "referrer": "https://crm.test/call?n=+44 20 7946 0958"}}}),
        ),
    ];
    for (path, country, headers, body) in sends {
        let id = body["messageId"].clone();
        assert_eq!(send(&st, path, country, &headers, body).await, 200, "{id}");
    }

    // Nothing raw at rest in the Durable Object storage...
    let at_rest = scan(&st.dir.path().join("edge-state"));
    assert!(at_rest.is_empty(), "raw PII in edge storage: {at_rest:?}");
    let summary = st.drain().await;
    assert_eq!(summary.inserted, 8, "{summary:?}");
    // ...nor in the warehouse files, nor in any value a query can read.
    let in_warehouse = scan(&st.dir.path().join("data"));
    assert!(
        in_warehouse.is_empty(),
        "raw PII in the warehouse file: {in_warehouse:?}"
    );
    let all = st.query(
        "SELECT raw::VARCHAR FROM tracks UNION ALL SELECT raw::VARCHAR FROM identifies UNION ALL SELECT raw::VARCHAR FROM pages",
    );
    let text = format!("{all:?}").to_lowercase();
    for raw in RAW {
        assert!(!text.contains(raw), "raw {raw} readable in the warehouse");
    }

    // Exactly what the policy says happened.
    let ids: Vec<Option<String>> = st
        .query("SELECT message_id FROM tracks UNION ALL SELECT message_id FROM identifies UNION ALL SELECT message_id FROM pages ORDER BY 1")
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    assert_eq!(
        ids,
        [
            "br-page",
            "de-bad-tcf",
            "de-cookie-page",
            "de-tcf-order",
            "fr-click",
            "us-identify",
            "us-safety-page",
            "us-safety-track"
        ]
        .map(s)
    );
    // The evidence says which fields the PII rules touched, and the user id that was an
    // e-mail address joins like the hashed e-mail would.
    let page = &st.query("SELECT user_id, context->'consent'->'resolved'->'pii' FROM pages WHERE message_id = 'us-safety-page'")[0];
    let hasher = collector_core::pii::PiiHasher::new("v1", b"test-pii-key-not-secret", &[]);
    assert_eq!(
        page[0],
        Some(hasher.hash(
            collector_core::pii::PiiKind::Email,
            "ceo.secret@example.com",
            ""
        ))
    );
    let pii: Value = serde_json::from_str(page[1].as_deref().unwrap()).unwrap();
    assert_eq!(
        pii,
        json!({"context.page.referrer": "phone:hash", "context.page.title": "email:hash",
               "context.page.url": "email:hash", "userId": "email:hash"})
    );
    let track = &st.query("SELECT properties->>'note', context->'consent'->'resolved'->'pii' FROM tracks WHERE message_id = 'us-safety-track'")[0];
    assert_eq!(track[0], s("paid with [redacted:card]"));
    let pii: Value = serde_json::from_str(track[1].as_deref().unwrap()).unwrap();
    assert_eq!(
        pii,
        json!({"context.traits.phone": "phone:hash", "properties.customer.contact.mobile_number": "phone:hash",
               "properties.note": "card:redact"})
    );
    let fr = &st.query(
        "SELECT user_id, anonymous_id, context->'traits', properties->>'email', context->>'ip', context->'location'->>'country', \
         context->'page'->>'url', context->'consent'->'resolved'->>'region', context->'consent'->'resolved'->'denied', \
         context->>'userAgent' FROM tracks WHERE message_id = 'fr-click'",
    )[0];
    assert_eq!(fr[0], None, "anonymised: no userId");
    assert!(
        fr[1].as_deref().unwrap().starts_with("hmac-sha256:v1:"),
        "anonymousId is a keyed hash"
    );
    assert_eq!(
        (fr[2].clone(), fr[3].clone(), fr[4].clone()),
        (None, None, None),
        "traits, PII and IP removed"
    );
    assert_eq!(fr[5], s("FR"));
    assert_eq!(fr[6], s("https://shop.test/reset?lang=fr"));
    assert_eq!(fr[7], s("eea_uk_ch"));
    assert_eq!(
        fr[8],
        s(r#"["analytics","marketing","personalization","sms"]"#)
    );
    assert_eq!(fr[9], s("Firefox 121 (Linux)"), "the user agent is reduced");

    let us = &st.query("SELECT traits->>'email', traits->>'phone', traits->>'plan', context->'consent'->'resolved'->'sources'->>'analytics' FROM identifies")[0];
    let expected_email = collector_core::pii::PiiHasher::new("v1", b"test-pii-key-not-secret", &[])
        .hash(
            collector_core::pii::PiiKind::Email,
            "buyer.one@example.com",
            "",
        );
    assert_eq!(
        us[0],
        Some(expected_email),
        "normalised then hashed with the configured key"
    );
    assert!(us[1].as_deref().unwrap().starts_with("hmac-sha256:v1:"));
    assert_eq!((us[2].clone(), us[3].clone()), (s("pro"), s("default")));

    let de = &st.query("SELECT user_id, context->'consent'->'resolved'->'sources'->>'marketing', context->'consent'->>'tcf' FROM tracks WHERE message_id = 'de-tcf-order'")[0];
    assert_eq!(
        (de[0].clone(), de[1].clone(), de[2].clone()),
        (s("user-de"), s("tcf"), None),
        "the raw TC string is not stored"
    );
    let cookie_page = &st.query("SELECT user_id, context->'consent'->'resolved'->'sources'->>'analytics' FROM pages WHERE message_id = 'de-cookie-page'")[0];
    assert_eq!(
        (cookie_page[0].clone(), cookie_page[1].clone()),
        (None, s("tcf"))
    );
    let bad = &st.query("SELECT context->'consent'->'resolved'->>'tcf_error' FROM tracks WHERE message_id = 'de-bad-tcf'")[0];
    assert!(bad[0].as_deref().unwrap().contains("ends early"), "{bad:?}");

    let stats = st.edge_stats().await;
    assert_eq!(
        stats["drops"]["consent_denied_marketing"],
        json!(2),
        "{stats}"
    );
    let notes = &stats["notes"];
    assert_eq!(notes["pii_key_field"], json!(2), "{stats}");
    assert_eq!(notes["pii_detected_email"], json!(3), "{stats}");
    assert_eq!(notes["pii_detected_phone"], json!(1), "{stats}");
    assert_eq!(notes["pii_detected_card"], json!(1), "{stats}");
    assert_eq!(notes["tcf_ignored_truncated"], json!(1), "{stats}");
}

#[tokio::test]
async fn the_worker_refuses_to_run_without_a_pii_key() {
    let st = Stack::start_with(&[("PII_HMAC_KEY", "")]);
    let r = st
        .post("/v1/track", &json!({"userId": "u", "event": "E"}))
        .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.body["code"], "bad_config");
    assert!(
        r.body["error"].as_str().unwrap().contains("PII_HMAC_KEY"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn the_dev_endpoints_exist_only_in_dev_mode_and_bench_stores_nothing() {
    let body = json!({"batch": [{"type": "track", "event": "E", "userId": "u", "properties": {"email": "x@example.com"}}]}).to_string();
    let prod = Stack::start_with(&[("DEV_MODE", "false")]);
    let r = prod
        .send(
            prod.http
                .post(format!("{}/dev/bench/pipeline?iterations=3", prod.edge.url))
                .body(body.clone()),
        )
        .await;
    assert_eq!(r.status, 404);
    let inject = prod
        .send(
            prod.http
                .post(format!("{}/dev/inject?shard=0", prod.edge.url))
                .body("[]"),
        )
        .await;
    assert_eq!(inject.status, 404, "no raw injection outside DEV_MODE");
    let dev = Stack::start();
    let r = dev
        .send(
            dev.http
                .post(format!(
                    "{}/dev/bench/pipeline?iterations=3&country=US",
                    dev.edge.url
                ))
                .body(body),
        )
        .await;
    assert_eq!((r.status, r.body["events"].as_u64()), (200, Some(3)));
    assert_eq!(dev.drain().await.events, 0, "nothing was queued");
}
