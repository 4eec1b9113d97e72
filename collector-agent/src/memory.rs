//! The agent's allocators give freed memory back to the system promptly.
//!
//! The prebuilt `libduckdb.so` carries its own jemalloc (its symbols are
//! `duckdb_je_*`), which DuckDB sets up to keep freed pages resident for a while
//! ("decay"), so a query that runs again finds them ready. An agent frees a whole
//! load's buffers after every commit and checkpoint, and what the allocator kept was
//! about a fifth of its peak RSS (`cargo xtask bench --drain`, see BENCHMARKS.md).
//!
//! jemalloc reads its settings from the environment when the library is loaded,
//! before `main` runs (and the project has no `unsafe` code to call `mallctl`), so the
//! agent sets what is missing and executes itself again: same pid, same arguments.
//! glibc's malloc, which serves the agent's own (Rust) allocations, reads
//! `MALLOC_ARENA_MAX` the same way. A value an operator set is kept as it is;
//! `COLLECTOR_AGENT_ALLOCATOR=default` keeps both allocators' own defaults. A DuckDB
//! built from source (`--features bundled`) has no jemalloc of its own, and its
//! variable is then simply unused.

use std::ffi::OsString;

/// The settings the agent runs with, unless the environment has its own.
///
/// - DuckDB's jemalloc with decay at zero (BENCHMARKS.md, "DuckDB's allocator"): it
///   took the drain's peak from 317 to 252 MB, for about 10% of the DuckDB sink's
///   speed and 35% of the Parquet lake's (which writes its files through DuckDB). A
///   short decay instead (100 or 500 ms, or 200 ms with a background purging thread)
///   kept the speed and none of the memory.
/// - One glibc malloc arena (`MALLOC_ARENA_MAX=1`; BENCHMARKS.md, "Fifth round") for
///   the agent's own (Rust) allocations. A load is prepared on one thread and written
///   and freed on another, and glibc gives each thread an arena of its own that keeps
///   what was freed in it: three arenas of 15–20 MB each at the drain's peak. With one,
///   the peak fell by 16 MB into PostgreSQL (85 → 68 MB) and into DuckDB, by 6–12 MB
///   into ClickHouse and the Parquet lake, at the same drain rate (glibc's per-thread
///   caches serve most allocations without the arena's lock).
///
/// `COLLECTOR_AGENT_ALLOCATOR=default` gives the speed back for the memory.
pub const SETTINGS: &[(&str, &str)] = &[
    ("DUCKDB_JE_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0"),
    ("MALLOC_ARENA_MAX", "1"),
];

/// Opting out: the allocators' own defaults.
pub const OPT_OUT: (&str, &str) = ("COLLECTOR_AGENT_ALLOCATOR", "default");

/// The settings to add to an environment (read through `get`): those it does not
/// have, none when it opted out.
pub fn missing(get: impl Fn(&str) -> Option<OsString>) -> Vec<(&'static str, &'static str)> {
    if get(OPT_OUT.0).is_some_and(|v| v == OPT_OUT.1) {
        return Vec::new();
    }
    SETTINGS
        .iter()
        .filter(|(k, _)| get(k).is_none())
        .copied()
        .collect()
}

/// Executes this program again with the missing settings; returns when none is
/// missing, or when it cannot (the agent then runs with the allocators' defaults, and
/// says so). Call first thing in `main`, before any thread starts.
#[cfg(unix)]
pub fn reexec_with_settings() {
    use std::os::unix::process::CommandExt;
    let add = missing(|k| std::env::var_os(k));
    if add.is_empty() {
        return;
    }
    let mut args = std::env::args_os();
    let arg0 = args.next();
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("collector-agent: allocator settings not applied (own path unknown: {e}); running with the defaults");
            return;
        }
    };
    let mut cmd = std::process::Command::new(&exe);
    if let Some(arg0) = arg0 {
        cmd.arg0(arg0);
    }
    // Only returns on failure (e.g. the binary was replaced on disk meanwhile).
    let e = cmd.args(args).envs(add.iter().copied()).exec();
    eprintln!(
        "collector-agent: allocator settings not applied (could not run {} again: {e}); running with the defaults",
        exe.display()
    );
}

#[cfg(not(unix))]
pub fn reexec_with_settings() {}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn only_what_the_environment_lacks_is_added() {
        assert_eq!(missing(env(&[("HOME", "/root")])), SETTINGS.to_vec());
        assert_eq!(
            missing(env(&[("DUCKDB_JE_MALLOC_CONF", "narenas:4")])),
            vec![("MALLOC_ARENA_MAX", "1")]
        );
        assert_eq!(
            missing(env(&[("MALLOC_ARENA_MAX", "4")])),
            vec![("DUCKDB_JE_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0")]
        );
        // Set but empty is still the operator's choice.
        assert!(missing(env(&[
            ("DUCKDB_JE_MALLOC_CONF", ""),
            ("MALLOC_ARENA_MAX", "")
        ]))
        .is_empty());
    }

    #[test]
    fn opting_out_adds_nothing() {
        assert!(missing(env(&[("COLLECTOR_AGENT_ALLOCATOR", "default")])).is_empty());
        // Any other value is not an opt-out.
        assert_eq!(
            missing(env(&[("COLLECTOR_AGENT_ALLOCATOR", "yes")])),
            SETTINGS.to_vec()
        );
    }
}
