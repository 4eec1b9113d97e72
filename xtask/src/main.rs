//! `cargo xtask`: everything beyond `cargo build`.
//!
//! - `setup`      install the pinned tools (idempotent): wasm target, npm packages
//!   (Node 22, wrangler, binaryen, esbuild, playwright-core, prebuilt DuckDB),
//!   worker-build, wasm-bindgen-cli, Debian's Chromium
//! - `build-edge` build the browser SDK (esbuild, size budget) and the worker
//!   (worker-build, release); the Worker serves the SDK as a static asset
//! - `sdk-size`   build the SDK and print its sizes against the budget
//! - `dev`        the local stack: worker under wrangler dev, agent into DuckDB, demo page
//! - `ci`         setup, then every test
//! - `bench`      benchmarks, printed as a table

mod bench;
mod dev;
mod setup;

use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use collector_e2e::Toolchain;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args.first().map(String::as_str).unwrap_or("help");
    let rest = &args[args.len().min(1)..];
    let tools = Toolchain::discover();
    match cmd {
        "setup" => setup::setup(&tools, true),
        "sdk-size" => {
            setup::setup(&tools, false)?;
            build_sdk(&tools)?;
            bench::print_table(&bench::sdk_sizes(&tools)?);
            Ok(())
        }
        "build-edge" => {
            setup::setup(&tools, false)?;
            build_edge(&tools, !rest.iter().any(|a| a == "--dev"))
        }
        "dev" => {
            setup::setup(&tools, false)?;
            build_edge(&tools, true)?;
            dev::dev(&tools, rest)
        }
        "ci" => ci(&tools),
        // Used by `bench` through a release build of xtask.
        "bench-core" => {
            for (k, v) in bench::core_costs(&tools)? {
                println!("{k}\t{v}");
            }
            Ok(())
        }
        "bench" if rest.iter().any(|a| a == "--latency") => {
            // Only the activation latency (edge receipt → webhook call).
            setup::setup(&tools, false)?;
            build_edge(&tools, true)?;
            run(Command::new("cargo")
                .args(["build", "--release", "--quiet", "-p", "collector-agent"])
                .current_dir(&tools.root))?;
            bench::print_table(&bench::activation_latency(&tools)?);
            Ok(())
        }
        "bench" if rest.iter().any(|a| a == "--drain") => {
            // Only the agent's drain of a backlog into each sink: rows/s and peak RSS.
            setup::setup(&tools, false)?;
            build_edge(&tools, true)?;
            run(Command::new("cargo")
                .args(["build", "--release", "--quiet", "-p", "collector-agent"])
                .current_dir(&tools.root))?;
            bench::print_table(&bench::drain_only(&tools)?);
            Ok(())
        }
        "bench" if rest.iter().any(|a| a == "--edge" || a == "--compare") => {
            // Only the edge under load (1-, 20- and 100-event bodies), and with
            // `--compare URL [--write-key KEY]` the same load against another server.
            let arg = |name: &str| {
                rest.iter()
                    .position(|a| a == name)
                    .and_then(|i| rest.get(i + 1))
                    .cloned()
            };
            let compare = arg("--compare");
            let key = arg("--write-key").unwrap_or_else(|| collector_e2e::DEV_WRITE_KEY.into());
            setup::setup(&tools, false)?;
            build_edge(&tools, true)?;
            bench::print_table(&bench::edge_load_compare(
                &tools,
                compare.as_deref().map(|c| (c, key.as_str())),
            )?);
            Ok(())
        }
        "bench" => {
            setup::setup(&tools, false)?;
            build_edge(&tools, true)?;
            bench::bench(&tools)
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <setup|build-edge [--dev]|dev|ci|bench [--latency|--drain|--edge|--compare URL [--write-key K]]|sdk-size>"
            );
            if cmd == "help" || cmd == "--help" {
                Ok(())
            } else {
                bail!("unknown xtask {cmd:?}")
            }
        }
    }
}

/// Runs a command, failing with its name when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let desc = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("spawn {desc}"))?;
    if !status.success() {
        bail!("{desc} failed with {status}");
    }
    Ok(())
}

/// Builds the browser SDK into `sdk-js/dist/` (esbuild; fails over the size budget).
pub fn build_sdk(tools: &Toolchain) -> Result<()> {
    run(Command::new(&tools.node)
        .arg(tools.root.join("sdk-js/build.mjs"))
        .current_dir(&tools.root))
    .context("build the browser SDK (sdk-js/build.mjs)")
}

