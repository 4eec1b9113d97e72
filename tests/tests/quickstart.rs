//! The README's first command, `cargo xtask dev`, brings up a working local stack,
//! prints its scriptable lines, and stops everything on SIGTERM.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use collector_e2e::Toolchain;

#[test]
fn xtask_dev_runs_the_stack_and_stops_cleanly_on_sigterm() {
    let tools = Toolchain::discover();
    tools.require_built_worker();
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new("cargo")
        .args(["xtask", "dev"])
        .current_dir(&tools.root)
        .env("XTASK_DEV_DATA_DIR", data.path())
        .env("XTASK_DEV_EDGE_PORT", "0")
        .env("XTASK_DEV_DEMO_PORT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("cargo xtask dev");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut kv = std::collections::HashMap::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line == "ready" {
            break;
        }
        if let Some((k, v)) = line.split_once('=') {
            kv.insert(k.to_string(), v.to_string());
        }
    }
    for key in [
        "edge_url",
        "write_key",
        "agent_config",
        "demo_url",
        "try",
        "sms_log",
    ] {
        assert!(kv.contains_key(key), "xtask dev printed {key}=…: {kv:?}");
    }
    let edge = kv["edge_url"].clone();
    let http = reqwest::blocking::Client::new();
    let page = http.get(&kv["demo_url"]).send().unwrap().text().unwrap();
    let snippet = std::fs::read_to_string(tools.root.join("sdk-js/dist/snippet.min.js")).unwrap();
    assert!(
        page.contains(snippet.trim()),
        "the demo page embeds the built snippet"
    );
    assert!(
        page.contains(&format!("apiHost: '{edge}'")),
        "the demo page points at the local edge"
    );
    let sdk = http
        .get(format!("{edge}/sdk/v1/collector.js"))
        .send()
        .unwrap();
    assert_eq!(
        sdk.status(),
        200,
        "the edge serves the SDK the snippet loads"
    );

    let r = http
        .post(format!("{edge}/v1/batch"))
        .header("Content-Type", "text/plain")
        .body(
            serde_json::json!({"writeKey": kv["write_key"], "batch": [
            {"type": "track", "event": "Quickstart", "anonymousId": "qs", "messageId": "qs-1"}]})
            .to_string(),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);

    // The running agent loads it; `collector-agent sql` queries through the agent.
    let agent = tools.root.join("target/debug/collector-agent");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        let out = Command::new(&agent)
            .args([
                "sql",
                "--csv",
                "--config",
                &kv["agent_config"],
                "SELECT message_id, event_text FROM tracks",
            ])
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if last.contains("qs-1,Quickstart") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        last.contains("message_id,event_text\nqs-1,Quickstart"),
        "{last}"
    );

    let _ = Command::new("kill")
        .args(["-s", "TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "xtask dev did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "xtask dev exits cleanly: {status}");
    let port: u16 = edge.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the edge is stopped"
    );
    let warehouse = data.path().join("warehouse.duckdb");
    assert!(warehouse.exists());
    assert!(
        !data.path().join("warehouse.duckdb.agent").exists(),
        "the agent removed its state file"
    );
    // With the agent gone, `sql` opens the file directly.
    let out = Command::new(&agent)
        .args([
            "sql",
            "--config",
            &kv["agent_config"],
            "SELECT count(*) AS n FROM tracks",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("| 1 |"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
