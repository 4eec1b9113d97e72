//! Runs the built worker under `wrangler dev` (local mode: workerd, Durable Objects in
//! a persistence folder) on loopback, for tests, `xtask dev` and `xtask bench`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::toolchain::Toolchain;

/// The PII hashing key (`VERSION:SECRET`) the test and bench edges use.
pub const TEST_PII_KEY: &str = "v1:test-pii-key-not-secret";

#[derive(Debug, Clone)]
pub struct EdgeOptions {
    /// Extra `--var KEY:VALUE` settings (override `wrangler.toml` `[vars]`).
    pub vars: Vec<(String, String)>,
    /// Local Durable Object storage; reuse it across restarts to test durability.
    pub persist_dir: PathBuf,
    /// Port to listen on; 0 picks a free one.
    pub port: u16,
    /// Where wrangler's output goes.
    pub log_file: PathBuf,
}

impl EdgeOptions {
    /// Options with a drain secret, a test PII key ([`TEST_PII_KEY`]), dev mode (the
    /// `X-Collector-Country` header is honoured) and a fresh persistence folder in `dir`.
    pub fn in_dir(dir: &std::path::Path, drain_secret: &str) -> EdgeOptions {
        EdgeOptions {
            vars: vec![
                ("DRAIN_SECRET".into(), drain_secret.into()),
                ("PII_HMAC_KEY".into(), TEST_PII_KEY.into()),
                ("DEV_MODE".into(), "true".into()),
            ],
            persist_dir: dir.join("edge-state"),
            port: 0,
            log_file: dir.join("wrangler.log"),
        }
    }

    pub fn var(mut self, k: &str, v: &str) -> EdgeOptions {
        self.vars.push((k.into(), v.into()));
        self
    }
}

pub struct LocalEdge {
    child: Option<Child>,
    pub port: u16,
    pub url: String,
    opts: EdgeOptions,
    tools: Toolchain,
}

impl LocalEdge {
    pub fn start(opts: EdgeOptions) -> anyhow::Result<LocalEdge> {
        let tools = Toolchain::discover();
        tools.require_built_worker();
        let port = if opts.port == 0 {
            crate::free_port()
        } else {
            opts.port
        };
        let pick = opts.port == 0;
        let mut edge = LocalEdge {
            child: None,
            port,
            url: format!("http://127.0.0.1:{port}"),
            opts,
            tools,
        };
        // A free port can be taken by a parallel test before wrangler binds it: then
        // try another.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match edge.spawn() {
                Ok(()) => return Ok(edge),
                Err(e)
                    if pick && attempt < 4 && e.to_string().contains("Address already in use") =>
                {
                    edge.stop();
                    edge.port = crate::free_port();
                    edge.url = format!("http://127.0.0.1:{}", edge.port);
                }
                // wrangler's bundler (esbuild, a Go program) crashed at start once in
                // CI, beside other tests' wrangler processes starting: start it once
                // more, and say so.
                Err(e) if attempt < 2 && e.to_string().contains("before it was ready") => {
                    eprintln!("LocalEdge: wrangler dev died at start; starting it again. {e}");
                    edge.stop();
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.opts.persist_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.opts.log_file)
            .with_context(|| format!("open {}", self.opts.log_file.display()))?;
        let mut cmd = Command::new(&self.tools.node);
        cmd.arg(&self.tools.wrangler_js)
            .arg("dev")
            .arg("--config")
            .arg(self.tools.root.join("wrangler.toml"))
            .args([
                "--local",
                "--ip",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
            ])
            .args(["--inspector-port", &crate::free_port().to_string()])
            .arg("--persist-to")
            .arg(&self.opts.persist_dir)
            .args([
                "--show-interactive-dev-session=false",
                "--log-level",
                "warn",
            ]);
        for (k, v) in &self.opts.vars {
            cmd.arg("--var").arg(format!("{k}:{v}"));
        }
        cmd.current_dir(&self.tools.root)
            .env("PATH", self.tools.path_env())
            .env("WRANGLER_SEND_METRICS", "false")
            .env("CLOUDFLARE_CF_FETCH_ENABLED", "false")
            .env("DO_NOT_TRACK", "1")
            .env("CI", "true")
            .env("WRANGLER_LOG_PATH", self.opts.persist_dir.join("logs"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let child = cmd.spawn().context("spawn wrangler dev")?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(120))
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        let mut foreign_since = None;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "wrangler dev exited with {status} before it was ready:\n{}",
                        self.log_tail()
                    );
                }
            }
            if health_ok(self.port) {
                // Another test's worker may hold the port this one was given (taken
                // between the probe and the bind): its answer is not this edge's.
                let pgid = self.child.as_ref().map_or(0, |c| c.id());
                if listens_in_group(self.port, pgid) {
                    return Ok(());
                }
                let since = *foreign_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(5) {
                    bail!(
                        "port {}: Address already in use by another test's server",
                        self.port
                    );
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "wrangler dev was not ready after {timeout:?}:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The pids of this edge's workerd processes (its process group), from /proc.
    fn workerd_pids(&self) -> Vec<u32> {
        let Some(pgid) = self.child.as_ref().map(|c| c.id()) else {
            return Vec::new();
        };
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut pids = Vec::new();
        for entry in dir.flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid pgrp ...
            let Some((head, rest)) = stat.rsplit_once(") ") else {
                continue;
            };
            if !head.ends_with("workerd") {
                continue;
            }
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid) {
                if let Some(pid) = head.split(' ').next().and_then(|p| p.parse().ok()) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// CPU seconds (user + system) used so far by the workerd processes of this edge,
    /// read from /proc (Linux). The runtime's own clock stands still while a request
    /// computes, so this is how the worker's CPU cost per event can be measured.
    pub fn workerd_cpu_seconds(&self) -> Option<f64> {
        let ticks_per_s = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(100.0);
        let mut ticks = 0u64;
        let pids = self.workerd_pids();
        if pids.is_empty() {
            return None;
        }
        for pid in pids {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // utime(14) stime(15), counted from `state` as field 3.
            let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
            let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
            ticks += utime + stime;
        }
        Some(ticks as f64 / ticks_per_s)
    }

    /// The peak resident memory (`VmHWM`) of this edge's workerd processes, in bytes:
    /// what the worker's isolates have needed at most so far.
    pub fn workerd_peak_rss_bytes(&self) -> Option<u64> {
        let mut total = 0u64;
        let pids = self.workerd_pids();
        if pids.is_empty() {
            return None;
        }
        for pid in pids {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let kb: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
            total += kb * 1024;
        }
        Some(total)
    }

    /// What wrangler printed: all of it, or when long its first 20 lines (where a
    /// crash names its cause) and its last 40.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.opts.log_file).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if lines.len() <= 60 {
            return lines.join("\n");
        }
        format!(
            "{}\n[… {} lines …]\n{}",
            lines[..20].join("\n"),
            lines.len() - 60,
            lines[lines.len() - 40..].join("\n")
        )
    }

    /// Stops wrangler and its workerd children (the whole process group).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pgid = child.id();
            let _ = Command::new("kill")
                .args(["-s", "TERM", "--", &format!("-{pgid}")])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{pgid}")])
                .status();
            let _ = child.wait();
            // Wait for the port to be released so a restart can bind it again.
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Stops and starts again on the same port with the same storage.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }
}