/// Builds the SDK, then the worker into `collector-edge/build/` with worker-build,
/// pointing it at the pinned wasm-bindgen, wasm-opt and esbuild so it downloads nothing.
pub fn build_edge(tools: &Toolchain, release: bool) -> Result<()> {
    build_sdk(tools)?;
    if release && edge_build_is_fresh(tools) {
        return Ok(());
    }
    eprintln!(
        "xtask: building the worker ({})",
        if release { "release" } else { "dev" }
    );
    let mut cmd = Command::new(&tools.worker_build);
    cmd.arg(if release { "--release" } else { "--dev" })
        .current_dir(tools.root.join("collector-edge"))
        .env("PATH", tools.path_env())
        .env("WASM_BINDGEN_BIN", &tools.wasm_bindgen)
        .env("WASM_OPT_BIN", &tools.wasm_opt)
        .env("ESBUILD_BIN", &tools.esbuild);
    run(&mut cmd)?;
    if release {
        // worker-build keeps the wasm "name" section (function names for stack
        // traces): about 150 KiB raw, 42 KiB gzip of the bundle. A release build drops
        // it (and the producers section); `--dev` builds keep them for debugging.
        let wasm = tools.root.join("collector-edge/build/index_bg.wasm");
        let mut strip = Command::new(&tools.wasm_opt);
        strip.arg(&wasm).arg("-o").arg(&wasm);
        for flag in [
            "--strip-debug",
            "--strip-producers",
            "--enable-mutable-globals",
            "--enable-sign-ext",
            "--enable-nontrapping-float-to-int",
            "--enable-bulk-memory",
            "--enable-multivalue",
            "--enable-reference-types",
            "--enable-exception-handling",
        ] {
            strip.arg(flag);
        }
        run(&mut strip).context("strip the worker's wasm (wasm-opt --strip-debug)")?;
    }
    let marker = tools.root.join("collector-edge/build/.release");
    if release {
        std::fs::write(marker, "")?;
    } else {
        let _ = std::fs::remove_file(marker);
    }
    Ok(())
}

/// Builds the benchmark's floor worker (`xtask/floor-worker`) into
/// `xtask/floor-worker/build/` the way [`build_edge`] builds ours: worker-build, the
/// workspace's release profile and lock file, the same pinned tools.
pub fn build_floor_worker(tools: &Toolchain) -> Result<std::path::PathBuf> {
    let dir = tools.root.join("xtask/floor-worker");
    eprintln!("xtask: building the floor worker (release)");
    run(Command::new(&tools.worker_build)
        .arg("--release")
        .current_dir(&dir)
        .env("PATH", tools.path_env())
        .env("WASM_BINDGEN_BIN", &tools.wasm_bindgen)
        .env("WASM_OPT_BIN", &tools.wasm_opt)
        .env("ESBUILD_BIN", &tools.esbuild))
    .context("build the floor worker (xtask/floor-worker)")?;
    Ok(dir.join("build"))
}

fn ci(tools: &Toolchain) -> Result<()> {
    let started = std::time::Instant::now();
    // Each step's wall time, for measuring CI (a fresh machine's, above all).
    let mut lap = {
        let mut t = std::time::Instant::now();
        move |what: &str| {
            eprintln!("xtask ci: {what} took {:.0?}", t.elapsed());
            t = std::time::Instant::now();
        }
    };
    setup::setup(tools, true)?;
    lap("setup");
    run(Command::new("cargo")
        .args(["fmt", "--all", "--", "--check"])
        .current_dir(&tools.root))
    .context("cargo fmt --check (run `cargo fmt --all`)")?;
    let mut native = vec!["clippy"];
    native.extend(native_workspace());
    native.extend(["--all-targets", "--quiet", "--", "-D", "warnings"]);
    run(Command::new("cargo").args(&native).current_dir(&tools.root)).context("cargo clippy")?;
    lap("fmt and clippy");
    let mut wasm = vec!["clippy"];
    wasm.extend(WASM_ONLY.iter().flat_map(|p| ["-p", *p]));
    wasm.extend([
        "--target",
        "wasm32-unknown-unknown",
        "--quiet",
        "--",
        "-D",
        "warnings",
    ]);
    run(Command::new("cargo").args(&wasm).current_dir(&tools.root))
        .context("cargo clippy (wasm)")?;
    lap("clippy (wasm)");
    build_edge(tools, true)?;
    lap("the SDK and worker build");
    let sdk = sdk_unit_tests(tools)?;
    let cargo = cargo_test(tools)?;
    lap("the tests (build and run)");
    // Benchmarks are not tests: a smoke run with tiny sizes checks they still run.
    bench::smoke();
    let smoke_rows = bench::core_costs(tools)?
        .into_iter()
        .chain(bench::edge_load(tools)?)
        .count();
    eprintln!("xtask ci: benchmark smoke run printed {smoke_rows} rows");
    let totals = (sdk.0 + cargo.0, sdk.1 + cargo.1, sdk.2 + cargo.2);
    eprintln!("xtask ci: finished in {:.0?}", started.elapsed());
    // The closing line: the total over every test binary.
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.0, totals.1, totals.2
    );
    anyhow::ensure!(totals.1 == 0, "{} test(s) failed", totals.1);
    anyhow::ensure!(totals.0 > 0, "no test ran");
    Ok(())
}

