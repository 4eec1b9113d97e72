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
pub mod edge;
pub mod pages;
pub mod postgres;
pub mod toolchain;

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
