//! `collector-agent config check`: every problem named by its key, offline.

mod common;

use std::process::Command;

fn check(toml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_collector-agent"))
        .args(["config", "check", "--config"])
        .arg(&path)
        .env("TEST_DRAIN_SECRET", "s")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

const BASE: &str =
    "edge_url = \"http://127.0.0.1:8787\"\ndrain_secret_env = \"TEST_DRAIN_SECRET\"\n";

#[test]
fn a_valid_config_of_each_kind_passes() {
    let (ok, text) = check(BASE);
    assert!(ok, "{text}");
    assert!(text.contains("warehouse duckdb"), "{text}");
    let (ok, text) = check(&format!(
        "{BASE}[warehouse]\nkind = \"postgres\"\nurl = \"postgres://collector@127.0.0.1:5432/analytics\"\n"
    ));
    assert!(ok, "{text}");
    assert!(
        text.contains(
            "warehouse postgres postgres://collector@127.0.0.1:5432/analytics (schema public, TLS when the server offers it, certificate not checked)"
        ),
        "{text}"
    );
    // TLS parameters as libpq takes them; the CA file is read (a real one is needed).
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, common::TestCa::new("config check CA").pem()).unwrap();
    let (ok, text) = check(&format!(
        "{BASE}[warehouse]\nkind = \"postgres\"\nurl = \"postgres://collector@db.example.com/analytics?sslmode=verify-full&sslrootcert={}\"\n",
        ca.display()
    ));
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!(
            "(schema public, TLS, certificate and host checked against {})",
            ca.display()
        )),
        "{text}"
    );
    let (ok, text) = check(&format!(
        "{BASE}[warehouse]\nkind = \"clickhouse\"\nurl = \"http://127.0.0.1:8123\"\n"
    ));
    assert!(ok, "{text}");
    assert!(
        text.contains("warehouse clickhouse http://127.0.0.1:8123 (database analytics)"),
        "{text}"
    );
}

#[test]
fn problems_name_their_key() {
    let cases = [
        (format!("{BASE}lease_batchez = 3\n"), "lease_batchez"),
        (
            format!("{BASE}[warehouse]\nkind = \"postgres\"\npath = \"x\"\n"),
            "path",
        ),
        (format!("{BASE}[warehouse]\nkind = \"postgres\"\n"), "url"),
        (
            format!("{BASE}[warehouse]\nkind = \"oracle\"\n"),
            "warehouse.kind",
        ),
        (
            format!("{BASE}[warehouse]\nkind = \"postgres\"\nurl = \"postgres://u:secret@h/db\"\n"),
            "password_env",
        ),
        (format!("{BASE}lease_batches = 1000\n"), "lease_batches"),
        (
            format!("{BASE}[warehouse]\nmemory_limit = \"64MB'; DROP TABLE tracks; --\"\n"),
            "warehouse.memory_limit",
        ),
        (format!("{BASE}[warehouse]\nthreads = 0\n"), "warehouse.threads"),
        (
            format!("{BASE}[warehouse]\nmemory_limit = \"32MB\"\n"),
            "warehouse.memory_limit must be at least 64MB",
        ),
        (
            format!("{BASE}[warehouse]\ncheckpoint_threshold = \"1GB;\"\n"),
            "warehouse.checkpoint_threshold",
        ),
        (
            format!("{BASE}[warehouse]\nkind = \"clickhouse\"\nurl = \"tcp://h:9000\"\n"),
            "warehouse.url",
        ),
        (
            format!("{BASE}[warehouse]\nkind = \"clickhouse\"\nurl = \"http://u:p@h:8123\"\n"),
            "password_env",
        ),
        (
            format!("{BASE}[warehouse]\nkind = \"clickhouse\"\nurl = \"http://h:8123\"\ndatabase = \"a-b\"\n"),
            "warehouse.database",
        ),
        (
            format!("{BASE}[warehouse]\nkind = \"clickhouse\"\nurl = \"http://h:8123\"\nschema = \"x\"\n"),
            "schema",
        ),
        (
            "edge_url = \"ftp://x\"\ndrain_secret = \"s\"\n".to_string(),
            "edge_url",
        ),
        (
            format!("{BASE}[warehouse]\nkind = \"postgres\"\nurl = \"postgres://u@h/db?sslmode=verify-full\"\n"),
            "warehouse.url: sslmode=verify-full needs the CA to check the server against",
        ),
        (
            format!("{BASE}[warehouse]\nkind = \"postgres\"\nurl = \"postgres://u@h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem\"\n"),
            "warehouse.url: sslrootcert /nonexistent/ca.pem",
        ),
        (
            format!("{BASE}[warehouse]\nkind = \"postgres\"\nurl = \"postgres://u@h/db?sslmode=yes\"\n"),
            "warehouse.url: sslmode must be",
        ),
        (
            format!("{BASE}[warehouse]\nkind = \"postgres\"\nurl = \"postgres://u@h/db?colour=blue\"\n"),
            "warehouse.url: invalid connection string: unknown option `colour`",
        ),
    ];
    for (toml, key) in cases {
        let (ok, text) = check(&toml);
        assert!(!ok, "{toml}: should fail");
        assert!(
            text.contains(key),
            "{toml}: the error names `{key}`: {text}"
        );
    }
}