/// The SDK's unit tests (Node's test runner, TAP output): (passed, failed, skipped).
fn sdk_unit_tests(tools: &Toolchain) -> Result<(u64, u64, u64)> {
    let out = Command::new(&tools.node)
        .args(["--test", "--test-reporter=tap", "sdk-js/test/*.test.js"])
        .current_dir(&tools.root)
        .output()
        .context("run the SDK unit tests")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let count = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("# {key} ")))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    // A cancelled test (its file crashed, or it timed out) did not pass: a failure.
    let (passed, failed) = (count("pass"), count("fail") + count("cancelled"));
    let skipped = count("skipped") + count("todo");
    let summary = [
        "# tests ",
        "# pass ",
        "# fail ",
        "# skipped ",
        "# todo ",
        "# cancelled ",
    ];
    for line in text
        .lines()
        .filter(|l| l.starts_with("not ok") || summary.iter().any(|p| l.starts_with(p)))
    {
        println!("sdk-js: {line}");
    }
    if !out.status.success() && failed == 0 {
        eprintln!("{text}\n{}", String::from_utf8_lossy(&out.stderr));
        bail!("the SDK unit tests failed to run ({})", out.status);
    }
    if failed > 0 {
        println!("{text}");
    }
    println!("test result: sdk-js unit tests. {passed} passed; {failed} failed; {skipped} skipped");
    Ok((passed, failed, skipped))
}

/// Test binaries that take longest (over 30 s each here), started first so that the
/// last one to finish is a short one.
const SLOW_TESTS_FIRST: &[&str] = &[
    "warehouse_unavailable",
    "kill9",
    "postgres_e2e",
    "conformance",
    "ingest_to_duckdb",
    "identity",
    "quickstart",
    "dashboard_e2e",
    "browser",
];

/// Test binaries run alone, before the others: they kill and restart the agent on a
/// timer, and a machine shared with another binary's servers slows the agent enough
/// that a kill lands before it loads anything.
const ALONE_TESTS: &[&str] = &["kill9"];

/// The workers: checked and built for wasm only. Natively they have no test, and
/// building them there compiles `worker`, `web-sys` and the rest of the Workers
/// bindings twice more (clippy and the test build) for nothing.
const WASM_ONLY: &[&str] = &["collector-edge", "floor-worker"];

/// The packages a native build takes: the workspace without [`WASM_ONLY`].
fn native_workspace() -> Vec<&'static str> {
    let mut args = vec!["--workspace"];
    args.extend(WASM_ONLY.iter().flat_map(|p| ["--exclude", *p]));
    args
}

/// One test binary `cargo test --no-run` built.
struct TestBinary {
    /// `package::target` (`collector-agent::conformance`, `xtask::unittests`).
    name: String,
    target: String,
    exe: std::path::PathBuf,
    /// The package's folder: `cargo test` runs a binary there.
    dir: std::path::PathBuf,
}

