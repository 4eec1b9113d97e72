//! Identity resolution at scale, in DuckDB, PostgreSQL, the Parquet lake and ClickHouse:
//! 1M identify events (250k people, four devices each) resolved from scratch; but in
//! ClickHouse, then 4M pages of those devices (a history an incremental run should not
//! read again); then the incremental run after 10k more events (new devices of existing
//! people, and new people), then a backlog of 100k events in 20 loads (read in runs of
//! about `events_per_run`), then a run with nothing new.
//!
//! DuckDB, PostgreSQL and ClickHouse get their events by SQL, as a load would leave
//! them (rows, registry, pending loads); the lake by its own loads of 5,000 events (its
//! rows live in Parquet files, one per table and load, listed in its manifest), so its
//! setup takes minutes.
//! Prints `label<TAB>result` lines for `cargo xtask bench`.
//! Run: `cargo bench -p collector-agent --bench identity` (`-- duckdb`, `-- postgres`,
//! `-- parquet` or `-- clickhouse` for one).

use std::time::Instant;

use collector_agent::config::{ClickHouseConfig, PostgresConfig};
use collector_agent::identity::{self, IdentityConfig};
use collector_agent::sinks::clickhouse::ClickHouseSink;
use collector_agent::sinks::duckdb::DuckDbSink;
use collector_agent::sinks::parquet::ParquetSink;
use collector_agent::sinks::postgres::PostgresSink;
use collector_agent::sinks::{Load, LoadBatch, Sink};
use collector_core::ingest::{parse_body, Endpoint};
use collector_e2e::clickhouse::LocalClickHouse;
use collector_e2e::postgres::LocalPostgres;

const EVENTS: u64 = 1_000_000;
const MORE: u64 = 10_000;
/// The backlog after the incremental run: loads of 5,000 events, as a drain writes them.
const BACKLOG_LOADS: u64 = 20;
const BACKLOG_LOAD: u64 = 5_000;

/// DuckDB or PostgreSQL: what the bench's SQL spells differently in each.
#[derive(Clone, Copy)]
enum Dialect {
    DuckDb,
    Postgres,
}

impl Dialect {
    /// The rows `i` of `start..end` (end excluded).
    fn series(self, start: u64, end: u64) -> String {
        match self {
            Dialect::DuckDb => format!("range({start}, {end}) r(i)"),
            Dialect::Postgres => format!("generate_series({start}::bigint, {}::bigint) i", end - 1),
        }
    }

    /// `day` at midnight UTC plus `i` seconds.
    fn at(self, day: &str) -> String {
        match self {
            Dialect::DuckDb => format!("TIMESTAMP '{day} 00:00:00' + to_seconds(i)"),
            Dialect::Postgres => {
                format!("TIMESTAMPTZ '{day} 00:00:00+00' + i * INTERVAL '1 second'")
            }
        }
    }

    fn now(self) -> &'static str {
        match self {
            Dialect::DuckDb => "now()::TIMESTAMP",
            Dialect::Postgres => "now()",
        }
    }

    /// Integer division of `i`.
    fn div(self) -> &'static str {
        match self {
            Dialect::DuckDb => "//",
            Dialect::Postgres => "/",
        }
    }

    /// A JSON column's value from text.
    fn json(self, text: &str) -> String {
        match self {
            Dialect::DuckDb => text.to_string(),
            Dialect::Postgres => format!("({text})::jsonb"),
        }
    }

    /// The registry's rows for ids `prefix || i` of `table`, load `load`, over `rows`
    /// (DuckDB's registry has the ids' hash beside them).
    fn register(self, prefix: &str, table: &str, load: u64, rows: &str) -> String {
        let hash = match self {
            Dialect::DuckDb => format!(", md5_number_lower('{prefix}' || i)"),
            Dialect::Postgres => String::new(),
        };
        format!(
            "INSERT INTO message_ids SELECT '{prefix}' || i, '{table}', {load}{hash} FROM {rows}"
        )
    }
}

/// `n` identify events from `start`, straight into `identifies` as load `load` would
/// leave them (registered in `message_ids`, pending for identity with the rows'
/// `loaded_at`, in one transaction): device `a{i}` signs in as `u{user}`.
fn insert_sql(d: Dialect, start: u64, n: u64, user: User, load: u64) -> Vec<String> {
    let rows = d.series(start, start + n);
    let user = user.sql(&format!("i {} {}", d.div(), user.div));
    let (at, now) = (d.at("2026-11-01"), d.now());
    let traits = d.json("'{\"plan\": \"p' || (i % 3) || '\"}'");
    vec![
        "BEGIN".into(),
        format!(
            "INSERT INTO identifies (message_id, anonymous_id, user_id, timestamp, received_at, context, traits, raw, loaded_at, id)
             SELECT 'm' || i, 'a' || i, 'u' || ({user}), {at}, {at}, '{{}}', {traits}, '{{}}', {now}, 'm' || i
             FROM {rows}"
        ),
        d.register("m", "identifies", load, &rows),
        format!("INSERT INTO identity_pending VALUES ({load}, {now})"),
        "COMMIT".into(),
    ]
}