/// A config in `dir` whose edge nothing answers at (a free loopback port).
fn unreachable_edge_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "edge_url = \"http://127.0.0.1:{}\"\ndrain_secret = \"s\"\nrequest_timeout_ms = 1000\n",
            collector_e2e::free_port()
        ),
    )
    .unwrap();
    path
}

#[test]
fn logs_can_be_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    // An unreachable edge: the agent logs its failure, then `--once` exits with an error.
    let path = unreachable_edge_config(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_collector-agent"))
        .args(["--log-format", "json", "run", "--once", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let json_lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        json_lines
            .iter()
            .any(|v| v["level"].is_string() && v["fields"].is_object()),
        "{stderr}"
    );
}

fn agent(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_collector-agent"))
        .args(args)
        .env("TEST_DRAIN_SECRET", "s")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

// `audience check`: the shipped file passes against the shipped policy; a bad one
// fails with every problem at its line, and so does `config check` naming it.
#[test]
fn audience_check_and_config_check_report_audience_problems_by_line() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let (ok, text) = agent(&[
        "audience".as_ref(),
        "check".as_ref(),
        root.join("audiences.toml").as_os_str(),
        "--privacy".as_ref(),
        root.join("privacy.toml").as_os_str(),
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("2 audiences: cart_abandoners_15m, pricing_no_purchase_7d"),
        "{text}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("audiences.toml");
    std::fs::write(
        &bad,
        "[audiences.ok]\nperformed = { event = \"A\" }\n\n[audiences.x]\nrequires = [\"fax\"]\nperformed = { event = \"A\", within = \"3q\" }\n",
    )
    .unwrap();
    let (ok, text) = agent(&[
        "audience".as_ref(),
        "check".as_ref(),
        bad.as_os_str(),
        "--privacy".as_ref(),
        root.join("privacy.toml").as_os_str(),
    ]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("audiences.toml:4:1: audience x: requires \"fax\""),
        "{text}"
    );
    assert!(
        text.contains("audiences.toml:4:1: audience x: performed.within: \"3q\""),
        "{text}"
    );

    std::fs::copy(root.join("privacy.toml"), dir.path().join("privacy.toml")).unwrap();
    let (ok, text) = check_in(
        dir.path(),
        &format!("{BASE}audiences = \"audiences.toml\"\nprivacy = \"privacy.toml\"\n"),
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("config: audiences:") && text.contains(":4:1: audience x"),
        "{text}"
    );
}

fn check_in(dir: &std::path::Path, toml: &str) -> (bool, String) {
    let path = dir.join("agent.toml");
    std::fs::write(&path, toml).unwrap();
    agent(&[
        "config".as_ref(),
        "check".as_ref(),
        "--config".as_ref(),
        path.as_os_str(),
    ])
}

// `profile` on a Parquet lake reads the people its state file keeps (here none yet).
#[test]
fn profile_reads_the_people_of_a_lake() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        format!("{BASE}[warehouse]\nkind = \"parquet\"\npath = \"lake\"\n"),
    )
    .unwrap();
    let (ok, text) = agent(&[
        "profile".as_ref(),
        "u1".as_ref(),
        "--config".as_ref(),
        path.as_os_str(),
    ]);
    assert!(!ok);
    assert!(text.contains("no person has the id \"u1\""), "{text}");
}

/// The environment of a running `collector-agent run` (read from `/proc` once it has
/// logged, i.e. once it is past `main`'s start), started with `env` added.
#[cfg(target_os = "linux")]
fn running_agent_environment(env: &[(&str, &str)]) -> Vec<String> {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let path = unreachable_edge_config(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_collector-agent"))
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("DUCKDB_JE_MALLOC_CONF")
        .env_remove("MALLOC_ARENA_MAX")
        .env_remove("COLLECTOR_AGENT_ALLOCATOR")
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // Same pid: the agent executes itself again in place.
    let environ = std::fs::read(format!("/proc/{}/environ", child.id())).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!first.is_empty(), "the agent exited before logging");
    environ
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

#[cfg(target_os = "linux")]
#[test]
fn the_agent_runs_with_allocators_giving_freed_memory_back() {
    let var = |env: &[String], name: &str| {
        let prefix = format!("{name}=");
        env.iter()
            .find_map(|v| v.strip_prefix(prefix.as_str()))
            .map(str::to_string)
    };
    let env = running_agent_environment(&[]);
    assert_eq!(
        var(&env, "DUCKDB_JE_MALLOC_CONF").as_deref(),
        Some("dirty_decay_ms:0,muzzy_decay_ms:0"),
        "{env:?}"
    );
    assert_eq!(
        var(&env, "MALLOC_ARENA_MAX").as_deref(),
        Some("1"),
        "{env:?}"
    );
    // An operator's own settings are kept, each on its own.
    let env = running_agent_environment(&[("DUCKDB_JE_MALLOC_CONF", "narenas:2")]);
    assert_eq!(
        var(&env, "DUCKDB_JE_MALLOC_CONF").as_deref(),
        Some("narenas:2")
    );
    assert_eq!(var(&env, "MALLOC_ARENA_MAX").as_deref(), Some("1"));
    let env = running_agent_environment(&[("MALLOC_ARENA_MAX", "8")]);
    assert_eq!(var(&env, "MALLOC_ARENA_MAX").as_deref(), Some("8"));
    // And the allocators' defaults on request.
    let env = running_agent_environment(&[("COLLECTOR_AGENT_ALLOCATOR", "default")]);
    assert_eq!(var(&env, "DUCKDB_JE_MALLOC_CONF"), None);
    assert_eq!(var(&env, "MALLOC_ARENA_MAX"), None);
}

// An error the agent expects (here a setting) ends it with the message and exit code
// 1, and no stack trace, even where `RUST_BACKTRACE` is set (as many Rust developers
// have it).
#[test]
fn an_expected_error_prints_its_message_without_a_stack_trace() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        format!("{BASE}[warehouse]\nkind = \"postgres\"\nurl = \"postgres://u@127.0.0.1:1/db\"\npassword_env = \"COLLECTOR_TEST_UNSET_PASSWORD\"\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_collector-agent"))
        .args(["run", "--once", "--config"])
        .arg(&path)
        .env("TEST_DRAIN_SECRET", "s")
        .env("RUST_BACKTRACE", "1")
        .env_remove("COLLECTOR_TEST_UNSET_PASSWORD")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "Error: config: warehouse.password_env names COLLECTOR_TEST_UNSET_PASSWORD, which is not set"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("backtrace"), "{stderr}");
    assert!(stderr.lines().count() <= 3, "{stderr}");
}

