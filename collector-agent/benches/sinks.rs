//! Bulk-load speed of every sink from one backlog of realistic events, beside the
//! database's own bulk load of the same events: DuckDB `read_json` of the NDJSON (and,
//! like for like, of the rows of `tracks` into a table like it), DuckDB `COPY … TO`
//! Parquet for the lake, PostgreSQL `COPY` of the same rows, ClickHouse `INSERT …
//! JSONEachRow` of them. Prints `label<TAB>result` lines for `cargo xtask bench`. Run:
//! `cargo bench -p collector-agent --bench sinks`.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use collector_agent::config::{ClickHouseConfig, PostgresConfig};
use collector_agent::sinks::clickhouse::ClickHouseSink;
use collector_agent::sinks::duckdb::DuckDbSink;
use collector_agent::sinks::parquet::ParquetSink;
use collector_agent::sinks::postgres::PostgresSink;
use collector_agent::sinks::{schema, Load, LoadBatch, LoadPipeline, Sink};
use collector_core::ingest::{parse_body, Endpoint};
use collector_core::StoredEvent;
use collector_e2e::clickhouse::LocalClickHouse;
use collector_e2e::postgres::LocalPostgres;

const EVENTS: usize = 100_000;
const BATCH: usize = 500;
const BATCHES_PER_LOAD: usize = 10;

fn backlog() -> Vec<StoredEvent> {
    generated(Some("2026-11-24T12:00:01.000Z"), |n| {
        serde_json::json!({
            "type": "track", "event": if n.is_multiple_of(3) { "Order Completed" } else { "Product Viewed" },
            "messageId": format!("bench-{n}"), "anonymousId": format!("anon-{}", n % 5000),
            "userId": if n.is_multiple_of(2) { serde_json::Value::from(format!("user-{}", n % 2000)) } else { serde_json::Value::Null },
            "properties": {"revenue": (n % 97) as f64 + 0.99, "currency": "EUR", "sku": format!("SKU-{}", n % 300),
                           "quantity": n % 5 + 1, "category": "shoes"},
            "context": {"library": {"name": "analytics.js", "version": "5.2.0"},
                        "page": {"path": "/p", "url": "https://shop.example.com/p?x=1", "title": "Product"},
                        "userAgent": "Chrome 120 (Windows)", "locale": "de-DE"},
            "timestamp": "2026-11-24T12:00:00.000Z"
        })
    })
}

/// `EVENTS` events made by `event` from their number, as the edge stores them after
/// `/v1/batch` bodies of `BATCH` each (with `sentAt`, if given).
fn generated(
    sent_at: Option<&str>,
    event: impl Fn(usize) -> serde_json::Value,
) -> Vec<StoredEvent> {
    let mut out = Vec::with_capacity(EVENTS);
    let mut seq = 0;
    for b in 0..EVENTS / BATCH {
        let batch: Vec<serde_json::Value> = (0..BATCH).map(|i| event(b * BATCH + i)).collect();
        let mut body = serde_json::json!({"batch": batch});
        if let Some(t) = sent_at {
            body["sentAt"] = t.into();
        }
        out.extend(accepted(&body.to_string(), &mut seq));
    }
    out
}

/// The events of a `/v1/batch` body as the edge stores them (`seq` numbers the ids
/// it generates).
fn accepted(body: &str, seq: &mut u64) -> Vec<StoredEvent> {
    parse_body(
        Endpoint::Batch,
        body.as_bytes(),
        1_795_528_444_000,
        &mut || {
            *seq += 1;
            format!("gen-{seq}")
        },
    )
    .unwrap()
    .accepted
}

/// 100k identify events of 20k users (five each, spread over the backlog, so most
/// loads update users already there; one in four carries an older `timestamp` than
/// the user's last, as an offline device's queue would), four traits each.
fn identifies() -> Vec<StoredEvent> {
    generated(None, |n| {
        let minute = if n % 4 == 3 { n / 2 } else { n } % 1440;
        let plan = ["free", "pro", "team"][n % 3];
        serde_json::json!({
            "type": "identify", "messageId": format!("id-{n}"), "userId": format!("user-{}", n % 20_000),
            "anonymousId": format!("anon-{}", n % 30_000),
            "traits": {"plan": plan, "city": format!("city-{}", n % 50),
                       "age": n % 70 + 18, "company": if n.is_multiple_of(5) { serde_json::Value::Null } else { format!("co-{}", n % 900).into() }},
            "timestamp": format!("2026-11-24T{:02}:{:02}:00.000Z", minute / 60, minute % 60)
        })
    })
}

