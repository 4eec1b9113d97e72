//! The seed's cart-abandonment SMS, end to end: events posted to the real worker (which
//! hashes the phone number and seals it to the agent's key, per the shipped
//! privacy.toml), drained by the agent, which resolves people, evaluates
//! `cart_abandoners_15m`, checks consent at send time and texts through a local server
//! standing in for Twilio. Nothing at rest holds the number in the clear.

mod common;

use collector_agent::destinations::DestinationConfig;
use collector_agent::drain_once;
use collector_e2e::recorder::Recorder;
use common::*;
use serde_json::{json, Value};

const MIN: i64 = 60_000;
const TOKEN_ENV: &str = "ACTIVATION_E2E_TWILIO_TOKEN";
const KEY_ENV: &str = "ACTIVATION_E2E_SEAL_KEY";

fn iso(ms: i64) -> String {
    collector_core::timestamp::format_ms(ms)
}

/// The development key's secret half, which the shipped policy seals to.
fn dev_seal_key() -> String {
    include_str!("../../examples/dev-seal.key")
        .lines()
        .find(|l| !l.starts_with('#') && !l.trim().is_empty())
        .unwrap()
        .trim()
        .to_string()
}

#[tokio::test]
async fn cart_abandoners_get_one_text_and_only_they() {
    let st = Stack::start();
    let twilio = Recorder::start(0).unwrap();
    std::env::set_var(KEY_ENV, dev_seal_key());
    std::env::set_var(TOKEN_ENV, "twilio-token");
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut cfg = st.agent_config();
    cfg.privacy = Some(format!("{repo}/privacy.toml").into());
    cfg.audiences = Some(format!("{repo}/audiences.toml").into());
    cfg.seal_key_env = Some(KEY_ENV.into());
    cfg.destinations = vec![toml::from_str::<DestinationConfig>(&format!(
        "name = \"cart_sms\"\nkind = \"twilio\"\nbase_url = \"{}\"\naccount = \"ACe2e\"\nsecret_env = \"{TOKEN_ENV}\"
from = \"+15005550006\"\nmessage = \"Your cart is waiting\"\naudiences = [\"cart_abandoners_15m\"]\n",
        twilio.url
    ))
    .unwrap()];
    cfg.validate().expect("valid config");

    // Three shoppers added to their carts 20 minutes ago, each with their phone number
    // and consent to marketing texts. c1 does nothing more; c2 ordered at minute 10;
    // c3 withdrew marketing consent at minute 5.
    let now = collector_agent::now_ms();
    let added = now - 20 * MIN;
    let texts = json!({"consent": {"categoryPreferences": {"marketing": true, "sms": true}}});
    let mut batch: Vec<Value> = Vec::new();
    for (n, phone) in [
        ("c1", "+49 151 2345 6789"),
        ("c2", "+49 151 0000 0002"),
        ("c3", "+49 151 0000 0003"),
    ] {
        batch.push(json!({"type": "identify", "messageId": format!("i-{n}"), "anonymousId": format!("dev-{n}"),
            "userId": format!("shopper-{n}"), "traits": {"phone": phone}, "timestamp": iso(added - MIN), "context": texts}));
        batch.push(json!({"type": "track", "messageId": format!("a-{n}"), "anonymousId": format!("dev-{n}"),
            "userId": format!("shopper-{n}"), "event": "Product Added", "properties": {"sku": "SKU-42"},
            "timestamp": iso(added), "context": texts}));
    }
    batch.push(json!({"type": "track", "messageId": "o-c2", "anonymousId": "dev-c2", "userId": "shopper-c2",
        "event": "Order Completed", "properties": {"revenue": 19.9, "currency": "EUR"},
        "timestamp": iso(added + 10 * MIN), "context": texts}));
    batch.push(
        json!({"type": "page", "messageId": "w-c3", "anonymousId": "dev-c3", "userId": "shopper-c3",
        "properties": {"path": "/settings"}, "timestamp": iso(added + 5 * MIN),
        "context": {"consent": {"categoryPreferences": {"marketing": false}}}}),
    );
    let r = st
        .post("/v1/batch", &json!({"batch": batch, "sentAt": iso(now)}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // One drain: load, resolve people, evaluate audiences, send.
    let summary = drain_once(&cfg).await.expect("drain");
    assert_eq!(summary.inserted, 8);
    let calls = twilio.calls();
    assert_eq!(calls.len(), 1, "exactly one text: {calls:?}");
    assert_eq!(calls[0].method, "POST");
    assert_eq!(calls[0].path, "/2010-04-01/Accounts/ACe2e/Messages.json");
    let form = calls[0].form();
    let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(
        field("To"),
        Some("+4915123456789"),
        "c1's number, opened at send time"
    );
    assert_eq!(field("From"), Some("+15005550006"));
    assert_eq!(field("Body"), Some("Your cart is waiting"));
    assert!(calls[0]
        .header("authorization")
        .unwrap()
        .starts_with("Basic "));

    // Draining again texts no one again.
    drain_once(&cfg).await.expect("drain");
    assert_eq!(twilio.calls().len(), 1);

    // The log says why c2 and c3 got nothing (c2 left the audience by buying, so only
    // c1 was ever in it; c3's withdrawal kept them out), and no number is at rest: not
    // in the edge's storage, not in the warehouse.
    let log = st.query("SELECT action, count(*) FROM activation_log GROUP BY 1 ORDER BY 1");
    assert_eq!(
        log,
        vec![vec![Some("sent".into()), Some("1".into())]],
        "{log:?}"
    );
    let found = scan_for(
        st.dir.path(),
        &["4915123456789", "151 2345 6789", "15123456789"],
    );
    assert!(found.is_empty(), "raw phone numbers at rest: {found:?}");
    let sealed = st.query(
        r#"SELECT count(*) FROM identifies WHERE json_extract_string(context, '$.sealed."traits.phone"') LIKE 'sealed:v1:%'"#,
    );
    assert_eq!(
        sealed,
        vec![vec![Some("3".into())]],
        "the edge sealed each number"
    );
}

// From the real worker to the email platform (Mailchimp's shape) and the conversions
// shape (Meta's): pricing_no_purchase_7d members become tagged list members keyed by
// the MD5 of their address; Order Completed goes to the conversions API with the
// SHA-256 of the normalised email, only for people whose consent allows it.
#[tokio::test]
async fn audiences_reach_the_email_platform_and_orders_the_conversions_api() {
    let st = Stack::start();
    let mailchimp = Recorder::start(0).unwrap();
    let meta = Recorder::start(0).unwrap();
    std::env::set_var(KEY_ENV, dev_seal_key());
    std::env::set_var(TOKEN_ENV, "platform-token");
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    // The shipped policy (the worker's) with these two destinations named.
    let policy = std::fs::read_to_string(format!("{repo}/privacy.toml")).unwrap()
        + "\n[destinations.newsletter]\ncategories = [\"marketing\"]\n\n[destinations.meta_capi]\ncategories = [\"marketing\"]\n";
    let policy_path = st.dir.path().join("privacy.toml");
    std::fs::write(&policy_path, policy).unwrap();
    let mut cfg = st.agent_config();
    cfg.privacy = Some(policy_path);
    cfg.audiences = Some(format!("{repo}/audiences.toml").into());
    cfg.seal_key_env = Some(KEY_ENV.into());
    cfg.destinations = vec![
        toml::from_str::<DestinationConfig>(&format!(
            "name = \"newsletter\"\nkind = \"mailchimp\"\nbase_url = \"{}/3.0\"\nlist_id = \"L1\"\nsecret_env = \"{TOKEN_ENV}\"
audiences = [\"pricing_no_purchase_7d\"]\n",
            mailchimp.url
        ))
        .unwrap(),
        toml::from_str::<DestinationConfig>(&format!(
            "name = \"meta_capi\"\nkind = \"meta_capi\"\nbase_url = \"{}/v21.0\"\npixel_id = \"P1\"\nsecret_env = \"{TOKEN_ENV}\"
events = [\"Order Completed\"]\n",
            meta.url
        ))
        .unwrap(),
    ];
    cfg.validate().expect("valid config");

    let now = collector_agent::now_ms();
    let yes = json!({"consent": {"categoryPreferences": {"marketing": true}}});
    let no = json!({"consent": {"categoryPreferences": {"marketing": false}}});
    let mut batch = Vec::new();
    for (n, email, context) in [
        ("s1", "Ann@Example.com", &yes),
        ("s2", "bo@example.com", &yes),
        ("s3", "cy@example.com", &no),
    ] {
        batch.push(json!({"type": "identify", "messageId": format!("i-{n}"), "userId": format!("shopper-{n}"),
            "traits": {"email": email}, "timestamp": iso(now - 30 * MIN), "context": context}));
        batch.push(json!({"type": "page", "messageId": format!("p-{n}"), "userId": format!("shopper-{n}"),
            "properties": {"path": "/pricing"}, "timestamp": iso(now - 20 * MIN), "context": context}));
    }
    for (n, context) in [("s2", &yes), ("s3", &no)] {
        batch.push(
            json!({"type": "track", "messageId": format!("o-{n}"), "userId": format!("shopper-{n}"),
            "event": "Order Completed", "properties": {"revenue": 10, "currency": "EUR"},
            "timestamp": iso(now - 10 * MIN), "context": context}),
        );
    }
    let r = st
        .post("/v1/batch", &json!({"batch": batch, "sentAt": iso(now)}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // s3's events need marketing (Order Completed) or are kept (pages, identify).
    drain_once(&cfg).await.expect("drain");

    // s1 alone is in the audience (s2 bought, s3 withheld marketing).
    let ann = collector_agent::destinations::mailchimp::subscriber_hash("ann@example.com");
    let calls = mailchimp.calls();
    let paths: Vec<(String, String)> = calls
        .iter()
        .map(|c| (c.method.clone(), c.path.clone()))
        .collect();
    assert_eq!(
        paths,
        vec![
            ("PUT".to_string(), format!("/3.0/lists/L1/members/{ann}")),
            (
                "POST".to_string(),
                format!("/3.0/lists/L1/members/{ann}/tags")
            ),
        ]
    );
    let upsert: Value = serde_json::from_str(&calls[0].body).unwrap();
    assert_eq!(upsert["email_address"], "ann@example.com");
    // s2's order reaches the conversions API, hashed; s3's never left the edge (its
    // marketing category was denied, so the edge dropped it).
    let calls = meta.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].path, "/v21.0/P1/events");
    let body: Value = serde_json::from_str(&calls[0].body).unwrap();
    assert_eq!(body["data"][0]["event_id"], "o-s2");
    assert_eq!(body["data"][0]["event_name"], "Purchase");
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b"bo@example.com"))
    };
    assert_eq!(body["data"][0]["user_data"]["em"], json!([sha]));
    assert!(!calls[0].body.contains("bo@example.com"));
    // No address at rest.
    let found = scan_for(
        st.dir.path(),
        &["ann@example.com", "bo@example.com", "cy@example.com"],
    );
    assert!(found.is_empty(), "raw emails at rest: {found:?}");
}
