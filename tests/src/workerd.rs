//! A worker on `workerd serve` directly (the binary the wrangler package ships), with
//! a generated config: no `wrangler dev` proxy in front, so what it measures is the
//! worker and the runtime. For the benchmarks (`cargo xtask bench --edge`); the tests
//! keep `wrangler dev` (`LocalEdge`), which is what developers run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::{free_port, Toolchain};

/// One ES module of a worker: its name (as the others import it) and its file.
pub enum Module {
    Js(String, PathBuf),
    Wasm(String, PathBuf),
}

/// A worker to serve: its modules (the first is the entry), text bindings, and a
/// SQLite-backed Durable Object class bound as `binding`, if any.
pub struct WorkerSpec {
    pub modules: Vec<Module>,
    pub vars: Vec<(String, String)>,
    pub durable_object: Option<(String, String)>,
    pub compatibility_date: String,
}

pub struct DirectWorker {
    child: Child,
    pub url: String,
}

fn capnp_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

impl DirectWorker {
    /// Writes the config into `dir` (its Durable Object storage too) and starts
    /// `workerd serve` on a free loopback port; waits until it answers.
    pub fn start(spec: &WorkerSpec, dir: &Path) -> anyhow::Result<DirectWorker> {
        let tools = Toolchain::discover();
        let bin = tools
            .root
            .join("node_modules/@cloudflare/workerd-linux-64/bin/workerd");
        anyhow::ensure!(
            bin.exists(),
            "{} not found (cargo xtask setup)",
            bin.display()
        );
        std::fs::create_dir_all(dir.join("do"))?;
        let port = free_port();
        // `embed` reads files beside the config: copy each module there.
        let mut modules: Vec<String> = Vec::new();
        for m in &spec.modules {
            let (name, path, kind) = match m {
                Module::Js(name, path) => (name, path, "esModule"),
                Module::Wasm(name, path) => (name, path, "wasm"),
            };
            std::fs::copy(path, dir.join(name))
                .with_context(|| format!("copy {}", path.display()))?;
            modules.push(format!(
                "(name = {}, {kind} = embed {})",
                capnp_string(name),
                capnp_string(name)
            ));
        }
        let mut bindings: Vec<String> = spec
            .vars
            .iter()
            .map(|(k, v)| format!("(name = {}, text = {})", capnp_string(k), capnp_string(v)))
            .collect();
        let mut objects = String::new();
        if let Some((binding, class)) = &spec.durable_object {
            bindings.push(format!(
                "(name = {}, durableObjectNamespace = {})",
                capnp_string(binding),
                capnp_string(class)
            ));
            objects = format!(
                "durableObjectNamespaces = [(className = {}, uniqueKey = {}, enableSql = true)],\n  durableObjectStorage = (localDisk = \"do-disk\"),",
                capnp_string(class),
                capnp_string(&format!("bench-{class}"))
            );
        }
        let config = format!(
            "using Workerd = import \"/workerd/workerd.capnp\";

const config :Workerd.Config = (
  services = [
    (name = \"main\", worker = .worker),
    (name = \"do-disk\", disk = (path = {disk}, writable = true)),
  ],
  sockets = [(name = \"http\", address = \"127.0.0.1:{port}\", http = (), service = \"main\")],
);

const worker :Workerd.Worker = (
  modules = [{modules}],
  bindings = [{bindings}],
  compatibilityDate = {date},
  {objects}
);
",
            disk = capnp_string(&dir.join("do").display().to_string()),
            modules = modules.join(", "),
            bindings = bindings.join(", "),
            date = capnp_string(&spec.compatibility_date),
        );
        let config_path = dir.join("workerd.capnp");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.join("workerd.log"))?;
        let child = Command::new(&bin)
            .args(["serve", "--experimental"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start workerd")?;
        let mut w = DirectWorker {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(w);
            }
            if let Ok(Some(status)) = w.child.try_wait() {
                anyhow::bail!(
                    "workerd exited ({status}): {}",
                    std::fs::read_to_string(dir.join("workerd.log")).unwrap_or_default()
                );
            }
            anyhow::ensure!(Instant::now() < deadline, "workerd did not listen in 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// CPU seconds (user + system) workerd has used so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        let after = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        Some(ticks / 100.0)
    }

    /// Peak resident memory of workerd, in bytes.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    }
}

impl Drop for DirectWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
