//! The consent audit dashboard in real Chromium, from events posted to the real worker:
//! a crafted mix of visitors (EEA with no choice, EEA with an explicit choice, US with
//! no signal, US with GPC, EEA with a TCF string) drained by the running agent; the
//! page shows their decisions with the right numbers, draws its chart, is usable from
//! the keyboard and labelled, asks for its token, and a screenshot is far from blank.

mod common;

use std::time::Duration;

use collector_core::tcf::TcWriter;
use collector_e2e::browser::Browser;
use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "dashboard-token-0123456789";

/// A TC string consenting to purposes 1 to 8 (so marketing, purposes 1, 3, 4, and
/// personalization, 1, 5, 6, are granted; analytics needs 9 and 10 too), vendors 1-10.
fn tc_string() -> String {
    let mut w = TcWriter::core_header(0xff_0000);
    w.put(16, 10).put(1, 0).put(10, 0x3ff).put(16, 0).put(1, 0);
    w.encode()
}

async fn page_event(st: &Stack, country: &str, headers: &[(&str, &str)], body: Value) {
    let mut req = st
        .http
        .post(format!("{}/v1/page", st.edge.url))
        .basic_auth(WRITE_KEY, Some(""))
        .header("Content-Type", "application/json")
        .header("X-Collector-Country", country);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = st.send(req.body(body.to_string())).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

fn consent(prefs: Value) -> Value {
    json!({"consent": {"categoryPreferences": prefs}})
}

#[tokio::test]
async fn the_dashboard_shows_the_consent_decisions_of_a_crafted_mix_of_visitors() {
    let st = Stack::start();
    let tc = format!("euconsent-v2={}", tc_string());
    // EEA, no choice: the region denies by default (analytics anonymises the page).
    for n in 1..=3 {
        page_event(
            &st,
            "DE",
            &[],
            json!({"anonymousId": format!("eea-none-{n}"), "properties": {"path": "/"}}),
        )
        .await;
    }
    // EEA, an explicit choice. eea-yes-1 first granted analytics only, then also
    // marketing: their latest decision of the day counts.
    page_event(&st, "FR", &[], json!({"anonymousId": "eea-yes-1", "properties": {"path": "/a"}, "timestamp": "2026-01-01T00:00:00Z",
        "context": consent(json!({"analytics": true, "marketing": false}))})).await;
    for n in 1..=2 {
        page_event(
            &st,
            "FR",
            &[],
            json!({"anonymousId": format!("eea-yes-{n}"), "properties": {"path": "/b"},
            "context": consent(json!({"analytics": true, "marketing": true}))}),
        )
        .await;
    }
    // US, no signal: granted by the region's default. US with GPC: marketing and
    // personalization denied by the signal; their order is not stored at all.
    for n in 1..=2 {
        page_event(
            &st,
            "US",
            &[],
            json!({"anonymousId": format!("us-none-{n}"), "properties": {"path": "/"}}),
        )
        .await;
        page_event(
            &st,
            "US",
            &[("Sec-GPC", "1")],
            json!({"anonymousId": format!("us-gpc-{n}"), "properties": {"path": "/"}}),
        )
        .await;
    }
    let r = st
        .send(
            st.http
                .post(format!("{}/v1/track", st.edge.url))
                .basic_auth(WRITE_KEY, Some(""))
                .header("X-Collector-Country", "US")
                .header("Sec-GPC", "1")
                .body(json!({"anonymousId": "us-gpc-1", "event": "Order Completed", "properties": {"revenue": 5}}).to_string()),
        )
        .await;
    assert_eq!(r.status, 200);
    // EEA with a TCF string in the cookie.
    page_event(
        &st,
        "DE",
        &[("Cookie", &tc)],
        json!({"anonymousId": "eea-tcf-1", "properties": {"path": "/"}}),
    )
    .await;

    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let config = st.dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "edge_url = \"{}\"\ndrain_secret = \"{SECRET}\"\npoll_interval_ms = 100\nadmin_addr = \"127.0.0.1:0\"\nprivacy = \"{repo}/privacy.toml\"\ndashboard_token_env = \"DASHBOARD_E2E_TOKEN\"\n\n[warehouse]\npath = \"{}\"\n",
            st.edge.url,
            st.warehouse().display()
        ),
    )
    .unwrap();
    let (mut agent, addr) = st
        .run_agent(&config, &[("DASHBOARD_E2E_TOKEN", TOKEN)])
        .await;
    let base = format!("http://{addr}");

    // The token is required: without it 401, with it the figures.
    let http = reqwest::Client::new();
    let r = http.get(format!("{base}/dashboard")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let mut data = Value::Null;
    for _ in 0..100 {
        data = http
            .get(format!("{base}/dashboard/data.json"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if data["decisions"] == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(data["decisions"], 10, "ten visitors decided: {data}");
    let rate = |v: &Value| {
        (
            v["granted"].as_u64().unwrap(),
            v["decided"].as_u64().unwrap(),
        )
    };
    let eea = &data["by_region"]["eea_uk_ch"];
    assert_eq!(rate(&eea["analytics"]), (2, 6));
    assert_eq!(rate(&eea["marketing"]), (3, 6));
    assert_eq!(rate(&eea["personalization"]), (1, 6));
    assert_eq!(rate(&eea["necessary"]), (6, 6));
    let us = &data["by_region"]["us"];
    assert_eq!(rate(&us["analytics"]), (4, 4));
    assert_eq!(rate(&us["marketing"]), (2, 4));
    assert_eq!(rate(&us["sms"]), (0, 4));
    let marketing = &data["by_source"]["marketing"];
    assert_eq!(rate(&marketing["default"]), (2, 5));
    assert_eq!(rate(&marketing["explicit"]), (2, 2));
    assert_eq!(rate(&marketing["gpc"]), (0, 2));
    assert_eq!(rate(&marketing["tcf"]), (1, 1));
    assert_eq!(rate(&data["by_source"]["analytics"]["tcf"]), (0, 1));
    // The GPC visitor's order was withheld at the edge, and counted.
    let withheld: u64 = data["withheld"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(withheld, 1, "{}", data["withheld"]);
    // The policy in force was recorded with its text.
    assert!(data["policies"][0]["text"]
        .as_str()
        .unwrap()
        .contains("[categories.marketing]"));
    // The same figures straight from the warehouse (through the agent, which holds it):
    // visitors in the EEA whose latest event of the day grants marketing.
    let out = std::process::Command::new(agent_binary())
        .args(["sql", "--csv", "--config"])
        .arg(&config)
        .arg("SELECT count(*) FROM (SELECT anonymous_id, context, row_number() OVER (PARTITION BY anonymous_id ORDER BY timestamp DESC) AS rn FROM pages) WHERE rn = 1 AND json_extract_string(context, '$.consent.resolved.region') = 'eea_uk_ch' AND json_contains(json_extract(context, '$.consent.resolved.granted'), '\"marketing\"')")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == "3"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // In Chromium.
    let log = st.dir.path().join("browser.log");
    let mut b = Browser::launch(&log).expect("chromium");
    b.open(None).unwrap();
    b.goto(&format!("{base}/dashboard?token={TOKEN}")).unwrap();
    b.wait_for(
        "document.getElementById('rates-chart').dataset.drawn === 'true'",
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", b.log_tail()));
    let text =
        |b: &mut Browser, js: &str| b.eval(js).unwrap().as_str().unwrap_or_default().to_string();
    assert_eq!(
        text(
            &mut b,
            "document.querySelector('#sum-decisions strong').textContent"
        ),
        "10"
    );
    assert_eq!(
        text(
            &mut b,
            "document.querySelector('#sum-withheld strong').textContent"
        ),
        "1"
    );
    let cell = |b: &mut Browser, table: &str, key: &str, attr: &str, col: &str| {
        text(b, &format!("document.querySelector('#{table} tr[data-key=\"{key}\"] td[data-{attr}=\"{col}\"]').textContent"))
    };
    assert_eq!(
        cell(&mut b, "regions-table", "eea_uk_ch", "cat", "marketing"),
        "50% (3 of 6)"
    );
    assert_eq!(
        cell(&mut b, "regions-table", "us", "cat", "analytics"),
        "100% (4 of 4)"
    );
    assert_eq!(
        cell(&mut b, "regions-table", "eea_uk_ch", "cat", "analytics"),
        "33.3% (2 of 6)"
    );
    assert_eq!(
        cell(&mut b, "sources-table", "marketing", "source", "gpc"),
        "0% (0 of 2)"
    );
    assert_eq!(
        cell(&mut b, "sources-table", "marketing", "source", "tcf"),
        "100% (1 of 1)"
    );
    // The chart drew lines (not just an empty frame): enough dark pixels on its canvas.
    let inked = b
        .eval("(() => { const c = document.querySelector('#rates-chart canvas'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && d[i] + d[i + 1] + d[i + 2] < 600) n++; return n; })()")
        .unwrap()
        .as_u64()
        .unwrap();
    assert!(
        inked > 300,
        "the chart has {inked} inked pixels\n{}",
        b.log_tail()
    );
    // Labelled and navigable: a language, captions on every table, a label for every
    // field, the chart described, and the skip link first from the keyboard.
    assert_eq!(text(&mut b, "document.documentElement.lang"), "en");
    let uncaptioned = b.eval("[...document.querySelectorAll('table')].filter(t => !(t.caption && t.caption.textContent.trim().length > 0)).map(t => t.outerHTML.slice(0, 200))").unwrap();
    assert_eq!(uncaptioned, json!([]), "tables without a caption");
    let unlabelled = b.eval("[...document.querySelectorAll('input:not([type=hidden]), select')].filter(i => !(i.labels && i.labels.length > 0) && !i.getAttribute('aria-label')).map(i => i.outerHTML)").unwrap();
    assert_eq!(unlabelled, json!([]), "fields without a label");
    assert!(!text(
        &mut b,
        "document.getElementById('rates-chart').getAttribute('aria-label')"
    )
    .is_empty());
    let first = b.press("Tab").unwrap();
    assert_eq!(first["text"], "Skip to the figures", "{first}");
    // Text contrast: body text on white is at least 4.5:1.
    let contrast = b
        .eval("(() => { const lum = c => { const [r, g, b] = c.match(/\\d+/g).slice(0, 3).map(v => { v = v / 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); }); return 0.2126 * r + 0.7152 * g + 0.0722 * b; }; const fg = lum(getComputedStyle(document.body).color); return (1.05) / (fg + 0.05); })()")
        .unwrap()
        .as_f64()
        .unwrap();
    assert!(contrast >= 4.5, "contrast {contrast}");

    // One person's history, looked up through the form (from the keyboard's Enter).
    b.eval("document.getElementById('person-id').value = 'eea-yes-1'")
        .unwrap();
    b.eval("document.getElementById('person-id').focus()")
        .unwrap();
    b.press("Enter").unwrap();
    b.wait_for(
        "document.getElementById('person-table')",
        Duration::from_secs(20),
    )
    .unwrap();
    assert_eq!(
        b.eval("document.querySelectorAll('#person-table tbody tr').length")
            .unwrap(),
        2
    );
    let last = text(
        &mut b,
        "document.querySelector('#person-table tbody tr:last-child').textContent",
    );
    assert!(
        last.contains("marketing") && last.contains("explicit choice"),
        "{last}"
    );

    // A screenshot of the whole page is far from an empty page's.
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    b.goto(&format!("{base}/dashboard")).unwrap();
    b.wait_for(
        "document.getElementById('rates-chart').dataset.drawn === 'true'",
        Duration::from_secs(20),
    )
    .unwrap();
    let full = b
        .screenshot(&shots.join("dashboard.png"), true, 1200, 900)
        .unwrap();
    b.goto("about:blank").unwrap();
    let blank = b
        .screenshot(&shots.join("blank.png"), true, 1200, 900)
        .unwrap();
    assert!(
        full > 20 * blank && full > 60_000,
        "dashboard {full} bytes, blank page {blank} bytes"
    );
    drop(b);

    assert!(agent.terminate(), "the agent stops on SIGTERM");
}