/// Pages per device of the 1M identifies, loaded after them: the history a warehouse
/// holds, which an incremental run must not have to read again.
const PAGES_PER_DEVICE: u64 = 4;

/// The `context` of each page of that history: a path, and the consent the edge
/// resolved (what a profile's consent is computed from).
const PAGE_CONTEXT: &str = r#"{"page": {"path": "/"}, "consent": {"resolved": {"policy_version": "v1", "granted": ["analytics"], "denied": ["marketing"], "sources": {"analytics": "explicit", "marketing": "region_default"}}}}"#;

/// `PAGES_PER_DEVICE` pages of each of the first 1M devices (anonymous only, with the
/// consent the edge stamps), as load `load`.
fn history_sql(d: Dialect, load: u64) -> Vec<String> {
    let rows = d.series(0, EVENTS * PAGES_PER_DEVICE);
    let (at, now) = (d.at("2026-11-13"), d.now());
    let mut sql = vec![
        "BEGIN".into(),
        format!(
            "INSERT INTO pages (message_id, anonymous_id, timestamp, received_at, context, properties, raw, loaded_at, id)
             SELECT 'p' || i, 'a' || (i % {EVENTS}), {at}, {at}, '{PAGE_CONTEXT}', '{{\"path\": \"/\"}}', '{{}}', {now}, 'p' || i
             FROM {rows}"
        ),
        d.register("p", "pages", load, &rows),
        format!("INSERT INTO identity_pending VALUES ({load}, {now})"),
        "COMMIT".into(),
    ];
    if let Dialect::Postgres = d {
        // Statistics for the history, as autovacuum would take them.
        sql.push("ANALYZE".into());
    }
    sql
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
    /// The user of event `i`.
    fn of(self, i: u64) -> u64 {
        let q = i / self.div;
        self.offset + self.modulo.map_or(q, |m| q % m)
    }

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

/// How a warehouse gets the bench's events.
#[derive(Clone, Copy)]
enum Feed {
    /// By SQL, with the pages' history.
    Sql(Dialect),
    /// By ClickHouse's SQL, without the history.
    ClickHouse,
    /// By the sink's own loads (the lake).
    Loads,
}

/// Events in batches of 500 as the edge stores them, loaded 5,000 at a time (the
/// drain's lease), `event(i)` for each `i` of `range`.
async fn load_events(
    sink: &dyn Sink,
    range: std::ops::Range<u64>,
    batch_id: &mut i64,
    event: impl Fn(u64) -> serde_json::Value,
) {
    let ids: Vec<u64> = range.collect();
    for lease in ids.chunks(5_000) {
        let mut batches = Vec::new();
        for chunk in lease.chunks(500) {
            let body =
                serde_json::json!({"batch": chunk.iter().map(|i| event(*i)).collect::<Vec<_>>()});
            let events = parse_body(
                Endpoint::Batch,
                body.to_string().as_bytes(),
                1_795_528_444_000,
                &mut || unreachable!("every event has its messageId"),
            )
            .unwrap()
            .accepted;
            *batch_id += 1;
            batches.push(LoadBatch::Decoded {
                batch_id: *batch_id,
                events,
            });
        }
        sink.load(&Load { shard: 0, batches }).await.unwrap();
    }
}

/// Identify events `start..start + n`, as [`insert_sql`] writes them.
async fn load_identifies(sink: &dyn Sink, start: u64, n: u64, user: User, batch_id: &mut i64) {
    load_events(sink, start..start + n, batch_id, |i| {
        serde_json::json!({"type": "identify", "messageId": format!("m{i}"), "anonymousId": format!("a{i}"),
            "userId": format!("u{}", user.of(i)), "traits": {"plan": format!("p{}", i % 3)},
            "timestamp": collector_core::timestamp::format_ms(1_793_491_200_000 + 1000 * i as i64)})
    })
    .await
}

/// The pages' history, as [`history_sql`] writes it.
async fn load_history(sink: &dyn Sink, batch_id: &mut i64) {
    let context: serde_json::Value = serde_json::from_str(PAGE_CONTEXT).unwrap();
    load_events(sink, 0..EVENTS * PAGES_PER_DEVICE, batch_id, |i| {
        serde_json::json!({"type": "page", "messageId": format!("p{i}"), "anonymousId": format!("a{}", i % EVENTS),
            "properties": {"path": "/"},
            "context": context.clone(),
            "timestamp": collector_core::timestamp::format_ms(1_794_528_000_000 + 1000 * i as i64)})
    })
    .await
}

impl Feed {
    async fn identifies(
        self,
        sink: &dyn Sink,
        start: u64,
        n: u64,
        user: User,
        load: u64,
        batch_id: &mut i64,
    ) {
        match self {
            Feed::Sql(d) => insert(sink, insert_sql(d, start, n, user, load)).await,
            Feed::ClickHouse => insert(sink, insert_sql_clickhouse(start, n, user, load)).await,
            Feed::Loads => load_identifies(sink, start, n, user, batch_id).await,
        }
    }

    /// The history, if this warehouse gets one.
    async fn history(self, sink: &dyn Sink, load: u64, batch_id: &mut i64) -> bool {
        match self {
            Feed::Sql(d) => insert(sink, history_sql(d, load)).await,
            Feed::ClickHouse => return false,
            Feed::Loads => load_history(sink, batch_id).await,
        }
        true
    }
}

/// 1M from scratch, (a history of pages,) 10k more, a backlog, nothing new: one line each.
async fn bench(name: &str, sink: &dyn Sink, feed: Feed) {
    let mut batch_id = 0;
    let t = Instant::now();
    feed.identifies(sink, 0, EVENTS, PEOPLE, 1, &mut batch_id)
        .await;
    if matches!(feed, Feed::Loads) {
        println!(
            "identity: loading the 1M identify events ({name}, not timed for identity)\t{:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    let cfg = IdentityConfig::default();

    let (full, secs) = timed_run(sink, &cfg).await;
    println!(
        "identity: 1M identify events from scratch ({name})\t{secs:.1} s ({:.0} events/s; {} edges, {} label-propagation passes, {} profiles)",
        EVENTS as f64 / secs,
        full.new_edges,
        full.passes,
        full.profiles
    );

    if feed.history(sink, 4, &mut batch_id).await {
        let (h, secs) = timed_run(sink, &cfg).await;
        println!(
            "identity: then {}M pages of those devices ({name})\t{secs:.1} s ({} profiles)",
            EVENTS * PAGES_PER_DEVICE / 1_000_000,
            h.profiles
        );
    }

    // 10k more: half new devices of existing people, half new people.
    feed.identifies(sink, EVENTS, MORE / 2, NEW_DEVICES, 2, &mut batch_id)
        .await;
    feed.identifies(sink, 2 * EVENTS, MORE / 2, NEW_PEOPLE, 3, &mut batch_id)
        .await;
    let (inc, secs) = timed_run(sink, &cfg).await;
    println!(
        "identity: then 10k more events, incremental ({name})\t{secs:.2} s ({} new edges, region {} ids, {} passes, {} refused)",
        inc.new_edges,
        inc.region_ids,
        inc.passes,
        inc.refused
    );
    // A backlog: 100k events in 20 loads, read in runs of about `events_per_run`.
    for l in 0..BACKLOG_LOADS {
        let (start, n) = (3 * EVENTS + l * BACKLOG_LOAD, BACKLOG_LOAD);
        let who = if l % 2 == 0 { NEW_DEVICES } else { NEW_PEOPLE };
        feed.identifies(sink, start, n, who, 10 + l, &mut batch_id)
            .await;
    }
    let (backlog, secs) = timed_run(sink, &cfg).await;
    println!(
        "identity: then a backlog of {}k events in {BACKLOG_LOADS} loads ({name})\t{secs:.2} s ({} runs, {} new edges)",
        BACKLOG_LOADS * BACKLOG_LOAD / 1000,
        backlog.runs,
        backlog.new_edges
    );
    let (idle, secs) = timed_run(sink, &cfg).await;
    println!(
        "identity: a run with nothing new ({name})\t{secs:.2} s ({} new edges)",
        idle.new_edges
    );
}

/// One identity run in a session of its own, as the agent runs each (a server sink's
/// session holds its one connection, which the loads between runs need); timed from
/// the session's first statement.
async fn timed_run(sink: &dyn Sink, cfg: &IdentityConfig) -> (identity::IdentityStats, f64) {
    let mut session = sink.session().await.unwrap().unwrap();
    let t = Instant::now();
    let stats = identity::run(&mut *session, cfg).await.unwrap();
    (stats, t.elapsed().as_secs_f64())
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
        bench("DuckDB", &sink, Feed::Sql(Dialect::DuckDb)).await;
    }
    if wanted("postgres") {
        match LocalPostgres::start() {
            Ok(pg) => {
                // The agent's defaults: identity's statements run under
                // `query_timeout_ms` (a load's 30 s would not let them finish).
                let sink = PostgresSink::connect(&PostgresConfig::at(&pg.url))
                    .await
                    .unwrap();
                bench("PostgreSQL", &sink, Feed::Sql(Dialect::Postgres)).await;
            }
            Err(e) => println!("identity: PostgreSQL\tnot run: {e}"),
        }
    }
    if wanted("parquet") {
        let dir = tempfile::tempdir().unwrap();
        let sink = ParquetSink::open(&dir.path().join("lake")).unwrap();
        bench("the Parquet lake", &sink, Feed::Loads).await;
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
                bench("ClickHouse", &sink, Feed::ClickHouse).await;
            }
            Err(e) => println!("identity: ClickHouse\tnot run: {e}"),
        }
    }
}
