//! Activation through a webhook destination, against a local server that records what
//! it receives (standing in for the receiver we cannot reach), on a real DuckDB file and
//! a real PostgreSQL server: entries and exits of an audience, events forwarded only
//! where consent allows (checked again at send time), signed calls, retries that
//! deliver once, and a rejected item isolated into a dead letter.

mod common;

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use collector_agent::sinks::Sink;
use collector_agent::{AgentConfig, Drainer};
use common::{load, one, rows, s, Target};
use serde_json::{json, Value};

const SECRET_ENV: &str = "ACTIVATION_TEST_HOOK_SECRET";
const SECRET: &str = "hook-secret";
const T0: i64 = 1_795_000_000_000;
const MIN: i64 = 60_000;

/// A receiver standing in for a destination: records every call (any path); answers
/// with the queued statuses first (0: hangs, then 504), 400 to a body that mentions
/// `poison`, else 200.
#[derive(Clone, Default)]
struct Recorder {
    calls: Arc<Mutex<Vec<Call>>>,
    answers: Arc<Mutex<VecDeque<u16>>>,
}

/// One call as received.
#[derive(Clone, Debug)]
struct Call {
    status: u16,
    method: String,
    path: String,
    body: String,
    /// The webhook signature verified with the shared secret.
    signed: bool,
    authorization: Option<String>,
}

impl Call {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

impl Recorder {
    /// Serves on a free loopback port; the base URL.
    async fn start(&self) -> (String, tokio::task::JoinHandle<()>) {
        use axum::http::{HeaderMap, StatusCode, Uri};
        let rec = self.clone();
        let app = axum::Router::new().fallback(
            move |method: axum::http::Method,
                  uri: Uri,
                  headers: HeaderMap,
                  body: axum::body::Bytes| {
                let rec = rec.clone();
                async move {
                    let h = |n: &str| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string)
                    };
                    let signed = collector_core::sign::verify(
                        SECRET.as_bytes(),
                        "POST",
                        uri.path(),
                        &body,
                        h(collector_core::sign::TIMESTAMP_HEADER).as_deref(),
                        h(collector_core::sign::SIGNATURE_HEADER).as_deref(),
                        collector_agent::now_ms() / 1000,
                    )
                    .is_ok();
                    let text = String::from_utf8_lossy(&body).to_string();
                    let status = rec
                        .answers
                        .lock()
                        .unwrap()
                        .pop_front()
                        .unwrap_or(if text.contains("poison") { 400 } else { 200 });
                    // 0: hang past the sender's timeout, then fail.
                    let status = if status == 0 {
                        tokio::time::sleep(std::time::Duration::from_secs(10)).await;
                        504
                    } else {
                        status
                    };
                    rec.calls.lock().unwrap().push(Call {
                        status,
                        method: method.to_string(),
                        path: uri.path().to_string(),
                        body: text,
                        signed,
                        authorization: h("authorization"),
                    });
                    (StatusCode::from_u16(status).unwrap(), "recorded")
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        (url, task)
    }

    /// The webhook items of the calls answered 200.
    fn delivered(&self) -> Vec<Value> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.status == 200)
            .flat_map(|c| c.json()["items"].as_array().cloned().unwrap_or_default())
            .collect()
    }
}

fn consent(marketing: bool) -> Value {
    if marketing {
        consent_of(&["analytics", "marketing"], &[])
    } else {
        consent_of(&["analytics"], &["marketing"])
    }
}

/// The evidence the edge stamps, with these categories granted and denied.
fn consent_of(granted: &[&str], denied: &[&str]) -> Value {
    let sources: serde_json::Map<String, Value> = granted
        .iter()
        .chain(denied)
        .map(|c| (c.to_string(), json!("explicit")))
        .collect();
    json!({"consent": {"resolved": {"policy_version": "v1", "granted": granted, "denied": denied,
        "sources": sources}}})
}

fn iso(ms: i64) -> String {
    collector_core::timestamp::format_ms(ms)
}

/// `agent.toml` for the target's warehouse with one webhook destination, which
/// `privacy.toml` lets receive what `categories` allow.
fn agent_config(dir: &std::path::Path, t: &Target, url: &str) -> AgentConfig {
    agent_config_for(dir, t, url, &["marketing"])
}