/// Every test (`cargo test --workspace --all-targets`): (passed, failed, skipped). The
/// binaries are built first, then run `CI_TEST_JOBS` at a time (default 2): most of the
/// slow ones wait on servers (workerd, PostgreSQL, ClickHouse, Chromium) and back-offs
/// rather than use the CPU, so two at once shorten CI. Each binary runs as `cargo
/// test` runs it (in its package's folder, with cargo's variables), and its output is
/// printed whole when it finishes.
fn cargo_test(tools: &Toolchain) -> Result<(u64, u64, u64)> {
    let started = std::time::Instant::now();
    let mut args = vec!["test"];
    args.extend(native_workspace());
    args.extend([
        "--all-targets",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    let out = Command::new("cargo")
        .args(&args)
        .current_dir(&tools.root)
        .env("PATH", tools.path_env())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!(
            "cargo test --no-run failed with {} (a build error?)",
            out.status
        );
    }
    let mut bins = Vec::new();
    // The agent binary this build made (for the agent's own integration tests), handed to
    // the e2e tests: `cargo build -p collector-agent` resolves features for the agent
    // alone, so it would compile most of its dependencies a second time.
    let mut agent_bin = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["profile"]["test"] == false
            && msg["target"]["kind"] == serde_json::json!(["bin"])
            && msg["target"]["name"] == "collector-agent"
        {
            agent_bin = msg["executable"].as_str().map(std::path::PathBuf::from);
        }
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let manifest = std::path::PathBuf::from(msg["manifest_path"].as_str().unwrap_or_default());
        let package = package_name(msg["package_id"].as_str().unwrap_or_default());
        let kinds = msg["target"]["kind"].to_string();
        let target = msg["target"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        // Library and binary unit tests show as `unittests`, like cargo's own output.
        let shown = if kinds.contains("\"test\"") || kinds.contains("\"bench\"") {
            target.clone()
        } else {
            "unittests".to_string()
        };
        bins.push(TestBinary {
            name: format!("{package}::{shown}"),
            target,
            exe: exe.into(),
            dir: manifest
                .parent()
                .map(|d| d.to_path_buf())
                .unwrap_or_default(),
        });
    }
    ensure!(!bins.is_empty(), "cargo test --no-run built no test binary");
    let agent_bin = agent_bin.context("cargo test --no-run built no collector-agent binary")?;
    eprintln!("xtask ci: test binaries built in {:.0?}", started.elapsed());
    let rank = |b: &TestBinary| {
        SLOW_TESTS_FIRST
            .iter()
            .position(|s| *s == b.target)
            .unwrap_or(SLOW_TESTS_FIRST.len())
    };
    bins.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.name.cmp(&b.name)));
    let jobs = std::env::var("CI_TEST_JOBS")
        .ok()
        .and_then(|j| j.parse::<usize>().ok())
        .filter(|j| *j > 0)
        .unwrap_or(2);
    let (alone, shared): (Vec<_>, Vec<_>) = bins
        .into_iter()
        .partition(|b| ALONE_TESTS.contains(&b.target.as_str()));
    eprintln!(
        "xtask ci: {} test binaries, {} alone, then {jobs} at a time",
        alone.len() + shared.len(),
        alone.len()
    );
    let totals = std::sync::Mutex::new((0u64, 0u64, 0u64));
    run_test_binaries(tools, &agent_bin, alone, 1, &totals);
    run_test_binaries(tools, &agent_bin, shared, jobs, &totals);
    Ok(totals.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// Runs `bins` (in order) `jobs` at a time, adding their counts to `totals`.
fn run_test_binaries(
    tools: &Toolchain,
    agent_bin: &std::path::Path,
    bins: Vec<TestBinary>,
    jobs: usize,
    totals: &std::sync::Mutex<(u64, u64, u64)>,
) {
    use std::io::Write;
    use std::sync::Mutex;
    let queue = Mutex::new(std::collections::VecDeque::from(bins));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let path_env = tools.path_env();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            let (queue, cargo, path_env) = (&queue, &cargo, &path_env);
            s.spawn(move || loop {
                let Some(bin) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front() else {
                    return;
                };
                let started = std::time::Instant::now();
                let out = Command::new(&bin.exe)
                    .current_dir(&bin.dir)
                    .env("PATH", path_env)
                    .env("CARGO", cargo)
                    .env("CARGO_MANIFEST_DIR", &bin.dir)
                    .env("COLLECTOR_AGENT_BIN", agent_bin)
                    .stdin(std::process::Stdio::null())
                    .output();
                let (stdout, stderr, status) = match out {
                    Ok(o) => (
                        String::from_utf8_lossy(&o.stdout).to_string(),
                        String::from_utf8_lossy(&o.stderr).to_string(),
                        Some(o.status),
                    ),
                    Err(e) => (
                        String::new(),
                        format!("could not run {}: {e}", bin.exe.display()),
                        None,
                    ),
                };
                let mut counted = (0u64, 0u64, 0u64);
                for line in stdout.lines() {
                    if let Some(rest) = line.strip_prefix("test result: ") {
                        let (p, f, i) = test_result_counts(rest);
                        counted = (counted.0 + p, counted.1 + f, counted.2 + i);
                    }
                }
                // A binary that crashed, or failed without saying so, failed.
                if !status.is_some_and(|s| s.success()) && counted.1 == 0 {
                    counted.1 = 1;
                }
                // One binary's output at a time, whole (under the totals' lock).
                let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                *t = (t.0 + counted.0, t.1 + counted.1, t.2 + counted.2);
                let mut out = std::io::stdout().lock();
                let _ = writeln!(
                    out,
                    "     Running {} ({}) in {:.1?}",
                    bin.name,
                    bin.exe.display(),
                    started.elapsed()
                );
                let _ = out.write_all(stdout.as_bytes());
                let _ = out.flush();
                eprint!("{stderr}");
                if let Some(st) = status.filter(|s| !s.success()) {
                    let _ = writeln!(out, "xtask ci: {} exited with {st}", bin.name);
                }
            });
        }
    });
}

