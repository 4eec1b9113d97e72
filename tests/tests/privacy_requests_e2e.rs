//! Privacy requests end to end, from events posted to the real worker: a person seen
//! on two devices and merged under one user id (three ids) is exported, then erased:
//! no row holding any of their ids is left in any warehouse table (DuckDB, and a real
//! PostgreSQL server), their events still queued at the edge are dropped at drain, new
//! ones are dropped at the edge and counted, the destinations' deletion endpoints are
//! called (a signed webhook `delete`, the email platform's permanent delete, both on
//! local servers standing in for them), and the audit trail is complete. Suppression
//! and its lifting on another person.

mod common;

use std::collections::BTreeSet;

use collector_agent::destinations::DestinationConfig;
use collector_agent::privacy::{cli, Kind, NewRequest};
use collector_agent::{drain_once, AgentConfig};
use collector_e2e::postgres::LocalPostgres;
use collector_e2e::recorder::Recorder;
use common::*;
use serde_json::{json, Value};

const MIN: i64 = 60_000;
const TOKEN_ENV: &str = "PRIVACY_E2E_TOKEN";
const KEY_ENV: &str = "PRIVACY_E2E_SEAL_KEY";
const PII_ENV: &str = "PRIVACY_E2E_PII_KEY";

fn iso(ms: i64) -> String {
    collector_core::timestamp::format_ms(ms)
}

fn dev_seal_key() -> String {
    include_str!("../../examples/dev-seal.key")
        .lines()
        .find(|l| !l.starts_with('#') && !l.trim().is_empty())
        .unwrap()
        .trim()
        .to_string()
}

/// Runs SQL on the warehouse the config names (no agent holds it).
async fn query(cfg: &AgentConfig, sql: &str) -> Vec<Vec<Option<String>>> {
    let sink = collector_agent::sinks::open(&cfg.warehouse).await.unwrap();
    sink.query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .rows
}

