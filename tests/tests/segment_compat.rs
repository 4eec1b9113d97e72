//! Unmodified Segment client libraries, pointed at the local edge as users would, send
//! every call type; the rows land exactly once.

mod common;

use std::process::Command;

use collector_e2e::Toolchain;
use common::*;

#[tokio::test]
async fn unmodified_segment_analytics_node_lands_every_call_exactly_once() {
    let st = Stack::start();
    let tools = Toolchain::discover();
    let out = Command::new(&tools.node)
        .arg(tools.root.join("tests/compat/segment-analytics-node.mjs"))
        .arg(&st.edge.url)
        .arg(WRITE_KEY)
        .current_dir(&tools.root)
        .output()
        .expect("run node");
    assert!(
        out.status.success(),
        "analytics-node failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = st.drain().await;
    assert_eq!(
        (summary.inserted, summary.duplicates),
        (6, 0),
        "{summary:?}"
    );

    assert_eq!(
        st.query("SELECT user_id, event_text, properties->>'revenue', properties->>'currency', context->'library'->>'name' FROM tracks"),
        vec![vec![s("compat-user"), s("Compat Track"), s("42.5"), s("EUR"), s("@segment/analytics-node")]]
    );
    assert_eq!(
        st.query("SELECT user_id, traits->>'plan' FROM identifies"),
        vec![vec![s("compat-user"), s("enterprise")]]
    );
    assert_eq!(
        st.query("SELECT anonymous_id, user_id, name, category, properties->>'path' FROM pages"),
        vec![vec![
            s("compat-anon"),
            None,
            s("Getting Started"),
            s("Docs"),
            s("/docs")
        ]]
    );
    assert_eq!(
        st.query("SELECT user_id, group_id, traits->>'employees' FROM groups"),
        vec![vec![s("compat-user"), s("compat-group"), s("12")]]
    );
    assert_eq!(
        st.query("SELECT user_id, previous_id FROM aliases"),
        vec![vec![s("compat-user"), s("compat-anon")]]
    );
    assert_eq!(
        st.query("SELECT user_id, name, properties->>'tab' FROM screens"),
        vec![vec![s("compat-user"), s("Settings"), s("billing")]]
    );
    // Client message ids are kept, and every row has a client-side original timestamp.
    assert_eq!(
        st.query("SELECT count(*) FROM (SELECT message_id FROM tracks UNION ALL SELECT message_id FROM identifies \
                  UNION ALL SELECT message_id FROM pages UNION ALL SELECT message_id FROM groups \
                  UNION ALL SELECT message_id FROM aliases UNION ALL SELECT message_id FROM screens) \
                  WHERE message_id LIKE 'node-next-%'")[0][0],
        s("6")
    );
}
