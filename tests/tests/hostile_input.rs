//! Hostile input against the real worker in workerd (issue #8): a table of malicious
//! requests, each checked for its status and JSON reason, with good events sent beside
//! and between them that must land exactly once, the worker's peak memory bounded, and
//! the edge still serving at the end.

mod common;

use std::io::Write;

use collector_core::tcf::{largest_range_bomb, range_bomb, MAX_TC_STRING_CHARS};
use common::*;
use serde_json::{json, Value};

/// What a hostile request must get.
enum Expect {
    /// A 4xx with this status and `code`.
    Rejected(u16, &'static str),
    /// Accepted (200): the hostile part was bounded or ignored, and the event kept.
    Accepted,
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn good(id: &str) -> Value {
    json!({"type": "track", "messageId": id, "anonymousId": format!("anon-{id}"), "event": "Good"})
}

/// The isolate limit on Cloudflare: no request may need anywhere near it.
const MEMORY_BUDGET: u64 = 128 * 1024 * 1024;

#[tokio::test]
async fn hostile_requests_get_bounded_answers_and_good_events_land_once() {
    let st = Stack::start();
    let url = |p: &str| format!("{}{p}", st.edge.url);
    let post = |p: &str| st.http.post(url(p)).basic_auth(WRITE_KEY, Some(""));

    // Warm the isolate up, then take the baseline peak memory.
    let r = st.post("/v1/track", &good("warm-up")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let baseline = st.edge.workerd_peak_rss_bytes().expect("workerd runs");

    let deep = "[".repeat(100_000) + &"]".repeat(100_000);
    let bomb = gzip(&vec![b' '; 20 * 1024 * 1024]);
    let too_many: Vec<Value> = (0..2_501).map(|i| good(&format!("x{i}"))).collect();
    let long_id = "i".repeat(20 * 1024);
    let over_cap_tc = range_bomb(4_095); // ~22 KB: over the TC string limit
    assert!(over_cap_tc.len() > MAX_TC_STRING_CHARS);
    let max_tc = largest_range_bomb(); // just under it: decoded, as ranges
    let many_params: String = (0..2_500).map(|i| format!("p{i}=v&")).collect();
    let many_cookies: String = (0..4_000).map(|i| format!("c{i}=v; ")).collect();

    let mut good_ids: Vec<String> = vec!["warm-up".into()];
    let cases: Vec<(&str, reqwest::RequestBuilder, Expect, Vec<&str>)> = vec![
        (
            "broken UTF-8",
            post("/v1/track").body(b"{\"event\": \"\xff\xfe\", \"userId\": \"u\"}".to_vec()),
            Expect::Rejected(400, "not_utf8"),
            vec![],
        ),
        (
            "100k-deep JSON",
            post("/v1/track").body(deep.clone()),
            Expect::Rejected(400, "malformed_json"),
            vec![],
        ),
        (
            "100k-deep JSON as a batch item (over the event size limit)",
            post("/v1/batch").body(format!("{{\"batch\": [{deep}]}}")),
            Expect::Rejected(413, "event_too_large"),
            vec![],
        ),
        (
            "10k-deep JSON as a batch item, beside a good one",
            post("/v1/batch").body(format!(
                "{{\"batch\": [{}, {}]}}",
                "[".repeat(10_000) + &"]".repeat(10_000),
                good("beside-deep")
            )),
            Expect::Rejected(400, "malformed_json"),
            vec!["beside-deep"],
        ),
        (
            "gzip bomb (20 MB of spaces)",
            post("/v1/batch")
                .header("Content-Encoding", "gzip")
                .body(bomb),
            Expect::Rejected(413, "request_too_large"),
            vec![],
        ),
        (
            "2,501-event batch",
            post("/v1/batch").body(json!({"batch": too_many}).to_string()),
            Expect::Rejected(413, "too_many_events"),
            vec![],
        ),
        (
            "20 KB userId beside good events",
            post("/v1/batch").body(
                json!({"batch": [good("beside-1"),
                    {"type": "track", "userId": long_id, "event": "E"}, good("beside-2")]})
                .to_string(),
            ),
            Expect::Rejected(400, "field_too_long"),
            vec!["beside-1", "beside-2"],
        ),
        (
            "number out of range",
            post("/v1/track").body("{\"userId\": \"u\", \"event\": \"E\", \"properties\": {\"n\": 1e999999}}"),
            Expect::Rejected(400, "malformed_json"),
            vec![],
        ),
        (
            "garbage Basic auth",
            st.http
                .post(url("/v1/track"))
                .header("Authorization", format!("Basic {}", "%".repeat(8_000)))
                .body(good("never").to_string()),
            Expect::Rejected(401, "invalid_write_key"),
            vec![],
        ),
        (
            "TC string over the length limit in context.consent.tcf",
            post("/v1/track").body(
                json!({"messageId": "tc-over", "anonymousId": "a-tc-over", "event": "Clicked",
                    "context": {"consent": {"tcf": over_cap_tc}}})
                .to_string(),
            ),
            Expect::Accepted,
            vec!["tc-over"],
        ),
        (
            "40 events each with a range bomb at the limit",
            post("/v1/batch").body(
                json!({"batch": (0..40).map(|i| json!({"type": "track", "messageId": format!("tc-max-{i}"),
                    "anonymousId": format!("a-tc-{i}"), "event": "Clicked",
                    "context": {"consent": {"tcf": max_tc}}})).collect::<Vec<_>>()})
                .to_string(),
            ),
            Expect::Accepted,
            vec!["tc-max-0", "tc-max-39"],
        ),
        (
            "2,000 events sharing a range-bomb euconsent-v2 cookie",
            post("/v1/batch")
                .header("Cookie", format!("euconsent-v2={max_tc}"))
                .body(
                    json!({"batch": (0..2_000).map(|i| good(&format!("ck-{i}"))).collect::<Vec<_>>()})
                        .to_string(),
                ),
            Expect::Accepted,
            vec!["ck-0", "ck-1999"],
        ),
        (
            "4,000 cookies",
            post("/v1/track")
                .header("Cookie", many_cookies)
                .body(good("cookies").to_string()),
            Expect::Accepted,
            vec!["cookies"],
        ),
        (
            "page URL with 2,500 query parameters",
            post("/v1/page").body(
                json!({"messageId": "params", "anonymousId": "a-params",
                    "context": {"page": {"url": format!("https://x.test/?{many_params}token=secret")}}})
                .to_string(),
            ),
            Expect::Accepted,
            vec!["params"],
        ),
        (
            "PII-detector food: 30,000 '@' and '%40' runs",
            post("/v1/track").body(
                json!({"messageId": "at-signs", "anonymousId": "a-at", "event": "E",
                    "properties": {"a": "@".repeat(15_000), "b": "%40".repeat(5_000)}})
                .to_string(),
            ),
            Expect::Accepted,
            vec!["at-signs"],
        ),
        (
            "sentAt in year 2999",
            post("/v1/batch").body(
                json!({"sentAt": "2999-01-01T00:00:00.000Z", "batch": [{"type": "track", "messageId": "skew-2999",
                    "anonymousId": "a-skew", "event": "E", "timestamp": "2026-01-02T03:04:05.000Z"}]})
                .to_string(),
            ),
            Expect::Accepted,
            vec!["skew-2999"],
        ),
    ];

    for (i, (name, req, expect, lands)) in cases.into_iter().enumerate() {
        let r = st.send(req).await;
        match expect {
            Expect::Rejected(status, code) => {
                assert_eq!(r.status, status, "{name}: {}", r.body);
                assert_eq!(r.body["code"], code, "{name}: {}", r.body);
                assert!(
                    r.body["error"].as_str().is_some_and(|e| !e.is_empty()),
                    "{name}: the body names the problem: {}",
                    r.body
                );
            }
            Expect::Accepted => assert_eq!(r.status, 200, "{name}: {}", r.body),
        }
        good_ids.extend(lands.iter().map(|s| s.to_string()));
        // A good event between every two hostile requests.
        let id = format!("between-{i}");
        let r = st.post("/v1/track", &good(&id)).await;
        assert_eq!(r.status, 200, "after {name}: {}", r.body);
        good_ids.push(id);
    }

    let peak = st
        .edge
        .workerd_peak_rss_bytes()
        .expect("workerd still runs");
    eprintln!(
        "workerd peak memory: baseline {} MB, after the hostile table {} MB",
        baseline >> 20,
        peak >> 20
    );
    assert!(
        peak.saturating_sub(baseline) < MEMORY_BUDGET,
        "workerd peak memory grew by {} MB (baseline {} MB)",
        peak.saturating_sub(baseline) >> 20,
        baseline >> 20
    );
    let health = st.send(st.http.get(url("/health"))).await;
    assert_eq!(health.status, 200, "the edge keeps serving");

    // Every good event lands exactly once.
    st.drain().await;
    for id in &good_ids {
        let n = st.query(&format!(
            "SELECT count(*) FROM tracks WHERE message_id = '{id}' UNION ALL SELECT count(*) FROM pages WHERE message_id = '{id}'"
        ));
        let total: u64 = n
            .iter()
            .map(|r| r[0].as_deref().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(total, 1, "{id} landed {total} times");
    }
    assert_eq!(
        st.count("tracks"),
        good_ids.len() as u64 - 1 + 2_000 + 40 - 4
    );

    // What was bounded is also counted and visible.
    let stats = st.edge_stats().await;
    assert_eq!(stats["notes"]["tcf_ignored_too_long"], json!(1), "{stats}");
    assert_eq!(stats["notes"]["clock_untrusted"], json!(1), "{stats}");
    let rows = st.query(
        "SELECT CAST(timestamp AS VARCHAR), CAST(sent_at AS VARCHAR), context->'consent'->'resolved'->>'tcf_error' FROM tracks WHERE message_id IN ('skew-2999', 'tc-over') ORDER BY message_id",
    );
    assert_eq!(
        rows[0][0].as_deref(),
        Some("2026-01-02 03:04:05"),
        "the client's timestamp is kept, not year 1053"
    );
    assert_eq!(
        rows[0][1].as_deref(),
        Some("2999-01-01 00:00:00"),
        "its sentAt is kept as sent"
    );
    assert!(rows[1][2].as_deref().unwrap().contains("limit"), "{rows:?}");
    let url_kept =
        &st.query("SELECT context->'page'->>'url' FROM pages WHERE message_id = 'params'")[0][0];
    assert!(
        !url_kept.as_deref().unwrap().contains("secret"),
        "token scrubbed"
    );
}
