//! An analyst's dbt project, written against Segment's warehouse schema, runs unchanged
//! on what the agent loads: real dbt (`cargo xtask setup` installs the pinned dbt-core
//! 1.10 and dbt-postgres), a real PostgreSQL server on loopback, the PostgreSQL sink.
//! The models use what Segment-style models use: `id`, the flattened `context_*`
//! columns, page properties as columns, a per-event table and `users`.

mod common;

use std::path::Path;
use std::process::Command;

use collector_agent::config::PostgresConfig;
use collector_agent::sinks::postgres::PostgresSink;
use collector_agent::sinks::{Load, Sink};
use collector_e2e::postgres::{LocalPostgres, USER};
use collector_e2e::Toolchain;
use common::events;
use serde_json::json;

const PROJECT: &str = r#"name: segment_models
version: "1.0.0"
config-version: 2
profile: segment_models
model-paths: ["models"]
"#;

const SOURCES: &str = r#"version: 2
sources:
  - name: segment
    schema: segment
    tables:
      - name: pages
      - name: tracks
      - name: users
      - name: order_completed
models:
  - name: page_views
    columns:
      - name: page_view_id
        data_tests: [unique, not_null]
      - name: anonymous_id
        data_tests: [not_null]
  - name: revenue_by_user
    columns:
      - name: user_id
        data_tests: [unique, not_null]
  - name: user_plans
    columns:
      - name: user_id
        data_tests: [unique]
"#;

const PAGE_VIEWS: &str = r#"select
    id as page_view_id,
    anonymous_id,
    user_id,
    received_at as received_at_tstamp,
    sent_at as sent_at_tstamp,
    "timestamp" as tstamp,
    url as page_url,
    path as page_url_path,
    title as page_title,
    referrer,
    search as page_url_query,
    context_campaign_source as utm_source,
    context_user_agent as user_agent
from {{ source('segment', 'pages') }}
"#;

const REVENUE: &str = r#"select
    user_id,
    count(*) as orders,
    sum(revenue) as revenue,
    max(currency) as currency
from {{ source('segment', 'order_completed') }}
where event = 'order_completed'
group by user_id
"#;

const USER_PLANS: &str = r#"select u.id as user_id, u.plan, t.last_seen
from {{ source('segment', 'users') }} u
left join (
    select user_id, max(received_at) as last_seen from {{ source('segment', 'tracks') }} group by user_id
) t on t.user_id = u.id
"#;

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn dbt(tools: &Toolchain, project: &Path, args: &[&str]) {
    let out = Command::new(tools.dbt())
        .args(args)
        .args(["--no-use-colors"])
        .current_dir(project)
        .env("DBT_PROFILES_DIR", project)
        .env("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "run {} ({e}); `cargo xtask setup` installs dbt",
                tools.dbt().display()
            )
        });
    assert!(
        out.status.success(),
        "dbt {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn segment_style_dbt_models_run_unchanged() {
    let tools = Toolchain::discover();
    assert!(
        tools.dbt().exists(),
        "dbt is not installed at {}; run `cargo xtask setup`",
        tools.dbt().display()
    );
    let pg = LocalPostgres::start().unwrap();
    let sink = PostgresSink::connect(&PostgresConfig {
        url: pg.url.clone(),
        password_env: None,
        schema: "segment".into(),
        timeout_ms: 30_000,
        query_timeout_ms: 3_600_000,
    })
    .await
    .unwrap();
    let page = |id: &str, anon: &str, path: &str| {
        json!({"type": "page", "messageId": id, "anonymousId": anon, "name": "Docs",
               "properties": {"path": path, "url": format!("https://shop.example.com{path}?q=1"),
                              "title": "Docs", "referrer": "https://search.example.com/", "search": "?q=1"},
               "context": {"userAgent": "Firefox 140", "campaign": {"source": "newsletter", "medium": "email"}}})
    };
    let evs = events(json!({"batch": [
        page("p1", "a1", "/pricing"),
        page("p2", "a1", "/docs"),
        page("p3", "a2", "/"),
        {"type": "track", "messageId": "o1", "userId": "u1", "event": "Order Completed", "properties": {"revenue": 10.5, "currency": "EUR"}},
        {"type": "track", "messageId": "o2", "userId": "u1", "event": "Order Completed", "properties": {"revenue": "4.5", "currency": "EUR"}},
        {"type": "track", "messageId": "o3", "userId": "u2", "event": "Order Completed", "properties": {"revenue": 99, "currency": "USD"}},
        {"type": "identify", "messageId": "i1", "userId": "u1", "traits": {"plan": "pro"}},
        {"type": "identify", "messageId": "i2", "userId": "u2", "traits": {"plan": "free"}}
    ]}));
    sink.load(&Load::events(0, 1, evs)).await.unwrap();

    let project = tempfile::tempdir().unwrap();
    let dir = project.path();
    write(dir, "dbt_project.yml", PROJECT);
    write(
        dir,
        "profiles.yml",
        &format!(
            "segment_models:\n  target: test\n  outputs:\n    test:\n      type: postgres\n      host: 127.0.0.1\n      port: {}\n      user: {USER}\n      password: \"\"\n      dbname: postgres\n      schema: analytics\n      threads: 1\n",
            pg.port
        ),
    );
    write(dir, "models/sources.yml", SOURCES);
    write(dir, "models/page_views.sql", PAGE_VIEWS);
    write(dir, "models/revenue_by_user.sql", REVENUE);
    write(dir, "models/user_plans.sql", USER_PLANS);
    dbt(&tools, dir, &["run"]);
    dbt(&tools, dir, &["test"]);

    let q = |sql: &'static str| {
        let sink = &sink;
        async move { sink.query(sql).await.unwrap().rows }
    };
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        q("SELECT page_view_id, page_url_path, page_url, utm_source, user_agent FROM analytics.page_views ORDER BY 1").await,
        vec![
            vec![s("p1"), s("/pricing"), s("https://shop.example.com/pricing?q=1"), s("newsletter"), s("Firefox 140")],
            vec![s("p2"), s("/docs"), s("https://shop.example.com/docs?q=1"), s("newsletter"), s("Firefox 140")],
            vec![s("p3"), s("/"), s("https://shop.example.com/?q=1"), s("newsletter"), s("Firefox 140")],
        ]
    );
    assert_eq!(
        q("SELECT user_id, orders, revenue, currency FROM analytics.revenue_by_user ORDER BY 1")
            .await,
        vec![
            vec![s("u1"), s("2"), s("15"), s("EUR")],
            vec![s("u2"), s("1"), s("99"), s("USD")],
        ]
    );
    assert_eq!(
        q("SELECT user_id, plan, last_seen IS NOT NULL FROM analytics.user_plans ORDER BY 1").await,
        vec![
            vec![s("u1"), s("pro"), s("t")],
            vec![s("u2"), s("free"), s("t")],
        ]
    );
}