fn loads(events: &[StoredEvent]) -> Vec<Load> {
    events
        .chunks(BATCH * BATCHES_PER_LOAD)
        .enumerate()
        .map(|(l, chunk)| Load {
            shard: 0,
            batches: chunk
                .chunks(BATCH)
                .enumerate()
                .map(|(b, evs)| LoadBatch::Decoded {
                    batch_id: (l * BATCHES_PER_LOAD + b) as i64,
                    events: evs.to_vec(),
                })
                .collect(),
        })
        .collect()
}

/// Loads the backlog as the drain loop does (preparing a load while the one before is
/// written); rows/s.
async fn time_sink(sink: Arc<dyn Sink>, loads: Vec<Load>) -> f64 {
    let t = Instant::now();
    let mut pipeline = LoadPipeline::new(sink);
    for l in loads {
        pipeline.push(l).await.unwrap();
    }
    let inserted = pipeline.finish().await.unwrap().inserted;
    assert_eq!(inserted as usize, EVENTS);
    EVENTS as f64 / t.elapsed().as_secs_f64()
}

/// Loads a lake as a daemon at low traffic does (one small load after another, one
/// file per table each), then times what its files cost a reader before and after
/// compaction: a session's views (the agent binds one per table at every session) and
/// a plain `read_parquet` of `tracks`, and the compaction itself.
async fn lake_compaction(dir: &std::path::Path, events: &[StoredEvent]) {
    const SMALL_LOADS: usize = 1_000;
    const PER_LOAD: usize = 5;
    let root = dir.join("lake-small");
    let lake = ParquetSink::open(&root).unwrap();
    for (l, chunk) in events.chunks(PER_LOAD).take(SMALL_LOADS).enumerate() {
        lake.load(&Load::events(0, l as i64, chunk.to_vec()))
            .await
            .unwrap();
    }
    let glob = format!("{}/table=tracks/*/*.parquet", root.display());
    let reader = |label: &str| {
        let conn = duckdb::Connection::open_in_memory().unwrap();
        let t = Instant::now();
        let n: i64 = conn
            .query_row(
                &format!("SELECT count(DISTINCT message_id) FROM read_parquet('{glob}', union_by_name = true)"),
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n as usize, SMALL_LOADS * PER_LOAD);
        println!("{label}\t{:.3} s", t.elapsed().as_secs_f64());
    };
    let session = |label: &'static str| {
        let lake = &lake;
        async move {
            let t = Instant::now();
            // A session binds a view over every table's files.
            drop(lake.session().await.unwrap());
            println!("{label}\t{:.3} s", t.elapsed().as_secs_f64());
        }
    };
    let files = || {
        walk(&root)
            .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
            .count()
    };
    println!(
        "lake: files after {SMALL_LOADS} loads of {PER_LOAD} events\t{}",
        files()
    );
    session("lake: a session's views, small files").await;
    reader("lake: read_parquet of tracks, small files");
    let t = Instant::now();
    let done = lake
        .compact(collector_agent::sinks::parquet::CompactPolicy {
            min_files: 2,
            today: "2099-01-01".into(),
            budget: None,
            max_input_bytes: collector_agent::sinks::parquet::TARGET_FILE_BYTES,
            crash_at: None,
        })
        .await
        .unwrap();
    println!(
        "lake: compaction ({} partitions)\t{:.3} s",
        done.len(),
        t.elapsed().as_secs_f64()
    );
    println!("lake: files after compaction\t{}", files());
    session("lake: a session's views, compacted").await;
    reader("lake: read_parquet of tracks, compacted");

    // An old lake: many days of many tables, each day compacted long ago (here: one
    // file each, linked from the compacted `tracks` file). An idle agent asks whether
    // anything is due at every idle moment; nothing is.
    const OLD_TABLES: usize = 20;
    const OLD_DAYS: usize = 1_000;
    let one = walk(&root.join("table=tracks"))
        .find(|p| p.extension().is_some_and(|e| e == "parquet"))
        .unwrap();
    for t in 0..OLD_TABLES {
        for d in 0..OLD_DAYS {
            let day = collector_core::timestamp::format_ms(946_684_800_000 + d as i64 * 86_400_000);
            let part = root.join(format!("table=old_{t}/date={}", &day[..10]));
            std::fs::create_dir_all(&part).unwrap();
            std::fs::hard_link(&one, part.join("part-0.parquet")).unwrap();
        }
    }
    let policy = || collector_agent::sinks::parquet::CompactPolicy {
        min_files: 64,
        today: "2099-01-01".into(),
        budget: None,
        max_input_bytes: collector_agent::sinks::parquet::TARGET_FILE_BYTES,
        crash_at: None,
    };
    // Once to warm the kernel's caches, as a daemon's repeated checks are.
    assert!(lake.compact(policy()).await.unwrap().is_empty());
    let t = Instant::now();
    for _ in 0..10 {
        assert!(lake.compact(policy()).await.unwrap().is_empty());
    }
    println!(
        "lake: an idle check with nothing due, {} partitions\t{:.1} ms",
        OLD_TABLES * OLD_DAYS,
        t.elapsed().as_secs_f64() * 100.0
    );
}

