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

use anyhow::{bail, Context, Result};
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
    setup::setup(tools, true)?;
    run(Command::new("cargo")
        .args(["fmt", "--all", "--", "--check"])
        .current_dir(&tools.root))
    .context("cargo fmt --check (run `cargo fmt --all`)")?;
    run(Command::new("cargo")
        .args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--quiet",
            "--",
            "-D",
            "warnings",
        ])
        .current_dir(&tools.root))
    .context("cargo clippy")?;
    run(Command::new("cargo")
        .args([
            "clippy",
            "-p",
            "collector-edge",
            "--target",
            "wasm32-unknown-unknown",
            "--quiet",
            "--",
            "-D",
            "warnings",
        ])
        .current_dir(&tools.root))
    .context("cargo clippy (wasm)")?;
    build_edge(tools, true)?;
    let sdk = sdk_unit_tests(tools)?;
    let cargo = cargo_test(tools)?;
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

/// Runs every test target of the workspace (not doctests: there are none), echoing the
/// output and adding up the `test result:` lines into (passed, failed, ignored).
fn cargo_test(tools: &Toolchain) -> Result<(u64, u64, u64)> {
    use std::io::BufRead;
    let mut child = Command::new("cargo")
        .args(["test", "--workspace", "--all-targets", "--no-fail-fast"])
        .current_dir(&tools.root)
        .env("PATH", tools.path_env())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("spawn cargo test")?;
    let mut totals = (0u64, 0u64, 0u64);
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
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
            totals.0 += count(" passed");
            totals.1 += count(" failed");
            totals.2 += count(" ignored");
        }
    }
    let status = child.wait()?;
    if !status.success() && totals.1 == 0 {
        bail!("cargo test failed with {status} (a build error?)");
    }
    Ok(totals)
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
