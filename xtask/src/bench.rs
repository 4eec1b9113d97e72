//! `cargo xtask bench`: measures and prints a table. Benchmarks are not tests: nothing
//! here asserts a speed.
//!
//! - browser SDK and snippet sizes (against their budget)
//! - worker bundle size (wasm and JS glue, raw and gzip)
//! - requests/s of `POST /v1/batch` with 20 events, against the local runtime
//!   (`wrangler dev`, workerd with SQLite-backed Durable Objects)
//! - agent drain rows/s into each sink (`collector-agent run --once`, release build)
//!   and the agent's peak RSS
//! - every sink's bulk load of 100k events beside the database's own bulk load
//!   (`collector-agent/benches/sinks.rs`)
//! - identity resolution on 1M identify events, then incrementally
//!   (`collector-agent/benches/identity.rs`)
//! - activation latency: an event posted to the edge → the webhook call forwarding it
//!   (the agent running as a daemon at its default settings)

use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use collector_e2e::{EdgeOptions, LocalEdge, Toolchain, DEV_WRITE_KEY};

use crate::run;

const SECRET: &str = "bench-drain-secret";

/// How big the benchmark loads are: the real sizes, or a smoke run's (CI checks the
/// machinery works, never the numbers).
static SMOKE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes every later benchmark a smoke run (tiny sizes).
pub fn smoke() {
    SMOKE.store(true, Ordering::Relaxed);
}

fn scaled(n: u64) -> u64 {
    if SMOKE.load(Ordering::Relaxed) {
        n.min(4)
    } else {
        n
    }
}

fn gzip_len(bytes: &[u8]) -> usize {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let _ = gz.write_all(bytes);
    gz.finish().map(|v| v.len()).unwrap_or(0)
}

fn batch_body(seq: u64, events: usize) -> String {
    batch_body_from(seq, events, false)
}

/// A body of `events` track events: from as many visitors (a server-side batch; they
/// spread over the queue shards), or with `one_visitor` all from one (a browser's batch:
/// one shard).
fn batch_body_from(seq: u64, events: usize, one_visitor: bool) -> String {
    let batch: Vec<serde_json::Value> = (0..events)
        .map(|i| {
            let visitor = if one_visitor {
                seq as usize % 1000
            } else {
                (seq as usize * events + i) % 1000
            };
            serde_json::json!({
                "type": "track", "event": "Bench Event", "messageId": format!("bench-{seq}-{i}"),
                "anonymousId": format!("anon-{visitor}"),
                "properties": {"plan": "pro", "price": 19.99, "sku": format!("SKU-{i}")},
                "context": {"library": {"name": "bench", "version": "1"}, "page": {"path": "/checkout"}},
                "timestamp": "2026-11-24T12:00:00.000Z"
            })
        })
        .collect();
    serde_json::json!({"writeKey": DEV_WRITE_KEY, "sentAt": "2026-11-24T12:00:01.000Z", "batch": batch}).to_string()
}

pub fn bench(tools: &Toolchain) -> Result<()> {
    let mut rows: Vec<(String, String)> = Vec::new();

    rows.extend(sdk_sizes(tools)?);
    let wasm = std::fs::read(tools.root.join("collector-edge/build/index_bg.wasm"))?;
    let js = std::fs::read(tools.root.join("collector-edge/build/index.js"))?;
    rows.push((
        "worker wasm, raw".into(),
        format!("{:.1} KiB", wasm.len() as f64 / 1024.0),
    ));
    rows.push((
        "worker wasm, gzip -9".into(),
        format!("{:.1} KiB", gzip_len(&wasm) as f64 / 1024.0),
    ));
    rows.push((
        "worker JS glue, raw / gzip".into(),
        format!(
            "{:.1} / {:.1} KiB",
            js.len() as f64 / 1024.0,
            gzip_len(&js) as f64 / 1024.0
        ),
    ));

    eprintln!("bench: core per-event costs (release build)");
    let out = Command::new("cargo")
        .args([
            "run",
            "--release",
            "--quiet",
            "-p",
            "xtask",
            "--",
            "bench-core",
        ])
        .current_dir(&tools.root)
        .output()
        .context("cargo run --release -p xtask -- bench-core")?;
    anyhow::ensure!(
        out.status.success(),
        "bench-core failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some((k, v)) = line.split_once('\t') {
            rows.push((k.to_string(), v.to_string()));
        }
    }

    eprintln!("bench: building the agent (release)");
    run(Command::new("cargo")
        .args(["build", "--release", "--quiet", "-p", "collector-agent"])
        .current_dir(&tools.root))?;

    eprintln!("bench: the agent's drain of a backlog");
    rows.extend(drain_only(tools)?);

    // (The pipeline-in-workerd rows come with the edge load, below.)
    eprintln!("bench: the edge under load, 1-, 20- and 100-event bodies");
    rows.extend(edge_load(tools)?);

    eprintln!("bench: activation latency (edge receipt → webhook call)");
    rows.extend(activation_latency(tools)?);

    // Every sink's bulk load beside the database's own (collector-agent/benches/sinks.rs),
    // and identity resolution on 1M identify events (collector-agent/benches/identity.rs).
    for bench in ["sinks", "identity"] {
        eprintln!("bench: cargo bench -p collector-agent --bench {bench}");
        rows.extend(agent_bench(tools, bench)?);
    }

    print_table(&rows);
    Ok(())
}

/// Which warehouse a drain benchmark loads, as its `[warehouse]` keys.
pub struct DrainSink {
    /// `DuckDB`, `PostgreSQL`, …
    pub label: &'static str,
    pub warehouse: String,
    /// Agent keys of its own (before `BENCH_AGENT`'s).
    pub agent: &'static str,
    /// The agent's environment beyond the bench's own (the lean recipes' allocator
    /// setting).
    pub env: &'static [(&'static str, &'static str)],
}

/// The DuckDB settings that keep the embedded agent's loads under 100 MB (README,
/// Memory): a smaller buffer pool, row groups that bound a checkpoint's work, smaller
/// leases.
pub const LEAN_DUCKDB: &str =
    "memory_cap = \"32MB\"\nrow_group_size = 16384\nthreads = 1\ncheckpoint_on_stop = false";
