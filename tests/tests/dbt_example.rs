//! The example dbt project (`examples/dbt`, dbt-duckdb) runs on a warehouse filled
//! through the real worker and the agent, and its models say what the events say.

mod common;

use std::path::PathBuf;
use std::process::Command;

use collector_e2e::Toolchain;
use common::*;
use serde_json::json;

#[tokio::test]
async fn the_example_dbt_project_builds_on_a_warehouse_filled_through_the_edge() {
    let tools = Toolchain::discover();
    assert!(
        tools.dbt().exists(),
        "dbt is not installed at {}; run `cargo xtask setup`",
        tools.dbt().display()
    );
    let st = Stack::start();
    let ev = |id: &str, anon: &str, event: &str, minute: u32, props: serde_json::Value| {
        json!({"type": "track", "messageId": id, "anonymousId": anon, "event": event,
               "timestamp": format!("2026-11-20T10:{minute:02}:00.000Z"), "properties": props,
               "context": {"page": {"path": "/shop"}, "userAgent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0", "consent": {"categoryPreferences": {"analytics": true, "marketing": true}}}})
    };
    let batch = vec![
        // v1 adds two items and leaves; v2 adds, orders; v3 orders, then adds again.
        ev(
            "a1",
            "v1",
            "Product Added",
            0,
            json!({"sku": "S-1", "price": 10.5}),
        ),
        ev(
            "a2",
            "v1",
            "Product Added",
            1,
            json!({"sku": "S-2", "price": 4.5}),
        ),
        ev(
            "a3",
            "v2",
            "Product Added",
            2,
            json!({"sku": "S-1", "price": 10.5}),
        ),
        ev("o1", "v2", "Order Completed", 3, json!({"revenue": 10.5})),
        ev("o2", "v3", "Order Completed", 4, json!({"revenue": 3.0})),
        ev(
            "a4",
            "v3",
            "Product Added",
            5,
            json!({"sku": "S-3", "price": 7.0}),
        ),
    ];
    let r = st
        .post(
            "/v1/batch",
            &json!({"batch": batch, "sentAt": "2026-11-20T10:06:00.000Z"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    st.drain().await;

    let project = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/dbt");
    let scratch = tempfile::tempdir().unwrap();
    let out = Command::new(tools.dbt())
        .args(["build", "--no-use-colors"])
        .current_dir(&project)
        .env("DBT_PROFILES_DIR", &project)
        .env("DBT_TARGET_PATH", scratch.path().join("target"))
        .env("DBT_LOG_PATH", scratch.path().join("logs"))
        .env("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
        .env("COLLECTOR_WAREHOUSE", st.warehouse())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dbt build failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        st.query("SELECT count(*), count(DISTINCT visitor_id) FROM main_analytics.stg_tracks"),
        vec![vec![s("6"), s("3")]]
    );
    assert_eq!(
        st.query("SELECT visitor_id, items_added, cart_value FROM main_analytics.cart_abandoners ORDER BY 1"),
        vec![vec![s("v1"), s("2"), s("15")], vec![s("v3"), s("1"), s("7")]]
    );
}