// A warehouse file DuckDB can never open as it is (not a DuckDB file, a folder, a
// corrupt file) stops the daemon at once, naming the file,
// instead of being waited for like a file another process holds.
#[test]
fn a_warehouse_file_duckdb_cannot_open_stops_the_daemon_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.duckdb");
    std::fs::write(&garbage, b"not a database").unwrap();
    let folder = dir.path().join("folder.duckdb");
    std::fs::create_dir(&folder).unwrap();
    // A real file whose header no longer matches its checksum (the version follows the
    // checksum, 8 bytes, and the magic `DUCK`, 4 bytes).
    let corrupt = dir.path().join("corrupt.duckdb");
    duckdb::Connection::open(&corrupt)
        .unwrap()
        .execute_batch("CREATE TABLE t (x INTEGER); CHECKPOINT;")
        .unwrap();
    let mut bytes = std::fs::read(&corrupt).unwrap();
    assert_eq!(&bytes[8..12], b"DUCK");
    bytes[12] ^= 0x40;
    std::fs::write(&corrupt, bytes).unwrap();

    for (path, words) in [
        (&garbage, "not a valid DuckDB database file"),
        (&folder, "Is a directory"),
        (&corrupt, "Corrupt database file"),
    ] {
        for kind in ["duckdb", "parquet-state"] {
            let warehouse = if kind == "duckdb" {
                format!("path = {:?}", path.display().to_string())
            } else {
                // The lake's state file, in its place.
                let lake = dir.path().join(format!(
                    "lake-{}",
                    path.file_name().unwrap().to_string_lossy()
                ));
                std::fs::create_dir_all(lake.join("_collector")).unwrap();
                let state = lake.join("_collector/state.duckdb");
                if path.is_dir() {
                    std::fs::create_dir_all(&state).unwrap();
                } else {
                    std::fs::copy(path, &state).unwrap();
                }
                format!(
                    "kind = \"parquet\"\npath = {:?}",
                    lake.display().to_string()
                )
            };
            let cfg = dir.path().join("agent.toml");
            std::fs::write(
                &cfg,
                format!("edge_url = \"http://127.0.0.1:9\"\ndrain_secret_env = \"TEST_DRAIN_SECRET\"\nadmin_addr = \"127.0.0.1:0\"\n[warehouse]\n{warehouse}\n"),
            )
            .unwrap();
            let mut child = Command::new(env!("CARGO_BIN_EXE_collector-agent"))
                .args(["run", "--config"])
                .arg(&cfg)
                .env("TEST_DRAIN_SECRET", "s")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let started = std::time::Instant::now();
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break Some(status);
                }
                // Generous: the agent waiting for the file would never exit.
                if started.elapsed() > std::time::Duration::from_secs(60) {
                    let _ = child.kill();
                    break None;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            };
            let mut stderr = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
            assert_eq!(
                status.and_then(|s| s.code()),
                Some(1),
                "{kind} {path:?}: {stderr}"
            );
            assert!(stderr.contains(words), "{kind} {path:?}: {stderr}");
            assert!(
                !stderr.contains("waiting for it"),
                "{kind} {path:?}: {stderr}"
            );
        }
    }
}