fn agent_config_for(
    dir: &std::path::Path,
    t: &Target,
    url: &str,
    categories: &[&str],
) -> AgentConfig {
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let policy = std::fs::read_to_string(format!("{repo}/privacy.toml")).unwrap()
        + &format!(
            "\n[destinations.crm_hook]\ncategories = {}\n",
            serde_json::to_string(categories).unwrap()
        );
    std::fs::write(dir.join("privacy.toml"), policy).unwrap();
    std::fs::copy(format!("{repo}/audiences.toml"), dir.join("audiences.toml")).unwrap();
    let warehouse = match t {
        Target::DuckDb(d) => format!("path = \"{}\"", d.path().join("w.duckdb").display()),
        Target::Parquet(d) => format!(
            "kind = \"parquet\"\npath = \"{}\"",
            d.path().join("lake").display()
        ),
        Target::Postgres(pg) => format!(
            "kind = \"postgres\"\nurl = \"{}\"\nschema = \"analytics\"",
            pg.url
        ),
        _ => unreachable!("activation runs from duckdb, postgres and parquet"),
    };
    std::env::set_var(SECRET_ENV, SECRET);
    let toml = format!(
        "edge_url = \"http://127.0.0.1:9\"\ndrain_secret = \"s\"\nprivacy = \"privacy.toml\"\naudiences = \"audiences.toml\"
[warehouse]\n{warehouse}
[[destinations]]
name = \"crm_hook\"
kind = \"webhook\"
base_url = \"{url}\"
secret_env = \"{SECRET_ENV}\"
audiences = [\"pricing_no_purchase_7d\"]
events = [\"Order Completed\"]
batch_size = 10
rate_limit = 1000
max_event_age = \"3650d\"
"
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, toml).unwrap();
    let cfg = AgentConfig::load(&path).unwrap();
    cfg.validate().unwrap();
    cfg
}

/// Identity, audiences and activation at `at`, as the agent does after a load.
async fn cycle(drainer: &Drainer, at: i64) -> collector_agent::destinations::sync::SyncStats {
    drainer.resolve_identity().await.unwrap();
    drainer.evaluate_audiences(at).await.unwrap();
    let out = drainer.activate(at).await.unwrap();
    assert_eq!(out.len(), 1);
    out[0].1
}

async fn webhook_delivers_what_consent_allows_once(t: &Target) {
    let dir = tempfile::tempdir().unwrap();
    let rec = Recorder::default();
    let (url, server) = rec.start().await;
    let cfg = agent_config(dir.path(), t, &format!("{url}/hook"));
    let sink: Arc<dyn Sink> = t.open().await;
    let drainer = Drainer::new(cfg, sink.clone()).unwrap();

    load(&*sink, 1, json!([
        // v1 views pricing with marketing consent: enters the audience.
        {"type": "page", "messageId": "v1p", "anonymousId": "v1", "properties": {"path": "/pricing"}, "timestamp": iso(T0), "context": consent(true)},
        // v2 views pricing without it: never a member.
        {"type": "page", "messageId": "v2p", "anonymousId": "v2", "properties": {"path": "/pricing"}, "timestamp": iso(T0), "context": consent(false)},
        // Orders: o1's may be forwarded, o2's may not.
        {"type": "track", "messageId": "o1", "anonymousId": "o1-dev", "userId": "buyer-1", "event": "Order Completed", "properties": {"revenue": 10}, "timestamp": iso(T0), "context": consent(true)},
        {"type": "track", "messageId": "o2", "anonymousId": "o2-dev", "userId": "buyer-2", "event": "Order Completed", "properties": {"revenue": 20}, "timestamp": iso(T0), "context": consent(false)},
    ]))
    .await;
    // A dry run first: what would go, nothing sent, nothing written.
    drainer.resolve_identity().await.unwrap();
    drainer.evaluate_audiences(T0 + MIN).await.unwrap();
    let dry = drainer.dry_run("crm_hook", T0 + MIN).await.unwrap();
    assert_eq!(
        (dry.add.len(), dry.remove.len(), dry.withheld),
        (1, 0, 1),
        "{dry:?}"
    );
    assert_eq!(dry.events, vec!["o1".to_string()]);
    assert!(rec.calls.lock().unwrap().is_empty());
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM activation_outbox")
            .await
            .as_deref(),
        Some("0")
    );
    let st = cycle(&drainer, T0 + MIN).await;
    assert_eq!((st.sent, st.withheld, st.dead), (2, 1, 0), "{st:?}");
    let calls = rec.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "one batch: {calls:?}");
    assert!(calls[0].signed, "the call is signed with the shared secret");
    let items = rec.delivered();
    let v1 = one(
        &*sink,
        "SELECT person_id FROM identities WHERE id_value = 'v1'",
    )
    .await;
    let entry = items.iter().find(|i| i["type"] == "audience").unwrap();
    assert_eq!(entry["action"], "entered");
    assert_eq!(entry["audience"], "pricing_no_purchase_7d");
    assert_eq!(entry["person_id"].as_str(), v1.as_deref());
    let event = items.iter().find(|i| i["type"] == "event").unwrap();
    assert_eq!(event["message_id"], "o1");
    assert_eq!(event["data"]["event"], "Order Completed");
    // The log says what was withheld, and on what consent.
    assert_eq!(
        rows(
            &*sink,
            "SELECT action, key FROM activation_log ORDER BY action, key"
        )
        .await,
        vec![
            vec![
                s("sent"),
                Some(format!(
                    "crm_hook:{}:pricing_no_purchase_7d:entered:{}",
                    v1.clone().unwrap(),
                    iso(T0 + MIN)
                ))
            ],
            vec![s("sent"), s("crm_hook:o1")],
            vec![s("withheld"), s("crm_hook:o2")],
        ]
    );
    let withheld = one(
        &*sink,
        "SELECT CAST(consent AS VARCHAR) FROM activation_log WHERE action = 'withheld'",
    )
    .await
    .unwrap();
    assert!(withheld.contains("\"marketing\""), "{withheld}");

    // Nothing new: nothing sent again.
    let again = cycle(&drainer, T0 + 2 * MIN).await;
    assert_eq!((again.enqueued, again.sent), (0, 0), "{again:?}");

    // v1 withdraws marketing consent: removed from the audience at the destination.
    load(&*sink, 2, json!([
        {"type": "page", "messageId": "v1q", "anonymousId": "v1", "properties": {"path": "/"}, "timestamp": iso(T0 + 3 * MIN), "context": consent(false)},
    ]))
    .await;
    let st = cycle(&drainer, T0 + 4 * MIN).await;
    assert_eq!(st.sent, 1, "{st:?}");
    let exit = rec
        .delivered()
        .into_iter()
        .filter(|i| i["action"] == "exited")
        .collect::<Vec<_>>();
    assert_eq!(exit.len(), 1);
    assert_eq!(exit[0]["person_id"].as_str(), v1.as_deref());
    let st = cycle(&drainer, T0 + 5 * MIN).await;
    assert_eq!((st.enqueued, st.sent), (0, 0), "never added again: {st:?}");

    // The receiver fails twice (500, then 503 with Retry-After-less body), then
    // recovers: the order is delivered exactly once.
    rec.answers.lock().unwrap().extend([500, 503]);
    load(&*sink, 3, json!([
        {"type": "track", "messageId": "o3", "anonymousId": "o1-dev", "userId": "buyer-1", "event": "Order Completed", "timestamp": iso(T0 + 6 * MIN), "context": consent(true)},
    ]))
    .await;
    let st = cycle(&drainer, T0 + 7 * MIN).await;
    assert_eq!((st.sent, st.retried), (0, 1), "{st:?}");
    let st = cycle(&drainer, T0 + 30 * MIN).await;
    assert_eq!((st.sent, st.retried), (0, 1), "{st:?}");
    let st = cycle(&drainer, T0 + 120 * MIN).await;
    assert_eq!((st.sent, st.retried), (1, 0), "{st:?}");
    let keys: Vec<String> = rec
        .delivered()
        .iter()
        .map(|i| i["key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        keys.len(),
        keys.iter().collect::<HashSet<_>>().len(),
        "each item delivered once: {keys:?}"
    );
    assert_eq!(keys.iter().filter(|k| *k == "crm_hook:o3").count(), 1);
    assert_eq!(
        one(
            &*sink,
            "SELECT attempts FROM activation_outbox WHERE key = 'crm_hook:o3'"
        )
        .await
        .as_deref(),
        Some("3")
    );

    // A bad record is refused (400): its batch is split, the good order goes out, the
    // bad one is a dead letter with the answer.
    load(&*sink, 4, json!([
        {"type": "track", "messageId": "o4", "anonymousId": "o1-dev", "userId": "buyer-1", "event": "Order Completed", "timestamp": iso(T0 + 130 * MIN), "context": consent(true)},
        {"type": "track", "messageId": "o5", "anonymousId": "o1-dev", "userId": "buyer-1", "event": "Order Completed", "properties": {"note": "poison"}, "timestamp": iso(T0 + 130 * MIN), "context": consent(true)},
    ]))
    .await;
    let st = cycle(&drainer, T0 + 131 * MIN).await;
    assert_eq!((st.sent, st.dead), (1, 1), "{st:?}");
    assert_eq!(
        rows(&*sink, "SELECT key, status, last_error FROM activation_outbox WHERE key IN ('crm_hook:o4', 'crm_hook:o5') ORDER BY key").await,
        vec![
            vec![s("crm_hook:o4"), s("sent"), None],
            vec![s("crm_hook:o5"), s("dead"), s("crm_hook answered 400 Bad Request: recorded")],
        ]
    );

    // The command line, with no agent running: the dead letter is made pending again,
    // the dry run shows it, and a test call reaches the receiver signed.
    if matches!(t, Target::DuckDb(_) | Target::Parquet(_)) {
        drop(drainer);
        drop(sink);
    }
    let config = dir.path().join("agent.toml");
    let out = cli(&["replay", "--destination", "crm_hook"], &config).await;
    assert!(
        out.contains("crm_hook: 1 dead letters will be sent again"),
        "{out}"
    );
    let out = cli(&["destinations", "dry-run", "crm_hook", "--json"], &config).await;
    let dry: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(dry["events"], json!(["o5"]), "{out}");
    let before = rec.calls.lock().unwrap().len();
    let out = cli(&["destinations", "test", "crm_hook"], &config).await;
    assert!(out.contains("answered 200 OK: recorded"), "{out}");
    let calls = rec.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), before + 1);
    let last = calls.last().unwrap();
    let body = last.json();
    assert!(
        last.signed && body["test"] == json!(true) && body["items"] == json!([]),
        "{body}"
    );
    server.abort();
}

