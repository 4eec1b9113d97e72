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
    /// DuckDB's `memory_limit` (`"64MB"`, `"1GB"`). When absent, DuckDB's default (80%
    /// of RAM, or of the container's limit), capped at [`DEFAULT_MEMORY_CAP`] plus room
    /// for the indexes, which DuckDB keeps whole in memory (the keys of `users` and the
    /// identity tables, which grow with the people seen; the registry of loaded ids
    /// has none; see `MemoryFit` in `sink.rs`): DuckDB keeps the
    /// warehouse's blocks cached up to the limit, so an uncapped agent's RSS climbs
    /// with what it loaded. Operators that exceed it spill to a temp folder beside the
    /// file; a configured limit must leave the indexes their room.
    #[serde(default)]
    pub memory_limit: Option<String>,
    /// The cap of the default `memory_limit` (instead of [`DEFAULT_MEMORY_CAP`]): the
    /// limit is this plus room for the indexes as they grow, and is raised when DuckDB
    /// runs out of memory (a load, or identity's SQL), up to DuckDB's own default.
    /// `"32MB"` with `row_group_size = 16384` keeps a fresh embedded agent's loads under
    /// 100 MB (README, Memory). Not with `memory_limit`.
    #[serde(default)]
    pub memory_cap: Option<String>,
    /// DuckDB's worker threads; DuckDB's default (one per core) when absent.
    #[serde(default)]
    pub threads: Option<u32>,
    /// DuckDB's `checkpoint_threshold`: how much write-ahead log gathers before DuckDB
    /// folds it into the file. Each checkpoint recompresses the newest row groups and
    /// writes every index whole, so a larger value loads faster (the sinks bench: 16MB
    /// → 64MB ≈ +15% rows/s) and keeps more unfolded rows in memory. When absent,
    /// DuckDB's 16 MiB, raised to twice the indexes' size as the keyed tables grow, up
    /// to 1 GiB (see `CheckpointFit` in `sink.rs`).
    #[serde(default)]
    pub checkpoint_threshold: Option<String>,
    /// Rows per row group of the tables the agent writes (a multiple of 2048, below
    /// DuckDB's default of 122,880). Every checkpoint rewrites each table's last,
    /// partial row group whole, so smaller groups bound what a checkpoint reads and
    /// compresses again: loading 36k events, the agent peaked at 151 MB instead of
    /// 217 MB with 16384 and loaded ~20% faster. Analysts pay for it: on 3M rows,
    /// files ~19% larger and selective filters on text columns 3–5× slower
    /// (BENCHMARKS.md, "Fifth round"). When absent, DuckDB's default. The file is then
    /// attached with the option (`ATTACH … (ROW_GROUP_SIZE n)`), which DuckDB keeps
    /// for that session only: other programs writing the file use their own.
    #[serde(default)]
    pub row_group_size: Option<u32>,
    /// Whether DuckDB folds its write-ahead log into the file when the agent stops
    /// (DuckDB's default, `true`). `false` stops without that last checkpoint: the
    /// rows committed since the one before stay in `<path>.wal` beside the file, as
    /// durable as in the file, and whoever opens it next (the agent, or an analyst's
    /// DuckDB, read-only too) reads them from there. Under a small `memory_cap` that
    /// checkpoint was the agent's peak in half of the lean runs (~118 MB instead of
    /// ~100 MB; README, Memory). Copy both files to copy the warehouse.
    #[serde(default)]
    pub checkpoint_on_stop: Option<bool>,
}

impl Default for DuckDbConfig {
    fn default() -> Self {
        DuckDbConfig {
            path: default_path(),
            memory_limit: None,
            memory_cap: None,
            threads: None,
            checkpoint_threshold: None,
            row_group_size: None,
            checkpoint_on_stop: None,
        }
    }
}

impl DuckDbConfig {
    /// The least memory limit (or cap) DuckDB's checkpoints need with this row group
    /// size, and how to say it.
    fn least_memory(&self) -> (u64, &'static str) {
        if self
            .row_group_size
            .is_some_and(|n| n <= SMALL_ROW_GROUP_SIZE)
        {
            (MIN_MEMORY_LIMIT_SMALL_GROUPS, "32MB")
        } else {
            (
                MIN_MEMORY_LIMIT,
                "64MB, or 32MB with row_group_size = 16384 or less",
            )
        }
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
        let (least, text) = self.least_memory();
        anyhow::ensure!(
            bytes >= least,
            "config: warehouse.memory_cap must be at least {text} (DuckDB's checkpoints fail below that), got {m:?}"
        );
        Ok(Some(bytes))
    }

