//! The real edge (workerd) drained by the agent into a real PostgreSQL server started on
//! loopback for the test: every event exactly once, with two agents at once, across a
//! database outage, and past events an analyst's trigger refuses.

mod common;

use std::time::{Duration, Instant};

use collector_agent::config::{PostgresConfig, WarehouseConfig};
use collector_agent::drain_once;
use collector_agent::sinks::postgres::PostgresSink;
use collector_agent::sinks::Sink;
use collector_e2e::postgres::LocalPostgres;
use common::*;
use serde_json::json;

/// A sink of its own on the test's server (its schema brought up to date).
async fn connect(pg: &LocalPostgres) -> PostgresSink {
    PostgresSink::connect(&PostgresConfig {
        url: pg.url.clone(),
        password_env: None,
        schema: "public".into(),
        timeout_ms: 10_000,
        query_timeout_ms: 3_600_000,
    })
    .await
    .unwrap()
}

async fn count(pg: &LocalPostgres, sql: &str) -> u64 {
    let sink = connect(pg).await;
    sink.query(sql).await.unwrap().rows[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap()
}

async fn post_tracks(st: &Stack, prefix: &str, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let batch: Vec<_> = chunk
            .iter()
            .map(|i| json!({"type": "track", "messageId": format!("{prefix}-{i}"), "anonymousId": format!("v-{i}"), "event": "E"}))
            .collect();
        let r = st.post("/v1/batch", &json!({"batch": batch})).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
}

#[tokio::test]
async fn edge_to_postgres_lands_every_event_once() {
    let st = Stack::start();
    let pg = LocalPostgres::start().unwrap();
    let r = st
        .post("/v1/batch", &json!({"batch": [
            {"type": "track", "messageId": "t-1", "userId": "u1", "event": "Signed Up", "properties": {"plan": "pro"}},
            {"type": "page", "messageId": "p-1", "anonymousId": "a1", "name": "Home"},
            {"type": "identify", "messageId": "i-1", "userId": "u1", "traits": {"plan": "pro"}},
            {"type": "group", "messageId": "g-1", "userId": "u1", "groupId": "acme"},
            {"type": "alias", "messageId": "al-1", "userId": "u1", "previousId": "a1"},
            {"type": "screen", "messageId": "s-1", "userId": "u1", "name": "Main"}
        ]}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let cfg = st.pg_config(&pg);
    // `collector-agent status` before the drain: the backlog and its lag, once the
    // shards' alarms sealed the open batches (BATCH_MAX_AGE_MS = 5 s).
    let client = collector_agent::edge::EdgeClient::new(&cfg).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let stats = loop {
        let stats = client.stats().await.unwrap();
        if stats.shards.iter().all(|s| s.open_events == 0) {
            break stats;
        }
        assert!(
            Instant::now() < deadline,
            "batches were not sealed: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let wh = PostgresSink::connect(match &cfg.warehouse {
        WarehouseConfig::Postgres(p) => p,
        _ => unreachable!(),
    })
    .await
    .unwrap()
    .query(collector_agent::status::WAREHOUSE_SQL)
    .await
    .unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let status = collector_agent::status::Status::new(now_ms, stats, &wh);
    assert_eq!(status.backlog_events(), 6, "{status}");
    assert!(status.lag_ms() > 0 && status.lag_ms() < 60_000, "{status}");
    assert!(status.to_string().contains("last load never"), "{status}");
    let summary = drain_once(&cfg).await.unwrap();
    assert_eq!(
        (summary.inserted, summary.duplicates),
        (6, 0),
        "{summary:?}"
    );
    for t in [
        "tracks",
        "pages",
        "identifies",
        "groups",
        "aliases",
        "screens",
    ] {
        assert_eq!(
            count(&pg, &format!("SELECT count(*) FROM {t}")).await,
            1,
            "{t}"
        );
    }
    assert_eq!(
        count(&pg, "SELECT count(*) FROM tracks WHERE properties->>'plan' = 'pro' AND context->'consent'->'resolved'->>'region' IS NOT NULL").await,
        1
    );
    // Draining again finds nothing; nothing doubles.
    assert_eq!(drain_once(&cfg).await.unwrap().batches, 0);
    assert_eq!(count(&pg, "SELECT count(*) FROM message_ids").await, 6);
}

async fn wait_for(pg: &LocalPostgres, sql: &str, want: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let n = count(pg, sql).await;
        if n == want {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {n} of {want}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn two_agents_drain_one_edge_into_postgres_exactly_once() {
    let st = Stack::start();
    let pg = LocalPostgres::start().unwrap();
    post_tracks(&st, "two", 600).await;
    let cfg = st.pg_config(&pg);
    let mut stops = Vec::new();
    let mut agents = Vec::new();
    for _ in 0..2 {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(tx);
        let mut c = cfg.clone();
        c.lease_batches = 1;
        agents.push(tokio::spawn(collector_agent::run(c, async move {
            let _ = rx.await;
        })));
    }
    wait_for(&pg, "SELECT count(*) FROM tracks", 600, "loaded").await;
    for s in stops {
        let _ = s.send(());
    }
    for a in agents {
        a.await.unwrap().unwrap();
    }
    assert_eq!(
        count(
            &pg,
            "SELECT count(DISTINCT message_id) FROM tracks WHERE message_id LIKE 'two-%'"
        )
        .await,
        600
    );
    assert_eq!(count(&pg, "SELECT count(*) FROM message_ids").await, 600);
    st.assert_edge_drained().await;
}

#[tokio::test]
async fn postgres_outage_mid_drain_backs_off_and_loses_nothing() {
    let st = Stack::start();
    let pg = LocalPostgres::start().unwrap();
    let mut cfg = st.pg_config(&pg);
    let metrics_port = collector_e2e::free_port();
    cfg.metrics_addr = Some(format!("127.0.0.1:{metrics_port}"));
    // Every retry during the outage is a stuck load's, written in parts: a warehouse
    // that takes nothing has nothing quarantined.
    cfg.stuck_quarantine_after_ms = 1;
    post_tracks(&st, "before", 100).await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(collector_agent::run(cfg, async move {
        let _ = rx.await;
    }));
    wait_for(&pg, "SELECT count(*) FROM tracks", 100, "before the outage").await;
    pg.stop().unwrap();
    // The edge keeps spooling while the warehouse is down.
    post_tracks(&st, "during", 100).await;
    // Until the agent has tried (and failed) to load them: a transient warehouse failure.
    let scrape = || async {
        st.http
            .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !scrape()
        .await
        .contains("collector_agent_drain_failures_total{reason=\"warehouse_transient\"}")
    {
        assert!(
            Instant::now() < deadline,
            "no load was tried during the outage"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pg.restart().unwrap();
    wait_for(&pg, "SELECT count(*) FROM tracks", 200, "after the outage").await;
    // The counters move just after the commit that made the rows visible: read them
    // until they have caught up (or the deadline passes), then check them exactly.
    let inserted_of = |metrics: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("collector_agent_events_inserted_total{table="))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut metrics = scrape().await;
    while inserted_of(&metrics) < 200 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        metrics = scrape().await;
    }
    assert_eq!(inserted_of(&metrics), 200, "{metrics}");
    let _ = tx.send(());
    agent.await.unwrap().unwrap();
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM tracks WHERE message_id LIKE 'during-%'"
        )
        .await,
        100
    );
    assert_eq!(count(&pg, "SELECT count(*) FROM quarantine").await, 0);
}

// An analyst's trigger refuses some events with an exception PostgreSQL does not call a
// data error (P0001, as `RAISE EXCEPTION` gives): every load holding one fails,
// transiently, attempt after attempt, which used to block the shard for good. After
// `stuck_quarantine_after_ms` the agent writes that load in parts: every other event
// lands, the refused ones are quarantined with the trigger's words, the edge drains.
// Once the trigger is gone, `replay` loads them.
#[tokio::test]
async fn events_a_trigger_refuses_are_quarantined_instead_of_blocking_their_shard() {
    let st = Stack::start();
    let pg = LocalPostgres::start().unwrap();
    let mut cfg = st.pg_config(&pg);
    cfg.stuck_quarantine_after_ms = 2_000;
    let sink = connect(&pg).await;
    sink.query(
        "CREATE FUNCTION refuse_tests() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NEW.event_text = 'Test Purchase' THEN \
         RAISE EXCEPTION 'no test purchases in production (%)', NEW.message_id; \
         END IF; RETURN NEW; END $$",
    )
    .await
    .unwrap();
    sink.query("CREATE TRIGGER refuse_tests BEFORE INSERT ON tracks FOR EACH ROW EXECUTE FUNCTION refuse_tests()")
        .await
        .unwrap();
    // Two refused events, each in a batch of good ones.
    for b in 0..4 {
        let mut batch: Vec<_> = (0..50)
            .map(|i| json!({"type": "track", "messageId": format!("good-{b}-{i}"), "anonymousId": format!("v-{b}-{i}"), "event": "Purchase"}))
            .collect();
        if b % 2 == 1 {
            batch.insert(20, json!({"type": "track", "messageId": format!("test-{b}"), "anonymousId": format!("v-{b}-20"), "event": "Test Purchase"}));
        }
        let r = st.post("/v1/batch", &json!({ "batch": batch })).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(collector_agent::run(cfg, async move {
        let _ = rx.await;
    }));
    wait_for(&pg, "SELECT count(*) FROM tracks", 200, "good events").await;
    wait_for(&pg, "SELECT count(*) FROM quarantine", 2, "refused events").await;
    let _ = tx.send(());
    agent.await.unwrap().unwrap();
    st.assert_edge_drained().await;
    let q = sink
        .query("SELECT message_id, reason FROM quarantine ORDER BY message_id")
        .await
        .unwrap()
        .rows;
    assert_eq!(q.len(), 2);
    for (row, id) in q.iter().zip(["test-1", "test-3"]) {
        assert_eq!(row[0].as_deref(), Some(id));
        let reason = row[1].as_deref().unwrap();
        assert!(
            reason.contains(&format!("no test purchases in production ({id})")),
            "{reason}"
        );
    }
    assert_eq!(
        count(&pg, "SELECT count(*) FROM purchase").await,
        200,
        "the per-event table"
    );
    // The analyst drops the trigger; the quarantined events load.
    sink.query("DROP TRIGGER refuse_tests ON tracks")
        .await
        .unwrap();
    let r = collector_agent::sinks::replay_all(&sink, &[], &|_, _| {})
        .await
        .unwrap();
    assert_eq!(r.loads.inserted, 2, "{r:?}");
    assert_eq!(count(&pg, "SELECT count(*) FROM tracks").await, 202);
    assert_eq!(count(&pg, "SELECT count(*) FROM quarantine").await, 0);
}

// The identity run after the last load fails (here `profiles` is missing while an
// operator moves it; PostgreSQL's 42P01, transient), and then nothing loads for a
// while: people are not left behind the events until the next load, the daemon tries
// identity again on the audience schedule.
#[tokio::test]
async fn identity_that_failed_after_the_last_load_is_retried_on_schedule() {
    let st = Stack::start();
    let pg = LocalPostgres::start().unwrap();
    let mut cfg = st.pg_config(&pg);
    cfg.audience_interval_ms = 300;
    let sink = connect(&pg).await;
    sink.query("ALTER TABLE profiles RENAME TO profiles_away")
        .await
        .unwrap();
    let batch: Vec<_> = (0..20)
        .map(|i| json!({"type": "identify", "messageId": format!("id-{i}"), "anonymousId": format!("a-{i}"), "userId": format!("u-{i}")}))
        .collect();
    let r = st.post("/v1/batch", &json!({ "batch": batch })).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(collector_agent::run(cfg, async move {
        let _ = rx.await;
    }));
    wait_for(&pg, "SELECT count(*) FROM identifies", 20, "identifies").await;
    // Identity failed after that load (and once more at once), and on schedule since.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(count(&pg, "SELECT count(*) FROM profiles_away").await, 0);
    sink.query("ALTER TABLE profiles_away RENAME TO profiles")
        .await
        .unwrap();
    wait_for(
        &pg,
        "SELECT count(*) FROM profiles",
        20,
        "profiles, with nothing new loaded",
    )
    .await;
    let _ = tx.send(());
    agent.await.unwrap().unwrap();
}

// The warehouse is down when the agent starts (a database that starts after it, or is
// being restarted): the agent waits for it instead of exiting, then loads everything.
#[tokio::test]
async fn the_agent_waits_for_a_postgres_that_is_down_at_start() {
    let st = Stack::start();
    let pg = LocalPostgres::start().unwrap();
    let cfg = st.pg_config(&pg);
    pg.stop().unwrap();
    post_tracks(&st, "early", 100).await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(collector_agent::run(cfg, async move {
        let _ = rx.await;
    }));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !agent.is_finished(),
        "the agent waits for the warehouse instead of exiting"
    );
    pg.restart().unwrap();
    wait_for(
        &pg,
        "SELECT count(*) FROM tracks",
        100,
        "once PostgreSQL is up",
    )
    .await;
    let _ = tx.send(());
    agent.await.unwrap().unwrap();
    assert_eq!(
        count(&pg, "SELECT count(DISTINCT message_id) FROM tracks").await,
        100
    );
}

// A load that takes longer than its lease (here: blocked by a lock an analyst holds)
// keeps the lease by renewing it, so no other agent gets its batches meanwhile; then it
// commits and acks, exactly once.
/// `n` track events of one visitor (so one shard), posted 500 to a request; returns
/// the shard.
async fn post_one_visitors_tracks(st: &Stack, prefix: &str, n: usize) -> u32 {
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let batch: Vec<_> = chunk
            .iter()
            .map(|i| json!({"type": "track", "messageId": format!("{prefix}-{i}"), "anonymousId": "one-visitor", "event": "E"}))
            .collect();
        let r = st.post("/v1/batch", &json!({"batch": batch})).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    collector_core::shard::shard_for(Some("one-visitor"), None, 4)
}

/// A transaction of the test's own holding `message_ids` locked, so the agent's next
/// load waits for it until [`Locked::commit`].
struct Locked {
    release: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

async fn lock_message_ids(cfg: &collector_agent::AgentConfig) -> Locked {
    let WarehouseConfig::Postgres(pg) = cfg.warehouse.clone() else {
        unreachable!()
    };
    let (locked, is_locked) = tokio::sync::oneshot::channel::<()>();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        let sink = PostgresSink::connect(&pg).await.unwrap();
        let mut lock = sink.session().await.unwrap().unwrap();
        lock.batch("BEGIN").await.unwrap();
        lock.batch("LOCK TABLE message_ids IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        let _ = locked.send(());
        let _ = released.await;
        lock.batch("COMMIT").await.unwrap();
    });
    is_locked.await.expect("message_ids locked");
    Locked { release, done }
}

impl Locked {
    async fn commit(self) {
        let _ = self.release.send(());
        self.done.await.unwrap();
    }
}

/// Waits until `shard` has `n` batches leased.
async fn wait_leased(st: &Stack, shard: u32, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = st.edge_stats().await;
        if stats["shards"][shard as usize]["leased_batches"].as_u64() == Some(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never held {n} leased: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_load_longer_than_its_lease_renews_it() {
    let st = Stack::start();
    let pg = LocalPostgres::start().unwrap();
    let mut cfg = st.pg_config(&pg);
    cfg.lease_ms = 1_500;
    let shard = post_one_visitors_tracks(&st, "slow", 50).await;
    let lock = lock_message_ids(&cfg).await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(collector_agent::run(cfg.clone(), async move {
        let _ = rx.await;
    }));
    // The agent holds the lease (the batch seals after BATCH_MAX_AGE_MS).
    wait_leased(&st, shard, 1).await;
    // Two lease lengths later the lease is still the agent's: nothing to hand out.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let other = st.lease(shard, 10, 1_000).await;
    assert!(
        other.batches.is_empty(),
        "the lease was renewed, not handed out again"
    );
    lock.commit().await;
    wait_for(&pg, "SELECT count(*) FROM tracks", 50, "after the lock").await;
    let _ = tx.send(());
    agent.await.unwrap().unwrap();
    let stats = st.edge_stats().await;
    assert_eq!(
        stats["shards"][shard as usize]["sealed_batches"],
        json!(0),
        "{stats}"
    );
}

/// An agent (`lease_batches = 1`) started on three full batches of one visitor while
/// `message_ids` is locked: it holds the first batch loading and the second taken
/// ahead.
struct BehindALock {
    st: Stack,
    pg: LocalPostgres,
    shard: u32,
    lock: Locked,
    stop: tokio::sync::oneshot::Sender<()>,
    agent: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// [`BehindALock`] with leases of `lease_ms` and loads that wait `timeout_ms` for the
/// lock (a statement timeout, which the agent takes as a transient failure).
async fn three_batches_behind_a_lock(prefix: &str, lease_ms: u64, timeout_ms: u64) -> BehindALock {
    let st = Stack::start();
    let pg = LocalPostgres::start().unwrap();
    let mut cfg = st.pg_config(&pg);
    cfg.lease_ms = lease_ms;
    cfg.lease_batches = 1;
    if let WarehouseConfig::Postgres(p) = &mut cfg.warehouse {
        p.timeout_ms = timeout_ms;
    }
    let shard = post_one_visitors_tracks(&st, prefix, 1_500).await;
    let lock = lock_message_ids(&cfg).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(collector_agent::run(cfg, async move {
        let _ = stopped.await;
    }));
    // The first batch is loading (and waits for the lock); the second is leased
    // beside it, not after it.
    wait_leased(&st, shard, 2).await;
    BehindALock {
        st,
        pg,
        shard,
        lock,
        stop,
        agent,
    }
}

impl BehindALock {
    /// Lets the loads through; every event lands once, the agent stops, and the edge
    /// holds nothing sealed or leased.
    async fn finish(self) {
        self.lock.commit().await;
        wait_for(
            &self.pg,
            "SELECT count(*) FROM tracks",
            1_500,
            "after the lock",
        )
        .await;
        assert_eq!(
            count(&self.pg, "SELECT count(DISTINCT message_id) FROM tracks").await,
            1_500
        );
        let _ = self.stop.send(());
        self.agent.await.unwrap().unwrap();
        let stats = self.st.edge_stats().await;
        for key in ["sealed_batches", "leased_batches"] {
            assert_eq!(
                stats["shards"][self.shard as usize][key],
                json!(0),
                "{key}: {stats}"
            );
        }
    }
}

#[tokio::test]
async fn the_next_lease_is_taken_and_renewed_while_a_load_runs() {
    // The load waits for the lock longer than this test runs.
    let run = three_batches_behind_a_lock("ahead", 1_500, 120_000).await;
    // Both stay the agent's two lease lengths later: the lease in hand is renewed too.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let other = run.st.lease(run.shard, 1, 1_000).await;
    assert_eq!(other.batches.len(), 1, "only the third batch is free");
    let stats = run.st.edge_stats().await;
    assert_eq!(
        stats["shards"][run.shard as usize]["leased_batches"],
        json!(3),
        "{stats}"
    );
    // The test's own lease of the third batch expires and the agent takes it.
    run.finish().await;
}

#[tokio::test]
async fn a_failed_load_gives_its_lease_and_the_next_one_back() {
    // Held to the end, these leases would keep their batches past `finish`'s wait;
    // the load waiting for the lock fails after a second and a half.
    let run = three_batches_behind_a_lock("back", 600_000, 1_500).await;
    // Past a failed load or two.
    tokio::time::sleep(Duration::from_millis(5_000)).await;
    run.finish().await;
}