/// Runs the agent's command line (the receiver answers meanwhile); its output.
async fn cli(args: &[&str], config: &std::path::Path) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_collector-agent"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env(SECRET_ENV, SECRET)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

// The destination needs personalization as well as marketing (which the audience
// itself requires): consent is checked again before every attempt, and a member who
// withdraws it is removed though still in the audience.
async fn consent_is_checked_at_every_attempt_and_withdrawal_removes(t: &Target) {
    let dir = tempfile::tempdir().unwrap();
    let rec = Recorder::default();
    let (url, server) = rec.start().await;
    let cfg = agent_config_for(
        dir.path(),
        t,
        &format!("{url}/hook"),
        &["marketing", "personalization"],
    );
    let sink: Arc<dyn Sink> = t.open().await;
    let drainer = Drainer::new(cfg, sink.clone()).unwrap();
    let all = consent_of(&["analytics", "marketing", "personalization"], &[]);
    let less = consent_of(&["analytics", "marketing"], &["personalization"]);
    load(&*sink, 1, json!([
        {"type": "page", "messageId": "p1", "anonymousId": "w1", "properties": {"path": "/pricing"}, "timestamp": iso(T0), "context": all},
        {"type": "page", "messageId": "p2", "anonymousId": "w2", "properties": {"path": "/pricing"}, "timestamp": iso(T0), "context": all},
    ]))
    .await;
    // The first attempt fails; before the retry, w2 withdraws personalization.
    rec.answers.lock().unwrap().push_back(500);
    let st = cycle(&drainer, T0 + MIN).await;
    assert_eq!((st.sent, st.retried), (0, 2), "{st:?}");
    load(&*sink, 2, json!([
        {"type": "page", "messageId": "p2b", "anonymousId": "w2", "properties": {"path": "/about"}, "timestamp": iso(T0 + 2 * MIN), "context": less},
    ]))
    .await;
    let st = cycle(&drainer, T0 + 60 * MIN).await;
    assert_eq!((st.sent, st.withheld), (1, 1), "{st:?}");
    let person = |id: &str| format!("SELECT person_id FROM identities WHERE id_value = '{id}'");
    let w1 = one(&*sink, &person("w1")).await;
    let w2 = one(&*sink, &person("w2")).await;
    let delivered = rec.delivered();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0]["person_id"].as_str(), w1.as_deref());
    // Both are still members (the audience needs only marketing).
    assert_eq!(
        one(
            &*sink,
            "SELECT count(*) FROM audience_membership WHERE exited_at IS NULL"
        )
        .await
        .as_deref(),
        Some("2")
    );
    // w1 withdraws personalization: removed at the destination, still a member.
    load(&*sink, 3, json!([
        {"type": "page", "messageId": "p1b", "anonymousId": "w1", "properties": {"path": "/about"}, "timestamp": iso(T0 + 61 * MIN), "context": less},
    ]))
    .await;
    let st = cycle(&drainer, T0 + 62 * MIN).await;
    assert_eq!(st.sent, 1, "{st:?}");
    let last = rec.delivered().pop().unwrap();
    assert_eq!(
        (last["action"].as_str(), last["person_id"].as_str()),
        (Some("exited"), w1.as_deref())
    );
    assert_ne!(w1, w2);
    // Nothing more, ever, for this stay.
    let st = cycle(&drainer, T0 + 63 * MIN).await;
    assert_eq!((st.enqueued, st.sent), (0, 0), "{st:?}");
    server.abort();
}

