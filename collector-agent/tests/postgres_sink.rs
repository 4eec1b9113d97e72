//! What is the PostgreSQL sink's own, against a real server started on loopback: its
//! two statement timeouts, a least-privilege role, its query connection, a
//! transaction-mode pooler in front. (The scenarios every sink shares are in `conformance.rs`;
//! TLS in `postgres_tls.rs`.)

mod common;

use collector_agent::config::PostgresConfig;
use collector_agent::sinks::postgres::PostgresSink;
use collector_agent::sinks::{Load, Sink, SinkError};
use collector_e2e::postgres::LocalPostgres;
use common::{load, one, order_completed, s};
use serde_json::json;

/// A session makes a temporary table of `identifies`' user ids and reads it back:
/// the one identify loaded, of `u1`.
async fn scratch_holds_u1(session: &mut dyn collector_agent::sinks::SqlSession) {
    session
        .batch("CREATE TEMP TABLE scratch AS SELECT user_id FROM identifies")
        .await
        .unwrap();
    assert_eq!(
        session
            .query("SELECT user_id FROM scratch")
            .await
            .unwrap()
            .rows[0][0],
        s("u1")
    );
}

/// A load's statements are bound by `timeout_ms`; what reads the warehouse (a
/// session: identity, audiences, privacy; `sql`) by `query_timeout_ms`, so a
/// statement that outgrows a load's limit on a large warehouse still finishes.
#[tokio::test]
async fn loads_and_analytical_statements_have_their_own_timeouts() {
    let pg = LocalPostgres::start().unwrap();
    let cfg = PostgresConfig {
        timeout_ms: 500,
        query_timeout_ms: 20_000,
        ..PostgresConfig::at(&pg.url)
    };
    let sink = connected_with_one_track(&cfg, "m1").await;

    // Longer than a load may take: fine in a session and through `query`.
    {
        let mut session = sink.session().await.unwrap().unwrap();
        session.batch("SELECT pg_sleep(1.5)").await.unwrap();
        assert_eq!(
            session
                .query("SELECT count(*) FROM tracks")
                .await
                .unwrap()
                .rows[0][0],
            s("1")
        );
    }
    assert_eq!(
        one(&sink, "SELECT 'slept' FROM pg_sleep(1.5)").await,
        s("slept")
    );

    // A load that waits on another session's lock for longer than `timeout_ms` fails
    // (transiently: retried later, nothing quarantined), then loads once it is gone.
    let other = PostgresSink::connect(&cfg).await.unwrap();
    let mut holder = other.session().await.unwrap().unwrap();
    holder.batch("BEGIN").await.unwrap();
    holder
        .batch("LOCK TABLE tracks IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err = sink
        .load(&Load::events(0, 2, order_completed("o1", 5.0)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SinkError::Transient(m) if m.contains("statement timeout")),
        "{err:?}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "the load waited past its limit: {:?}",
        started.elapsed()
    );
    holder.batch("ROLLBACK").await.unwrap();
    drop(holder);
    sink.load(&Load::events(0, 2, order_completed("o1", 5.0)))
        .await
        .unwrap();
    assert_eq!(one(&sink, "SELECT count(*) FROM tracks").await, s("2"));
    assert_eq!(one(&sink, "SELECT count(*) FROM quarantine").await, s("0"));

    // And `query_timeout_ms` is a limit too.
    let short = PostgresSink::connect(&PostgresConfig {
        query_timeout_ms: 300,
        ..cfg.clone()
    })
    .await
    .unwrap();
    let mut session = short.session().await.unwrap().unwrap();
    let err = session.batch("SELECT pg_sleep(2)").await.unwrap_err();
    assert!(err.to_string().contains("statement timeout"), "{err}");
}

/// A least-privilege role, as a DBA sets one up: it owns its schema and may not create
/// schemas (nor write to `public`). The agent loads, runs identity's kind of SQL (temporary
/// tables) and answers queries with it; it used to fail at connect, on `CREATE SCHEMA IF
/// NOT EXISTS`, which asks for the database's CREATE right even when the schema exists.
#[tokio::test]
async fn a_role_that_owns_only_its_schema_is_enough() {
    let pg = LocalPostgres::start().unwrap();
    pg.psql(
        "CREATE ROLE agent LOGIN; CREATE SCHEMA analytics AUTHORIZATION agent; REVOKE CREATE ON SCHEMA public FROM PUBLIC; REVOKE CREATE ON DATABASE postgres FROM PUBLIC;",
    )
    .unwrap();
    let cfg = PostgresConfig {
        schema: "analytics".into(),
        ..PostgresConfig::at(&pg.url.replace("collector@", "agent@"))
    };
    let sink = PostgresSink::connect(&cfg).await.unwrap();
    load(
        &sink,
        1,
        json!([{"type": "identify", "messageId": "i1", "userId": "u1", "anonymousId": "a1", "traits": {"plan": "pro"}}]),
    )
    .await;
    assert_eq!(one(&sink, "SELECT plan FROM users").await, s("pro"));
    assert_eq!(one(&sink, "SELECT current_schema()").await, s("analytics"));
    let mut session = sink.session().await.unwrap().unwrap();
    scratch_holds_u1(&mut *session).await;
    drop(session);
    // A second connection (an agent restarting) finds the schema and makes nothing.
    drop(sink);
    PostgresSink::connect(&cfg).await.unwrap();
}

/// An analyst's long query (`collector-agent sql`, through a running agent's admin
/// endpoint, up to `query_timeout_ms`) has a connection of its own: loads go on
/// meanwhile, where they used to wait for it.
#[tokio::test]
async fn a_long_query_does_not_hold_loads_up() {
    let pg = LocalPostgres::start().unwrap();
    let sink = std::sync::Arc::new(
        PostgresSink::connect(&PostgresConfig::at(&pg.url))
            .await
            .unwrap(),
    );
    let querying = {
        let sink = sink.clone();
        tokio::spawn(async move { sink.query("SELECT pg_sleep(4)").await })
    };
    // The query has started (its backend sleeps) before the load; asked through the
    // loads' connection (a session), as the query's is busy.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut session = sink.session().await.unwrap().unwrap();
        let running = session
            .query("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(4)'")
            .await
            .unwrap();
        if running.rows[0][0] == s("1") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the query never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    sink.load(&Load::events(0, 1, order_completed("o1", 5.0)))
        .await
        .unwrap();
    assert!(
        !querying.is_finished(),
        "the load waited for the query to end"
    );
    querying.await.unwrap().unwrap();
    assert_eq!(one(&*sink, "SELECT count(*) FROM tracks").await, s("1"));
}

/// Through PgBouncer in transaction mode with one server connection, which another
/// client of the pooler left with its own `search_path` and `extra_float_digits` (the
/// settings PgBouncer does not keep per client): the agent's loads land in its schema,
/// its doubles read back exactly, its sessions and queries work, and the connection is
/// left as that client set it. The agent used to
/// set its session once per connection, which through such a pooler went to whichever
/// server connection was free (and stayed there for the pooler's other clients), and
/// its statements outside a transaction, prepared then run in two steps, failed with
/// `prepared statement "s0" does not exist` when a pool had more connections.
#[tokio::test]
async fn a_transaction_mode_pooler_is_served_and_left_as_found() {
    let pg = LocalPostgres::start_pooled(1).unwrap();
    let as_left = || {
        pg.psql_pooled("SHOW search_path; SHOW extra_float_digits; SHOW IntervalStyle")
            .unwrap()
    };
    assert_eq!(as_left(), "public\n0\nsql_standard\n");
    let cfg = PostgresConfig {
        schema: "analytics".into(),
        ..PostgresConfig::at(&pg.url)
    };
    let sink = PostgresSink::connect(&cfg).await.unwrap();
    load(
        &sink,
        1,
        json!([
            {"type": "identify", "messageId": "i1", "userId": "u1", "traits": {"plan": "pro"}},
            {"type": "track", "messageId": "t1", "userId": "u1", "event": "Order Completed",
             "properties": {"revenue": 0.30000000000000004}}
        ]),
    )
    .await;
    assert_eq!(
        pg.psql_pooled(
            "SELECT count(*) FROM analytics.tracks; SELECT count(*) FROM analytics.order_completed; SELECT to_regclass('public.tracks') IS NULL"
        )
        .unwrap(),
        "1\n1\nt\n"
    );
    assert_eq!(
        one(&sink, "SELECT revenue FROM order_completed").await,
        s("0.30000000000000004")
    );
    assert_eq!(one(&sink, "SELECT plan FROM users").await, s("pro"));
    {
        let mut session = sink.session().await.unwrap().unwrap();
        session.batch("BEGIN").await.unwrap();
        scratch_holds_u1(&mut *session).await;
        session.batch("COMMIT").await.unwrap();
        assert_eq!(
            session.query("SHOW TimeZone").await.unwrap().rows[0][0],
            s("UTC")
        );
    }
    assert!(sink.quarantined(&[]).await.unwrap().is_empty());
    assert!(sink.dead_letters().await.unwrap().is_empty());
    assert_eq!(as_left(), "public\n0\nsql_standard\n");
    // The job's working table went with its transaction: none is left on the
    // connection for the pooler's next client.
    assert_eq!(
        pg.psql_pooled("SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()")
            .unwrap(),
        "0\n"
    );
    // A second agent connecting (migrations, the catalog) through the same pooler.
    drop(sink);
    let sink = PostgresSink::connect(&cfg).await.unwrap();
    assert_eq!(one(&sink, "SELECT count(*) FROM tracks").await, s("1"));
    assert_eq!(as_left(), "public\n0\nsql_standard\n");
}

/// Several hosts, as libpq takes them (`host1:port1,host2:port2`, a primary and its
/// standbys): the agent connects to the first that answers, and with
/// `target_session_attrs=read-write` to the first that takes writes, skipping one that
/// is read-only (as a hot standby is). When its server goes, the agent connects again
/// the same way, so it finds the host that took over, and brings that server's schema
/// and its own catalog up to date (a standby promoted after a failover, or a server
/// restored from a backup, need not have what the agent knew). Server `a` stands in
/// for a standby, read-only and then writable; it is not a replica, so it has no
/// schema until the agent reaches it, which the agent used to find only at its start
/// ("relation load_ids does not exist" at every load after the switch).
#[tokio::test]
async fn several_hosts_and_the_first_that_takes_writes() {
    let (a, b) = (
        LocalPostgres::start().unwrap(),
        LocalPostgres::start().unwrap(),
    );
    let read_only = |pg: &LocalPostgres, on: bool| {
        pg.psql(&format!(
            "ALTER SYSTEM SET default_transaction_read_only = {on}"
        ))
        .unwrap();
        pg.psql("SELECT pg_reload_conf()").unwrap();
    };
    read_only(&a, true);
    let hosts = |ports: &[u16], attrs: &str| {
        let list: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        PostgresConfig {
            timeout_ms: 5_000,
            ..PostgresConfig::at(&format!(
                "postgres://{}@{}/postgres{attrs}",
                collector_e2e::postgres::USER,
                list.join(",")
            ))
        }
    };
    let count = |pg: &LocalPostgres| {
        pg.psql_output("SELECT count(*) FROM public.tracks")
            .unwrap()
            .trim()
            .to_string()
    };

    // libpq's values the driver does not know are refused by `config check`.
    let err = hosts(&[a.port, b.port], "?target_session_attrs=primary")
        .validate()
        .unwrap_err()
        .to_string();
    assert!(err.contains("target_session_attrs"), "{err}");

    // A host that does not answer is skipped.
    let dead = collector_e2e::free_port();
    let sink = connected_with_one_track(&hosts(&[dead, b.port], ""), "t1").await;
    drop(sink);
    assert_eq!(count(&b), "1");

    // Read-only first: refused without `target_session_attrs`, skipped with it.
    let err = match PostgresSink::connect(&hosts(&[a.port, b.port], "")).await {
        Ok(_) => panic!("migrated a read-only server"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("read-only transaction"), "{err}");
    let cfg = hosts(&[a.port, b.port], "?target_session_attrs=read-write");
    let sink = PostgresSink::connect(&cfg).await.unwrap();
    sink.load(&Load::events(0, 2, order_completed("o1", 5.0)))
        .await
        .unwrap();
    assert_eq!(count(&b), "2");

    // The writable server goes and the other takes writes: the load that finds the
    // connection gone fails (transiently), the next one lands on the other host.
    b.stop().unwrap();
    read_only(&a, false);
    let err = sink
        .load(&Load::events(0, 3, order_completed("o2", 6.0)))
        .await
        .unwrap_err();
    assert!(matches!(err, SinkError::Transient(_)), "{err:?}");
    sink.load(&Load::events(0, 3, order_completed("o2", 6.0)))
        .await
        .unwrap();
    assert_eq!(one(&sink, "SELECT count(*) FROM tracks").await, s("1"));
    assert_eq!(count(&a), "1");
}

/// A job that ends inside its transaction (its future dropped at shutdown, say)
/// leaves nothing behind: the next load does not commit the job's half-done work with
/// its own, and the sink goes on. It used to hand the connection back in the job's
/// transaction, whose rows the next load's COMMIT then made permanent.
#[tokio::test]
async fn a_job_dropped_inside_its_transaction_commits_nothing() {
    let pg = LocalPostgres::start().unwrap();
    let sink = connected_with_one_track(&PostgresConfig::at(&pg.url), "t1").await;
    {
        let mut job = sink.session().await.unwrap().unwrap();
        job.batch("BEGIN").await.unwrap();
        job.batch("DELETE FROM tracks").await.unwrap();
        // Dropped here, neither committed nor rolled back.
    }
    sink.load(&Load::events(0, 2, order_completed("o1", 5.0)))
        .await
        .unwrap();
    assert_eq!(one(&sink, "SELECT count(*) FROM tracks").await, s("2"));
    assert_eq!(
        one(&sink, "SELECT count(*) FROM tracks WHERE message_id = 't1'").await,
        s("1")
    );
}

// PgBouncer in statement mode refuses transactions, and the agent runs every statement
// in one (`SET LOCAL`s, then the statement). At start that is said for what it is, with
// what to use instead, and not retried as a warehouse that is down: the daemon waited
// for it for ever, logging PgBouncer's words as a transient error ("warehouse
// temporarily unavailable"), which is also all `run --once` said.
#[tokio::test]
async fn a_statement_mode_pooler_is_refused_with_what_to_use() {
    let pg = LocalPostgres::start_pooled_in(1, "statement").unwrap();
    let err = PostgresSink::connect(&PostgresConfig::at(&pg.url))
        .await
        .err()
        .expect("refused");
    assert!(!err.retryable(), "{err}");
    let text = err.to_string();
    for words in [
        "transaction blocks not allowed in statement pooling mode",
        "pool_mode = transaction",
    ] {
        assert!(text.contains(words), "{text}");
    }
}

/// A sink connected with `cfg`, into which one track (`message_id`) was loaded.
async fn connected_with_one_track(cfg: &PostgresConfig, message_id: &str) -> PostgresSink {
    let sink = PostgresSink::connect(cfg).await.unwrap();
    load(
        &sink,
        1,
        json!([{"type": "track", "messageId": message_id, "userId": "u", "event": "Signed Up"}]),
    )
    .await;
    sink
}
