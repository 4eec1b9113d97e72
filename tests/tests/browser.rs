//! The browser SDK in real headless Chromium (Debian's, driven by playwright-core):
//! pages on a loopback server embed the built snippet, which loads the SDK from the
//! worker itself (a static asset of the real runtime under `wrangler dev`); the agent
//! drains into a real DuckDB file, where every assertion looks.

mod common;

use std::time::{Duration, Instant};

use collector_e2e::browser::Browser;
use collector_e2e::pages::{sdk_page_vars, PageServer};
use collector_e2e::Toolchain;
use common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
/// The persisted retry queue in localStorage, as the page sees it.
const STORED_QUEUE: &str = "JSON.parse(localStorage.getItem('ec_queue:dev-write-key') || '[]')";

struct Site {
    // Field order is drop order: the browser, then the page server, then the edge.
    browser: Browser,
    pages: PageServer,
    st: Stack,
}

impl Site {
    fn start() -> Site {
        Site::serving("tests/browser/pages")
    }

    /// Serves the pages below `dir` (relative to the repository).
    fn serving(dir: &str) -> Site {
        let st = Stack::start();
        let tools = Toolchain::discover();
        let pages = PageServer::start(
            &tools.root.join(dir),
            0,
            sdk_page_vars(&tools.root, &st.edge.url, WRITE_KEY).expect("built snippet"),
        )
        .expect("page server");
        let browser = Browser::launch(&st.dir.path().join("browser.log")).expect("chromium starts");
        Site { browser, pages, st }
    }

    fn url(&self, page: &str) -> String {
        format!("{}/{page}", self.pages.url)
    }

    /// Opens `page` as a new visitor and waits for the SDK to load.
    fn visit(&mut self, page: &str, init_script: Option<&str>) {
        self.browser.open(init_script).unwrap();
        let url = self.url(page);
        self.browser.goto(&url).unwrap();
        self.sdk_loaded();
    }

    fn sdk_loaded(&mut self) {
        self.browser
            .wait_for("window.analytics && window.analytics.loaded === true", WAIT)
            .expect("the SDK loads from the worker");
    }

    fn eval(&mut self, js: &str) -> Value {
        self.browser.eval(js).unwrap()
    }

    /// Waits until the SDK has handed at least `n` events to the edge.
    fn wait_sent(&mut self, n: u64) {
        let js = format!("analytics.stats().sent >= {n}");
        if let Err(e) = self.browser.wait_for(&js, WAIT) {
            let stats = self.browser.eval("analytics.stats()").ok();
            panic!("{n} events were not sent: {e}\nstats: {stats:?}");
        }
    }

