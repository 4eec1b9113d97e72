//! Embeds an rpath to the prebuilt libduckdb.so (see `.cargo/config.toml`), so the agent
//! and its tests run without LD_LIBRARY_PATH.
fn main() {
    println!("cargo:rerun-if-env-changed=DUCKDB_LIB_DIR");
    if let Ok(dir) = std::env::var("DUCKDB_LIB_DIR") {
        if std::env::var_os("CARGO_FEATURE_BUNDLED").is_none() {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        }
    }
}
