//! Identity resolution at scale, in DuckDB and in ClickHouse: 1M identify events (250k people, four
//! devices each) resolved from scratch; in DuckDB, then 4M pages of those devices (a
//! history an incremental run should not read again); then the incremental run after
//! 10k more events (new devices of existing people, and new people), then a backlog of
//! 100k events in 20 loads (read in runs of about `events_per_run`), then a run with
//! nothing new.
//! Prints `label<TAB>result` lines for `cargo xtask bench`.
//! Run: `cargo bench -p collector-agent --bench identity` (`-- duckdb` or
//! `-- clickhouse` for one).

use std::time::Instant;

use collector_agent::config::ClickHouseConfig;
use collector_agent::identity::{self, IdentityConfig};
use collector_agent::sinks::clickhouse::ClickHouseSink;
use collector_agent::sinks::duckdb::DuckDbSink;
use collector_agent::sinks::Sink;
use collector_e2e::clickhouse::LocalClickHouse;

const EVENTS: u64 = 1_000_000;
const MORE: u64 = 10_000;
/// The backlog after the incremental run: loads of 5,000 events, as a drain writes them.
const BACKLOG_LOADS: u64 = 20;
const BACKLOG_LOAD: u64 = 5_000;

/// `n` identify events from `start`, straight into `identifies` as load `load` would
/// leave them (registered in `message_ids`, pending for identity with the rows'
/// `loaded_at`, in one transaction): device `a{i}` signs in as `u{user}`.
fn insert_sql(start: u64, n: u64, user: User, load: u64) -> Vec<String> {
    let end = start + n;
    let user = user.sql(&format!("i // {}", user.div));
    vec!["BEGIN".into(), format!(
        "INSERT INTO identifies (message_id, anonymous_id, user_id, timestamp, received_at, context, traits, raw, loaded_at, id)
         SELECT 'm' || i, 'a' || i, 'u' || ({user}), TIMESTAMP '2026-11-01 00:00:00' + to_seconds(i),
                TIMESTAMP '2026-11-01 00:00:00' + to_seconds(i), '{{}}', '{{\"plan\": \"p' || (i % 3) || '\"}}', '{{}}',
                now()::TIMESTAMP, 'm' || i
         FROM range({start}, {end}) r(i)"
    ),
    format!("INSERT INTO message_ids SELECT 'm' || i, 'identifies', {load}, md5_number_lower('m' || i) FROM range({start}, {end}) r(i)"),
    format!("INSERT INTO identity_pending VALUES ({load}, now()::TIMESTAMP)"), "COMMIT".into()]
}

/// Pages per device of the 1M identifies, loaded after them: the history a warehouse
/// holds, which an incremental run must not have to read again.
const PAGES_PER_DEVICE: u64 = 4;

/// `PAGES_PER_DEVICE` pages of each of the first 1M devices (anonymous only, with the
/// consent the edge stamps), as load `load`.
fn history_sql(load: u64) -> Vec<String> {
    let n = EVENTS * PAGES_PER_DEVICE;
    vec![
        "BEGIN".into(),
        format!(
            "INSERT INTO pages (message_id, anonymous_id, timestamp, received_at, context, properties, raw, loaded_at, id)
             SELECT 'p' || i, 'a' || (i % {EVENTS}), TIMESTAMP '2026-11-13 00:00:00' + to_seconds(i),
                    TIMESTAMP '2026-11-13 00:00:00' + to_seconds(i),
                    '{{\"page\": {{\"path\": \"/\"}}, \"consent\": {{\"resolved\": {{\"policy_version\": \"v1\", \"granted\": [\"analytics\"], \"denied\": [\"marketing\"], \"sources\": {{\"analytics\": \"explicit\", \"marketing\": \"region_default\"}}}}}}}}',
                    '{{\"path\": \"/\"}}', '{{}}', now()::TIMESTAMP, 'p' || i
             FROM range(0, {n}) r(i)"
        ),
        format!("INSERT INTO message_ids SELECT 'p' || i, 'pages', {load}, md5_number_lower('p' || i) FROM range(0, {n}) r(i)"),
        format!("INSERT INTO identity_pending VALUES ({load}, now()::TIMESTAMP)"),
        "COMMIT".into(),
    ]
}

/// The same events in ClickHouse: rows, registry (`identity_pending` is a view there).
fn insert_sql_clickhouse(start: u64, n: u64, user: User, load: u64) -> Vec<String> {
    let i = format!("(number + {start})");
    let user = user.sql(&format!("intDiv({i}, {})", user.div));
    vec![
        format!(
            "INSERT INTO collector_rows_identifies (message_id, anonymous_id, user_id, timestamp, received_at, context, traits, raw, loaded_at, _version, _received, id)
             SELECT concat('m', toString({i})), concat('a', toString({i})), concat('u', toString({user})),
                    toDateTime('2026-11-01 00:00:00') + {i}, toDateTime('2026-11-01 00:00:00') + {i}, '{{}}',
                    concat('{{\"plan\": \"p', toString({i} % 3), '\"}}'), '{{}}', now(), 1, toDate('2026-11-01'), concat('m', toString({i}))
             FROM numbers({n})"
        ),
        format!(
            "INSERT INTO message_ids SELECT concat('m', toString({i})), 'identifies', {load} FROM numbers({n})"
        ),
    ]
}