    /// Drains into DuckDB until `sql` (a count) reaches `want`, or fails after 30 s.
    async fn drain_until(&self, sql: &str, want: u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            self.st.drain().await;
            let got: u64 = self.st.query(sql)[0][0]
                .as_deref()
                .unwrap()
                .parse()
                .unwrap();
            if got == want {
                return;
            }
            assert!(got < want, "{sql}: {got} rows, expected {want}");
            assert!(
                Instant::now() < deadline,
                "{sql}: {got} rows after 30 s, expected {want}\n{}",
                self.browser.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

fn row(site: &Site, sql: &str) -> Vec<Option<String>> {
    let rows = site.st.query(sql);
    assert_eq!(rows.len(), 1, "{sql}: {rows:?}");
    rows.into_iter().next().unwrap()
}

#[tokio::test]
async fn snippet_calls_made_before_the_sdk_loads_are_replayed_in_order_and_land() {
    let mut site = Site::start();
    site.visit("replay.html", None);
    assert_eq!(
        site.eval("window.stubWasArray"),
        Value::Bool(true),
        "the calls went to the snippet's stub"
    );
    site.wait_sent(4);
    let anon = site.eval("analytics.user().anonymousId()");
    site.drain_until(
        "SELECT (SELECT count(*) FROM tracks) + (SELECT count(*) FROM identifies) + (SELECT count(*) FROM pages)",
        4,
    )
    .await;
    // In call order (the client's own timestamps), with the user id from the moment
    // identify was called.
    let rows = site.st.query(
        "SELECT kind, name, user_id, anonymous_id FROM (
           SELECT 'track' AS kind, event_text AS name, user_id, anonymous_id, original_timestamp FROM tracks
           UNION ALL SELECT 'identify', NULL, user_id, anonymous_id, original_timestamp FROM identifies
           UNION ALL SELECT 'page', name, user_id, anonymous_id, original_timestamp FROM pages)
         ORDER BY original_timestamp",
    );
    let anon = anon.as_str().map(str::to_string);
    assert_eq!(
        rows,
        vec![
            vec![s("track"), s("Before Load A"), None, anon.clone()],
            vec![s("identify"), None, s("user-replay"), anon.clone()],
            vec![
                s("track"),
                s("Before Load B"),
                s("user-replay"),
                anon.clone()
            ],
            vec![s("page"), s("Home"), s("user-replay"), anon.clone()],
        ]
    );
    let page = row(
        &site,
        "SELECT category, properties->>'path', context->'page'->>'title', context->'library'->>'name' FROM pages",
    );
    assert_eq!(
        page,
        vec![
            s("Docs"),
            s("/replay.html"),
            s("Replay test"),
            s("edge-collector.js")
        ]
    );
}

#[tokio::test]
async fn identify_then_track_carries_the_user_id_and_a_reload_keeps_the_anonymous_id() {
    let mut site = Site::start();
    site.visit("app.html", None);
    site.eval("analytics.track('First Visit'), analytics.identify('user-42', { plan: 'pro' }), analytics.track('After Identify')");
    site.wait_sent(3);
    let anon = site.eval("analytics.user().anonymousId()");
    let anon = anon.as_str().unwrap().to_string();
    // analytics.js's cookie, so sites that migrate keep their visitors.
    let cookie = site.eval("document.cookie");
    assert!(
        cookie
            .as_str()
            .unwrap()
            .contains(&format!("ajs_anonymous_id={anon}")),
        "{cookie}"
    );
    site.browser.reload().unwrap();
    site.sdk_loaded();
    assert_eq!(
        site.eval("analytics.user().anonymousId()"),
        Value::String(anon.clone())
    );
    assert_eq!(
        site.eval("analytics.user().id()"),
        Value::String("user-42".into())
    );
    site.eval("analytics.track('After Reload')");
    site.wait_sent(1);
    site.drain_until("SELECT count(*) FROM tracks", 3).await;
    let rows = site
        .st
        .query("SELECT event_text, user_id, anonymous_id FROM tracks ORDER BY original_timestamp");
    assert_eq!(
        rows,
        vec![
            vec![s("First Visit"), None, Some(anon.clone())],
            vec![s("After Identify"), s("user-42"), Some(anon.clone())],
            vec![s("After Reload"), s("user-42"), Some(anon.clone())],
        ]
    );
    let traits = row(&site, "SELECT user_id, traits->>'plan' FROM identifies");
    assert_eq!(traits, vec![s("user-42"), s("pro")]);
}

#[tokio::test]
async fn events_tracked_while_the_worker_is_down_are_persisted_and_delivered_exactly_once() {
    let mut site = Site::start();
    site.visit("app.html?flushAt=1&backoffCap=2000", None);
    site.eval("analytics.track('Online Before')");
    site.wait_sent(1);

    site.st.edge.stop();
    site.eval(
        "analytics.track('Offline 1'), analytics.track('Offline 2'), analytics.track('Offline 3')",
    );
    // The first attempt fails; all three wait in localStorage.
    site.browser
        .wait_for(
            &format!("{STORED_QUEUE}.length === 3 && {STORED_QUEUE}.some(x => x.n > 0)"),
            WAIT,
        )
        .expect("the events are persisted while the edge is down");
    // The visitor moves on while the edge is still down: nothing may be lost on the way
    // (no beacon into the void), everything stays stored.
    let plain = site.url("plain.html");
    site.browser.goto(&plain).unwrap();
    assert_eq!(site.eval(&format!("{STORED_QUEUE}.length")), Value::from(3));
    // ...and comes back while it is still down: the SDK loads from the browser's cache
    // (Cache-Control of the asset), adopts the stored events and keeps retrying them.
    let app = site.url("app.html?flushAt=1&backoffCap=2000");
    site.browser.goto(&app).unwrap();
    site.sdk_loaded();
    site.browser
        .wait_for(&format!("{STORED_QUEUE}.every(x => x.n > 0)"), WAIT)
        .expect("the new page view tries the stored events");
    assert_eq!(site.eval(&format!("{STORED_QUEUE}.length")), Value::from(3));

    site.st.edge.restart().expect("the edge comes back");
    site.browser
        .wait_for(&format!("{STORED_QUEUE}.length === 0"), WAIT)
        .expect("the stored events are delivered");
    site.drain_until("SELECT count(*) FROM tracks", 4).await;
    let rows = site.st.query(
        "SELECT event_text, count(*), count(DISTINCT message_id) FROM tracks GROUP BY event_text ORDER BY event_text",
    );
    assert_eq!(
        rows,
        ["Offline 1", "Offline 2", "Offline 3", "Online Before"]
            .iter()
            .map(|e| vec![s(e), s("1"), s("1")])
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn navigating_away_right_after_track_still_delivers_the_event_by_beacon() {
    let mut site = Site::start();
    // Batches wait for 50 events or 10 minutes: only the pagehide beacon can send this.
    site.visit("app.html?flushAt=50&flushInterval=600000", None);
    let stats = site.eval("analytics.track('Clicked Away', { to: 'plain' }), analytics.stats()");
    assert_eq!(stats["sent"], Value::from(0), "{stats}");
    assert_eq!(stats["queued"], Value::from(1), "{stats}");
    let plain = site.url("plain.html");
    site.browser.goto(&plain).unwrap();
    // The new page has no SDK: the event can only have come from the beacon.
    assert_eq!(
        site.eval("typeof window.analytics"),
        Value::from("undefined")
    );
    site.drain_until("SELECT count(*) FROM tracks", 1).await;
    let r = row(
        &site,
        "SELECT event_text, properties->>'to', context->'page'->>'path' FROM tracks",
    );
    assert_eq!(r, vec![s("Clicked Away"), s("plain"), s("/app.html")]);
}

/// GPC on (`navigator.globalPrivacyControl`) and a TCF CMP whose TC string consents to
/// purposes 1, 3, 4, 5 and 6 (marketing and personalization; not analytics' 8–10).
fn gpc_and_cmp_script() -> String {
    let line = include_str!("../../collector-core/tests/fixtures/tcf/tcf-v2.jsonl")
        .lines()
        .nth(2)
        .unwrap();
    let tc = serde_json::from_str::<Value>(line).unwrap()["tc_string"]
        .as_str()
        .unwrap()
        .to_string();
    format!(
        "Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', {{ get: () => true, configurable: true }});
         window.__tcfapi = function (cmd, version, cb) {{
           if (cmd !== 'addEventListener') return;
           setTimeout(function () {{ cb({{ eventStatus: 'cmpuishown', tcString: '', listenerId: 1 }}, true); }}, 0);
           setTimeout(function () {{ cb({{ eventStatus: 'useractioncomplete', tcString: '{tc}', gdprApplies: true, listenerId: 1 }}, true); }}, 50);
         }};"
    )
}

#[tokio::test]
async fn gpc_and_a_tcf_cmp_reach_the_edge_and_the_resolved_consent_is_stored() {
    let mut site = Site::start();
    site.visit("app.html", Some(&gpc_and_cmp_script()));
    site.browser
        .wait_for("analytics.consent.get().tcf", WAIT)
        .expect("the SDK hears the CMP's decision");
    assert_eq!(site.eval("analytics.consent.get().gpc"), Value::Bool(true));
    site.eval(
        "analytics.identify('user-gpc'),
         analytics.track('Article Read'),
         analytics.consent.set({ analytics: true }),
         analytics.track('Video Played'),
         analytics.track('Order Completed', { total: 10 })",
    );
    site.wait_sent(4);
    site.drain_until("SELECT count(*) FROM tracks", 2).await;
    let q = |event: &str| {
        row(
            &site,
            &format!(
                "SELECT user_id, context->'consent'->'resolved'->'sources'->>'analytics',
                        context->'consent'->'resolved'->'sources'->>'marketing',
                        context->'consent'->'resolved'->>'gpc', context->'consent'->>'tcf'
                 FROM tracks WHERE event_text = '{event}'"
            ),
        )
    };
    // Before the visitor said yes to analytics, the TC string decided it (no consent for
    // purposes 8-10): anonymised. GPC denies marketing whatever the TC string says; the
    // raw TC string is not stored.
    assert_eq!(
        q("Article Read"),
        vec![None, s("tcf"), s("gpc"), s("true"), None]
    );
    // The visitor's explicit yes beats the TC string; GPC still denies marketing.
    assert_eq!(
        q("Video Played"),
        vec![s("user-gpc"), s("explicit"), s("gpc"), s("true"), None]
    );
    // Order Completed needs marketing: dropped at the edge, and counted.
    assert_eq!(site.st.count("tracks"), 2);
    let stats = site.st.edge_stats().await;
    assert_eq!(
        stats["drops"]["consent_denied_marketing"],
        Value::from(1),
        "{stats}"
    );
}

#[tokio::test]
async fn consent_denied_in_the_browser_is_enforced_at_the_edge() {
    let mut site = Site::start();
    site.visit("app.html", None);
    site.eval(
        "analytics.consent.set({ analytics: false, marketing: true, personalization: false }),
         analytics.identify('user-denied', { email: 'denied@example.com' }),
         analytics.track('Product Recommended'),
         analytics.track('Order Completed', { total: 5 })",
    );
    site.wait_sent(3);
    site.drain_until("SELECT count(*) FROM tracks", 1).await;
    // Analytics denied (anonymise): no user id, no traits; the choice is the evidence.
    let order = row(
        &site,
        "SELECT event_text, user_id, context->'consent'->'resolved'->'sources'->>'analytics',
                context->'consent'->'categoryPreferences'->>'analytics'
         FROM tracks",
    );
    assert_eq!(
        order,
        vec![s("Order Completed"), None, s("explicit"), s("false")]
    );
    let ident = row(&site, "SELECT user_id, traits FROM identifies");
    assert_eq!(ident, vec![None, None]);
    // Personalization denied (drop): never stored, counted at the edge.
    let stats = site.st.edge_stats().await;
    assert_eq!(
        stats["drops"]["consent_denied_personalization"],
        Value::from(1),
        "{stats}"
    );
}

#[tokio::test]
async fn the_demo_page_of_xtask_dev_sends_its_page_view_and_clicks() {
    // Served exactly as `cargo xtask dev` serves it.
    let mut site = Site::serving("sdk-js/demo");
    site.visit("", None);
    site.wait_sent(1);
    site.browser
        .wait_for(
            "document.getElementById('anon').textContent.length === 36",
            WAIT,
        )
        .expect("the page shows the anonymous id");
    site.eval(
        "document.getElementById('identify').click(), document.getElementById('track').click()",
    );
    site.wait_sent(3);
    site.drain_until("SELECT count(*) FROM tracks", 1).await;
    let anon = site.eval("analytics.user().anonymousId()");
    assert_eq!(
        row(
            &site,
            "SELECT event_text, user_id, anonymous_id FROM tracks"
        ),
        vec![
            s("Demo Clicked"),
            s("demo-user"),
            anon.as_str().map(str::to_string)
        ]
    );
    assert_eq!(row(&site, "SELECT name FROM pages"), vec![s("Demo")]);
}

#[tokio::test]
async fn events_the_sdk_could_not_send_are_counted_at_the_edge() {
    let mut site = Site::start();
    // The site waits for consent before sending; the visitor leaves without giving it.
    site.visit("app.html?whileUnknown=buffer", None);
    let stats =
        site.eval("analytics.track('Held 1'), analytics.track('Held 2'), analytics.stats()");
    assert_eq!(stats["held"], Value::from(2), "{stats}");
    let plain = site.url("plain.html");
    site.browser.goto(&plain).unwrap();
    // The next page view reports the count with its first request.
    let app = site.url("app.html");
    site.browser.goto(&app).unwrap();
    site.sdk_loaded();
    site.eval("analytics.track('Next Page')");
    site.wait_sent(1);
    site.drain_until("SELECT count(*) FROM tracks", 1).await;
    let stats = site.st.edge_stats().await;
    assert_eq!(
        stats["drops"]["client_consent_unknown_at_unload"],
        Value::from(2),
        "{stats}"
    );
    assert_eq!(
        row(&site, "SELECT event_text FROM tracks"),
        vec![s("Next Page")]
    );
}

#[tokio::test]
async fn segments_own_browser_sdk_unmodified_lands_every_call_once() {
    let tools = Toolchain::discover();
    let built = std::process::Command::new(&tools.node)
        .arg(tools.root.join("tests/browser/build-vendor.mjs"))
        .current_dir(&tools.root)
        .status()
        .expect("bundle analytics-next");
    assert!(built.success());
    let mut site = Site::start();
    site.browser.open(None).unwrap();
    let url = site.url("segment.html");
    site.browser.goto(&url).unwrap();
    site.browser
        .wait_for("!!window.segment", WAIT)
        .expect("analytics-next loads with inline settings");
    // Each call's promise resolves once the Segment.io destination has delivered it.
    let out = site.eval(
        "(async () => {
           await segment.identify('seg-user', { plan: 'pro' });
           await segment.track('Segment Browser Event', { n: 1 });
           await segment.page('Docs', 'Home', { section: 'a' });
           await segment.group('seg-group', { seats: 3 });
           await segment.alias('seg-user-2', 'seg-user');
           return { anon: segment.user().anonymousId(), version: segment.VERSION };
         })()",
    );
    site.drain_until(
        "SELECT (SELECT count(*) FROM tracks) + (SELECT count(*) FROM identifies) + (SELECT count(*) FROM pages) + (SELECT count(*) FROM groups) + (SELECT count(*) FROM aliases)",
        5,
    )
    .await;
    let anon = out["anon"].as_str().map(str::to_string);
    assert_eq!(
        row(
            &site,
            "SELECT event_text, user_id, anonymous_id, properties->>'n', context->'library'->>'name' FROM tracks"
        ),
        vec![
            s("Segment Browser Event"),
            s("seg-user"),
            anon.clone(),
            s("1"),
            s("analytics.js")
        ]
    );
    assert_eq!(
        row(&site, "SELECT user_id, traits->>'plan' FROM identifies"),
        vec![s("seg-user"), s("pro")]
    );
    assert_eq!(
        row(
            &site,
            "SELECT name, category, properties->>'section' FROM pages"
        ),
        vec![s("Home"), s("Docs"), s("a")]
    );
    assert_eq!(
        row(&site, "SELECT group_id FROM groups"),
        vec![s("seg-group")]
    );
    // (analytics-next itself sends the current user as the alias's userId.)
    assert_eq!(
        row(
            &site,
            "SELECT previous_id, message_id LIKE 'ajs-next-%' FROM aliases"
        ),
        vec![s("seg-user"), s("true")]
    );
    let stats = site.st.edge_stats().await;
    assert!(
        stats["drops"].as_object().is_none_or(|d| d.is_empty()),
        "nothing rejected: {stats}"
    );
}
