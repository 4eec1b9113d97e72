//! Shared helpers of the end-to-end tests: a local edge (the built worker under
//! `wrangler dev`) plus a DuckDB warehouse in one temp folder.

#![allow(dead_code)]

use std::path::PathBuf;

use collector_agent::config::{DuckDbConfig, WarehouseConfig};
use collector_agent::sinks::duckdb::{run_query, DuckDbSink};
use collector_agent::{drain_once, AgentConfig, DrainSummary};
use collector_e2e::{EdgeOptions, LocalEdge, DEV_WRITE_KEY};
use serde_json::Value;

pub const SECRET: &str = "e2e-drain-secret";
pub const WRITE_KEY: &str = DEV_WRITE_KEY;

pub struct Stack {
    // Field order is drop order: stop the edge before its folder is removed.
    pub edge: LocalEdge,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
}

pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Stack {
    pub fn start() -> Stack {
        Stack::start_with(&[])
    }

    pub fn start_with(vars: &[(&str, &str)]) -> Stack {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut opts = EdgeOptions::in_dir(dir.path(), SECRET);
        for (k, v) in vars {
            opts = opts.var(k, v);
        }
        let edge = LocalEdge::start(opts).expect("wrangler dev starts");
        Stack {
            dir,
            edge,
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(60))
                .build()
                .unwrap(),
        }
    }

    pub fn warehouse(&self) -> PathBuf {
        self.dir.path().join("data/warehouse.duckdb")
    }

    /// The agent's config, loading into this PostgreSQL server (schema `public`).
    pub fn pg_config(&self, pg: &collector_e2e::postgres::LocalPostgres) -> AgentConfig {
        let mut cfg = self.agent_config();
        cfg.warehouse = WarehouseConfig::Postgres(collector_agent::config::PostgresConfig {
            url: pg.url.clone(),
            password_env: None,
            schema: "public".into(),
            timeout_ms: 10_000,
            query_timeout_ms: 3_600_000,
        });
        cfg.validate().expect("valid config");
        cfg
    }

    pub fn agent_config(&self) -> AgentConfig {
        let cfg = AgentConfig {
            edge_url: self.edge.url.clone(),
            drain_secret: Some(SECRET.into()),
            drain_secret_env: None,
            warehouse: WarehouseConfig::DuckDb(DuckDbConfig {
                path: self.warehouse(),
                ..DuckDbConfig::default()
            }),
            admin_addr: "127.0.0.1:0".into(),
            poll_interval_ms: 100,
            lease_batches: 10,
            lease_ms: 30_000,
            request_timeout_ms: 30_000,
            stuck_quarantine_after_ms: 600_000,
            metrics_addr: None,
            identity: Default::default(),
            audiences: None,
            privacy: None,
            audience_interval_ms: 60_000,
            destinations: Vec::new(),
            seal_key_env: None,
            pii_key_env: None,
            admin_keys: Vec::new(),
            dashboard_token_env: None,
        };
        cfg.validate().expect("valid agent config");
        cfg
    }

    /// POSTs a JSON body authenticated with the write key as HTTP Basic username.
    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.send(
            self.http
                .post(format!("{}{path}", self.edge.url))
                .basic_auth(WRITE_KEY, Some(""))
                .header("Content-Type", "application/json")
                .body(body.to_string()),
        )
        .await
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        let resp = req.send().await.expect("edge answers");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply {
            status,
            body,
            headers,
        }
    }

    /// Drains the edge into the warehouse until empty (`collector-agent run --once`).
    pub async fn drain(&self) -> DrainSummary {
        drain_once(&self.agent_config()).await.expect("drain")
    }

    /// Runs SQL against the warehouse file (no agent running).
    pub fn query(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        if !self.warehouse().exists() {
            DuckDbSink::open(&self.warehouse()).expect("create warehouse");
        }
        let conn = DuckDbSink::open_read_only(&self.warehouse()).expect("open warehouse");
        run_query(&conn, sql).expect("query").rows
    }

    pub fn count(&self, table: &str) -> u64 {
        self.query(&format!("SELECT count(*) FROM {table}"))[0][0]
            .as_deref()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// A drain-API request signed with `secret` at `unix_s`.
    pub async fn signed(
        &self,
        method: &str,
        path: &str,
        body: &str,
        secret: &str,
        unix_s: i64,
    ) -> Reply {
        let sig =
            collector_core::sign::sign(secret.as_bytes(), method, path, unix_s, body.as_bytes());
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(m, format!("{}{path}", self.edge.url))
            .header(collector_core::sign::TIMESTAMP_HEADER, unix_s.to_string())
            .header(collector_core::sign::SIGNATURE_HEADER, sig);
        if !body.is_empty() {
            req = req.body(body.to_string());
        }
        self.send(req).await
    }

    /// Leases a shard's sealed batches (sealing the open one first) with the agent's own
    /// drain client, and never acks: an agent that dies holding the lease.
    pub async fn lease(
        &self,
        shard: u32,
        max_batches: u32,
        lease_ms: u64,
    ) -> collector_core::codec::Lease {
        let client = collector_agent::edge::EdgeClient::new(&self.agent_config()).unwrap();
        client
            .lease(shard, max_batches, lease_ms, true)
            .await
            .expect("lease")
    }

    /// Writes `agent.toml` for the agent binary draining this stack (its edge and drain
    /// secret, a 50 ms poll), with `rest` (the warehouse, other keys) after it.
    pub fn write_agent_config(&self, rest: &str) -> PathBuf {
        let path = self.dir.path().join("agent.toml");
        std::fs::write(
            &path,
            format!(
                "edge_url = \"{}\"\ndrain_secret = \"{SECRET}\"\npoll_interval_ms = 50\n{rest}",
                self.edge.url
            ),
        )
        .unwrap();
        path
    }

    /// Asserts that the edge holds nothing back: no sealed batch and no open event in
    /// any shard.
    pub async fn assert_edge_drained(&self) {
        let stats = self.edge_stats().await;
        let left: u64 = stats["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["sealed_batches"].as_u64().unwrap() + s["open_events"].as_u64().unwrap())
            .sum();
        assert_eq!(left, 0, "{stats}");
    }

    pub async fn edge_stats(&self) -> Value {
        let client = collector_agent::edge::EdgeClient::new(&self.agent_config()).unwrap();
        serde_json::to_value(client.stats().await.expect("stats")).unwrap()
    }
}

pub fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

/// The agent binary ([`collector_e2e::agent_binary`]).
pub fn agent_binary() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    collector_e2e::agent_binary(root).expect("the agent binary")
}

