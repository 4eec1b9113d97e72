//! Embeds an rpath to the prebuilt libduckdb.so (see `.cargo/config.toml`), so the agent
//! and its tests run without LD_LIBRARY_PATH; and vendors the consent dashboard's chart
//! library (npm `uplot`, pinned in package.json, installed by `cargo xtask setup`) into
//! the binary, so the dashboard loads nothing from anywhere else.
fn main() {
    println!("cargo:rerun-if-env-changed=DUCKDB_LIB_DIR");
    if let Ok(dir) = std::env::var("DUCKDB_LIB_DIR") {
        if std::env::var_os("CARGO_FEATURE_BUNDLED").is_none() {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        }
    }
    vendor_uplot();
}

/// Copies uPlot's script, stylesheet and licence into `OUT_DIR`. Before `npm ci` has
/// run (xtask builds the agent before it installs the npm packages) they are empty and
/// the `dashboard_assets_missing` cfg makes the dashboard say how to fix the build;
/// the build script runs again once the files exist.
fn vendor_uplot() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    // Read when the script runs, not when it was compiled: a build script compiled for
    // another checkout sharing this target folder would look in that checkout.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    let root = std::path::Path::new(&manifest_dir).join("../node_modules/uplot");
    println!("cargo::rustc-check-cfg=cfg(dashboard_assets_missing)");
    let files = [
        ("dist/uPlot.iife.min.js", "uPlot.iife.min.js"),
        ("dist/uPlot.min.css", "uPlot.min.css"),
        ("LICENSE", "uPlot.LICENSE"),
    ];
    let mut missing = false;
    for (from, to) in files {
        let src = root.join(from);
        println!("cargo:rerun-if-changed={}", src.display());
        let bytes = std::fs::read(&src).unwrap_or_else(|_| {
            missing = true;
            Vec::new()
        });
        std::fs::write(out.join(to), bytes).expect("write to OUT_DIR");
    }
    if missing {
        println!("cargo:rustc-cfg=dashboard_assets_missing");
        println!("cargo:warning=node_modules/uplot is missing: the consent dashboard is built without its charts (run `cargo xtask setup`, then build again)");
    }
}
