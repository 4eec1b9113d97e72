//! `collector-e2e`: the end-to-end harness.
//!
//! [`toolchain`] knows where the project's pinned tools live (installed by
//! `cargo xtask setup`); [`edge::LocalEdge`] runs the *built* worker in the real Workers
//! runtime (`wrangler dev`, local mode, workerd) on a free loopback port with its own
//! persistence folder, and stops it (and its workerd children) when dropped. The tests
//! in `tests/` use it; so do `cargo xtask dev` and `cargo xtask bench`.
//! [`pages::PageServer`] serves pages that embed the SDK snippet; [`browser::Browser`]
//! drives Debian's Chromium (playwright-core) for the SDK's browser tests.

pub mod browser;
pub mod clickhouse;
pub mod disk;
pub mod edge;
pub mod pages;
pub mod postgres;
pub mod recorder;
pub mod toolchain;
pub mod workerd;

pub use edge::{EdgeOptions, LocalEdge, TEST_PII_KEY};
pub use toolchain::Toolchain;

/// The write key in `wrangler.toml` `[vars]`.
pub const DEV_WRITE_KEY: &str = "dev-write-key";

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The agent binary to run: `COLLECTOR_AGENT_BIN` when set (`cargo xtask ci` sets it
/// to the agent its workspace test build made, so the tests and `cargo xtask dev` do not
/// build a second one with `-p collector-agent`'s own feature set), else built (debug)
/// with `cargo build -p collector-agent` in the workspace at `root`.
pub fn agent_binary(root: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    if let Some(bin) = std::env::var_os("COLLECTOR_AGENT_BIN") {
        let bin = std::path::PathBuf::from(bin);
        anyhow::ensure!(
            bin.is_file(),
            "COLLECTOR_AGENT_BIN={} is not a file",
            bin.display()
        );
        return Ok(bin);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "--quiet", "-p", "collector-agent"])
        .current_dir(root)
        .status()?;
    anyhow::ensure!(status.success(), "cargo build -p collector-agent: {status}");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("debug/collector-agent"))
}

/// A uniquely named folder in the temp folder, removed on drop: the data folder of a
/// test server (the `tempfile` crate is a dev-dependency only; the harness is a library).
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    /// `<temp>/<prefix>-<pid>-<nanos>-<port>`, created.
    pub fn new(prefix: &str) -> std::io::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{nanos}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