async fn count(cfg: &AgentConfig, sql: &str) -> u64 {
    query(cfg, sql).await[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap()
}

/// The agent's config for this scenario: the shipped policy naming the two
/// destinations, their stand-ins, the key that opens sealed emails, the edge's PII key.
fn configure(
    st: &Stack,
    mut cfg: AgentConfig,
    hook: &Recorder,
    mailchimp: &Recorder,
) -> AgentConfig {
    std::env::set_var(KEY_ENV, dev_seal_key());
    std::env::set_var(TOKEN_ENV, "stand-in-secret-0123456789");
    std::env::set_var(PII_ENV, collector_e2e::edge::TEST_PII_KEY);
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let policy = std::fs::read_to_string(format!("{repo}/privacy.toml")).unwrap()
        + "\n[destinations.newsletter]\ncategories = [\"marketing\"]\n\n[destinations.crm_hook]\ncategories = [\"marketing\"]\n";
    let policy_path = st.dir.path().join("privacy.toml");
    std::fs::write(&policy_path, policy).unwrap();
    cfg.privacy = Some(policy_path);
    cfg.audiences = Some(format!("{repo}/audiences.toml").into());
    cfg.seal_key_env = Some(KEY_ENV.into());
    cfg.pii_key_env = Some(PII_ENV.into());
    cfg.destinations = vec![
        toml::from_str::<DestinationConfig>(&format!(
            "name = \"newsletter\"\nkind = \"mailchimp\"\nbase_url = \"{}/3.0\"\nlist_id = \"L1\"\nsecret_env = \"{TOKEN_ENV}\"\naudiences = [\"pricing_no_purchase_7d\"]\n",
            mailchimp.url
        ))
        .unwrap(),
        toml::from_str::<DestinationConfig>(&format!(
            "name = \"crm_hook\"\nkind = \"webhook\"\nbase_url = \"{}/hook\"\nsecret_env = \"{TOKEN_ENV}\"\nevents = [\"Order Completed\"]\n",
            hook.url
        ))
        .unwrap(),
    ];
    cfg.validate().expect("valid config");
    cfg
}

/// Exports a person; the message ids of the events in the document (the six event
/// tables), and the document. The request completed.
async fn exported_message_ids(cfg: &AgentConfig, export: NewRequest) -> (BTreeSet<String>, Value) {
    let (req, doc) = cli::submit(cfg, export, None).await.expect("export");
    assert_eq!(req.status, "completed");
    let doc = doc.expect("a document");
    let mut ids = BTreeSet::new();
    for table in collector_core::EventKind::ALL.map(collector_core::EventKind::table) {
        for row in doc["tables"][table].as_array().into_iter().flatten() {
            ids.insert(row["message_id"].as_str().unwrap().to_string());
        }
    }
    (ids, doc)
}

fn request(kind: Kind) -> NewRequest {
    NewRequest {
        kind: Some(kind),
        ..NewRequest::default()
    }
}

/// The scenario, on the warehouse `cfg` names.
async fn erase_export_and_suppress(st: &Stack, cfg: AgentConfig) {
    let hook = Recorder::start(0).unwrap();
    let mailchimp = Recorder::start(0).unwrap();
    let cfg = configure(st, cfg, &hook, &mailchimp);
    let now = collector_agent::now_ms();
    let yes = json!({"consent": {"categoryPreferences": {"marketing": true}}});
    // Erin: a laptop (dev-erin-a) and a phone (dev-erin-b), both signed in as u-erin.
    // Quinn: another customer, who must be left alone.
    let batch = json!([
        {"type": "page", "messageId": "e-p1", "anonymousId": "dev-erin-a", "properties": {"path": "/pricing"}, "timestamp": iso(now - 50 * MIN), "context": yes},
        {"type": "identify", "messageId": "e-i1", "anonymousId": "dev-erin-a", "userId": "u-erin", "traits": {"email": "Erin@Example.com", "plan": "pro"}, "timestamp": iso(now - 45 * MIN), "context": yes},
        {"type": "page", "messageId": "e-p2", "anonymousId": "dev-erin-b", "properties": {"path": "/"}, "timestamp": iso(now - 40 * MIN), "context": yes},
        {"type": "identify", "messageId": "e-i2", "anonymousId": "dev-erin-b", "userId": "u-erin", "timestamp": iso(now - 35 * MIN), "context": yes},
        {"type": "track", "messageId": "e-o1", "userId": "u-erin", "event": "Order Completed", "properties": {"revenue": 42.5, "currency": "EUR"}, "timestamp": iso(now - 30 * MIN), "context": yes},
        {"type": "identify", "messageId": "q-i1", "anonymousId": "dev-quinn", "userId": "u-quinn", "traits": {"email": "quinn@example.com"}, "timestamp": iso(now - 45 * MIN), "context": yes},
        {"type": "track", "messageId": "q-o1", "userId": "u-quinn", "event": "Order Completed", "properties": {"revenue": 9.5, "currency": "EUR"}, "timestamp": iso(now - 30 * MIN), "context": yes},
    ]);
    let r = st
        .post("/v1/batch", &json!({"batch": batch, "sentAt": iso(now)}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let loaded = drain_once(&cfg).await.expect("drain");
    assert_eq!(loaded.inserted, 7);
    assert_eq!(
        count(&cfg, "SELECT count(DISTINCT person_id) FROM identities WHERE id_value IN ('u-erin', 'dev-erin-a', 'dev-erin-b')").await,
        1,
        "the three ids are one person"
    );
    let email_hash = query(&cfg, "SELECT id_value FROM identities WHERE id_type = 'email' AND person_id = (SELECT person_id FROM identities WHERE id_value = 'u-erin')").await[0][0].clone().unwrap();
    let person = query(
        &cfg,
        "SELECT person_id FROM identities WHERE id_value = 'u-erin'",
    )
    .await[0][0]
        .clone()
        .unwrap();
    // The webhook got both orders (both consented to marketing), in one batch.
    let sent: Value = serde_json::from_str(&hook.calls()[0].body).unwrap();
    assert_eq!(sent["items"].as_array().map(Vec::len), Some(2), "{sent}");

    // Export, by email (matched through the edge's keyed hash): exactly Erin's events.
    let mut export = request(Kind::Export);
    export.emails = vec!["erin@example.com".into()];
    let (ids, doc) = exported_message_ids(&cfg, export).await;
    let erin: BTreeSet<String> = ["e-p1", "e-i1", "e-p2", "e-i2", "e-o1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(ids, erin, "the export holds exactly Erin's events");
    assert_eq!(
        doc["tables"]["order_completed"][0]["revenue"].as_str(),
        Some("42.5"),
        "{}",
        doc["tables"]["order_completed"]
    );
    assert_eq!(doc["tables"]["profiles"].as_array().map(Vec::len), Some(1));
    assert!(!doc.to_string().contains("u-quinn"));

    // Two more of Erin's events are queued at the edge, not yet drained.
    let queued = json!([
        {"type": "page", "messageId": "e-p3", "anonymousId": "dev-erin-b", "properties": {"path": "/cart"}, "timestamp": iso(now - MIN)},
        {"type": "track", "messageId": "e-t3", "userId": "u-erin", "event": "Product Viewed", "timestamp": iso(now - MIN)},
    ]);
    let r = st
        .post("/v1/batch", &json!({"batch": queued, "sentAt": iso(now)}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Erase, by user id, under the DPO's ticket number.
    let mut erase = request(Kind::Erase);
    erase.user_ids = vec!["u-erin".into()];
    erase.id = Some("ticket-4711".into());
    let (req, _) = cli::submit(
        &cfg,
        erase.clone(),
        Some(std::time::Duration::from_secs(60)),
    )
    .await
    .expect("erase");
    assert_eq!(req.status, "completed", "{}", req.render());
    assert_eq!(req.id, "ticket-4711");
    assert!(req.requested_by.starts_with("cli:"), "{}", req.requested_by);
    assert!(req.completed_at.is_some());
    let store = |name: &str| {
        req.stores
            .iter()
            .find(|s| s.store == name)
            .unwrap_or_else(|| panic!("no store {name}: {}", req.render()))
            .clone()
    };
    for (name, before) in [
        ("tracks", 1),
        ("pages", 2),
        ("identifies", 2),
        ("order_completed", 1),
        ("identities", 4),
        ("profiles", 1),
        ("users", 1),
        ("activation_log", 1),
    ] {
        let s = store(name);
        assert_eq!(
            (s.status.as_str(), s.before, s.after),
            ("done", Some(before), Some(0)),
            "{name}: {}",
            req.render()
        );
    }
    // Where each of their `users` values came from goes with them, and what each pair
    // of their ids did (what their profile was computed from).
    for name in ["collector_user_traits", "collector_id_activity"] {
        let keys = store(name);
        assert!(
            keys.status == "done" && keys.before.is_some_and(|n| n > 0) && keys.after == Some(0),
            "{name}: {}",
            req.render()
        );
    }
    assert_eq!(store("edge").status, "done");
    assert_eq!(
        store("destination:crm_hook").status,
        "done",
        "{}",
        req.render()
    );
    assert_eq!(
        store("destination:newsletter").status,
        "done",
        "{}",
        req.render()
    );

    // The destinations were asked to delete Erin: the webhook by a signed delete naming
    // all her ids, the email platform by the member hash of her address.
    let deletes: Vec<_> = hook
        .calls()
        .into_iter()
        .filter(|c| c.body.contains("\"delete\""))
        .collect();
    assert_eq!(deletes.len(), 1, "{:?}", hook.calls());
    let body: Value = serde_json::from_str(&deletes[0].body).unwrap();
    assert_eq!(body["type"], "delete");
    assert_eq!(body["request_id"], "ticket-4711");
    assert_eq!(body["user_ids"], json!(["u-erin"]));
    assert_eq!(body["anonymous_ids"], json!(["dev-erin-a", "dev-erin-b"]));
    let ts: i64 = deletes[0]
        .header("x-collector-timestamp")
        .unwrap()
        .parse()
        .unwrap();
    let sig = collector_core::sign::sign(
        b"stand-in-secret-0123456789",
        "POST",
        "/hook",
        ts,
        deletes[0].body.as_bytes(),
    );
    assert_eq!(
        deletes[0].header("x-collector-signature"),
        Some(sig.as_str())
    );
    let member = collector_agent::destinations::mailchimp::subscriber_hash("erin@example.com");
    let calls = mailchimp.calls();
    assert!(
        calls.iter().any(|c| c.method == "POST"
            && c.path == format!("/3.0/lists/L1/members/{member}/actions/delete-permanent")),
        "{calls:?}"
    );

    // Submitting the same request again returns it, and does not run it again.
    let (again, _) = cli::submit(&cfg, erase, Some(std::time::Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!((again.id.as_str(), again.runs), ("ticket-4711", req.runs));

    // A new event from her laptop is dropped at the edge and counted.
    let r = st
        .post("/v1/page", &json!({"anonymousId": "dev-erin-a", "messageId": "e-p4", "properties": {"path": "/again"}}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(st.edge_stats().await["drops"]["suppressed"], 1);
    // The queued ones are dropped at drain; the edge's queue is empty after it.
    let after = drain_once(&cfg).await.expect("drain");
    assert_eq!((after.suppressed, after.inserted), (2, 0), "{after:?}");
    let stats = st.edge_stats().await;
    for shard in stats["shards"].as_array().unwrap() {
        assert_eq!(
            (
                shard["open_events"].as_u64(),
                shard["sealed_batches"].as_u64()
            ),
            (Some(0), Some(0)),
            "{stats}"
        );
    }
    // The edge keeps digests, not her ids.
    let digests = collector_agent::edge::EdgeClient::new(&cfg)
        .unwrap()
        .suppressions()
        .await
        .unwrap();
    assert_eq!(digests.len(), 3);
    assert!(digests.iter().all(|d| !d.contains("erin")));

    // Not one row in any table holds any of her ids (the audit trail's own tables name
    // the request's subject, as they must).
    let tables = query(&cfg, "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' AND table_name NOT LIKE 'privacy_request%' ORDER BY 1").await;
    assert!(tables.len() > 20, "{tables:?}");
    let needles = [
        "u-erin",
        "dev-erin-a",
        "dev-erin-b",
        email_hash.as_str(),
        person.as_str(),
        "e-p1",
        "e-o1",
    ];
    for t in &tables {
        let t = t[0].clone().unwrap();
        let cond: Vec<String> = needles
            .iter()
            .map(|n| format!("strpos(CAST(x AS TEXT), '{n}') > 0"))
            .collect();
        let n = count(
            &cfg,
            &format!(
                "SELECT count(*) FROM \"{t}\" AS x WHERE {}",
                cond.join(" OR ")
            ),
        )
        .await;
        assert_eq!(n, 0, "{t} still holds rows of hers");
    }
    // Quinn is untouched; the activation log keeps a tombstone of Erin's send.
    assert_eq!(
        count(
            &cfg,
            "SELECT count(*) FROM tracks WHERE user_id = 'u-quinn'"
        )
        .await,
        1
    );
    assert_eq!(count(&cfg, "SELECT count(*) FROM profiles").await, 1);
    assert_eq!(count(&cfg, "SELECT count(*) FROM activation_log WHERE key = 'erased' AND person_id IS NULL AND action = 'sent'").await, 1);

    // The audit trail, as `privacy request status` shows it.
    let trail = cli::status(&cfg, "ticket-4711").await.unwrap();
    assert_eq!(trail.status, "completed");
    assert!(trail.runs >= 2, "a later run confirmed nothing came back");
    assert!(
        trail.resolved.is_empty(),
        "the ids it resolved are not kept once done"
    );
    let text = trail.render();
    for part in [
        "received",
        "completed",
        "destination:newsletter",
        "order_completed",
    ] {
        assert!(text.contains(part), "{text}");
    }

    // Suppress Quinn: the edge drops his new events; lift it: they are stored again.
    let mut suppress = request(Kind::Suppress);
    suppress.user_ids = vec!["u-quinn".into()];
    let (r, _) = cli::submit(&cfg, suppress, Some(std::time::Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(r.status, "completed", "{}", r.render());
    let r = st
        .post(
            "/v1/track",
            &json!({"userId": "u-quinn", "event": "Viewed", "messageId": "q-t2"}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(st.edge_stats().await["drops"]["suppressed"], 2);
    let mut lift = request(Kind::Unsuppress);
    lift.user_ids = vec!["u-quinn".into()];
    let (r, _) = cli::submit(&cfg, lift, Some(std::time::Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(r.status, "completed", "{}", r.render());
    let r = st
        .post(
            "/v1/track",
            &json!({"userId": "u-quinn", "event": "Viewed", "messageId": "q-t3"}),
        )
        .await;
    assert_eq!(r.status, 200);
    drain_once(&cfg).await.expect("drain");
    assert_eq!(
        count(
            &cfg,
            "SELECT count(*) FROM tracks WHERE message_id IN ('q-t2', 'q-t3')"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &cfg,
            "SELECT count(*) FROM tracks WHERE message_id = 'q-t3'"
        )
        .await,
        1
    );
    let list = cli::list(&cfg).await.unwrap();
    assert_eq!(list.len(), 4, "export, erase, suppress, unsuppress");
}

#[tokio::test]
async fn erasure_export_and_suppression_in_duckdb() {
    let st = Stack::start();
    let cfg = st.agent_config();
    erase_export_and_suppress(&st, cfg).await;
}

#[tokio::test]
async fn erasure_export_and_suppression_in_postgres() {
    let st = Stack::start();
    let pg = LocalPostgres::start().unwrap();
    let cfg = st.pg_config(&pg);
    erase_export_and_suppress(&st, cfg).await;
}

/// A signed call to the running agent's privacy API as the `[[admin_keys]]` key
/// `name` would make it.
async fn signed_call(
    http: &reqwest::Client,
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
    name: &str,
    secret: &str,
) -> (u16, Value) {
    let ts = now_s();
    let sig = collector_core::sign::sign(secret.as_bytes(), method, path, ts, body.as_bytes());
    let resp = http
        .request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            format!("http://{addr}{path}"),
        )
        .header("X-Collector-Key", name)
        .header(collector_core::sign::TIMESTAMP_HEADER, ts.to_string())
        .header(collector_core::sign::SIGNATURE_HEADER, sig)
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

// The signed API on the running agent's admin address: a DPO portal's key files an
// erasure, the loop carries it out between drains, the trail names the key, and the
// CLI reads it through the agent. Bad signatures and bad requests get clear errors.
#[tokio::test]
async fn the_running_agent_takes_signed_requests_from_named_keys() {
    let st = Stack::start();
    let now = collector_agent::now_ms();
    let batch = json!([
        {"type": "identify", "messageId": "r-i1", "anonymousId": "dev-rae", "userId": "u-rae", "timestamp": iso(now - MIN)},
        {"type": "page", "messageId": "r-p1", "anonymousId": "dev-rae", "properties": {"path": "/"}, "timestamp": iso(now - MIN)},
        {"type": "page", "messageId": "s-p1", "anonymousId": "dev-sam", "properties": {"path": "/"}, "timestamp": iso(now - MIN)},
    ]);
    assert_eq!(
        st.post("/v1/batch", &json!({"batch": batch})).await.status,
        200
    );
    let config = st.dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "edge_url = \"{}\"\ndrain_secret = \"{SECRET}\"\npoll_interval_ms = 100\nadmin_addr = \"127.0.0.1:0\"\n\n[warehouse]\npath = \"{}\"\n\n[[admin_keys]]\nname = \"dpo-portal\"\nsecret_env = \"PRIVACY_E2E_ADMIN_KEY\"\n",
            st.edge.url,
            st.warehouse().display()
        ),
    )
    .unwrap();
    let secret = "dpo-portal-secret-0123456789";
    let (mut agent, addr) = st
        .run_agent(&config, &[("PRIVACY_E2E_ADMIN_KEY", secret)])
        .await;
    let http = reqwest::Client::new();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(agent_binary())
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    // Wait until Rae's events are loaded (through the agent: it holds the file).
    for _ in 0..100 {
        let (_, out) = cli(&["sql", "--csv", "SELECT count(*) FROM pages"]);
        if out.lines().any(|l| l.trim() == "2") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    let body = json!({"kind": "erase", "user_ids": ["u-rae"], "id": "dsar-7"}).to_string();
    // A wrong secret, an unknown key, no signature: 401, named.
    let (status, err) = signed_call(
        &http,
        &addr,
        "POST",
        "/privacy/requests",
        &body,
        "dpo-portal",
        "not-the-secret-0123456789",
    )
    .await;
    assert_eq!(status, 401, "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("dpo-portal"),
        "{err}"
    );
    let (status, err) = signed_call(
        &http,
        &addr,
        "POST",
        "/privacy/requests",
        &body,
        "someone",
        secret,
    )
    .await;
    assert_eq!(status, 401, "{err}");
    let r = http
        .post(format!("http://{addr}/privacy/requests"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // A request that names no one, or no kind: 400, saying what is missing.
    let (status, err) = signed_call(
        &http,
        &addr,
        "POST",
        "/privacy/requests",
        r#"{"kind":"erase"}"#,
        "dpo-portal",
        secret,
    )
    .await;
    assert_eq!(status, 400, "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("name the person"),
        "{err}"
    );
    let (status, err) = signed_call(
        &http,
        &addr,
        "POST",
        "/privacy/requests",
        r#"{"kind":"forget"}"#,
        "dpo-portal",
        secret,
    )
    .await;
    assert_eq!(status, 400, "{err}");

    let (status, accepted) = signed_call(
        &http,
        &addr,
        "POST",
        "/privacy/requests",
        &body,
        "dpo-portal",
        secret,
    )
    .await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["request"]["requested_by"], "dpo-portal");
    let mut done = Value::Null;
    for _ in 0..150 {
        let (status, r) = signed_call(
            &http,
            &addr,
            "GET",
            "/privacy/requests/dsar-7",
            "",
            "dpo-portal",
            secret,
        )
        .await;
        assert_eq!(status, 200, "{r}");
        if r["request"]["status"] == "completed" {
            done = r;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        done["request"]["status"], "completed",
        "the loop carried it out"
    );
    let (ok, out) = cli(&["privacy", "request", "status", "dsar-7"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("completed") && out.contains("dpo-portal") && out.contains("pages"),
        "{out}"
    );
    let (ok, out) = cli(&[
        "sql",
        "--csv",
        "SELECT count(*) FROM pages WHERE anonymous_id = 'dev-rae'",
    ]);
    // The CSV's value line (a table's "(1 row)" would match any digit test).
    assert!(ok && out.lines().any(|l| l.trim() == "0"), "{out}");
    let (ok, out) = cli(&[
        "sql",
        "--csv",
        "SELECT count(*) FROM pages WHERE anonymous_id = 'dev-sam'",
    ]);
    assert!(ok && out.lines().any(|l| l.trim() == "1"), "{out}");
    let (status, missing) = signed_call(
        &http,
        &addr,
        "GET",
        "/privacy/requests/nope",
        "",
        "dpo-portal",
        secret,
    )
    .await;
    assert_eq!(status, 404, "{missing}");

    assert!(agent.terminate(), "the agent stops on SIGTERM");
}

// The Parquet lake: the person is resolved through the identity graph its state file
// keeps (built from the files by the drain's identity run); their rows are removed by
// rewriting each file that holds some, the registry forgets their message ids, the
// graph and the profile go, and no file of the lake holds their ids after.
#[tokio::test]
async fn erasure_and_export_in_the_parquet_lake() {
    let st = Stack::start();
    let mut cfg = st.agent_config();
    let lake = st.dir.path().join("lake");
    cfg.warehouse = collector_agent::config::WarehouseConfig::Parquet(
        collector_agent::config::ParquetConfig::at(lake.clone()),
    );
    cfg.validate().expect("valid config");
    let now = collector_agent::now_ms();
    let batch = json!([
        {"type": "page", "messageId": "e-p1", "anonymousId": "dev-erin-a", "properties": {"path": "/pricing"}, "timestamp": iso(now - 50 * MIN)},
        {"type": "identify", "messageId": "e-i1", "anonymousId": "dev-erin-a", "userId": "u-erin", "traits": {"plan": "pro"}, "timestamp": iso(now - 45 * MIN)},
        {"type": "identify", "messageId": "e-i2", "anonymousId": "dev-erin-b", "userId": "u-erin", "timestamp": iso(now - 35 * MIN)},
        {"type": "track", "messageId": "e-o1", "userId": "u-erin", "event": "Order Completed", "properties": {"revenue": 42.5}, "timestamp": iso(now - 30 * MIN)},
        {"type": "page", "messageId": "q-p1", "anonymousId": "dev-quinn", "userId": "u-quinn", "properties": {"path": "/"}, "timestamp": iso(now - 30 * MIN)},
        {"type": "track", "messageId": "q-o1", "userId": "u-quinn", "event": "Order Completed", "properties": {"revenue": 9.5}, "timestamp": iso(now - 30 * MIN)},
    ]);
    assert_eq!(
        st.post("/v1/batch", &json!({"batch": batch, "sentAt": iso(now)}))
            .await
            .status,
        200
    );
    assert_eq!(drain_once(&cfg).await.expect("drain").inserted, 6);

    let mut export = request(Kind::Export);
    export.user_ids = vec!["u-erin".into()];
    let (ids, doc) = exported_message_ids(&cfg, export).await;
    let erin: BTreeSet<String> = ["e-p1", "e-i1", "e-i2", "e-o1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(ids, erin, "{doc}");

    let queued = json!([{"type": "page", "messageId": "e-p3", "anonymousId": "dev-erin-b", "properties": {"path": "/cart"}}]);
    assert_eq!(
        st.post("/v1/batch", &json!({"batch": queued})).await.status,
        200
    );
    let mut erase = request(Kind::Erase);
    erase.user_ids = vec!["u-erin".into()];
    let (req, _) = cli::submit(&cfg, erase, Some(std::time::Duration::from_secs(60)))
        .await
        .expect("erase");
    assert_eq!(req.status, "completed", "{}", req.render());
    let store = |name: &str| {
        req.stores
            .iter()
            .find(|s| s.store == name)
            .unwrap_or_else(|| panic!("{name}: {}", req.render()))
            .clone()
    };
    for (name, before) in [
        ("tracks", 1),
        ("pages", 1),
        ("identifies", 2),
        ("order_completed", 1),
        ("message_ids", 4),
        ("identities", 3),
        ("profiles", 1),
        // A table of the lake's state file, as in a DuckDB warehouse.
        ("users", 1),
        ("collector_user_traits", 1),
        // Her pairs of ids: (dev-erin-a, none), (dev-erin-a, u-erin),
        // (dev-erin-b, u-erin), (none, u-erin).
        ("collector_id_activity", 4),
    ] {
        let s = store(name);
        assert_eq!(
            (s.before, s.after),
            (Some(before), Some(0)),
            "{name}: {}",
            req.render()
        );
    }
    // Quinn's person stays.
    assert_eq!(
        count(
            &cfg,
            "SELECT count(*) FROM identities WHERE id_value IN ('u-quinn', 'dev-quinn')"
        )
        .await,
        2
    );
    let after = drain_once(&cfg).await.expect("drain");
    assert_eq!((after.suppressed, after.inserted), (1, 0), "{after:?}");
    assert_eq!(
        count(
            &cfg,
            "SELECT count(*) FROM tracks WHERE user_id = 'u-quinn'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&cfg, "SELECT count(*) FROM pages WHERE user_id = 'u-quinn'").await,
        1
    );
    assert_eq!(count(&cfg, "SELECT count(*) FROM order_completed").await, 1);
    // No Parquet file holds her ids any more (the ones that did were rewritten).
    let mut files = Vec::new();
    let mut dirs = vec![lake.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                if e.file_name() != "_collector" {
                    dirs.push(e.path());
                }
            } else if e.path().extension().is_some_and(|x| x == "parquet") {
                files.push(std::fs::read(e.path()).unwrap());
            }
        }
    }
    assert!(files.len() >= 3, "the lake has files");
    for needle in ["u-erin", "dev-erin-a", "dev-erin-b", "e-o1"] {
        assert!(
            !files
                .iter()
                .any(|f| f.windows(needle.len()).any(|w| w == needle.as_bytes())),
            "{needle} is still in a file"
        );
    }
}

// ClickHouse: the ledger as versioned rows, the person resolved through the identity
// graph ClickHouse keeps, their rows deleted by mutations on the tables behind the
// views (every version of each row), which the agent waits for.
#[tokio::test]
async fn erasure_and_export_in_clickhouse() {
    erasure_and_export_in(collector_e2e::clickhouse::LocalClickHouse::start().unwrap()).await;
}

// The same on the current ClickHouse engine (chDB), where Debian's server is 18.16.
#[tokio::test]
async fn erasure_and_export_in_current_clickhouse() {
    erasure_and_export_in(collector_e2e::clickhouse::LocalClickHouse::start_current().unwrap())
        .await;
}

async fn erasure_and_export_in(ch: collector_e2e::clickhouse::LocalClickHouse) {
    let st = Stack::start();
    let mut cfg = st.agent_config();
    cfg.warehouse = collector_agent::config::WarehouseConfig::ClickHouse(
        collector_agent::config::ClickHouseConfig {
            timeout_ms: 10_000,
            ..collector_agent::config::ClickHouseConfig::at(&ch.url)
        },
    );
    cfg.validate().expect("valid config");
    let now = collector_agent::now_ms();
    // Her ids hold quotes and backslashes (ids are whatever a client sends), which
    // ClickHouse reads as escapes in a literal: the graph, the erasure's search of the
    // events and its mutations must take them as they are.
    let (erin, device_b) = ("u-o'erin\\", "dev-\"erin\"-b\\'");
    let batch = json!([
        {"type": "page", "messageId": "e-p1", "anonymousId": "dev-erin-a", "properties": {"path": "/pricing"}, "timestamp": iso(now - 50 * MIN)},
        {"type": "identify", "messageId": "e-i1", "anonymousId": "dev-erin-a", "userId": erin, "traits": {"plan": "pro"}, "timestamp": iso(now - 45 * MIN)},
        {"type": "identify", "messageId": "e-i2", "anonymousId": device_b, "userId": erin, "timestamp": iso(now - 35 * MIN)},
        {"type": "track", "messageId": "e-o1", "userId": erin, "event": "Order Completed", "properties": {"revenue": 42.5}, "timestamp": iso(now - 30 * MIN)},
        {"type": "identify", "messageId": "q-i1", "anonymousId": "dev-quinn", "userId": "u-quinn", "timestamp": iso(now - 30 * MIN)},
        {"type": "track", "messageId": "q-o1", "userId": "u-quinn", "event": "Order Completed", "properties": {"revenue": 9.5}, "timestamp": iso(now - 30 * MIN)},
    ]);
    assert_eq!(
        st.post("/v1/batch", &json!({"batch": batch, "sentAt": iso(now)}))
            .await
            .status,
        200
    );
    assert_eq!(drain_once(&cfg).await.expect("drain").inserted, 6);

    let mut export = request(Kind::Export);
    export.anonymous_ids = vec![device_b.into()];
    let (ids, doc) = exported_message_ids(&cfg, export).await;
    let erin: BTreeSet<String> = ["e-p1", "e-i1", "e-i2", "e-o1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(ids, erin, "the graph joins her three ids: {doc}");

    let mut erase = request(Kind::Erase);
    erase.anonymous_ids = vec![device_b.into()];
    erase.id = Some("ch-1".into());
    let (req, _) = cli::submit(&cfg, erase, Some(std::time::Duration::from_secs(120)))
        .await
        .expect("erase");
    assert_eq!(req.status, "completed", "{}", req.render());
    let store = |name: &str| {
        req.stores
            .iter()
            .find(|s| s.store == name)
            .unwrap_or_else(|| panic!("{name}: {}", req.render()))
            .clone()
    };
    for (name, before) in [
        ("tracks", 1),
        ("pages", 1),
        ("identifies", 2),
        ("order_completed", 1),
        ("identities", 3),
        ("profiles", 1),
        ("users", 1),
        ("message_ids", 4),
    ] {
        let s = store(name);
        assert_eq!(
            (s.status.as_str(), s.before, s.after),
            ("done", Some(before), Some(0)),
            "{name}: {}",
            req.render()
        );
    }
    // `erin` is in each of her ids, however ClickHouse renders them.
    let needles = ["erin", "e-o1", "e-p1"];
    for table in [
        "tracks",
        "pages",
        "identifies",
        "order_completed",
        "users",
        "identities",
        "identity_edges",
        "identity_merges",
        "profiles",
        "message_ids",
    ] {
        let cond: Vec<String> = needles
            .iter()
            .map(|n| format!("position(toString(tuple(*)), '{n}') > 0"))
            .collect();
        let n = count(
            &cfg,
            &format!("SELECT count() FROM {table} WHERE {}", cond.join(" OR ")),
        )
        .await;
        assert_eq!(n, 0, "{table} still holds rows of hers");
    }
    assert_eq!(
        count(&cfg, "SELECT count() FROM tracks WHERE user_id = 'u-quinn'").await,
        1
    );
    assert_eq!(count(&cfg, "SELECT count() FROM profiles").await, 1);
    let trail = cli::status(&cfg, "ch-1").await.unwrap();
    assert_eq!(trail.status, "completed");
    assert!(trail.resolved.is_empty());
}