crate::per_target!(
    [duckdb, postgres, postgres_pooled, parquet]
    [webhook_delivers_what_consent_allows_once,
    consent_is_checked_at_every_attempt_and_withdrawal_removes,
    cart_abandonment_texts_exactly_the_people_it_may,
    conversions_carry_hashed_contacts_only_where_consent_allows,
    email_platform_members_are_tagged_untagged_and_archived,
    a_merge_continues_a_stay_without_sending_it_again,
    a_destination_that_times_out_then_recovers_gets_each_event_once,]
);

// A destination the privacy policy does not name receives nothing: `config check`
// refuses it (deny by default).
#[test]
fn a_destination_the_policy_does_not_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let t = Target::duckdb();
    let cfg = agent_config(dir.path(), &t, "http://127.0.0.1:9/hook");
    let mut other = cfg.clone();
    other.destinations[0].name = "crm_other".into();
    let err = other.validate().unwrap_err().to_string();
    assert!(
        err.contains("privacy.toml has no [destinations.crm_other]"),
        "{err}"
    );
}

/// `agent.toml` with a Twilio destination for the cart abandoners, and a policy that
/// seals phone numbers to a key made for this test; the config and the public key.
fn sms_config(dir: &std::path::Path, t: &Target, url: &str) -> (AgentConfig, String) {
    // The shipped policy has the sms category and [destinations.cart_sms].
    sealed_config(
        dir,
        t,
        "",
        &format!(
            "name = \"cart_sms\"\nkind = \"twilio\"\nbase_url = \"{url}\"\naccount = \"AC123\"\nsecret_env = \"{SECRET_ENV}\"
from = \"+15005550006\"\nmessage = \"Your cart is waiting ({{audience}})\"\naudiences = [\"cart_abandoners_15m\"]\n"
        ),
    )
}

/// A config whose policy is the shipped one (which seals emails and phones) sealing to a
/// key made for this test, with `policy_extra` appended, and one destination.
fn sealed_config(
    dir: &std::path::Path,
    t: &Target,
    policy_extra: &str,
    destination: &str,
) -> (AgentConfig, String) {
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let (secret, public) =
        collector_core::seal::OpenKey::generate_from(|b| getrandom::getrandom(b).is_ok()).unwrap();
    let shipped = std::fs::read_to_string(format!("{repo}/privacy.toml")).unwrap();
    let line = shipped
        .lines()
        .find(|l| l.starts_with("seal_to = "))
        .unwrap();
    let policy = shipped.replace(line, &format!("seal_to = \"{public}\"")) + policy_extra;
    std::fs::write(dir.join("privacy.toml"), policy).unwrap();
    std::fs::copy(format!("{repo}/audiences.toml"), dir.join("audiences.toml")).unwrap();
    let warehouse = match t {
        Target::DuckDb(d) => format!("path = \"{}\"", d.path().join("w.duckdb").display()),
        Target::Parquet(d) => format!(
            "kind = \"parquet\"\npath = \"{}\"",
            d.path().join("lake").display()
        ),
        Target::Postgres(pg) => format!(
            "kind = \"postgres\"\nurl = \"{}\"\nschema = \"analytics\"",
            pg.url
        ),
        _ => unreachable!("activation runs from duckdb, postgres and parquet"),
    };
    // One variable per test: tests run in parallel, each with its own key.
    let var = format!(
        "ACTIVATION_TEST_SEAL_KEY_{}",
        &public[7..15].replace(['-', '_'], "x")
    );
    std::env::set_var(&var, secret);
    std::env::set_var(SECRET_ENV, SECRET);
    let toml = format!(
        "edge_url = \"http://127.0.0.1:9\"\ndrain_secret = \"s\"\nprivacy = \"privacy.toml\"\naudiences = \"audiences.toml\"
seal_key_env = \"{var}\"
[warehouse]\n{warehouse}
[[destinations]]
{destination}"
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, toml).unwrap();
    let cfg = AgentConfig::load(&path).unwrap();
    cfg.validate().unwrap();
    (cfg, public)
}