/// Every file under `dir`, recursively.
fn walk(dir: &std::path::Path) -> impl Iterator<Item = std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.into_iter()
}

/// The row of `tracks` prepared for an event, as a JSON object by column name (the
/// rows the DuckDB and ClickHouse baselines load).
fn tracks_row(e: &StoredEvent) -> serde_json::Map<String, serde_json::Value> {
    schema::columns(collector_core::EventKind::Track)
        .iter()
        .zip(schema::prepare_row(e).unwrap())
        .map(|(c, v)| (c.name.into(), v.map_or(serde_json::Value::Null, Into::into)))
        .collect()
}

/// DuckDB's bulk load of exactly what PostgreSQL's and ClickHouse's baselines load: the
/// rows as prepared for `tracks`, as NDJSON, read by `read_json` into a table with the
/// columns and types of `tracks` (made by the sink itself), then checkpointed; rows/s.
fn duckdb_shaped_load(dir: &std::path::Path, events: &[StoredEvent]) -> f64 {
    let cols = schema::columns(collector_core::EventKind::Track);
    let rows = dir.join("tracks.ndjson");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&rows).unwrap());
        for e in events {
            writeln!(f, "{}", serde_json::Value::Object(tracks_row(e))).unwrap();
        }
    }
    let file = dir.join("shaped.duckdb");
    drop(DuckDbSink::open(&file).unwrap());
    let conn = duckdb::Connection::open(&file).unwrap();
    conn.execute_batch("CREATE TABLE native_tracks AS FROM tracks LIMIT 0; CHECKPOINT")
        .unwrap();
    let names = cols
        .iter()
        .map(|c| format!("\"{}\"", c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let types = cols
        .iter()
        .map(|c| format!("'{}': 'VARCHAR'", c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let t = Instant::now();
    conn.execute_batch(&format!(
        "INSERT INTO native_tracks ({names}) SELECT {names} FROM read_json('{}', format = 'newline_delimited', columns = {{{types}}}); CHECKPOINT",
        rows.display()
    ))
    .unwrap();
    events.len() as f64 / t.elapsed().as_secs_f64()
}

/// A sink into the test server `pg`.
async fn pg_sink(pg: &LocalPostgres) -> Arc<PostgresSink> {
    pg_sink_at(&pg.url, "public").await
}

async fn pg_sink_at(url: &str, schema: &str) -> Arc<PostgresSink> {
    let cfg = PostgresConfig {
        url: url.to_string(),
        password_env: None,
        schema: schema.into(),
        timeout_ms: 300_000,
        query_timeout_ms: 3_600_000,
    };
    Arc::new(PostgresSink::connect(&cfg).await.unwrap())
}

fn rate(label: &str, rows_per_s: f64, native: Option<f64>) {
    match native {
        Some(n) => println!(
            "{label}\t{rows_per_s:.0} rows/s ({:.2}x the database's own bulk load: {n:.0} rows/s)",
            rows_per_s / n
        ),
        None => println!("{label}\t{rows_per_s:.0} rows/s"),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary
    // without it, and then it does nothing (benchmarks are not tests).
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // DuckDB's allocator set as the agent sets it.
    collector_agent::memory::reexec_with_settings();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench_main());
}

async fn bench_main() {
    // `cargo bench --bench sinks -- duckdb postgres`: only the named sinks.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |sink: &str| only.is_empty() || only.iter().any(|o| o == sink);
    let events = backlog();
    let loads = loads(&events);
    let dir = tempfile::tempdir().unwrap();

    // What every sink does before its database: rows, flattening, typing against the
    // catalog.
    let copies = loads.clone();
    let t = Instant::now();
    let mut catalog = collector_agent::sinks::tables::Catalog::default();
    for l in copies {
        let prepared = schema::prepare(l);
        catalog = catalog.plan(&prepared).catalog;
    }
    println!(
        "sink: prepare + plan, no database (100k events)\t{:.0} rows/s",
        EVENTS as f64 / t.elapsed().as_secs_f64()
    );

    // The events as NDJSON, for DuckDB's own loads (into its file and into Parquet).
    let ndjson = dir.path().join("events.ndjson");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&ndjson).unwrap());
        for e in &events {
            writeln!(f, "{}", e.json).unwrap();
        }
    }
    let read_events = format!(
        "read_json('{}', format = 'newline_delimited')",
        ndjson.display()
    );

    if wanted("duckdb") {
        // DuckDB's own bulk load: read_json of the same events, into the table it infers.
        let conn = duckdb::Connection::open(dir.path().join("native.duckdb")).unwrap();
        let t = Instant::now();
        conn.execute_batch(&format!("CREATE TABLE t AS SELECT * FROM {read_events}"))
            .unwrap();
        // Every DuckDB timing ends with everything checkpointed into the file.
        conn.execute_batch("CHECKPOINT").unwrap();
        let duck_native = EVENTS as f64 / t.elapsed().as_secs_f64();
        drop(conn);
        let duck_shaped = duckdb_shaped_load(dir.path(), &events);

        let duck = Arc::new(DuckDbSink::open(&dir.path().join("sink.duckdb")).unwrap());
        let loads = loads.clone();
        let t = Instant::now();
        time_sink(duck.clone(), loads).await;
        duck.query("CHECKPOINT").await.unwrap();
        let sink_rate = EVENTS as f64 / t.elapsed().as_secs_f64();
        rate(
            "sink: DuckDB (100k events, loads of 5,000)",
            sink_rate,
            Some(duck_native),
        );
        rate(
            "sink: DuckDB, beside read_json of the rows of `tracks` into a table like it",
            sink_rate,
            Some(duck_shaped),
        );
    }
    if wanted("parquet") {
        // The lake writes through DuckDB: its own bulk load is a COPY of the same events
        // from read_json into one Parquet file.
        let conn = duckdb::Connection::open_in_memory().unwrap();
        let t = Instant::now();
        conn.execute_batch(&format!(
            "COPY (SELECT * FROM {read_events}) TO '{}' (FORMAT parquet)",
            dir.path().join("native.parquet").display()
        ))
        .unwrap();
        let parquet_native = EVENTS as f64 / t.elapsed().as_secs_f64();
        drop(conn);
        let lake = Arc::new(ParquetSink::open(&dir.path().join("lake")).unwrap());
        rate(
            "sink: Parquet lake (100k events, loads of 5,000)",
            time_sink(lake, loads.clone()).await,
            Some(parquet_native),
        );
    }

    if wanted("lake-compaction") {
        lake_compaction(dir.path(), &events).await;
    }

    if wanted("postgres") {
        match LocalPostgres::start() {
            Ok(pg) => {
                let sink = pg_sink(&pg).await;
                // PostgreSQL's own bulk load: COPY of the same rows (as prepared for tracks)
                // from a file into an equivalent typed table.
                let csv = dir.path().join("tracks.csv");
                {
                    let mut f = std::io::BufWriter::new(std::fs::File::create(&csv).unwrap());
                    for e in &events {
                        let row = schema::prepare_row(e).unwrap();
                        let line: Vec<String> = row
                            .iter()
                            .map(|v| match v {
                                Some(v) => format!("\"{}\"", v.replace('"', "\"\"")),
                                None => String::new(),
                            })
                            .collect();
                        writeln!(f, "{}", line.join(",")).unwrap();
                    }
                }
                std::fs::set_permissions(
                    dir.path(),
                    std::os::unix::fs::PermissionsExt::from_mode(0o755),
                )
                .unwrap();
                sink.query("CREATE TABLE native_tracks (LIKE tracks)")
                    .await
                    .unwrap();
                sink.query("ALTER TABLE native_tracks ALTER COLUMN loaded_at DROP NOT NULL")
                    .await
                    .unwrap();
                let cols: Vec<&str> = schema::columns(collector_core::EventKind::Track)
                    .iter()
                    .map(|c| c.name)
                    .collect();
                let t = Instant::now();
                sink.query(&format!(
                    "COPY native_tracks ({}) FROM '{}' (FORMAT csv)",
                    cols.iter()
                        .map(|c| format!("\"{c}\""))
                        .collect::<Vec<_>>()
                        .join(", "),
                    csv.display()
                ))
                .await
                .unwrap();
                let pg_native = EVENTS as f64 / t.elapsed().as_secs_f64();
                rate(
                    "sink: PostgreSQL (100k events, loads of 5,000)",
                    time_sink(sink, loads.clone()).await,
                    Some(pg_native),
                );
            }
            Err(e) => println!("sink: PostgreSQL\tskipped: {e}"),
        }
    }

    // Opt-in (`-- postgres-pooled`): the same loads straight to the server and through
    // PgBouncer in transaction mode in front of it, back to back, each into a schema
    // of its own: what the pooler costs.
    if only.iter().any(|o| o == "postgres-pooled") {
        match LocalPostgres::start_pooled(3) {
            Ok(pg) => {
                let direct = format!(
                    "postgres://{}@127.0.0.1:{}/postgres",
                    collector_e2e::postgres::USER,
                    pg.port
                );
                rate(
                    "sink: PostgreSQL, straight to the server (100k events, loads of 5,000)",
                    time_sink(pg_sink_at(&direct, "direct").await, loads.clone()).await,
                    None,
                );
                rate(
                    "sink: PostgreSQL through PgBouncer in transaction mode (the same)",
                    time_sink(pg_sink_at(&pg.url, "pooled").await, loads.clone()).await,
                    None,
                );
            }
            Err(e) => println!("sink: PostgreSQL through PgBouncer\tskipped: {e}"),
        }
    }

    if wanted("users") {
        // `users` merged per trait against what the warehouse holds (DuckDB and
        // PostgreSQL keep each value's identify in `collector_user_traits`).
        let loads = self::loads(&identifies());
        let duck = Arc::new(DuckDbSink::open(&dir.path().join("users.duckdb")).unwrap());
        rate(
            "sink: DuckDB, identifies into `users` (100k events of 20k users)",
            time_sink(duck, loads.clone()).await,
            None,
        );
        match LocalPostgres::start() {
            Ok(pg) => {
                let sink = pg_sink(&pg).await;
                rate(
                    "sink: PostgreSQL, identifies into `users` (100k events of 20k users)",
                    time_sink(sink, loads).await,
                    None,
                );
            }
            Err(e) => println!("sink: PostgreSQL users\tskipped: {e}"),
        }
    }

    if wanted("clickhouse") {
        match LocalClickHouse::start() {
            Ok(ch) => {
                let cfg = ClickHouseConfig {
                    timeout_ms: 300_000,
                    ..ClickHouseConfig::at(&ch.url)
                };
                let sink = Arc::new(ClickHouseSink::connect(&cfg).await.unwrap());
                // ClickHouse's own bulk load: the same rows (as prepared for tracks) sent as
                // JSONEachRow, 5,000 per INSERT, into a plain MergeTree table.
                let cols = schema::columns(collector_core::EventKind::Track);
                let defs: Vec<String> = cols
                    .iter()
                    .map(|c| format!("`{}` Nullable(String)", c.name))
                    .collect();
                let http = reqwest::Client::new();
                let post = |sql: String, body: String| {
                    let http = http.clone();
                    let url = ch.url.clone();
                    async move {
                        let req = if body.is_empty() {
                            http.post(&url).body(sql)
                        } else {
                            http.post(&url).query(&[("query", sql)]).body(body)
                        };
                        let r = req.send().await.unwrap();
                        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
                    }
                };
                post(
                format!(
                    "CREATE TABLE analytics.native_tracks ({}, _k String) ENGINE = MergeTree() ORDER BY _k",
                    defs.join(", ")
                ),
                String::new(),
            )
            .await;
                let bodies: Vec<String> = events
                    .chunks(5_000)
                    .map(|chunk| {
                        let mut body = String::new();
                        for e in chunk {
                            let mut obj = tracks_row(e);
                            obj.insert("_k".into(), e.message_id.clone().into());
                            body.push_str(&serde_json::Value::Object(obj).to_string());
                            body.push('\n');
                        }
                        body
                    })
                    .collect();
                let t = Instant::now();
                for body in bodies {
                    post(
                        "INSERT INTO analytics.native_tracks FORMAT JSONEachRow".into(),
                        body,
                    )
                    .await;
                }
                let ch_native = EVENTS as f64 / t.elapsed().as_secs_f64();
                rate(
                    "sink: ClickHouse (100k events, loads of 5,000)",
                    time_sink(sink, loads.clone()).await,
                    Some(ch_native),
                );
            }
            Err(e) => println!("sink: ClickHouse\tskipped: {e}"),
        }
    }
}