    /// The `SET` statements of the tuning keys.
    pub fn settings_sql(&self) -> anyhow::Result<String> {
        self.memory_cap_bytes()?;
        let mut sql = String::new();
        for (key, value) in [
            ("memory_limit", &self.memory_limit),
            ("checkpoint_threshold", &self.checkpoint_threshold),
        ] {
            if let Some(m) = value {
                let bytes = checked_size(key, m)?;
                if key == "memory_limit" {
                    let (least, text) = self.least_memory();
                    anyhow::ensure!(
                        bytes >= least,
                        "config: warehouse.memory_limit must be at least {text} (DuckDB's checkpoints fail below that, and a failed checkpoint stops every load until the agent opens the warehouse again), got {m:?}"
                    );
                }
                sql.push_str(&format!("SET {key} = '{m}';"));
            }
        }
        sql.push_str(&threads_sql(self.threads)?);
        if self.checkpoint_on_stop == Some(false) {
            sql.push_str("PRAGMA disable_checkpoint_on_shutdown;");
        }
        // Not a `SET` (an option of the file's `ATTACH`), but checked with the others.
        if let Some(n) = self.row_group_size {
            anyhow::ensure!(
                (ROW_GROUP_STEP..DUCKDB_ROW_GROUP_SIZE).contains(&n) && n % ROW_GROUP_STEP == 0,
                "config: warehouse.row_group_size must be a multiple of {ROW_GROUP_STEP} below DuckDB's default of {DUCKDB_ROW_GROUP_SIZE} (e.g. 16384), got {n}; leave it out for the default"
            );
        }
        Ok(sql)
    }
}

/// A size key's value in bytes, or an error naming the key. Only digits, letters, `.`
/// and spaces: the value goes into a `SET` statement.
pub(crate) fn checked_size(key: &str, m: &str) -> anyhow::Result<u64> {
    let ok = !m.is_empty()
        && m.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == ' ');
    ok.then(|| size_bytes(m)).flatten().ok_or_else(|| {
        anyhow::anyhow!("config: warehouse.{key} must look like \"64MB\" or \"1GB\", got {m:?}")
    })
}

/// The `SET threads` of a `threads` key, checked.
pub(crate) fn threads_sql(threads: Option<u32>) -> anyhow::Result<String> {
    let Some(t) = threads else {
        return Ok(String::new());
    };
    anyhow::ensure!(t >= 1, "config: warehouse.threads must be at least 1");
    Ok(format!("SET threads = {t};"))
}

/// DuckDB's row group size when none is given; larger ones need a newer storage
/// version than the warehouse's.
const DUCKDB_ROW_GROUP_SIZE: u32 = 122_880;

/// A row group holds whole vectors of this many rows.
const ROW_GROUP_STEP: u32 = 2048;

/// What a default `memory_limit` allows beyond the indexes (1 GiB): a long-running
/// agent's DuckDB caches about 20 MB of table blocks per 100k events loaded
/// (BENCHMARKS.md), and DuckDB's own default would let that climb to 80% of the
/// host's RAM.
pub const DEFAULT_MEMORY_CAP: u64 = 1 << 30;

/// The least `memory_limit` accepted: below it, DuckDB's checkpoint, which rewrites
/// each table's last partial row group (up to 122,880 rows) whole, runs out of memory
/// (seen at 32MB).
pub(crate) const MIN_MEMORY_LIMIT: u64 = 64 * 1000 * 1000;

/// Row groups this small or smaller bound a checkpoint's work enough for
/// [`MIN_MEMORY_LIMIT_SMALL_GROUPS`].
const SMALL_ROW_GROUP_SIZE: u32 = 16_384;

/// The least `memory_limit` with row groups of [`SMALL_ROW_GROUP_SIZE`] rows or fewer:
/// checkpoints of 16384-row groups ran at 24MB and failed at 20MB (the drain bench,
/// BENCHMARKS.md "Tenth round"); 32MB keeps a margin. The indexes (`users`, identity)
/// need their room beside it as they grow.
pub(crate) const MIN_MEMORY_LIMIT_SMALL_GROUPS: u64 = 32 * 1000 * 1000;