/// What the edge stores for a visitor who consents to `granted` and denies `denied`,
/// with their phone number sealed to `public` (the edge's `encrypt` action).
fn sealed_identify(
    id: &str,
    anon: &str,
    phone: &str,
    public: &str,
    at: i64,
    granted: &[&str],
    denied: &[&str],
) -> Value {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).unwrap();
    let sealed = collector_core::seal::SealKey::parse(public)
        .unwrap()
        .seal_with_seed(
            // As the edge does: normalised (E.164), then sealed.
            &collector_core::pii::normalise(collector_core::pii::PiiKind::Phone, phone, "49"),
            seed,
        );
    let mut context = consent_of(granted, denied);
    context["sealed"] = json!({ "traits.phone": sealed });
    json!({"type": "identify", "messageId": id, "anonymousId": anon, "userId": format!("user-{anon}"),
        "traits": {"phone": "hmac:v1:…"}, "timestamp": iso(at), "context": context})
}

/// `value` as the edge seals it: normalised, then sealed to `public`.
fn seal(kind: collector_core::pii::PiiKind, value: &str, public: &str) -> String {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).unwrap();
    collector_core::seal::SealKey::parse(public)
        .unwrap()
        .seal_with_seed(&collector_core::pii::normalise(kind, value, "49"), seed)
}

// The seed's cart-abandonment SMS: a Product Added and no Order Completed within 15
// minutes → exactly one text to that person; a purchase at minute 10 → none; marketing
// withdrawn at minute 5 → none; no SMS consent → none; no phone → none.
async fn cart_abandonment_texts_exactly_the_people_it_may(t: &Target) {
    let dir = tempfile::tempdir().unwrap();
    let rec = Recorder::default();
    let (url, server) = rec.start().await;
    let (cfg, public) = sms_config(dir.path(), t, &url);
    let sink: Arc<dyn Sink> = t.open().await;
    let drainer = Drainer::new(cfg, sink.clone()).unwrap();
    let all = ["analytics", "marketing", "sms"];
    let add = |id: &str, anon: &str, at: i64, granted: &[&str], denied: &[&str]| {
        json!({"type": "track", "messageId": id, "anonymousId": anon, "userId": format!("user-{anon}"),
            "event": "Product Added", "timestamp": iso(at), "context": consent_of(granted, denied)})
    };
    load(&*sink, 1, json!([
        sealed_identify("i1", "c1", "+49 151 1234 5678", &public, T0 - MIN, &all, &[]),
        add("a1", "c1", T0, &all, &[]),
        // c2 buys at minute 10.
        sealed_identify("i2", "c2", "+4915100000002", &public, T0 - MIN, &all, &[]),
        add("a2", "c2", T0, &all, &[]),
        {"type": "track", "messageId": "b2", "anonymousId": "c2", "userId": "user-c2", "event": "Order Completed",
         "timestamp": iso(T0 + 10 * MIN), "context": consent_of(&all, &[])},
        // c3 withdraws marketing at minute 5.
        sealed_identify("i3", "c3", "+4915100000003", &public, T0 - MIN, &all, &[]),
        add("a3", "c3", T0, &all, &[]),
        {"type": "page", "messageId": "w3", "anonymousId": "c3", "userId": "user-c3", "properties": {"path": "/"},
         "timestamp": iso(T0 + 5 * MIN), "context": consent_of(&["analytics", "sms"], &["marketing"])},
        // c4 never agreed to texts; c5 left no number.
        sealed_identify("i4", "c4", "+4915100000004", &public, T0 - MIN, &["analytics", "marketing"], &["sms"]),
        add("a4", "c4", T0, &["analytics", "marketing"], &["sms"]),
        {"type": "identify", "messageId": "i5", "anonymousId": "c5", "userId": "user-c5", "timestamp": iso(T0 - MIN), "context": consent_of(&all, &[])},
        add("a5", "c5", T0, &all, &[]),
    ]))
    .await;
    let early = cycle(&drainer, T0 + 14 * MIN).await;
    assert_eq!(early.sent, 0, "not yet 15 minutes: {early:?}");
    let st = cycle(&drainer, T0 + 16 * MIN).await;
    assert_eq!((st.sent, st.withheld), (1, 2), "{st:?}");
    let calls = rec.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].path, "/2010-04-01/Accounts/AC123/Messages.json");
    let form: std::collections::HashMap<String, String> = calls[0]
        .body
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            let dec = |x: &str| {
                let x = x.replace('+', " ");
                let mut out = Vec::new();
                let b = x.as_bytes();
                let mut i = 0;
                while i < b.len() {
                    if b[i] == b'%' && i + 2 < b.len() + 1 {
                        out.push(u8::from_str_radix(&x[i + 1..i + 3], 16).unwrap());
                        i += 3;
                    } else {
                        out.push(b[i]);
                        i += 1;
                    }
                }
                String::from_utf8(out).unwrap()
            };
            (dec(k), dec(v))
        })
        .collect();
    assert_eq!(
        form["To"], "+4915112345678",
        "the opened, normalised number"
    );
    assert_eq!(form["From"], "+15005550006");
    assert_eq!(form["Body"], "Your cart is waiting (cart_abandoners_15m)");
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("AC123:{SECRET}"));
    assert_eq!(
        calls[0].authorization.as_deref(),
        Some(format!("Basic {basic}").as_str())
    );
    // Why the others got nothing is in the log; no number is written anywhere.
    let log = rows(
        &*sink,
        "SELECT action, detail FROM activation_log ORDER BY action",
    )
    .await;
    assert_eq!(
        log.iter()
            .map(|r| r[0].clone().unwrap())
            .collect::<Vec<_>>(),
        vec!["sent", "unreachable", "withheld"]
    );
    let everything = rows(&*sink, "SELECT CAST(key AS VARCHAR) || COALESCE(detail, '') || COALESCE(CAST(consent AS VARCHAR), '') FROM activation_log").await;
    assert!(!format!("{everything:?}").contains("151"), "{everything:?}");
    // Later passes text no one again.
    let st = cycle(&drainer, T0 + 30 * MIN).await;
    assert_eq!(st.sent, 0, "{st:?}");
    assert_eq!(rec.calls.lock().unwrap().len(), 1);
    server.abort();
}