/// Which user event `i` signs in as: `offset + (i / div) % modulo`.
#[derive(Clone, Copy)]
struct User {
    offset: u64,
    div: u64,
    modulo: Option<u64>,
}

impl User {
    /// In SQL, given `i / div` in the dialect.
    fn sql(self, quotient: &str) -> String {
        match self.modulo {
            Some(m) => format!("({} + ({quotient}) % {m})", self.offset),
            None => format!("({} + {quotient})", self.offset),
        }
    }
}

/// Four devices per person, people from 0.
const PEOPLE: User = User {
    offset: 0,
    div: 4,
    modulo: None,
};
/// A new device of one of the first 250k people.
const NEW_DEVICES: User = User {
    offset: 0,
    div: 1,
    modulo: Some(250_000),
};
/// New people, four devices each.
const NEW_PEOPLE: User = User {
    offset: 10_000_000,
    div: 4,
    modulo: None,
};

async fn insert(sink: &dyn Sink, statements: Vec<String>) {
    let mut session = sink.session().await.unwrap().unwrap();
    for sql in statements {
        session.batch(&sql).await.unwrap();
    }
}

type Statements = fn(u64, u64, User, u64) -> Vec<String>;

/// 1M from scratch, (a history of pages,) 10k more, a backlog, nothing new: one line each.
async fn bench(
    name: &str,
    sink: &dyn Sink,
    sql: Statements,
    history: Option<fn(u64) -> Vec<String>>,
) {
    insert(sink, sql(0, EVENTS, PEOPLE, 1)).await;
    let cfg = IdentityConfig::default();

    let t = Instant::now();
    let mut session = sink.session().await.unwrap().unwrap();
    let full = identity::run(&mut *session, &cfg).await.unwrap();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "identity: 1M identify events from scratch ({name})\t{secs:.1} s ({:.0} events/s; {} edges, {} label-propagation passes, {} profiles)",
        EVENTS as f64 / secs,
        full.new_edges,
        full.passes,
        full.profiles
    );

    if let Some(history) = history {
        insert(sink, history(4)).await;
        let t = Instant::now();
        let h = identity::run(&mut *session, &cfg).await.unwrap();
        println!(
            "identity: then {}M pages of those devices ({name})\t{:.1} s ({} profiles)",
            EVENTS * PAGES_PER_DEVICE / 1_000_000,
            t.elapsed().as_secs_f64(),
            h.profiles
        );
    }

    // 10k more: half new devices of existing people, half new people.
    insert(sink, sql(EVENTS, MORE / 2, NEW_DEVICES, 2)).await;
    insert(sink, sql(2 * EVENTS, MORE / 2, NEW_PEOPLE, 3)).await;
    let t = Instant::now();
    let inc = identity::run(&mut *session, &cfg).await.unwrap();
    println!(
        "identity: then 10k more events, incremental ({name})\t{:.2} s ({} new edges, region {} ids, {} passes, {} refused)",
        t.elapsed().as_secs_f64(),
        inc.new_edges,
        inc.region_ids,
        inc.passes,
        inc.refused
    );
    // A backlog: 100k events in 20 loads, read in runs of about `events_per_run`.
    for l in 0..BACKLOG_LOADS {
        let (start, n) = (3 * EVENTS + l * BACKLOG_LOAD, BACKLOG_LOAD);
        let who = if l % 2 == 0 { NEW_DEVICES } else { NEW_PEOPLE };
        insert(sink, sql(start, n, who, 10 + l)).await;
    }
    let t = Instant::now();
    let backlog = identity::run(&mut *session, &cfg).await.unwrap();
    println!(
        "identity: then a backlog of {}k events in {BACKLOG_LOADS} loads ({name})\t{:.2} s ({} runs, {} new edges)",
        BACKLOG_LOADS * BACKLOG_LOAD / 1000,
        t.elapsed().as_secs_f64(),
        backlog.runs,
        backlog.new_edges
    );
    let t = Instant::now();
    let idle = identity::run(&mut *session, &cfg).await.unwrap();
    println!(
        "identity: a run with nothing new ({name})\t{:.2} s ({} new edges)",
        t.elapsed().as_secs_f64(),
        idle.new_edges
    );
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    if wanted("duckdb") {
        let dir = tempfile::tempdir().unwrap();
        let sink = DuckDbSink::open(&dir.path().join("identity.duckdb")).unwrap();
        bench("DuckDB", &sink, insert_sql, Some(history_sql)).await;
    }
    if wanted("clickhouse") {
        match LocalClickHouse::start() {
            Ok(ch) => {
                let sink = ClickHouseSink::connect(&ClickHouseConfig {
                    timeout_ms: 600_000,
                    ..ClickHouseConfig::at(&ch.url)
                })
                .await
                .unwrap();
                bench("ClickHouse", &sink, insert_sql_clickhouse, None).await;
            }
            Err(e) => println!("identity: ClickHouse\tnot run: {e}"),
        }
    }
}
