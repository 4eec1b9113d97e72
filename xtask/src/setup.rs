//! `cargo xtask setup`: installs every pinned tool the project needs, idempotently.
//! Only the package registries are used (crates.io, npm); nothing else is downloaded.

use std::process::Command;

use anyhow::{Context, Result};
use collector_e2e::toolchain::WORKER_BUILD_VERSION;
use collector_e2e::Toolchain;

use crate::run;

/// `browsers`: also Debian's Chromium (the browser tests need it; `dev` does not).
pub fn setup(tools: &Toolchain, browsers: bool) -> Result<()> {
    wasm_target()?;
    npm_packages(tools)?;
    cargo_tool(
        tools,
        "worker-build",
        WORKER_BUILD_VERSION,
        &tools.worker_build,
    )?;
    cargo_tool(
        tools,
        "wasm-bindgen-cli",
        &tools.wasm_bindgen_version,
        &tools.wasm_bindgen,
    )?;
    if browsers {
        chromium(tools)?;
    }
    let missing = tools.missing();
    anyhow::ensure!(
        missing.is_empty(),
        "setup finished but tools are missing: {missing:?}"
    );
    Ok(())
}

fn wasm_target() -> Result<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    if let Ok(out) = out {
        if String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == "wasm32-unknown-unknown")
        {
            return Ok(());
        }
    }
    eprintln!("xtask setup: rustup target add wasm32-unknown-unknown");
    run(Command::new("rustup").args(["target", "add", "wasm32-unknown-unknown"]))
}

/// `npm ci` from the committed lockfile, skipped when node_modules already matches it.
fn npm_packages(tools: &Toolchain) -> Result<()> {
    let lock =
        std::fs::read(tools.root.join("package-lock.json")).context("read package-lock.json")?;
    let stamp_path = tools.root.join("node_modules/.xtask-lock-stamp");
    let stamp = format!("{:x}", fnv(&lock));
    if std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str())
        && npm_tools_present(tools)
    {
        return Ok(());
    }
    eprintln!(
        "xtask setup: npm ci (wrangler, node 22, binaryen, esbuild, duckdb lib, test clients)"
    );
    run(Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&tools.root)
        .env("WRANGLER_SEND_METRICS", "false")
        .env("DO_NOT_TRACK", "1"))?;
    std::fs::write(&stamp_path, stamp)?;
    Ok(())
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `cargo install NAME --version V --root <tools>/NAME-V`, unless already there. Tries
/// `--locked` first; when the crate's own lockfile names a version the registry does
/// not serve, falls back to a fresh resolution (the tool's version stays pinned).
fn cargo_tool(tools: &Toolchain, name: &str, version: &str, bin: &std::path::Path) -> Result<()> {
    if bin.exists() {
        return Ok(());
    }
    let root = tools.tools_dir.join(format!("{name}-{version}"));
    eprintln!("xtask setup: cargo install {name} {version} (a few minutes, once)");
    let install = |locked: bool| {
        let mut cmd = Command::new("cargo");
        cmd.args(["install", name, "--version", version, "--root"])
            .arg(&root);
        if locked {
            cmd.arg("--locked");
        }
        run(&mut cmd)
    };
    install(true).or_else(|e| {
        eprintln!("xtask setup: {e}; retrying without --locked");
        install(false)
    })
}

/// Debian's Chromium at the pinned version, for the browser tests (apt, as root).
fn chromium(tools: &Toolchain) -> Result<()> {
    let installed = |pkg: &str| {
        Command::new("dpkg-query")
            .args(["-W", "-f=${Version}", pkg])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let want = &tools.chromium_version;
    if installed("chromium").as_deref() == Some(want.as_str()) && tools.chromium.exists() {
        return Ok(());
    }
    eprintln!("xtask setup: apt-get install chromium={want} (for the browser tests)");
    let sudo = !is_root();
    let apt = |args: &[&str]| {
        let mut cmd = if sudo {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        } else {
            Command::new("apt-get")
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut cmd)
    };
    apt(&["update", "-qq"])?;
    let pins = [
        format!("chromium={want}"),
        format!("chromium-common={want}"),
    ];
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(pins.iter().map(String::as_str));
    apt(&args).with_context(|| {
        format!(
            "installing Debian's chromium {want} failed. Debian keeps only its newest Chromium build; \
             see `apt-cache madison chromium`, then update CHROMIUM_VERSION in tests/src/toolchain.rs \
             (or set EDGE_COLLECTOR_CHROMIUM_VERSION)"
        )
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Whether every tool that comes from node_modules is there (the cargo-installed ones
/// are checked separately).
fn npm_tools_present(tools: &Toolchain) -> bool {
    [
        &tools.node,
        &tools.wrangler_js,
        &tools.wasm_opt,
        &tools.esbuild,
    ]
    .iter()
    .all(|p| p.exists())
}