pub const LEAN_AGENT: &str = "lease_batches = 2";
/// The lake's DuckDB settings that keep the agent under 100 MB with identity on (README,
/// Memory), with [`LEAN_AGENT`]'s leases.
pub const LEAN_LAKE: &str = "memory_cap = \"32MB\"\nthreads = 1";
/// The same, with identity left to another agent (its profile rebuild needs more).
pub const LEAN_AGENT_LOADS: &str = "lease_batches = 2\nidentity = { enabled = false }";
/// The lean DuckDB recipe's environment (README, Memory): glibc gives freed memory at the
/// top of the agent's heap back from 128 KiB on, not from its default, which grows with
/// the largest block freed (BENCHMARKS.md, "Twenty-eighth round": ~3 MB).
pub const LEAN_ENV: &[(&str, &str)] = &[("MALLOC_TRIM_THRESHOLD_", "131072")];

/// A backlog for the agent: 20-event bodies from 16 senders through `wrangler dev`
/// (1,800 requests, 36,000 events; `BENCH_DRAIN_REQUESTS` sets the count), then
/// `collector-agent run --once` drains it into a fresh warehouse (`sink`): its rows/s,
/// rows lost, and its peak RSS (sampled from `/proc`). `cargo xtask bench --drain`
/// prints only this, for every sink.
pub fn drain_run(
    tools: &Toolchain,
    edge: &LocalEdge,
    dir: &std::path::Path,
    sink: &DrainSink,
) -> Result<Vec<(String, String)>> {
    let mut rows = Vec::new();
    let seq = AtomicU64::new(0);
    let connections = 16;
    let r = load_run(
        &format!("{}/v1/batch", edge.url),
        20,
        drain_requests(),
        connections,
        &seq,
        &|| edge.workerd_cpu_seconds(),
    )?;
    rows.push((
        format!(
            "POST /v1/batch (20 events), wrangler dev, {connections} conns (backlog for {})",
            sink.label
        ),
        r.summary(),
    ));

    // Drain what was accepted into a fresh warehouse.
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "edge_url = \"{}\"\ndrain_secret = \"{SECRET}\"\n{}\n{}\n[warehouse]\n{}\n",
            edge.url,
            sink.agent,
            // The agent's defaults; to measure its own keys: `BENCH_AGENT='lease_batches = 50'`.
            std::env::var("BENCH_AGENT").unwrap_or_default(),
            sink.warehouse,
        ),
    )?;
    // `BENCH_AGENT_BIN=PATH`: another build of the agent (an earlier commit's, to
    // compare).
    let agent = std::env::var_os("BENCH_AGENT_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tools.root.join("target/release/collector-agent"));
    // `BENCH_AGENT_LOG=DIR`: the agent logs at `info` (limits raised, identity runs),
    // kept as `DIR/<sink>.log`.
    let log = if std::env::var_os("BENCH_AGENT_LOG").is_some() {
        "collector_agent=info"
    } else {
        "warn"
    };
    // `BENCH_DRAIN_DAEMON=WAVES`: the agent as a daemon instead, through that many
    // backlogs like the one above, and its memory at rest after each.
    if let Some(waves) = std::env::var("BENCH_DRAIN_DAEMON")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|w| *w > 0)
    {
        return daemon_waves(edge, &config, &agent, log, sink, r, &seq, waves, rows);
    }
    let t = Instant::now();
    let child = Command::new(agent)
        .args(["run", "--once", "--config"])
        .arg(&config)
        .env("RUST_LOG", log)
        .envs(sink.env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("run the agent")?;
    let sampler = RssSampler::start(child.id(), sink.label);
    let out = child.wait_with_output().context("run the agent")?;
    let drain_s = t.elapsed().as_secs_f64();
    let peak_mb = sampler.stop();
    keep_log(sink.label, &out.stderr)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "agent failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inserted: u64 = stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("inserted="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    rows.push((
        format!("agent drain into {} (lease+decode+load+ack)", sink.label),
        format!(
            "{:.0} rows/s ({inserted} rows in {drain_s:.2} s)",
            inserted as f64 / drain_s
        ),
    ));
    rows.push((
        "  rows lost (events accepted - rows inserted)".into(),
        r.accepted_events.saturating_sub(inserted).to_string(),
    ));
    rows.push(("  agent peak RSS".into(), format!("{peak_mb:.1} MB")));
    // A run that finished can still have failed a step after its loads (identity
    // running out of memory): the figures above are only what they say with none.
    rows.push((
        "  agent warnings".into(),
        warnings(&String::from_utf8_lossy(&out.stderr)),
    ));
    Ok(rows)
}