// Order Completed forwarded to the conversions shape (Meta's Conversions API) only for
// people whose consent allows it, with the SHA-256 of the normalised email computed at
// send time; an event older than Meta's 7 days is singled out as a dead letter and
// does not hold back the rest of its batch.
async fn conversions_carry_hashed_contacts_only_where_consent_allows(t: &Target) {
    use collector_core::pii::PiiKind;
    let dir = tempfile::tempdir().unwrap();
    let rec = Recorder::default();
    let (url, server) = rec.start().await;
    let (cfg, public) = sealed_config(
        dir.path(),
        t,
        "\n[destinations.meta_capi]\ncategories = [\"marketing\"]\n",
        &format!(
            "name = \"meta_capi\"\nkind = \"meta_capi\"\nbase_url = \"{url}/v21.0\"\npixel_id = \"PIXEL1\"
secret_env = \"{SECRET_ENV}\"\nevents = [\"Order Completed\"]\nmax_event_age = \"30d\"\n"
        ),
    );
    let sink: Arc<dyn Sink> = t.open().await;
    let drainer = Drainer::new(cfg, sink.clone()).unwrap();
    // Meta's 7 days are counted on the real clock.
    let now = collector_agent::now_ms();
    let all = ["analytics", "marketing"];
    let identify = |id: &str, user: &str, email: &str, granted: &[&str], denied: &[&str]| {
        let mut context = consent_of(granted, denied);
        context["sealed"] = json!({ "traits.email": seal(PiiKind::Email, email, &public) });
        json!({"type": "identify", "messageId": id, "userId": user, "traits": {"email": format!("hmac:v1:{user}")},
            "timestamp": iso(now - 2 * 3_600_000), "context": context})
    };
    let order = |id: &str, user: &str, at: i64, granted: &[&str], denied: &[&str]| {
        let mut context = consent_of(granted, denied);
        context["page"] = json!({"url": "https://shop.example/checkout"});
        json!({"type": "track", "messageId": id, "userId": user, "event": "Order Completed",
            "properties": {"revenue": 42.5, "currency": "EUR"}, "timestamp": iso(at), "context": context})
    };
    load(
        &*sink,
        1,
        json!([
            identify("i1", "buyer-1", "  Jane.Doe@Example.COM", &all, &[]),
            order("o1", "buyer-1", now - 3_600_000, &all, &[]),
            order("o3", "buyer-1", now - 8 * 86_400_000, &all, &[]),
            identify(
                "i2",
                "buyer-2",
                "max@example.com",
                &["analytics"],
                &["marketing"]
            ),
            order(
                "o2",
                "buyer-2",
                now - 3_600_000,
                &["analytics"],
                &["marketing"]
            ),
        ]),
    )
    .await;
    let st = cycle(&drainer, now).await;
    assert_eq!((st.sent, st.withheld, st.dead), (1, 1, 1), "{st:?}");
    let calls = rec.calls.lock().unwrap().clone();
    assert_eq!(
        calls.len(),
        1,
        "the old event is singled out without a call: {calls:?}"
    );
    assert_eq!(calls[0].path, "/v21.0/PIXEL1/events");
    assert!(
        !calls[0].body.to_lowercase().contains("jane"),
        "only hashes: {}",
        calls[0].body
    );
    let body = calls[0].json();
    assert_eq!(body["access_token"], SECRET);
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    let e = &data[0];
    assert_eq!(e["event_name"], "Purchase");
    assert_eq!(e["event_id"], "o1");
    assert_eq!(e["action_source"], "website");
    // The event's time as stored (the test's edge clock corrects times after receipt).
    let stored = one(
        &*sink,
        "SELECT timestamp FROM tracks WHERE message_id = 'o1'",
    )
    .await
    .unwrap();
    let stored_s = collector_core::timestamp::parse_ms(&stored)
        .unwrap()
        .div_euclid(1000);
    assert_eq!(e["event_time"], json!(stored_s));
    assert_eq!(e["event_source_url"], "https://shop.example/checkout");
    use sha2::Digest;
    let sha = |v: &str| hex::encode(sha2::Sha256::digest(v.as_bytes()));
    assert_eq!(e["user_data"]["em"], json!([sha("jane.doe@example.com")]));
    assert_eq!(e["user_data"]["external_id"], json!([sha("buyer-1")]));
    assert_eq!(e["custom_data"], json!({"value": 42.5, "currency": "EUR"}));
    assert_eq!(
        rows(
            &*sink,
            "SELECT key, status FROM activation_outbox ORDER BY key"
        )
        .await,
        vec![
            vec![s("meta_capi:o1"), s("sent")],
            vec![s("meta_capi:o2"), s("withheld")],
            vec![s("meta_capi:o3"), s("dead")],
        ]
    );
    let reason = one(
        &*sink,
        "SELECT last_error FROM activation_outbox WHERE key = 'meta_capi:o3'",
    )
    .await
    .unwrap();
    assert!(reason.contains("older than the 7 days"), "{reason}");
    server.abort();
}