/// A DuckDB size (`"64MB"`, `"1.5 GB"`, `"512MiB"`, `"100000"` bytes) in bytes, as DuckDB
/// reads it: KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024.
pub(crate) fn size_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let number: f64 = s[..split].parse().ok()?;
    let unit = s[split..].trim().to_ascii_lowercase();
    let scale: f64 = match unit.as_str() {
        "" | "b" | "byte" | "bytes" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    number.is_finite().then_some((number * scale) as u64)
}

fn default_path() -> PathBuf {
    PathBuf::from("./data/warehouse.duckdb")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_duckdb_reads_them() {
        assert_eq!(size_bytes("64MB"), Some(64_000_000));
        assert_eq!(size_bytes("1.5 GB"), Some(1_500_000_000));
        assert_eq!(size_bytes("512MiB"), Some(512 * 1024 * 1024));
        assert_eq!(size_bytes("100000"), Some(100_000));
        assert_eq!(size_bytes("16mb"), Some(16_000_000));
        assert_eq!(size_bytes("lots"), None);
        assert_eq!(size_bytes("5 parsecs"), None);
        let cfg = |m: &str| DuckDbConfig {
            memory_limit: Some(m.into()),
            ..DuckDbConfig::default()
        };
        assert!(cfg("64MB").settings_sql().is_ok());
        let err = cfg("32MB").settings_sql().unwrap_err().to_string();
        assert!(
            err.contains("warehouse.memory_limit must be at least 64MB, or 32MB with row_group_size = 16384 or less"),
            "{err}"
        );
    }

    // A cap is checked as a limit is, and the two exclude each other.
    #[test]
    fn a_memory_cap_is_a_size_above_the_least_and_not_beside_a_limit() {
        let cfg = |cap: &str, limit: Option<&str>, n: Option<u32>| DuckDbConfig {
            memory_cap: Some(cap.into()),
            memory_limit: limit.map(String::from),
            row_group_size: n,
            ..DuckDbConfig::default()
        };
        assert_eq!(
            cfg("32MB", None, Some(16384)).memory_cap_bytes().unwrap(),
            Some(32_000_000)
        );
        assert!(cfg("32MB", None, Some(16384)).settings_sql().is_ok());
        for (c, limit, n, want) in [
            (
                "32MB",
                None,
                None,
                "memory_cap must be at least 64MB, or 32MB",
            ),
            ("lots", None, None, "memory_cap must look like"),
            ("64MB", Some("64MB"), None, "exclude each other"),
        ] {
            let err = cfg(c, limit, n).settings_sql().unwrap_err().to_string();
            assert!(err.contains(want), "{c}: {err}");
        }
    }

    // Small row groups bound what a checkpoint rewrites, so they allow a smaller
    // memory limit; larger ones do not.
    #[test]
    fn small_row_groups_allow_a_32mb_memory_limit() {
        let cfg = |m: &str, n: u32| DuckDbConfig {
            memory_limit: Some(m.into()),
            row_group_size: Some(n),
            ..DuckDbConfig::default()
        };
        assert!(cfg("32MB", 16384).settings_sql().is_ok());
        assert!(cfg("32MB", 8192).settings_sql().is_ok());
        for (m, n, least) in [("24MB", 16384, "32MB ("), ("32MB", 32768, "64MB, or")] {
            let err = cfg(m, n).settings_sql().unwrap_err().to_string();
            assert!(
                err.contains(&format!("must be at least {least}")),
                "{m} {n}: {err}"
            );
        }
    }

    #[test]
    fn a_row_group_size_is_whole_vectors_below_duckdbs_default() {
        let cfg = |n: u32| DuckDbConfig {
            row_group_size: Some(n),
            ..DuckDbConfig::default()
        };
        for ok in [2048, 16384, 120_832] {
            assert!(cfg(ok).settings_sql().is_ok(), "{ok}");
        }
        for bad in [0, 1000, 3000, 122_880, 1 << 20] {
            let err = cfg(bad).settings_sql().unwrap_err().to_string();
            assert!(
                err.contains("warehouse.row_group_size must be a multiple of 2048"),
                "{bad}: {err}"
            );
        }
    }
}
