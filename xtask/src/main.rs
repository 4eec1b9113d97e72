//! `cargo xtask`: everything beyond `cargo build`.
//!
//! - `setup`      install the pinned tools (idempotent): wasm target, npm packages
//!                (Node 22, wrangler, binaryen, esbuild, prebuilt DuckDB), worker-build,
//!                wasm-bindgen-cli
//! - `build-edge` build the worker with worker-build (release)
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
        "setup" => setup::setup(&tools),
        "build-edge" => {
            setup::setup(&tools)?;
            build_edge(&tools, !rest.iter().any(|a| a == "--dev"))
        }
        "dev" => {
            setup::setup(&tools)?;
            build_edge(&tools, true)?;
            dev::dev(&tools, rest)
        }
        "ci" => ci(&tools),
        "bench" => {
            setup::setup(&tools)?;
            build_edge(&tools, true)?;
            bench::bench(&tools)
        }
        _ => {
            eprintln!("usage: cargo xtask <setup|build-edge [--dev]|dev|ci|bench>");
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

/// Builds the worker into `collector-edge/build/` with worker-build, pointing it at the
/// pinned wasm-bindgen, wasm-opt and esbuild so it downloads nothing.
pub fn build_edge(tools: &Toolchain, release: bool) -> Result<()> {
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
    run(&mut cmd)
}

fn ci(tools: &Toolchain) -> Result<()> {
    let started = std::time::Instant::now();
    setup::setup(tools)?;
    run(Command::new("cargo")
        .args(["fmt", "--all", "--", "--check"])
        .current_dir(&tools.root))
    .context("cargo fmt --check (run `cargo fmt --all`)")?;
    build_edge(tools, true)?;
    run(Command::new("cargo")
        .args(["test", "--workspace", "--no-fail-fast"])
        .current_dir(&tools.root)
        .env("PATH", tools.path_env()))?;
    eprintln!("xtask ci: all green in {:.0?}", started.elapsed());
    Ok(())
}