// pricing_no_purchase_7d members reach the email platform (Mailchimp's shape) as
// tagged list members, keyed by the MD5 of the lower-cased address; a member who buys
// is untagged (the exit diff); one who withdraws consent is archived and never added
// again.
async fn email_platform_members_are_tagged_untagged_and_archived(t: &Target) {
    use collector_core::pii::PiiKind;
    let dir = tempfile::tempdir().unwrap();
    let rec = Recorder::default();
    let (url, server) = rec.start().await;
    let (cfg, public) = sealed_config(
        dir.path(),
        t,
        "\n[destinations.newsletter]\ncategories = [\"marketing\"]\n",
        &format!(
            "name = \"newsletter\"\nkind = \"mailchimp\"\nbase_url = \"{url}/3.0\"\nlist_id = \"L1\"
secret_env = \"{SECRET_ENV}\"\naudiences = [\"pricing_no_purchase_7d\"]\n"
        ),
    );
    let sink: Arc<dyn Sink> = t.open().await;
    let drainer = Drainer::new(cfg, sink.clone()).unwrap();
    let all = ["analytics", "marketing"];
    let visitor = |n: &str, email: &str| {
        let mut context = consent_of(&all, &[]);
        context["sealed"] = json!({ "traits.email": seal(PiiKind::Email, email, &public) });
        json!([
            {"type": "identify", "messageId": format!("i-{n}"), "anonymousId": n, "traits": {"email": format!("hmac:v1:{n}")},
             "timestamp": iso(T0 - MIN), "context": context},
            {"type": "page", "messageId": format!("p-{n}"), "anonymousId": n, "properties": {"path": "/pricing"},
             "timestamp": iso(T0), "context": consent_of(&all, &[])},
        ])
    };
    let mut batch = Vec::new();
    for (n, e) in [
        ("m1", "Ann@Example.com"),
        ("m2", "bob@example.com"),
        ("m3", "cy@example.com"),
    ] {
        batch.extend(visitor(n, e).as_array().unwrap().clone());
    }
    load(&*sink, 1, Value::Array(batch)).await;
    let st = cycle(&drainer, T0 + MIN).await;
    assert_eq!(st.sent, 3, "{st:?}");
    let hash = |e: &str| collector_agent::destinations::mailchimp::subscriber_hash(e);
    let calls = rec.calls.lock().unwrap().clone();
    let ann = format!("/3.0/lists/L1/members/{}", hash("ann@example.com"));
    let upsert = calls
        .iter()
        .find(|c| c.method == "PUT" && c.path == ann)
        .expect("ann upserted");
    assert_eq!(
        upsert.json(),
        json!({"email_address": "ann@example.com", "status_if_new": "subscribed"})
    );
    let tag = calls
        .iter()
        .find(|c| c.method == "POST" && c.path == format!("{ann}/tags"))
        .unwrap();
    assert_eq!(
        tag.json(),
        json!({"tags": [{"name": "pricing_no_purchase_7d", "status": "active"}]})
    );
    assert_eq!(calls.len(), 6, "an upsert and a tag each: {calls:?}");

    // m2 buys: untagged. m3 withdraws marketing: archived.
    load(&*sink, 2, json!([
        {"type": "track", "messageId": "o-m2", "anonymousId": "m2", "event": "Order Completed",
         "timestamp": iso(T0 + 10 * MIN), "context": consent_of(&all, &[])},
        {"type": "page", "messageId": "w-m3", "anonymousId": "m3", "properties": {"path": "/"},
         "timestamp": iso(T0 + 10 * MIN), "context": consent_of(&["analytics"], &["marketing"])},
    ]))
    .await;
    let st = cycle(&drainer, T0 + 11 * MIN).await;
    assert_eq!(st.sent, 2, "{st:?}");
    let calls = rec.calls.lock().unwrap()[6..].to_vec();
    let bob = format!("/3.0/lists/L1/members/{}", hash("bob@example.com"));
    let cy = format!("/3.0/lists/L1/members/{}", hash("cy@example.com"));
    let untag = calls
        .iter()
        .find(|c| c.path == format!("{bob}/tags"))
        .expect("bob untagged");
    assert_eq!(
        untag.json(),
        json!({"tags": [{"name": "pricing_no_purchase_7d", "status": "inactive"}]})
    );
    assert!(
        calls.iter().any(|c| c.method == "DELETE" && c.path == cy),
        "cy archived: {calls:?}"
    );
    assert_eq!(calls.len(), 2, "{calls:?}");
    // Never added again.
    let st = cycle(&drainer, T0 + 12 * MIN).await;
    assert_eq!((st.enqueued, st.sent), (0, 0), "{st:?}");
    server.abort();
}

