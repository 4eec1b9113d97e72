//! Identity resolution at scale, in DuckDB: 1M identify events (250k people, four
//! devices each) resolved from scratch, then the incremental run after 10k more events
//! (new devices of existing people, and new people), then a run with nothing new.
//! Prints `label<TAB>result` lines for `cargo xtask bench`.
//! Run: `cargo bench -p collector-agent --bench identity`.

use std::time::Instant;

use collector_agent::identity::{self, IdentityConfig};
use collector_agent::sinks::duckdb::DuckDbSink;
use collector_agent::sinks::Sink;

const EVENTS: u64 = 1_000_000;
const MORE: u64 = 10_000;

/// `n` identify events from `start`, straight into `identifies` as load `load` would
/// leave them (registered in `message_ids`, pending for identity): device `a{i}` signs
/// in as `u{user}`.
fn insert_sql(start: u64, n: u64, user: &str, load: u64) -> Vec<String> {
    let end = start + n;
    vec![format!(
        "INSERT INTO identifies (message_id, anonymous_id, user_id, timestamp, received_at, context, traits, raw, loaded_at, id)
         SELECT 'm' || i, 'a' || i, 'u' || ({user}), TIMESTAMP '2026-11-01 00:00:00' + to_seconds(i),
                TIMESTAMP '2026-11-01 00:00:00' + to_seconds(i), '{{}}', '{{\"plan\": \"p' || (i % 3) || '\"}}', '{{}}',
                now()::TIMESTAMP, 'm' || i
         FROM range({start}, {end}) r(i)"
    ),
    format!("INSERT INTO message_ids SELECT 'm' || i, 'identifies', {load} FROM range({start}, {end}) r(i)"),
    format!("INSERT INTO identity_pending VALUES ({load})")]
}

async fn insert(sink: &DuckDbSink, statements: Vec<String>) {
    for sql in statements {
        sink.query(&sql).await.unwrap();
    }
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sink = DuckDbSink::open(&dir.path().join("identity.duckdb")).unwrap();
    insert(&sink, insert_sql(0, EVENTS, "i // 4", 1)).await;
    let cfg = IdentityConfig::default();

    let t = Instant::now();
    let mut session = sink.session().await.unwrap().unwrap();
    let full = identity::run(&mut *session, &cfg).await.unwrap();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "identity: 1M identify events from scratch (DuckDB)\t{secs:.1} s ({:.0} events/s; {} edges, {} label-propagation passes, {} profiles)",
        EVENTS as f64 / secs,
        full.new_edges,
        full.passes,
        full.profiles
    );

    // 10k more: half new devices of existing people, half new people.
    insert(&sink, insert_sql(EVENTS, MORE / 2, "i % 250000", 2)).await;
    insert(
        &sink,
        insert_sql(2 * EVENTS, MORE / 2, "10000000 + i // 4", 3),
    )
    .await;
    let t = Instant::now();
    let inc = identity::run(&mut *session, &cfg).await.unwrap();
    println!(
        "identity: then 10k more events, incremental\t{:.2} s ({} new edges, region {} ids, {} passes, {} refused)",
        t.elapsed().as_secs_f64(),
        inc.new_edges,
        inc.region_ids,
        inc.passes,
        inc.refused
    );
    let t = Instant::now();
    let idle = identity::run(&mut *session, &cfg).await.unwrap();
    println!(
        "identity: a run with nothing new\t{:.2} s ({} new edges)",
        t.elapsed().as_secs_f64(),
        idle.new_edges
    );
}