/// A package's name from cargo's package id: `path+file:///…/tests#collector-e2e@0.1.0`,
/// `path+file:///…/xtask#0.1.0` (named like its folder), or the older
/// `collector-e2e 0.1.0 (path+file:///…)`.
fn package_name(id: &str) -> String {
    if let Some((path, rest)) = id.rsplit_once('#') {
        match rest.split_once('@') {
            Some((name, _)) => name.to_string(),
            None => path.rsplit('/').next().unwrap_or(path).to_string(),
        }
    } else {
        id.split(' ').next().unwrap_or(id).to_string()
    }
}

/// (passed, failed, ignored) of a libtest summary line, after `test result: `.
fn test_result_counts(rest: &str) -> (u64, u64, u64) {
    let count = |word: &str| {
        rest.split(';')
            .find_map(|part| {
                part.trim()
                    .strip_suffix(word)
                    .map(|n| n.trim().rsplit(' ').next().unwrap_or("0").to_string())
            })
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (count(" passed"), count(" failed"), count(" ignored"))
}

/// Newest modification time of the files below `dir` (recursively).
fn newest_mtime(dir: &std::path::Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_mtime(&path)
        } else {
            entry.metadata().ok().and_then(|m| m.modified().ok())
        };
        if t > newest {
            newest = t;
        }
    }
    newest
}

/// Whether the release worker build is newer than every input, so `dev`, `bench` and
/// `ci` do not rebuild (and make a running `wrangler dev` reload) for nothing.
fn edge_build_is_fresh(tools: &Toolchain) -> bool {
    let out = tools.root.join("collector-edge/build/index_bg.wasm");
    let marker = tools.root.join("collector-edge/build/.release");
    let Some(built) = std::fs::metadata(&out).and_then(|m| m.modified()).ok() else {
        return false;
    };
    if !marker.exists() {
        return false;
    }
    let inputs = [
        tools.root.join("privacy.toml"),
        tools.root.join("collector-edge/build.rs"),
        tools.root.join("collector-edge/src"),
        tools.root.join("collector-core/src"),
        tools.root.join("collector-edge/Cargo.toml"),
        tools.root.join("collector-core/Cargo.toml"),
        tools.root.join("Cargo.lock"),
    ];
    inputs.iter().all(|p| {
        let t = if p.is_dir() {
            newest_mtime(p)
        } else {
            std::fs::metadata(p).and_then(|m| m.modified()).ok()
        };
        t.is_some_and(|t| t <= built)
    })
}

#[cfg(test)]
mod runner_tests {
    use super::*;

    #[test]
    fn package_names_are_read_from_every_id_format() {
        assert_eq!(
            package_name("path+file:///work/main/tests#collector-e2e@0.1.0"),
            "collector-e2e"
        );
        assert_eq!(package_name("path+file:///work/main/xtask#0.1.0"), "xtask");
        assert_eq!(
            package_name("collector-agent 0.1.0 (path+file:///work/main/collector-agent)"),
            "collector-agent"
        );
    }

    #[test]
    fn a_summary_line_gives_its_counts() {
        assert_eq!(
            test_result_counts(
                "FAILED. 7 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 3.10s"
            ),
            (7, 2, 1)
        );
        assert_eq!(
            test_result_counts("ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out"),
            (0, 0, 0)
        );
    }
}