// `status` with an edge it cannot reach still shows the warehouse's side (and says why
// the edge's is missing), and exits 1; a query the warehouse refuses is named as the
// query's failure, not a load's.
#[test]
fn status_shows_the_warehouse_when_the_edge_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    // A loopback port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // A warehouse an agent created (and left: no agent runs).
    drop(collector_agent::sinks::duckdb::DuckDbSink::open(&dir.path().join("w.duckdb")).unwrap());
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "edge_url = \"http://127.0.0.1:{port}\"\ndrain_secret_env = \"TEST_DRAIN_SECRET\"\n[warehouse]\npath = {:?}\n",
            dir.path().join("w.duckdb").display().to_string()
        ),
    )
    .unwrap();
    let (ok, text) = agent(&["status".as_ref(), "--config".as_ref(), cfg.as_os_str()]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("edge: unavailable: edge request failed"),
        "{text}"
    );
    assert!(text.contains("Connection refused"), "{text}");
    assert!(
        text.contains("warehouse: last load never; quarantined 0; dead letters 0"),
        "{text}"
    );
    assert!(
        text.contains("Error: status incomplete: the edge did not answer"),
        "{text}"
    );

    let (ok, text) = agent(&[
        "sql".as_ref(),
        "--config".as_ref(),
        cfg.as_os_str(),
        "SELEC 1".as_ref(),
    ]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("Error: the query failed: Parser Error"),
        "{text}"
    );
    assert!(!text.contains("load"), "{text}");
}