impl Drop for LocalEdge {
    fn drop(&mut self) {
        self.stop();
    }
}

/// True when a process of process group `pgid` listens on 127.0.0.1:`port` (Linux:
/// the socket's inode in `/proc/net/tcp`, found among the group's open files).
fn listens_in_group(port: u16, pgid: u32) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return true;
    };
    let local = format!("0100007F:{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // local_address, …, st (0A: LISTEN), …, inode
            (f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A"))
                .then(|| f.get(9).map(|i| format!("socket:[{i}]")))
                .flatten()
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return true;
    };
    for p in procs.flatten() {
        let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        // state ppid pgrp …
        if rest
            .split_whitespace()
            .nth(2)
            .and_then(|g| g.parse::<u32>().ok())
            != Some(pgid)
        {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| link.as_os_str() == i.as_str()) {
                    return true;
                }
            }
        }
    }
    false
}

fn health_ok(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    // Any answer means the runtime is up and serving the worker; a misconfigured worker
    // answers 503 there, which tests of bad configuration need to see.
    // Only the worker's own bad_config 503 counts, not a proxy's "not ready yet".
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.starts_with("HTTP/1.1 200")
        || (text.starts_with("HTTP/1.1 503") && text.contains("\"bad_config\""))
}

#[cfg(test)]
mod port_tests {
    use super::listens_in_group;

    /// This process's process group, from `/proc/self/stat`.
    fn own_group() -> u32 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let (_, rest) = stat.rsplit_once(") ").unwrap();
        rest.split_whitespace().nth(2).unwrap().parse().unwrap()
    }

    #[test]
    fn a_port_is_ours_only_when_our_group_listens_on_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(listens_in_group(port, own_group()));
        // Another group's server on the port is not ours; nor is a port nobody holds.
        assert!(!listens_in_group(port, own_group() + 1_000_000));
        drop(listener);
        assert!(!listens_in_group(port, own_group()));
    }
}
