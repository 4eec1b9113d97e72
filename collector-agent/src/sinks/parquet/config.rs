//! `[warehouse] kind = "parquet"`.

use std::path::PathBuf;

use serde::Deserialize;

use crate::sinks::duckdb::config::{checked_size, threads_sql, MIN_MEMORY_LIMIT};

/// A Parquet lake in a local folder.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParquetConfig {
    /// The lake's root folder. Relative paths are relative to the config file.
    pub path: PathBuf,
    /// The `memory_limit` of the lake's DuckDB (`"64MB"`, `"1GB"`): the state file, a
    /// load's rows while its files are written, and identity and audiences over the
    /// files. When absent, DuckDB's default (80% of RAM), capped at
    /// [`crate::sinks::duckdb::config::DEFAULT_MEMORY_CAP`] plus room for the
    /// indexes, as in a DuckDB warehouse. At least 64MB.
    #[serde(default)]
    pub memory_limit: Option<String>,
    /// The cap of the default `memory_limit`, instead of 1 GiB: the limit grows with
    /// the indexes and is raised when DuckDB runs out of memory (a load, or identity's
    /// SQL), up to DuckDB's own default. At least 32MB: the lake keeps no event rows in
    /// DuckDB, so its checkpoints are small, and a fatal error opens the state file
    /// again. Not with `memory_limit`.
    #[serde(default)]
    pub memory_cap: Option<String>,
    /// DuckDB's worker threads; DuckDB's default (one per core) when absent.
    #[serde(default)]
    pub threads: Option<u32>,
    /// Whether an idle agent merges a partition's small files (one per load) into
    /// files of up to ~128 MiB (default `true`). A daemon at low traffic writes one
    /// file per table for every load (every few seconds); every engine that reads the
    /// lake pays per file. `false` leaves the files as loads wrote them (a compaction
    /// job of your own, or readers that must never meet a moved file).
    #[serde(default = "compact_default")]
    pub compact: bool,
    /// How many small files the day still receiving events (today in UTC, and the
    /// `unknown` partition) collects before it is compacted (default 64; at least 2).
    /// A day that is over is compacted as soon as it has two.
    #[serde(default)]
    pub compact_min_files: Option<u32>,
}

fn compact_default() -> bool {
    true
}

/// The default of [`ParquetConfig::compact_min_files`].
pub const DEFAULT_COMPACT_MIN_FILES: u32 = 64;

/// The least `memory_cap` of a lake (see [`ParquetConfig::memory_cap`]).
pub(crate) const MIN_LAKE_MEMORY_CAP: u64 = 32 * 1000 * 1000;

impl ParquetConfig {
    /// A lake at `path` with DuckDB's settings left to the agent.
    pub fn at(path: impl Into<PathBuf>) -> ParquetConfig {
        ParquetConfig {
            path: path.into(),
            memory_limit: None,
            memory_cap: None,
            threads: None,
            compact: true,
            compact_min_files: None,
        }
    }

    /// `compact_min_files`, checked; the default when absent.
    pub fn compact_min_files(&self) -> anyhow::Result<u32> {
        let n = self.compact_min_files.unwrap_or(DEFAULT_COMPACT_MIN_FILES);
        anyhow::ensure!(
            n >= 2,
            "config: warehouse.compact_min_files must be at least 2 (one file is already compact), got {n}"
        );
        Ok(n)
    }

    /// `memory_cap` in bytes, checked.
    pub fn memory_cap_bytes(&self) -> anyhow::Result<Option<u64>> {
        let Some(m) = &self.memory_cap else {
            return Ok(None);
        };
        anyhow::ensure!(
            self.memory_limit.is_none(),
            "config: warehouse.memory_cap and warehouse.memory_limit exclude each other (a limit is fixed; a cap grows with the indexes): keep one"
        );
        let bytes = checked_size("memory_cap", m)?;
        anyhow::ensure!(
            bytes >= MIN_LAKE_MEMORY_CAP,
            "config: warehouse.memory_cap must be at least 32MB, got {m:?}"
        );
        Ok(Some(bytes))
    }

    /// The `SET` statements of the tuning keys.
    pub fn settings_sql(&self) -> anyhow::Result<String> {
        self.memory_cap_bytes()?;
        self.compact_min_files()?;
        let mut sql = String::new();
        if let Some(m) = &self.memory_limit {
            let bytes = checked_size("memory_limit", m)?;
            anyhow::ensure!(
                bytes >= MIN_MEMORY_LIMIT,
                "config: warehouse.memory_limit must be at least 64MB (a fixed limit is never raised, and below it the lake's loads run out of memory), got {m:?}; memory_cap goes lower"
            );
            sql.push_str(&format!("SET memory_limit = '{m}';"));
        }
        sql.push_str(&threads_sql(self.threads)?);
        Ok(sql)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lake(toml: &str) -> anyhow::Result<String> {
        let cfg: ParquetConfig = toml::from_str(&format!("path = \"lake\"\n{toml}"))?;
        cfg.settings_sql()
    }

    #[test]
    fn the_lakes_duckdb_keys_are_checked_with_their_names() {
        assert_eq!(lake("").unwrap(), "");
        assert_eq!(
            lake("memory_limit = \"64MB\"\nthreads = 1").unwrap(),
            "SET memory_limit = '64MB';SET threads = 1;"
        );
        assert_eq!(lake("memory_cap = \"32MB\"").unwrap(), "");
        let err = |t: &str| lake(t).unwrap_err().to_string();
        assert!(
            err("memory_limit = \"48MB\"").contains("warehouse.memory_limit must be at least 64MB"),
            "{}",
            err("memory_limit = \"48MB\"")
        );
        assert!(err("memory_cap = \"16MB\"").contains("warehouse.memory_cap must be at least 32MB"));
        assert!(err("memory_cap = \"lots\"").contains("warehouse.memory_cap must look like"));
        assert!(
            err("memory_limit = \"1GB'; DROP\"").contains("warehouse.memory_limit must look like")
        );
        assert!(
            err("memory_cap = \"64MB\"\nmemory_limit = \"64MB\"").contains("exclude each other")
        );
        assert!(err("threads = 0").contains("warehouse.threads must be at least 1"));
        assert!(
            err("compact_min_files = 1").contains("warehouse.compact_min_files must be at least 2")
        );
        let cfg: ParquetConfig = toml::from_str("path = \"lake\"").unwrap();
        assert!(cfg.compact);
        assert_eq!(cfg.compact_min_files().unwrap(), DEFAULT_COMPACT_MIN_FILES);
        let cfg: ParquetConfig =
            toml::from_str("path = \"lake\"\ncompact = false\ncompact_min_files = 8").unwrap();
        assert!(!cfg.compact);
        assert_eq!(cfg.compact_min_files().unwrap(), 8);
        let unknown = toml::from_str::<ParquetConfig>("path = \"lake\"\nrow_group_size = 16384")
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("row_group_size"), "{unknown}");
    }
}