/// Every file under `dir`, lower-cased, searched for each of `raw` (lower case): where
/// each was found.
pub fn scan_for(dir: &std::path::Path, raw: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let bytes = std::fs::read(&p).unwrap_or_default().to_ascii_lowercase();
            for r in raw {
                if bytes.windows(r.len()).any(|w| w == r.as_bytes()) {
                    found.push(format!("{r} in {}", p.display()));
                }
            }
        }
    }
    found
}

/// A child process (an agent) that is killed when this is dropped, so a failing test
/// leaves nothing running.
pub struct ChildGuard(pub std::process::Child);

impl ChildGuard {
    /// Stops it with SIGTERM and waits: whether it exited cleanly.
    pub fn terminate(&mut self) -> bool {
        let _ = std::process::Command::new("kill")
            .args(["-s", "TERM", &self.0.id().to_string()])
            .status();
        self.0.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Stack {
    /// Starts `collector-agent run` with `config` (its DuckDB warehouse is this stack's)
    /// and `env`; waits until it has written its state file. The agent and its admin
    /// address.
    pub async fn run_agent(
        &self,
        config: &std::path::Path,
        env: &[(&str, &str)],
    ) -> (ChildGuard, String) {
        let mut cmd = std::process::Command::new(agent_binary());
        cmd.args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let agent = ChildGuard(cmd.spawn().unwrap());
        let state_file = {
            let mut s = self.warehouse().into_os_string();
            s.push(".agent");
            PathBuf::from(s)
        };
        for _ in 0..200 {
            if let Some(addr) = std::fs::read_to_string(&state_file)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| v["addr"].as_str().map(String::from))
            {
                return (agent, addr);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("the agent did not write its state file");
    }
}
