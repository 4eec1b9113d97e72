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

// Segment's Python library (segment-analytics-python, unmodified, pinned), as a backend
// sends: twice, plain and gzipped, each call type, with what Python hands it
// (timezone-aware datetimes with microseconds, a `Decimal`, a `date`). Every call lands
// once, with the time it was given as `original_timestamp` (milliseconds; `timestamp`
// is that corrected for the server's clock skew, by Segment's formula) and the values as
// the library serialised them.
#[tokio::test]
async fn unmodified_segment_analytics_python_lands_every_call_exactly_once() {
    let st = Stack::start();
    let tools = Toolchain::discover();
    let out = Command::new(tools.dbt_venv().join("bin/python"))
        .arg(tools.root.join("tests/compat/segment-analytics-python.py"))
        .arg(&st.edge.url)
        .arg(WRITE_KEY)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "analytics-python failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = st.drain().await;
    assert_eq!(
        (summary.inserted, summary.duplicates),
        (12, 0),
        "{summary:?}"
    );
    for tag in ["py", "py-gz"] {
        let user = format!("{tag}-user");
        assert_eq!(
            st.query(&format!(
                "SELECT event_text, properties->>'revenue', properties->>'shipped_on', properties->>'at', \
                 strftime(original_timestamp, '%Y-%m-%dT%H:%M:%S.%g'), \
                 abs(epoch_ms(timestamp) - epoch_ms(original_timestamp)) < 60000, context->'library'->>'name' \
                 FROM tracks WHERE user_id = '{user}'"
            )),
            vec![vec![
                s("Python Order"),
                s("19.99"),
                s("2026-11-21"),
                s("2026-11-20T10:00:00.123456+00:00"),
                s("2026-11-20T10:00:00.123"),
                s("true"),
                s("analytics-python")
            ]],
            "{tag}"
        );
        // The per-event table types what the library sent: a number, and text.
        assert_eq!(
            st.query(&format!(
                "SELECT typeof(revenue), revenue = 19.99, shipped_on FROM python_order WHERE user_id = '{user}'"
            )),
            vec![vec![s("DOUBLE"), s("true"), s("2026-11-21")]],
            "{tag}"
        );
        assert_eq!(
            st.query(&format!(
                "SELECT traits->>'plan', traits->>'seats' FROM identifies WHERE user_id = '{user}'"
            )),
            vec![vec![s("pro"), s("3")]],
            "{tag}"
        );
        assert_eq!(
            st.query(&format!(
                "SELECT user_id, category, name, properties->>'path' FROM pages WHERE anonymous_id = '{tag}-anon'"
            )),
            vec![vec![None, s("Docs"), s("Python"), s("/py")]],
            "{tag}"
        );
        assert_eq!(
            st.query(&format!(
                "SELECT name, properties->>'tab' FROM screens WHERE user_id = '{user}'"
            )),
            vec![vec![s("Settings"), s("billing")]],
            "{tag}"
        );
        assert_eq!(
            st.query(&format!(
                "SELECT group_id, traits->>'employees' FROM groups WHERE user_id = '{user}'"
            )),
            vec![vec![s(&format!("{tag}-group")), s("12")]],
            "{tag}"
        );
        assert_eq!(
            st.query(&format!(
                "SELECT previous_id FROM aliases WHERE user_id = '{user}'"
            )),
            vec![vec![s(&format!("{tag}-anon"))]],
            "{tag}"
        );
    }
}