/// Requests of one drain backlog: 1,800 (36,000 events), or `BENCH_DRAIN_REQUESTS`
/// (5400: three times the backlog, to see what grows with it); scaled for a smoke run.
fn drain_requests() -> u64 {
    scaled(
        std::env::var("BENCH_DRAIN_REQUESTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_800),
    )
}

/// The agent's resident memory, sampled from `/proc` every 20 ms while it runs: its
/// peak (`VmHWM`) and the last value. `BENCH_SMAPS=DIR` keeps `/proc/PID/smaps` as it
/// was at the highest RSS sampled, as `DIR/<sink>.smaps`, to see what the peak is made of.
struct RssSampler {
    peak_kb: Arc<AtomicU64>,
    now_kb: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32, label: &str) -> RssSampler {
        let smaps_out = std::env::var_os("BENCH_SMAPS").map(|d| {
            std::path::PathBuf::from(d).join(format!("{}.smaps", label.replace(' ', "_")))
        });
        let peak_kb = Arc::new(AtomicU64::new(0));
        let now_kb = Arc::new(AtomicU64::new(0));
        // `BENCH_RSS_TRACE=DIR`: every sample, as `DIR/<sink>.rss` (`ms-since-start kB`).
        let mut trace = std::env::var_os("BENCH_RSS_TRACE").and_then(|d| {
            std::fs::File::create(
                std::path::PathBuf::from(d).join(format!("{}.rss", label.replace(' ', "_"))),
            )
            .ok()
        });
        let (peak, now) = (peak_kb.clone(), now_kb.clone());
        let thread = std::thread::spawn(move || {
            let t = Instant::now();
            let mut highest_rss = 0;
            loop {
                let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                    return;
                };
                let kb = |key: &str| {
                    status
                        .lines()
                        .find_map(|l| l.strip_prefix(key))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                };
                if let Some(kb) = kb("VmHWM:") {
                    peak.fetch_max(kb, Ordering::Relaxed);
                }
                if let Some(rss) = kb("VmRSS:") {
                    now.store(rss, Ordering::Relaxed);
                    if let Some(f) = trace.as_mut() {
                        let _ = writeln!(f, "{} {rss}", t.elapsed().as_millis());
                    }
                    if let Some(out) = smaps_out.as_ref().filter(|_| rss > highest_rss) {
                        highest_rss = rss;
                        if let Ok(smaps) = std::fs::read(format!("/proc/{pid}/smaps")) {
                            let _ = std::fs::write(out, smaps);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        RssSampler {
            peak_kb,
            now_kb,
            thread,
        }
    }

    /// The resident memory last sampled, in MB.
    fn now_mb(&self) -> f64 {
        self.now_kb.load(Ordering::Relaxed) as f64 / 1024.0
    }

    /// The peak, in MB, once the process has exited.
    fn stop(self) -> f64 {
        let _ = self.thread.join();
        self.peak_kb.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

/// Keeps the agent's log as `BENCH_AGENT_LOG/<sink>.log` when asked to.
fn keep_log(label: &str, stderr: &[u8]) -> Result<()> {
    if let Some(d) = std::env::var_os("BENCH_AGENT_LOG") {
        let path =
            std::path::PathBuf::from(d).join(format!("{}.log", label.replace([' ', ','], "_")));
        std::fs::write(&path, stderr).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// The agent as a daemon (`collector-agent run`, stopped with SIGTERM at the end) through
/// `waves` backlogs: the first is posted before it starts (`first`), each later one
/// while it idles. For each wave: its rows/s (from the agent's start, or the wave's
/// first request, to the moment `/metrics` counts its last row) and the agent's
/// resident memory 10 s later, at rest (identity and audiences run after a load);
/// then the peak over all waves.
#[allow(clippy::too_many_arguments)]
fn daemon_waves(
    edge: &LocalEdge,
    config: &std::path::Path,
    agent: &std::path::Path,
    log: &str,
    sink: &DrainSink,
    first: LoadRun,
    seq: &AtomicU64,
    waves: u32,
    mut rows: Vec<(String, String)>,
) -> Result<Vec<(String, String)>> {
    let metrics = format!("127.0.0.1:{}", collector_e2e::free_port());
    let mut text = std::fs::read_to_string(config)?;
    text = format!("metrics_addr = \"{metrics}\"\n{text}");
    std::fs::write(config, text)?;
    let mut child = Command::new(agent)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", log)
        .envs(sink.env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("run the agent")?;
    let sampler = RssSampler::start(child.id(), sink.label);
    // Read as it comes: a full pipe would stop the agent.
    let stderr_reader = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = Vec::new();
            let _ = e.read_to_end(&mut buf);
            buf
        })
    });
    let client = reqwest::blocking::Client::new();
    // Rows in `tracks` (every bench event is a track), from the agent's own count.
    let loaded = || -> Option<u64> {
        let body = client
            .get(format!("http://{metrics}/metrics"))
            .send()
            .ok()?
            .text()
            .ok()?;
        body.lines()
            .find_map(|l| {
                l.strip_prefix("collector_agent_events_inserted_total{table=\"tracks\"} ")
            })
            .and_then(|v| v.trim().parse().ok())
    };
    let mut accepted = 0;
    let mut run = Some(first);
    let result = (|| -> Result<()> {
        for wave in 1..=waves {
            let t = Instant::now();
            let r = match run.take() {
                Some(r) => r,
                None => load_run(
                    &format!("{}/v1/batch", edge.url),
                    20,
                    drain_requests(),
                    16,
                    seq,
                    &|| edge.workerd_cpu_seconds(),
                )?,
            };
            accepted += r.accepted_events;
            let deadline = Instant::now() + Duration::from_secs(600);
            let n = loop {
                let n = loaded().unwrap_or(0);
                if n >= accepted {
                    break n;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "wave {wave}: the agent loaded {n} of {accepted} events in 10 minutes"
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            let secs = t.elapsed().as_secs_f64();
            std::thread::sleep(Duration::from_secs(10));
            rows.push((
                format!("agent daemon into {}, wave {wave} of {waves}", sink.label),
                format!(
                    "{:.0} rows/s ({} rows in {secs:.2} s, posting included after the first); RSS at rest {:.1} MB",
                    r.accepted_events as f64 / secs,
                    r.accepted_events,
                    sampler.now_mb()
                ),
            ));
            rows.push((
                "  rows loaded beyond the events accepted".into(),
                (n - accepted).to_string(),
            ));
        }
        Ok(())
    })();
    let _ = Command::new("kill")
        .args(["-s", "TERM", &child.id().to_string()])
        .status();
    let status = child.wait().context("wait for the agent")?;
    let stderr = stderr_reader
        .and_then(|t| t.join().ok())
        .unwrap_or_default();
    let peak_mb = sampler.stop();
    keep_log(sink.label, &stderr)?;
    result?;
    anyhow::ensure!(
        status.success(),
        "agent stopped with {status}: {}",
        String::from_utf8_lossy(&stderr)
    );
    rows.push((
        "  agent peak RSS, all waves".into(),
        format!("{peak_mb:.1} MB"),
    ));
    rows.push((
        "  agent warnings".into(),
        warnings(&String::from_utf8_lossy(&stderr)),
    ));
    Ok(rows)
}

/// The agent's `WARN`/`ERROR` log lines: `none`, or how many and the first.
fn warnings(stderr: &str) -> String {
    let lines: Vec<String> = stderr
        .lines()
        .map(strip_ansi)
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    match lines.first() {
        None => "none".into(),
        Some(first) => {
            let text: String = first
                .split_once("collector_agent")
                .map_or(first.as_str(), |(_, rest)| rest)
                .chars()
                .take(140)
                .collect();
            format!(
                "{}, first: {}",
                lines.len(),
                text.trim_start_matches([':', ' '])
            )
        }
    }
}

/// A log line without its colour codes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Runs one of the agent's `cargo bench` targets; its `label<TAB>result` lines.
fn agent_bench(tools: &Toolchain, bench: &str) -> Result<Vec<(String, String)>> {
    let out = Command::new("cargo")
        .args([
            "bench",
            "--quiet",
            "-p",
            "collector-agent",
            "--bench",
            bench,
        ])
        .current_dir(&tools.root)
        .output()
        .with_context(|| format!("cargo bench --bench {bench}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{bench} bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

pub fn print_table(rows: &[(String, String)]) {
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(10);
    println!("| {:<w$} | result |", "benchmark");
    println!("|{}|{}|", "-".repeat(w + 2), "-".repeat(40));
    for (k, v) in rows {
        println!("| {k:<w$} | {v} |");
    }
}

/// The browser SDK's sizes, from the build's `sdk-js/dist/sizes.json`, against the budget.
pub fn sdk_sizes(tools: &Toolchain) -> Result<Vec<(String, String)>> {
    let path = tools.root.join("sdk-js/dist/sizes.json");
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?,
    )?;
    let n = |p: &str| {
        v.pointer(p)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    Ok(vec![
        (
            "SDK collector.js (IIFE), minified / gzip -9".into(),
            format!(
                "{} B / {} B (budget {} B gzip)",
                n("/sdk/raw"),
                n("/sdk/gzip"),
                n("/budget/sdkGzip")
            ),
        ),
        (
            "SDK ES module, minified / gzip -9".into(),
            format!("{} B / {} B", n("/esm/raw"), n("/esm/gzip")),
        ),
        (
            "snippet, minified".into(),
            format!(
                "{} B (budget {} B)",
                n("/snippet/raw"),
                n("/budget/snippetMin")
            ),
        ),
    ])
}

/// Native per-event cost of the core: parsing a 20-event batch, with and without the
/// privacy pipeline (the shipped privacy.toml, EEA and US visitors).
pub fn core_costs(tools: &Toolchain) -> Result<Vec<(String, String)>> {
    use collector_core::ingest::{parse_body_with_privacy, Endpoint};
    use collector_core::pii::PiiHasher;
    use collector_core::privacy::{PrivacyEngine, RequestSignals};
    let policy_text = std::fs::read_to_string(tools.root.join("privacy.toml"))?;
    let policy = collector_core::policy::parse(&policy_text)
        .map_err(|e| anyhow::anyhow!("privacy.toml: {e:?}"))?;
    // The same policy without value detection, to price the detector alone.
    let mut no_detect = policy.clone();
    no_detect.pii_detect = collector_core::policy::DetectRules {
        email: collector_core::policy::DetectAction::Off,
        phone: collector_core::policy::DetectAction::Off,
        card: collector_core::policy::DetectAction::Off,
    };
    let engine = PrivacyEngine::new(policy, PiiHasher::new("v1", b"bench-key-bench-key", &[]));
    let engine_no_detect =
        PrivacyEngine::new(no_detect, PiiHasher::new("v1", b"bench-key-bench-key", &[]));
    let body = batch_body(1, 20).replace(
        "\"properties\":{",
        "\"properties\":{\"email\":\"Jane@Example.com\",",
    );
    // A browser-like event: page context, user agent, a few text properties, and one
    // e-mail address in the page title for the detector to find.
    let browser_body = body.replace(
        "\"page\":{\"path\":\"/checkout\"}",
        "\"page\":{\"path\":\"/checkout\",\"url\":\"https://shop.example.com/checkout?step=2&utm_source=news\",\"referrer\":\"https://www.example.org/search?q=running+shoes\",\"title\":\"Checkout for jane@example.com - Shop\"},\"userAgent\":\"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36\",\"locale\":\"en-US\"",
    );
    let mut rows = Vec::new();
    let signals_us =
        RequestSignals::new(false, None, Some("US".into()), Some("203.0.113.9".into()));
    let signals_fr =
        RequestSignals::new(false, None, Some("FR".into()), Some("203.0.113.9".into()));
    let cases: [(&str, &str, &PrivacyEngine, Option<&RequestSignals>); 5] = [
        ("core: parse + validate (no policy)", &body, &engine, None),
        (
            "core: parse + policy, US visitor (keep, hash email, truncate IP)",
            &body,
            &engine,
            Some(&signals_us),
        ),
        (
            "core: parse + policy, EEA visitor (anonymise)",
            &body,
            &engine,
            Some(&signals_fr),
        ),
        (
            "core: parse + policy, US, browser event (page, UA; PII detection finds 1 e-mail)",
            &browser_body,
            &engine,
            Some(&signals_us),
        ),
        (
            "core: the same browser event, PII value detection off",
            &browser_body,
            &engine_no_detect,
            Some(&signals_us),
        ),
    ];
    for (label, body, engine, signals) in cases {
        let iterations = scaled(2_000) as u32;
        let start = Instant::now();
        for _ in 0..iterations {
            let parsed = parse_body_with_privacy(
                Endpoint::Batch,
                body.as_bytes(),
                0,
                &mut || "bench-id".to_string(),
                signals.map(|s| (engine, s)),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            std::hint::black_box(parsed);
        }
        let per_event = start.elapsed().as_secs_f64() / f64::from(iterations * 20);
        rows.push((
            format!("{label}, native"),
            format!("{:.2} µs/event", per_event * 1e6),
        ));
    }
    // What a queue shard does with an append of those events: read the counts and
    // keep the events' bytes as they came (append v3); beside it, what it did before
    // (decode every event and encode the chunk again), which it still does when a
    // suppression list has to read the events' ids.
    {
        use collector_core::codec::{
            decode_append, decode_append_parts, encode_append, encode_events_raw, Append,
        };
        let parsed = parse_body_with_privacy(
            Endpoint::Batch,
            body.as_bytes(),
            0,
            &mut || "bench-id".to_string(),
            Some((&engine, &signals_us)),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let n = parsed.accepted.len();
        let append = encode_append(&Append {
            events: parsed.accepted,
            ..Append::default()
        })?;
        let iterations = scaled(2_000) as u32;
        let per_event = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
            let start = Instant::now();
            for _ in 0..iterations {
                f()?;
            }
            Ok(start.elapsed().as_secs_f64() / f64::from(iterations * n as u32))
        };
        let stored = per_event(&|| {
            let parts = decode_append_parts(&append)?;
            std::hint::black_box(parts.events_raw.to_vec());
            Ok(())
        })?;
        let decoded = per_event(&|| {
            let a = decode_append(&append)?;
            std::hint::black_box(encode_events_raw(&a.events)?);
            Ok(())
        })?;
        rows.push((
            "core: shard append, events stored as sent, native".into(),
            format!("{:.3} µs/event", stored * 1e6),
        ));
        rows.push((
            "core: shard append, events decoded + encoded (with suppressions), native".into(),
            format!("{:.2} µs/event", decoded * 1e6),
        ));
    }
    // The floor of the same work: the same events parsed as `serde_json::Value`, two
    // HMACs each (an id and the e-mail), and encoded back to JSON text.
    let iterations = scaled(2_000) as u32;
    let key = b"bench-key-bench-key";
    let start = Instant::now();
    for _ in 0..iterations {
        use hmac::Mac;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let mut out = Vec::new();
        for ev in v["batch"].as_array().into_iter().flatten() {
            let mut tags = Vec::new();
            for field in [&ev["anonymousId"], &ev["properties"]["email"]] {
                let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key)?;
                mac.update(field.as_str().unwrap_or_default().as_bytes());
                tags.push(mac.finalize().into_bytes());
            }
            out.push((serde_json::to_string(ev)?, tags));
        }
        std::hint::black_box(out);
    }
    let floor = start.elapsed().as_secs_f64() / f64::from(iterations * 20);
    rows.push((
        "core floor: parse as serde_json::Value + 2 HMACs + encode, native".into(),
        format!("{:.2} µs/event", floor * 1e6),
    ));
    Ok(rows)
}

/// Events posted one at a time to a fresh edge, forwarded by the agent (`run`, default
/// poll and seal settings) to a webhook on a local recording server: for each event,
/// the time from the edge's 200 to the webhook call carrying it.
pub fn activation_latency(tools: &Toolchain) -> Result<Vec<(String, String)>> {
    const EVENTS: usize = 1000;
    let dir = std::env::temp_dir().join(format!("edge-collector-latency-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut edge = LocalEdge::start(EdgeOptions::in_dir(&dir, SECRET))?;
    let arrived: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>> = Arc::default();
    let hook = {
        let arrived = arrived.clone();
        collector_e2e::recorder::Recorder::start_with(0, move |r| {
            let now = Instant::now();
            let body: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
            let mut map = arrived.lock().unwrap();
            for item in body["items"].as_array().into_iter().flatten() {
                if let Some(id) = item["message_id"].as_str() {
                    map.entry(id.to_string()).or_insert(now);
                }
            }
        })?
    };
    let policy = std::fs::read_to_string(tools.root.join("privacy.toml"))?
        + "\n[destinations.latency_hook]\ncategories = [\"analytics\"]\n";
    std::fs::write(dir.join("privacy.toml"), policy)?;
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "edge_url = \"{}\"\ndrain_secret = \"{SECRET}\"\nprivacy = \"privacy.toml\"\n[warehouse]\npath = \"warehouse.duckdb\"
[[destinations]]\nname = \"latency_hook\"\nkind = \"webhook\"\nbase_url = \"{}/hook\"\nsecret_env = \"LATENCY_HOOK_SECRET\"\nevents = [\"Bench Latency\"]\n",
            edge.url, hook.url
        ),
    )?;
    let mut agent = Command::new(tools.root.join("target/release/collector-agent"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .env("LATENCY_HOOK_SECRET", "bench")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("run the agent")?;
    let client = reqwest::blocking::Client::new();
    let mut sent: Vec<(String, Instant)> = Vec::new();
    for i in 0..EVENTS {
        let id = format!("lat-{i}");
        let body = serde_json::json!({"writeKey": DEV_WRITE_KEY, "batch": [
            {"type": "track", "event": "Bench Latency", "anonymousId": format!("lat-{}", i % 20), "messageId": id,
             "context": {"consent": {"categoryPreferences": {"analytics": true}}}}]});
        let r = client
            .post(format!("{}/v1/batch", edge.url))
            .header("Content-Type", "text/plain")
            .body(body.to_string())
            .send()?;
        anyhow::ensure!(r.status().is_success(), "the edge answered {}", r.status());
        sent.push((id, Instant::now()));
        std::thread::sleep(Duration::from_millis(10));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while arrived.lock().unwrap().len() < EVENTS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    // When each row became visible in DuckDB (`loaded_at`, the load's commit) after
    // the edge received it (`received_at`), through the running agent.
    let out = Command::new(tools.root.join("target/release/collector-agent"))
        .args(["sql", "--csv", "--config"])
        .arg(&config)
        .arg("SELECT quantile_cont(epoch_ms(loaded_at) - epoch_ms(received_at), 0.5), quantile_cont(epoch_ms(loaded_at) - epoch_ms(received_at), 0.99), count(*) FROM tracks WHERE event_text = 'Bench Latency'")
        .output()
        .context("query the warehouse")?;
    let csv = String::from_utf8_lossy(&out.stdout).to_string();
    let duck: Vec<String> = csv
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split(',')
        .map(str::to_string)
        .collect();
    let _ = Command::new("kill")
        .args(["-s", "TERM", &agent.id().to_string()])
        .status();
    let _ = agent.wait();
    drop(hook);
    edge.stop();
    let _ = std::fs::remove_dir_all(&dir);
    let map = arrived.lock().unwrap();
    let mut ms: Vec<f64> = sent
        .iter()
        .filter_map(|(id, at)| {
            map.get(id)
                .map(|a| a.duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        ms.get(((ms.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let num = |i: usize| {
        duck.get(i)
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    Ok(vec![
        (
            format!(
                "edge receipt → row in DuckDB ({EVENTS} events, one per request, default settings)"
            ),
            format!(
                "p50 {:.0} ms, p99 {:.0} ms ({} of {EVENTS} loaded)",
                num(0),
                num(1),
                duck.get(2).map(|v| v.trim()).unwrap_or("?")
            ),
        ),
        (
            format!(
                "edge receipt → webhook call ({EVENTS} events, one per request, default settings)"
            ),
            format!(
                "p50 {:.0} ms, p99 {:.0} ms ({} of {EVENTS} delivered)",
                pct(0.5),
                pct(0.99),
                ms.len()
            ),
        ),
    ])
}

/// One load run's figures.
struct LoadRun {
    req_s: f64,
    events_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    failed: u64,
    /// Events in bodies answered 200, the warm-up's included.
    accepted_events: u64,
    /// Workerd CPU per event, in µs.
    cpu_us: Option<f64>,
}

impl LoadRun {
    /// The run on one line of the table.
    fn summary(&self) -> String {
        format!(
            "{:.0} req/s, {:.0} events/s, p50 {:.1} ms, p99 {:.1} ms, {} non-200, {}",
            self.req_s,
            self.events_s,
            self.p50_ms,
            self.p99_ms,
            self.failed,
            self.cpu_us
                .map(|c| format!("{c:.0} µs CPU/event"))
                .unwrap_or_else(|| "CPU n/a".into())
        )
    }
}

/// `requests` POSTs of `events`-event bodies to `url` from `senders` threads (after a
/// warm-up); `cpu` reads the server's CPU seconds.
fn load_run(
    url: &str,
    events: usize,
    requests: u64,
    senders: usize,
    seq: &AtomicU64,
    cpu: &dyn Fn() -> Option<f64>,
) -> Result<LoadRun> {
    load_run_as(
        url,
        DEV_WRITE_KEY,
        events,
        requests,
        senders,
        seq,
        cpu,
        false,
    )
}

/// [`load_run`] with a write key of one's own (sent as HTTP Basic username, and as
/// `writeKey` in the body), and bodies from one visitor each if `one_visitor`.
#[allow(clippy::too_many_arguments)]
fn load_run_as(
    url: &str,
    write_key: &str,
    events: usize,
    requests: u64,
    senders: usize,
    seq: &AtomicU64,
    cpu: &dyn Fn() -> Option<f64>,
    one_visitor: bool,
) -> Result<LoadRun> {
    let body_for =
        |seq: u64| batch_body_from(seq, events, one_visitor).replace(DEV_WRITE_KEY, write_key);
    let client = reqwest::blocking::Client::new();
    let mut warm_ok = 0;
    for _ in 0..5 {
        let resp = client
            .post(url)
            .basic_auth(write_key, Some(""))
            .body(body_for(seq.fetch_add(1, Ordering::Relaxed)))
            .send()?;
        warm_ok += u64::from(resp.status().as_u16() == 200);
    }
    let next = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let cpu_before = cpu();
    let start = Instant::now();
    let mut latencies: Vec<Duration> = Vec::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..senders)
            .map(|_| {
                let (next, failed, body_for) = (&next, &failed, &body_for);
                s.spawn(move || {
                    let client = reqwest::blocking::Client::new();
                    let mut lat = Vec::new();
                    while next.fetch_add(1, Ordering::Relaxed) < requests {
                        let body = body_for(seq.fetch_add(1, Ordering::Relaxed));
                        let t = Instant::now();
                        let ok = client
                            .post(url)
                            .basic_auth(write_key, Some(""))
                            .header("Content-Type", "application/json")
                            .body(body)
                            .send()
                            .map(|r| r.status().as_u16() == 200)
                            .unwrap_or(false);
                        lat.push(t.elapsed());
                        if !ok {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    lat
                })
            })
            .collect();
        for h in handles {
            latencies.extend(h.join().unwrap_or_default());
        }
    });
    let elapsed = start.elapsed().as_secs_f64();
    let cpu_s = match (cpu_before, cpu()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
            .as_secs_f64()
            * 1e3
    };
    let total = requests as f64 * events as f64;
    Ok(LoadRun {
        req_s: requests as f64 / elapsed,
        events_s: total / elapsed,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        failed: failed.load(Ordering::Relaxed),
        accepted_events: (warm_ok + requests - failed.load(Ordering::Relaxed)) * events as u64,
        cpu_us: cpu_s.map(|c| c / total * 1e6),
    })
}

/// The same floor as `xtask/floor-worker`, written in JavaScript: what the runtime does
/// per request with no wasm at all (printed for scale; the ratios the goals name are to
/// the Rust floor).
const FLOOR_WORKER: &str = r#"import { DurableObject } from "cloudflare:workers";
export class Floor extends DurableObject {
  constructor(ctx, env) {
    super(ctx, env);
    ctx.storage.sql.exec("CREATE TABLE IF NOT EXISTS bodies (id INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL)");
  }
  async fetch(request) {
    const body = await request.arrayBuffer();
    this.ctx.storage.sql.exec("INSERT INTO bodies (body) VALUES (?)", body);
    return new Response('{"success":true}', { headers: { "content-type": "application/json" } });
  }
}
export default {
  async fetch(request, env) {
    if (request.method !== "POST") return new Response("ok");
    const body = await request.arrayBuffer();
    const stub = env.FLOOR.get(env.FLOOR.idFromName("shard-0"));
    return stub.fetch("https://floor/", { method: "POST", body });
  },
};
"#;

/// The edge under load, for bodies of 1, 20 and 100 events (600, 400 and 300 requests
/// from 4 senders): through `wrangler dev` (what developers run), then the same worker
/// on `workerd serve` directly beside the floor worker, with the ratios. Workerd's CPU
/// per event counts all its processes. `cargo xtask bench --edge` prints only this.
pub fn edge_load(tools: &Toolchain) -> Result<Vec<(String, String)>> {
    edge_load_compare(tools, None)
}

/// [`edge_load`], and the same load against another Segment-compatible ingestion
/// server (`compare`: its base URL and write key), printed beside ours
/// (`cargo xtask bench --compare URL [--write-key KEY]`).
pub fn edge_load_compare(
    tools: &Toolchain,
    compare: Option<(&str, &str)>,
) -> Result<Vec<(String, String)>> {
    use collector_e2e::workerd::{DirectWorker, Module, WorkerSpec};
    let mut rows = Vec::new();
    let dir = std::env::temp_dir().join(format!("edge-collector-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let senders = 4;
    let seq = AtomicU64::new(1_000_000);
    let sizes = [(1usize, scaled(600)), (20, scaled(400)), (100, scaled(300))];
    let fmt = LoadRun::summary;

    {
        let mut edge = LocalEdge::start(EdgeOptions::in_dir(&dir.join("wrangler"), SECRET))?;
        rows.extend(pipeline_in_workerd(&edge)?);
        let url = format!("{}/v1/batch", edge.url);
        for (events, requests) in sizes {
            let r = load_run(&url, events, requests, senders, &seq, &|| {
                edge.workerd_cpu_seconds()
            })?;
            rows.push((format!("wrangler dev, {events}-event bodies"), fmt(&r)));
        }
        edge.stop();
    }

    let build = tools.root.join("collector-edge/build");
    let ours = WorkerSpec {
        modules: vec![
            Module::Js("index.js".into(), build.join("index.js")),
            Module::Wasm("index_bg.wasm".into(), build.join("index_bg.wasm")),
        ],
        vars: vec![
            ("WRITE_KEYS".into(), collector_e2e::DEV_WRITE_KEY.into()),
            ("ALLOWED_ORIGINS".into(), "*".into()),
            ("SHARDS".into(), "4".into()),
            ("DRAIN_SECRET".into(), SECRET.into()),
            (
                "PII_HMAC_KEY".into(),
                collector_e2e::edge::TEST_PII_KEY.into(),
            ),
        ],
        durable_object: Some(("QUEUE".into(), "QueueShard".into())),
        compatibility_date: "2026-11-01".into(),
    };
    // The floor the issue defines: our crate versions, one Durable Object SQLite write
    // per request. Beside it, the same floor written in JavaScript, for scale.
    let floor_build = crate::build_floor_worker(tools)?;
    let floor_rust = WorkerSpec {
        modules: vec![
            Module::Js("index.js".into(), floor_build.join("index.js")),
            Module::Wasm("index_bg.wasm".into(), floor_build.join("index_bg.wasm")),
        ],
        vars: Vec::new(),
        durable_object: Some(("FLOOR".into(), "Floor".into())),
        compatibility_date: "2026-11-01".into(),
    };
    let floor_js = dir.join("floor.js");
    std::fs::write(&floor_js, FLOOR_WORKER)?;
    let floor_js = WorkerSpec {
        modules: vec![Module::Js("floor.js".into(), floor_js)],
        vars: Vec::new(),
        durable_object: Some(("FLOOR".into(), "Floor".into())),
        compatibility_date: "2026-11-01".into(),
    };
    let started = Instant::now();
    let w = DirectWorker::start(&ours, &dir.join("ours"))?;
    // Cold start: from a fresh process to the first answer (compiling and
    // instantiating the wasm included).
    let client = reqwest::blocking::Client::new();
    client
        .post(format!("{}/v1/batch", w.url))
        .body(batch_body(seq.fetch_add(1, Ordering::Relaxed), 1))
        .send()?;
    rows.push((
        "workerd serve, our worker: process start to first answer".into(),
        format!("{:.0} ms", started.elapsed().as_secs_f64() * 1e3),
    ));
    let mut our_runs = Vec::new();
    for (events, requests) in sizes {
        let r = load_run(
            &format!("{}/v1/batch", w.url),
            events,
            requests,
            senders,
            &seq,
            &|| w.cpu_seconds(),
        )?;
        rows.push((
            format!("workerd serve, our worker, {events}-event bodies"),
            fmt(&r),
        ));
        our_runs.push(r);
    }
    // The same 100-event load, each body from one visitor (a browser's batch): one
    // queue shard per request, where the bodies above touch all four.
    let (events, requests) = sizes[2];
    let one_visitor = load_run_as(
        &format!("{}/v1/batch", w.url),
        DEV_WRITE_KEY,
        events,
        requests,
        senders,
        &seq,
        &|| w.cpu_seconds(),
        true,
    )?;
    rows.push((
        format!("workerd serve, our worker, {events}-event bodies from one visitor each"),
        fmt(&one_visitor),
    ));
    drop(w);
    for (name, spec) in [
        ("floor worker (Rust)", &floor_rust),
        ("floor worker (JS)", &floor_js),
    ] {
        let f = DirectWorker::start(spec, &dir.join(name.replace([' ', '(', ')'], "")))?;
        for ((events, requests), ours) in sizes.into_iter().zip(&our_runs) {
            let r = load_run(&f.url, events, requests, senders, &seq, &|| f.cpu_seconds())?;
            rows.push((
                format!("workerd serve, {name}, {events}-event bodies"),
                fmt(&r),
            ));
            let cpu_ratio = match (ours.cpu_us, r.cpu_us) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.1}× its CPU/event", a / b),
                _ => "CPU n/a".into(),
            };
            rows.push((
                format!("  ours / {name}, {events}-event bodies"),
                format!(
                    "{:.2}× its events/s, {cpu_ratio}",
                    ours.events_s / r.events_s
                ),
            ));
            if events == sizes[2].0 {
                rows.push((
                    format!("  ours / {name}, {events}-event bodies from one visitor each"),
                    format!(
                        "{:.2}× its events/s{}",
                        one_visitor.events_s / r.events_s,
                        match (one_visitor.cpu_us, r.cpu_us) {
                            (Some(a), Some(b)) if b > 0.0 =>
                                format!(", {:.1}× its CPU/event", a / b),
                            _ => String::new(),
                        }
                    ),
                ));
            }
        }
    }
    if let Some((base, key)) = compare {
        let url = format!("{}/v1/batch", base.trim_end_matches('/'));
        for ((events, requests), ours) in sizes.into_iter().zip(&our_runs) {
            let r = load_run_as(&url, key, events, requests, senders, &seq, &|| None, false)?;
            rows.push((format!("{base}, {events}-event bodies"), fmt(&r)));
            rows.push((
                format!("  ours (workerd serve) / {base}, {events}-event bodies"),
                format!("{:.2}× its events/s", ours.events_s / r.events_s),
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rows)
}

/// The pipeline alone inside the runtime, beside its floor: the CPU of one request that
/// runs it N times over a 20-event body (`/dev/bench/pipeline`, dev mode only).
fn pipeline_in_workerd(edge: &LocalEdge) -> Result<Vec<(String, String)>> {
    let mut rows = Vec::new();
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;
    let body = batch_body(7, 20).replace(
        "\"properties\":{",
        "\"properties\":{\"email\":\"Jane@Example.com\",",
    );
    // Warm up: the first requests pay for compiling and instantiating the wasm.
    for _ in 0..3 {
        client
            .post(format!("{}/dev/bench/pipeline?iterations=20", edge.url))
            .body(body.clone())
            .send()?;
    }
    for (label, query) in [
        (
            "worker: parse + validate (no policy), in workerd",
            "privacy=false",
        ),
        (
            "worker: parse + policy, US visitor, in workerd",
            "privacy=true&country=US",
        ),
        (
            "worker: parse + policy, EEA visitor (anonymise), in workerd",
            "privacy=true&country=FR",
        ),
        (
            "worker floor: parse as serde_json::Value + 2 HMACs + encode, in workerd",
            "floor=true",
        ),
    ] {
        let iterations = scaled(3000);
        let before = edge.workerd_cpu_seconds();
        let resp = client
            .post(format!(
                "{}/dev/bench/pipeline?iterations={iterations}&{query}",
                edge.url
            ))
            .body(body.clone())
            .send()?;
        anyhow::ensure!(
            resp.status().as_u16() == 200,
            "bench endpoint: {}",
            resp.text()?
        );
        let v: serde_json::Value = resp.json()?;
        let events = v["events"].as_f64().unwrap_or(0.0);
        if let (Some(a), Some(b)) = (before, edge.workerd_cpu_seconds()) {
            rows.push((
                label.into(),
                format!("{:.1} µs/event ({events} events)", (b - a) / events * 1e6),
            ));
        }
    }

    Ok(rows)
}

/// `cargo xtask bench --drain`: only [`drain_run`], on a fresh local edge, into each
/// sink in turn (`BENCH_DRAIN_SINKS=duckdb,postgres` for some; PostgreSQL and
/// ClickHouse are started on loopback for it). The embedded DuckDB runs inside the
/// agent's process, so its RSS is the database's too; the others show the agent alone.
pub fn drain_only(tools: &Toolchain) -> Result<Vec<(String, String)>> {
    let only = std::env::var("BENCH_DRAIN_SINKS").unwrap_or_else(|_| {
        "duckdb,duckdb-lean,duckdb-lean-loads,postgres,clickhouse,parquet,parquet-lean".into()
    });
    let dir = std::env::temp_dir().join(format!("edge-collector-drain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut edge = LocalEdge::start(EdgeOptions::in_dir(&dir, SECRET))?;
    // The first sink that fails ends the run; the edge is stopped either way.
    let rows = only
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(|kind| drain_into(tools, &edge, &dir, kind))
        .collect::<Result<Vec<_>>>()
        .map(|per_sink| per_sink.concat());
    edge.stop();
    let _ = std::fs::remove_dir_all(&dir);
    rows
}

/// Removes the DuckDB warehouse an earlier drain into `dir` left.
fn fresh_duckdb(dir: &std::path::Path) {
    let _ = std::fs::remove_file(dir.join("warehouse.duckdb"));
    let _ = std::fs::remove_file(dir.join("warehouse.duckdb.wal"));
}

/// One drain benchmark into a fresh warehouse of `kind`, its server started for it.
fn drain_into(
    tools: &Toolchain,
    edge: &LocalEdge,
    dir: &std::path::Path,
    kind: &str,
) -> Result<Vec<(String, String)>> {
    eprintln!("bench: the agent's drain into {kind}");
    // The servers run until the drain returns (each stops when dropped).
    let mut agent = "";
    let mut env: &'static [(&'static str, &'static str)] = &[];
    let (label, warehouse, _server): (_, String, Option<Box<dyn std::any::Any>>) = match kind {
        "duckdb-lean" | "duckdb-lean-loads" => {
            fresh_duckdb(dir);
            let loads = kind == "duckdb-lean-loads";
            agent = if loads { LEAN_AGENT_LOADS } else { LEAN_AGENT };
            env = LEAN_ENV;
            (
                if loads {
                    "DuckDB, lean settings, identity off"
                } else {
                    "DuckDB, lean settings"
                },
                format!("path = \"warehouse.duckdb\"\n{LEAN_DUCKDB}"),
                None,
            )
        }
        "duckdb" => {
            fresh_duckdb(dir);
            // `BENCH_DUCKDB_SEED=FILE`: drain into a copy of a warehouse that holds
            // events already (to see what grows with the warehouse) instead of a
            // fresh one.
            if let Some(seed) = std::env::var_os("BENCH_DUCKDB_SEED") {
                std::fs::copy(&seed, dir.join("warehouse.duckdb"))
                    .with_context(|| format!("BENCH_DUCKDB_SEED {}", seed.to_string_lossy()))?;
            }
            // To measure a setting: `BENCH_WAREHOUSE='memory_limit = "64MB"'`.
            let extra = std::env::var("BENCH_WAREHOUSE").unwrap_or_default();
            (
                "DuckDB",
                format!("path = \"warehouse.duckdb\"\n{extra}"),
                None,
            )
        }
        "postgres" => {
            let pg = collector_e2e::postgres::LocalPostgres::start()?;
            let w = format!("kind = \"postgres\"\nurl = \"{}\"", pg.url);
            ("PostgreSQL", w, Some(Box::new(pg)))
        }
        "clickhouse" => {
            let ch = collector_e2e::clickhouse::LocalClickHouse::start()?;
            let w = format!("kind = \"clickhouse\"\nurl = \"{}\"", ch.url);
            ("ClickHouse", w, Some(Box::new(ch)))
        }
        "parquet" | "parquet-lean" => {
            let _ = std::fs::remove_dir_all(dir.join("lake"));
            let lean = kind == "parquet-lean";
            // `BENCH_WAREHOUSE` as for DuckDB (the lake's DuckDB takes the same memory keys).
            let extra = if lean {
                agent = LEAN_AGENT;
                LEAN_LAKE.to_string()
            } else {
                std::env::var("BENCH_WAREHOUSE").unwrap_or_default()
            };
            let w = format!("kind = \"parquet\"\npath = \"lake\"\n{extra}");
            (
                if lean {
                    "the Parquet lake, lean settings"
                } else {
                    "the Parquet lake"
                },
                w,
                None,
            )
        }
        other => anyhow::bail!(
            "BENCH_DRAIN_SINKS: unknown sink {other:?} (duckdb, duckdb-lean, duckdb-lean-loads, postgres, clickhouse, parquet, parquet-lean)"
        ),
    };
    drain_run(
        tools,
        edge,
        dir,
        &DrainSink {
            label,
            warehouse,
            agent,
            env,
        },
    )
}
