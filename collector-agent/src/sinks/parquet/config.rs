//! `[warehouse] kind = "parquet"`.

use std::path::PathBuf;

use serde::Deserialize;

/// A Parquet lake in a local folder.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParquetConfig {
    /// The lake's root folder. Relative paths are relative to the config file.
    pub path: PathBuf,
}
