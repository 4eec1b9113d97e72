//! TLS to PostgreSQL, against a real server that refuses plain TCP: its own CA, a
//! certificate made out to `localhost` only (so connecting to `127.0.0.1` with
//! `verify-full` must fail on the name), SCRAM passwords and a client-certificate login.
//! Each scenario checks from the server's side (`pg_stat_ssl`) that the session the
//! agent loaded through was encrypted.

mod common;

use std::path::PathBuf;

use collector_agent::config::PostgresConfig;
use collector_agent::sinks::postgres::PostgresSink;
use collector_agent::sinks::SinkError;
use collector_e2e::postgres::{LocalPostgres, ServerTls, USER};
use common::{load, one, s, TestCa};
use rcgen::ExtendedKeyUsagePurpose;
use serde_json::json;

const PASSWORD_ENV: &str = "COLLECTOR_TLS_TEST_PASSWORD";
const PASSWORD: &str = "s3cret 'quoted'";
/// A role that logs in with a client certificate (its CN) and nothing else.
const CERT_USER: &str = "certuser";

struct Fixture {
    pg: LocalPostgres,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn start() -> Fixture {
        std::env::set_var(PASSWORD_ENV, PASSWORD);
        let dir = tempfile::tempdir().unwrap();
        let server_ca = TestCa::new("collector test CA");
        let other_ca = TestCa::new("someone else's CA");
        let (cert_pem, key_pem) = server_ca.localhost_server();
        let (client_pem, client_key) =
            server_ca.issue(CERT_USER, &[], ExtendedKeyUsagePurpose::ClientAuth);
        let (stranger_pem, stranger_key) =
            other_ca.issue(CERT_USER, &[], ExtendedKeyUsagePurpose::ClientAuth);
        for (name, text) in [
            ("ca.pem", server_ca.pem()),
            ("other-ca.pem", other_ca.pem()),
            ("client.pem", client_pem),
            ("client.key", client_key),
            ("stranger.pem", stranger_pem),
            ("stranger.key", stranger_key),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let hba = format!(
            "local all all trust\n\
             hostssl all {CERT_USER} 127.0.0.1/32 cert\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n\
             hostnossl all all 127.0.0.1/32 reject\n"
        );
        let pg = LocalPostgres::start_tls(&ServerTls {
            cert_pem,
            key_pem,
            client_ca_pem: server_ca.pem(),
            hba,
            password: PASSWORD.into(),
            roles: vec![CERT_USER.into()],
        })
        .expect("PostgreSQL with TLS starts");
        Fixture { pg, dir }
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// `postgres://USER@HOST:PORT/postgres?QUERY`, the password from the env.
    fn config(&self, user: &str, host: &str, query: &str) -> PostgresConfig {
        PostgresConfig {
            url: format!("postgres://{user}@{host}:{}/postgres?{query}", self.pg.port),
            password_env: (user == USER).then(|| PASSWORD_ENV.to_string()),
            schema: "analytics".into(),
            timeout_ms: 10_000,
            query_timeout_ms: 3_600_000,
        }
    }

    async fn connect(
        &self,
        user: &str,
        host: &str,
        query: &str,
    ) -> Result<PostgresSink, SinkError> {
        PostgresSink::connect(&self.config(user, host, query)).await
    }
}

/// Loads an event through the sink and reads it back, then asks the server whether
/// the session is encrypted.
async fn loads_over_tls(sink: &PostgresSink) {
    load(
        sink,
        1,
        json!([{"type": "track", "messageId": "m1", "userId": "u", "event": "Signed Up"}]),
    )
    .await;
    assert_eq!(one(sink, "SELECT count(*) FROM tracks").await, s("1"));
    assert_eq!(
        one(
            sink,
            "SELECT CASE WHEN ssl THEN 'encrypted' ELSE 'plain' END FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        .await,
        s("encrypted")
    );
}

fn refused(r: Result<PostgresSink, SinkError>) -> String {
    match r {
        Ok(_) => panic!("connected, but must not have"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn every_sslmode_means_what_it_means_in_libpq() {
    let f = Fixture::start();
    let ca = f.file("ca.pem");
    let other = f.file("other-ca.pem");

    // `verify-full`: the server's CA, and the name the certificate is made out to.
    let sink = f
        .connect(
            USER,
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        )
        .await
        .expect("verify-full against localhost");
    loads_over_tls(&sink).await;
    drop(sink);

    // The certificate says `localhost`, not `127.0.0.1`: verify-full refuses the
    // name, verify-ca (the chain only) accepts it.
    let err = refused(
        f.connect(
            USER,
            "127.0.0.1",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        )
        .await,
    );
    assert!(
        err.contains("not valid for name \"127.0.0.1\"") && err.contains("sslrootcert"),
        "{err}"
    );
    let sink = f
        .connect(
            USER,
            "127.0.0.1",
            &format!("sslmode=verify-ca&sslrootcert={ca}"),
        )
        .await
        .expect("verify-ca ignores the name");
    loads_over_tls(&sink).await;
    drop(sink);

    // Another CA: refused in both verifying modes, and in `require` too once
    // `sslrootcert` is given (libpq: then `require` checks the chain).
    for mode in ["verify-full", "verify-ca", "require", "prefer"] {
        let err = refused(
            f.connect(
                USER,
                "localhost",
                &format!("sslmode={mode}&sslrootcert={other}"),
            )
            .await,
        );
        assert!(
            err.contains("UnknownIssuer") && err.contains("sslmode and sslrootcert"),
            "{mode}: {err}"
        );
    }

    // `require` and the default (`prefer`) without a CA: encrypted, not checked.
    for query in ["sslmode=require", ""] {
        let sink = f
            .connect(USER, "127.0.0.1", query)
            .await
            .unwrap_or_else(|e| panic!("{query:?}: {e}"));
        loads_over_tls(&sink).await;
    }

    // `sslrootcert=system`: the machine's store, here pointed at the test's CA the way
    // OpenSSL's tools are (`SSL_CERT_FILE`; no other test of this file reads it).
    std::env::set_var("SSL_CERT_FILE", &ca);
    let sink = f
        .connect(USER, "localhost", "sslmode=verify-full&sslrootcert=system")
        .await
        .expect("the system's CAs, from SSL_CERT_FILE");
    loads_over_tls(&sink).await;
    drop(sink);

    // `disable` against a server that refuses plain TCP: the server's own words.
    let err = refused(f.connect(USER, "127.0.0.1", "sslmode=disable").await);
    assert!(err.contains("no encryption"), "{err}");
}

#[tokio::test]
async fn a_client_certificate_logs_in_where_the_server_asks_for_one() {
    let f = Fixture::start();
    let ca = f.file("ca.pem");
    let sink = f
        .connect(
            CERT_USER,
            "localhost",
            &format!(
                "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
                f.file("client.pem"),
                f.file("client.key")
            ),
        )
        .await
        .expect("certificate login");
    loads_over_tls(&sink).await;
    assert_eq!(one(&sink, "SELECT current_user").await, s(CERT_USER));
    drop(sink);

    // Without a certificate, or with one from a CA the server does not trust: refused.
    let err = refused(
        f.connect(
            CERT_USER,
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        )
        .await,
    );
    assert!(err.contains("requires a valid client certificate"), "{err}");
    let err = refused(
        f.connect(
            CERT_USER,
            "localhost",
            &format!(
                "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
                f.file("stranger.pem"),
                f.file("stranger.key")
            ),
        )
        .await,
    );
    assert!(
        err.contains("UnknownCA") && err.contains("sslcert"),
        "{err}"
    );
}

#[tokio::test]
async fn a_wrong_password_over_tls_is_the_servers_refusal() {
    let f = Fixture::start();
    let mut cfg = f.config(
        USER,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", f.file("ca.pem")),
    );
    cfg.password_env = Some("COLLECTOR_TLS_TEST_WRONG".into());
    std::env::set_var("COLLECTOR_TLS_TEST_WRONG", "not it");
    let err = refused(PostgresSink::connect(&cfg).await);
    assert!(err.contains("password authentication failed"), "{err}");
}

#[tokio::test]
async fn a_missing_ca_file_is_a_config_error_named_at_start() {
    let f = Fixture::start();
    let missing: PathBuf = f.dir.path().join("gone.pem");
    let err = f
        .connect(
            USER,
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={}", missing.display()),
        )
        .await;
    match err {
        Err(SinkError::Permanent(m)) => {
            assert!(m.contains("sslrootcert") && m.contains("gone.pem"), "{m}")
        }
        Err(e) => panic!("must be permanent (a config error): {e}"),
        Ok(_) => panic!("connected without its CA file"),
    }
}

/// The agent's own CLI over TLS, as an operator runs it: `sql` twice (the second start
/// finds everything made, where PostgreSQL says "already exists, skipping" for each
/// `IF NOT EXISTS`, which the agent used to log at every start).
#[test]
fn the_cli_reads_the_warehouse_over_tls_without_the_servers_notices() {
    let f = Fixture::start();
    let config = f.dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "edge_url = \"http://127.0.0.1:1\"\ndrain_secret_env = \"COLLECTOR_TLS_TEST_DRAIN\"\n[warehouse]\nkind = \"postgres\"\nurl = \"{}\"\npassword_env = \"{PASSWORD_ENV}\"\n",
            f.config(USER, "localhost", &format!("sslmode=verify-full&sslrootcert={}", f.file("ca.pem"))).url
        ),
    )
    .unwrap();
    for round in 0..2 {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_collector-agent"))
            .args(["sql", "--csv", "--config"])
            .arg(&config)
            .arg("SELECT CASE WHEN ssl THEN 'encrypted' ELSE 'plain' END FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .env("COLLECTOR_TLS_TEST_DRAIN", "s")
            .env(PASSWORD_ENV, PASSWORD)
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "round {round}: {stderr}");
        assert!(stdout.contains("encrypted"), "round {round}: {stdout}");
        assert!(!stderr.contains("NOTICE"), "round {round}: {stderr}");
    }
}