// An identity merge never sends twice: an anonymous visitor who entered an audience (and
// was sent) then signs in becomes another person_id, whose stay continues without a
// second entry and whose exit is sent once.
async fn a_merge_continues_a_stay_without_sending_it_again(t: &Target) {
    let dir = tempfile::tempdir().unwrap();
    let rec = Recorder::default();
    let (url, server) = rec.start().await;
    let cfg = agent_config(dir.path(), t, &format!("{url}/hook"));
    let sink: Arc<dyn Sink> = t.open().await;
    let drainer = Drainer::new(cfg, sink.clone()).unwrap();
    load(&*sink, 1, json!([
        {"type": "page", "messageId": "p1", "anonymousId": "a1", "properties": {"path": "/pricing"},
         "timestamp": iso(T0), "context": consent(true)},
    ]))
    .await;
    assert_eq!(cycle(&drainer, T0 + MIN).await.sent, 1);
    let anon = one(
        &*sink,
        "SELECT person_id FROM identities WHERE id_value = 'a1'",
    )
    .await;
    // Signs in: the anonymous person merges into the user's.
    load(
        &*sink,
        2,
        json!([
            {"type": "identify", "messageId": "i1", "anonymousId": "a1", "userId": "u1",
             "timestamp": iso(T0 + 2 * MIN), "context": consent(true)},
        ]),
    )
    .await;
    let st = cycle(&drainer, T0 + 3 * MIN).await;
    assert_eq!(st.sent, 0, "the stay continues, nothing sent: {st:?}");
    let user = one(
        &*sink,
        "SELECT person_id FROM identities WHERE id_value = 'u1'",
    )
    .await;
    assert_ne!(anon, user);
    assert_eq!(
        rows(&*sink, "SELECT person_id, transition, status FROM activation_outbox ORDER BY status, transition, person_id").await,
        vec![
            vec![user.clone(), s("entered"), s("continued")],
            vec![anon.clone(), s("exited"), s("continued")],
            vec![anon.clone(), s("entered"), s("sent")],
        ]
    );
    // The user buys: one exit, under the person they are now.
    load(
        &*sink,
        3,
        json!([
            {"type": "track", "messageId": "o1", "userId": "u1", "event": "Order Completed",
             "timestamp": iso(T0 + 4 * MIN), "context": consent(true)},
        ]),
    )
    .await;
    cycle(&drainer, T0 + 5 * MIN).await;
    let items: Vec<(String, String)> = rec
        .delivered()
        .iter()
        .filter(|i| i["type"] == "audience")
        .map(|i| {
            (
                i["action"].as_str().unwrap().to_string(),
                i["person_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        items,
        vec![
            ("entered".to_string(), anon.unwrap()),
            ("exited".to_string(), user.unwrap())
        ]
    );
    server.abort();
}

// A destination that times out for a while, then recovers: each event is delivered
// once (the hung calls are retried with the same keys).
async fn a_destination_that_times_out_then_recovers_gets_each_event_once(t: &Target) {
    let dir = tempfile::tempdir().unwrap();
    let rec = Recorder::default();
    let (url, server) = rec.start().await;
    let mut cfg = agent_config(dir.path(), t, &format!("{url}/hook"));
    // Long enough that a loaded machine answers a healthy call in time.
    cfg.destinations[0].timeout_ms = 2_000;
    let sink: Arc<dyn Sink> = t.open().await;
    let drainer = Drainer::new(cfg, sink.clone()).unwrap();
    rec.answers.lock().unwrap().extend([0, 0]);
    load(&*sink, 1, json!([
        {"type": "track", "messageId": "t1", "userId": "b1", "event": "Order Completed", "timestamp": iso(T0), "context": consent(true)},
        {"type": "track", "messageId": "t2", "userId": "b2", "event": "Order Completed", "timestamp": iso(T0), "context": consent(true)},
    ]))
    .await;
    let st = cycle(&drainer, T0 + MIN).await;
    assert_eq!((st.sent, st.retried), (0, 2), "timed out: {st:?}");
    let st = cycle(&drainer, T0 + 60 * MIN).await;
    assert_eq!((st.sent, st.retried), (0, 2), "timed out again: {st:?}");
    let st = cycle(&drainer, T0 + 180 * MIN).await;
    assert_eq!((st.sent, st.retried), (2, 0), "recovered: {st:?}");
    let keys: Vec<String> = rec
        .delivered()
        .iter()
        .map(|i| i["key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        keys,
        vec!["crm_hook:t1".to_string(), "crm_hook:t2".to_string()]
    );
    assert_eq!(
        one(
            &*sink,
            "SELECT attempts FROM activation_outbox WHERE key = 'crm_hook:t1'"
        )
        .await
        .as_deref(),
        Some("3")
    );
    server.abort();
}
