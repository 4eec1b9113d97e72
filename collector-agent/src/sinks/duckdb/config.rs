//! `[warehouse] kind = "duckdb"` (the default).

use std::path::PathBuf;

use serde::Deserialize;

/// The embedded DuckDB warehouse.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DuckDbConfig {
    /// Path of the DuckDB file. Relative paths are relative to the config file.
    #[serde(default = "default_path")]
    pub path: PathBuf,
}

impl Default for DuckDbConfig {
    fn default() -> Self {
        DuckDbConfig {
            path: default_path(),
        }
    }
}

fn default_path() -> PathBuf {
    PathBuf::from("./data/warehouse.duckdb")
}
