//! Helpers shared by the agent's test files.

#![allow(dead_code)]

use collector_core::ingest::{parse_body, Endpoint};
use collector_core::StoredEvent;

/// Events as the edge would store them: a `/v1/batch` body parsed and validated by core
/// (no privacy policy), received at 2026-11-24T13:54:04Z.
pub fn events(body: serde_json::Value) -> Vec<StoredEvent> {
    events_received_at(1_795_528_444_000, body)
}

/// [`events`], received at `received_ms`.
pub fn events_received_at(received_ms: i64, body: serde_json::Value) -> Vec<StoredEvent> {
    let mut n = 0;
    let p = parse_body(
        Endpoint::Batch,
        body.to_string().as_bytes(),
        received_ms,
        &mut || {
            n += 1;
            format!("gen-{n}")
        },
    )
    .unwrap();
    assert!(p.rejected.is_empty(), "{:?}", p.rejected);
    p.accepted
}

/// One `Order Completed` event (`revenue`, `paid: true`, `paid_at`) timed
/// 2026-11-24T13:54:00.250Z: what the tests of retyped columns load before and after.
pub fn order_completed(id: &str, revenue: f64) -> Vec<StoredEvent> {
    events(serde_json::json!({"batch": [
        {"type": "track", "messageId": id, "userId": "u", "event": "Order Completed",
         "timestamp": "2026-11-24T13:54:00.250Z",
         "properties": {"revenue": revenue, "paid": true, "paid_at": "2026-11-24T13:55:00Z"}}
    ]}))
}

/// Loads `batch` (events as a `/v1/batch` body's `batch`) as batch `batch_id` of shard 0.
pub async fn load(
    sink: &dyn collector_agent::sinks::Sink,
    batch_id: i64,
    batch: serde_json::Value,
) {
    sink.load(&collector_agent::sinks::Load::events(
        0,
        batch_id,
        events(serde_json::json!({ "batch": batch })),
    ))
    .await
    .unwrap();
}

/// A load of one batch that did not decode (a dead letter to be).
pub fn undecodable(shard: u32, batch_id: i64, blob: &[u8]) -> collector_agent::sinks::Load {
    collector_agent::sinks::Load {
        shard,
        batches: vec![collector_agent::sinks::LoadBatch::Undecodable {
            batch_id,
            blob: blob.to_vec(),
            error: "bad magic".into(),
        }],
    }
}

/// `Some(v)`, for comparing query results.
pub fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

/// The rows of a query, every value as text.
pub async fn rows(sink: &dyn collector_agent::sinks::Sink, sql: &str) -> Vec<Vec<Option<String>>> {
    sink.query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .rows
}

/// The first value of a query.
pub async fn one(sink: &dyn collector_agent::sinks::Sink, sql: &str) -> Option<String> {
    rows(sink, sql).await[0][0].clone()
}

/// A warehouse of one kind, opened (and reopened) for a scenario.
pub enum Target {
    DuckDb(tempfile::TempDir),
    Postgres(collector_e2e::postgres::LocalPostgres),
    Parquet(tempfile::TempDir),
    ClickHouse(collector_e2e::clickhouse::LocalClickHouse),
}

impl Target {
    pub fn duckdb() -> Target {
        Target::DuckDb(tempfile::tempdir().unwrap())
    }

    pub fn parquet() -> Target {
        Target::Parquet(tempfile::tempdir().unwrap())
    }

    pub fn postgres() -> Target {
        Target::Postgres(
            collector_e2e::postgres::LocalPostgres::start().expect("PostgreSQL starts"),
        )
    }

    /// PostgreSQL behind PgBouncer in transaction mode, its server connections left
    /// with another client's session state (`collector_e2e::postgres::PgBouncer`).
    pub fn postgres_pooled() -> Target {
        Target::Postgres(
            collector_e2e::postgres::LocalPostgres::start_pooled(3)
                .expect("PostgreSQL and PgBouncer start"),
        )
    }

    pub fn clickhouse() -> Target {
        Target::ClickHouse(
            collector_e2e::clickhouse::LocalClickHouse::start().expect("ClickHouse starts"),
        )
    }

    /// The current ClickHouse engine (chDB) behind ClickHouse's HTTP interface, where
    /// [`Target::clickhouse`] is Debian's 18.16 server: the same scenarios on both.
    pub fn clickhouse_current() -> Target {
        Target::ClickHouse(
            collector_e2e::clickhouse::LocalClickHouse::start_current()
                .expect("the current ClickHouse engine starts"),
        )
    }

    /// A new, empty warehouse of the same kind (a new server for PostgreSQL and
    /// ClickHouse).
    pub fn fresh(&self) -> Target {
        match self {
            Target::DuckDb(_) => Target::duckdb(),
            Target::Parquet(_) => Target::parquet(),
            Target::Postgres(pg) => Target::Postgres(pg.fresh().expect("PostgreSQL starts")),
            Target::ClickHouse(ch) if ch.current => Target::clickhouse_current(),
            Target::ClickHouse(_) => Target::clickhouse(),
        }
    }

    /// ClickHouse before 20.1 (18.16 here): instants in whole seconds (`DateTime`),
    /// where later servers keep milliseconds (`DateTime64(3)`).
    pub fn whole_seconds(&self) -> bool {
        matches!(self, Target::ClickHouse(ch) if !ch.current)
    }

    pub async fn open(&self) -> std::sync::Arc<dyn collector_agent::sinks::Sink> {
        match self {
            Target::DuckDb(dir) => std::sync::Arc::new(
                collector_agent::sinks::duckdb::DuckDbSink::open(&dir.path().join("w.duckdb"))
                    .unwrap(),
            ),
            Target::Parquet(dir) => std::sync::Arc::new(
                collector_agent::sinks::parquet::ParquetSink::open(&dir.path().join("lake"))
                    .unwrap(),
            ),
            Target::Postgres(pg) => std::sync::Arc::new(
                collector_agent::sinks::postgres::PostgresSink::connect(
                    &collector_agent::config::PostgresConfig {
                        url: pg.url.clone(),
                        password_env: None,
                        schema: "analytics".into(),
                        timeout_ms: 30_000,
                        query_timeout_ms: 3_600_000,
                    },
                )
                .await
                .unwrap(),
            ),
            Target::ClickHouse(ch) => std::sync::Arc::new(
                collector_agent::sinks::clickhouse::ClickHouseSink::connect(
                    &collector_agent::config::ClickHouseConfig::at(&ch.url),
                )
                .await
                .unwrap(),
            ),
        }
    }
}

/// Runs scenarios (each an `async fn(&Target)`) against targets, as `#[tokio::test]`s
/// in one module per target: `per_target!([duckdb, postgres] [scenario_a, scenario_b]);`
#[macro_export]
macro_rules! per_target {
    ([$($target:ident),* $(,)?] $scenarios:tt) => {
        $( $crate::per_target!(@one $target $scenarios); )*
    };
    (@one $target:ident [$($scenario:ident),* $(,)?]) => {
        mod $target {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(&super::Target::$target()).await;
                }
            )*
        }
    };
}

/// What differs between the warehouses' SQL, for the scenarios every sink runs. Each
/// difference is one the README documents: ClickHouse stores booleans as `UInt8` and
/// JSON as `String` (18.16 has no JSON path functions), has no `octet_length`, and
/// changes a row by writing a newer version of it, not by `UPDATE`.
impl Target {
    /// The dialect the agent's SQL over this warehouse is written in.
    pub fn dialect(&self) -> collector_agent::sinks::Dialect {
        use collector_agent::sinks::Dialect;
        match self {
            Target::DuckDb(_) | Target::Parquet(_) => Dialect::DuckDb,
            Target::Postgres(_) => Dialect::Postgres,
            Target::ClickHouse(_) => Dialect::ClickHouse,
        }
    }

    pub fn is_clickhouse(&self) -> bool {
        matches!(self, Target::ClickHouse(_))
    }

    /// SQL of a column's value as text (NULL stays NULL).
    pub fn text(&self, column: &str) -> String {
        if self.is_clickhouse() {
            format!("CAST({column} AS Nullable(String))")
        } else {
            format!("CAST({column} AS VARCHAR)")
        }
    }

    /// A boolean as [`Target::text`] renders it.
    pub fn boolean(&self, b: bool) -> Option<String> {
        Some(match (self.is_clickhouse(), b) {
            (true, b) => u8::from(b).to_string(),
            (false, b) => b.to_string(),
        })
    }

    /// SQL of the length in bytes of a binary column.
    pub fn bytes_len(&self, column: &str) -> String {
        if self.is_clickhouse() {
            format!("length({column})")
        } else {
            format!("octet_length({column})")
        }
    }

    /// The value at `path` (keys, and array indexes as numbers) in the JSON column
    /// `column` of the row `message_id` of `table`, as text: a string without quotes,
    /// like SQL's `->>`. The warehouse walks the path where it has a JSON type; in
    /// ClickHouse the stored text is read back and walked here.
    pub async fn json_at(
        &self,
        sink: &dyn collector_agent::sinks::Sink,
        table: &str,
        column: &str,
        message_id: &str,
        path: &[serde_json::Value],
    ) -> Option<String> {
        let filter = format!("FROM {table} WHERE message_id = '{message_id}'");
        if !self.is_clickhouse() {
            let mut expr = column.to_string();
            for (i, step) in path.iter().enumerate() {
                let arrow = if i + 1 == path.len() { "->>" } else { "->" };
                match step {
                    serde_json::Value::String(k) => expr.push_str(&format!("{arrow}'{k}'")),
                    other => expr.push_str(&format!("{arrow}{other}")),
                }
            }
            return one(sink, &format!("SELECT {expr} {filter}")).await;
        }
        let text = one(sink, &format!("SELECT {column} {filter}")).await?;
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        for step in path {
            v = match step {
                serde_json::Value::String(k) => v.get(k).cloned(),
                serde_json::Value::Number(n) => v.get(n.as_u64().unwrap() as usize).cloned(),
                other => panic!("not a JSON path step: {other}"),
            }
            .unwrap_or(serde_json::Value::Null);
        }
        match v {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s),
            other => Some(other.to_string()),
        }
    }

    /// Replaces a quarantined event's stored JSON, as an operator fixing it would:
    /// `UPDATE` where the warehouse has it; in ClickHouse a newer version of the row.
    pub async fn edit_quarantined(
        &self,
        sink: &dyn collector_agent::sinks::Sink,
        message_id: &str,
        event: &str,
    ) {
        let event = event.replace('\'', "''");
        let sql = if self.is_clickhouse() {
            format!(
                "INSERT INTO collector_quarantine SELECT message_id, type, shard, batch_id, reason, '{event}', quarantined_at, attempts, resolved, _version + 1 FROM collector_quarantine FINAL WHERE message_id = '{message_id}'"
            )
        } else {
            format!("UPDATE quarantine SET event = '{event}' WHERE message_id = '{message_id}'")
        };
        sink.query(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// An analyst's long query (`collector-agent sql` or the dashboard, through a running
/// agent) on an embedded DuckDB (the warehouse, or the lake's) runs on a connection of
/// its own: a load goes on meanwhile, where it used to wait for the query to end.
pub async fn a_long_query_does_not_hold_loads_up<S: collector_agent::sinks::Sink + 'static>(
    sink: S,
) {
    let sink = std::sync::Arc::new(sink);
    let querying = {
        let sink = sink.clone();
        // Seconds of work (4e8 pairs) on any machine this runs on.
        tokio::spawn(async move {
            sink.query(
                "SELECT count(*) FROM range(20000) a, range(20000) b WHERE a.range + b.range = 7",
            )
            .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    sink.load(&collector_agent::sinks::Load::events(
        0,
        1,
        order_completed("o1", 5.0),
    ))
    .await
    .unwrap();
    assert!(
        !querying.is_finished(),
        "the load waited for the query to end"
    );
    let counted = querying.await.unwrap().unwrap();
    assert_eq!(counted.rows[0][0], s("8"));
    assert_eq!(one(&*sink, "SELECT count(*) FROM tracks").await, s("1"));
}

/// Runs a query that needs ~100 MB and cannot spill (a list of 12M integers) in a
/// session of `sink` until it succeeds, as identity's runs are retried; how many times
/// DuckDB refused it for lack of memory (each refusal should raise a capped limit).
pub async fn out_of_memory_until_raised(sink: &dyn collector_agent::sinks::Sink) -> usize {
    let sql = "SELECT len(list(x)) FROM range(12000000) t(x)";
    let mut session = sink.session().await.unwrap().unwrap();
    let mut refused = 0;
    let answer = loop {
        match session.query(sql).await {
            Ok(r) => break r.rows[0][0].clone(),
            Err(e) => {
                assert!(e.to_string().contains("Out of Memory"), "{e}");
                refused += 1;
                assert!(refused < 6, "still out of memory after {refused} tries");
            }
        }
    };
    assert_eq!(answer.as_deref(), Some("12000000"));
    refused
}

/// A DuckDB setting of `sink` (an embedded warehouse or the lake), as DuckDB shows it.
pub async fn setting(sink: &dyn collector_agent::sinks::Sink, name: &str) -> String {
    let r = sink
        .query(&format!("SELECT current_setting('{name}')"))
        .await
        .unwrap();
    r.rows[0][0].clone().unwrap()
}

/// DuckDB's `memory_limit` of `sink` in MiB (as DuckDB shows it: `30.5 MiB`, `1.0 GiB`).
pub async fn memory_limit_mib(sink: &dyn collector_agent::sinks::Sink) -> f64 {
    let shown = setting(sink, "memory_limit").await;
    let (n, unit) = shown.split_once(' ').unwrap();
    let n: f64 = n.parse().unwrap();
    match unit {
        "KiB" => n / 1024.0,
        "MiB" => n,
        "GiB" => n * 1024.0,
        other => panic!("{shown}: {other}"),
    }
}

/// A lease of batches `batches` (ids) of 500 events of a browser each (a context with a
/// page, a campaign and consent; a thousand visitors): in ten, one identify (100
/// users), two pages and seven tracks (3 properties). Ten of these batches in one load
/// run out of memory in the lake's DuckDB with a 32MB pool on two threads (the DuckDB
/// sink's loads fit there).
pub fn wide_lease(batches: std::ops::Range<i64>) -> collector_agent::sinks::Load {
    use serde_json::json;
    let event = |b: i64, i: i64| {
        let context = json!({
            "library": {"name": "analytics.js", "version": "5.2.0"},
            "page": {"path": "/checkout", "url": format!("https://shop.example/checkout?step={i}"),
                     "referrer": "https://search.example/?q=shoes", "title": "Checkout"},
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
            "locale": "en-GB",
            "consent": {"categoryPreferences": {"analytics": true, "advertising": false, "functional": true}},
            "campaign": {"source": "news", "medium": "email", "name": format!("c{}", i % 7)}
        });
        let id = format!("bench-{b}-{i}");
        let anon = format!("anon-{}", (b * 500 + i) % 1000);
        let ts = "2026-11-24T12:00:00.000Z";
        match i % 10 {
            0 => json!({"type": "identify", "messageId": id, "anonymousId": anon,
                "userId": format!("user-{}", i % 100), "traits": {"plan": "pro", "visits": i % 40},
                "context": context, "timestamp": ts}),
            1 | 2 => {
                json!({"type": "page", "messageId": id, "anonymousId": anon, "name": "Checkout",
                "properties": {"path": "/checkout"}, "context": context, "timestamp": ts})
            }
            _ => {
                json!({"type": "track", "event": "Bench Event", "messageId": id, "anonymousId": anon,
                "properties": {"plan": "pro", "price": 19.99, "sku": format!("SKU-{i}")},
                "context": context, "timestamp": ts})
            }
        }
    };
    collector_agent::sinks::Load {
        shard: 0,
        batches: batches
            .map(|b| collector_agent::sinks::LoadBatch::Decoded {
                batch_id: b,
                events: events(json!({"batch": (0..500).map(|i| event(b, i)).collect::<Vec<_>>()})),
            })
            .collect(),
    }
}

/// An agent's configuration written to `dir/name` and loaded: an edge where nothing
/// listens (the test drives the warehouse itself), then `rest` (`[warehouse]`, …).
pub fn agent_config(dir: &std::path::Path, name: &str, rest: &str) -> collector_agent::AgentConfig {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!("edge_url = \"http://127.0.0.1:9\"\ndrain_secret = \"s\"\n{rest}"),
    )
    .unwrap();
    collector_agent::AgentConfig::load(&path).unwrap()
}

/// A certificate authority made for a test (rcgen), for servers that speak TLS.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        TestCa {
            cert: p.self_signed(&key).unwrap(),
            key,
        }
    }

    /// The CA's certificate (PEM).
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for `cn` (and the DNS names `dns`) signed by this CA, for
    /// `purpose`, and its key: both PEM.
    pub fn issue(
        &self,
        cn: &str,
        dns: &[&str],
        purpose: rcgen::ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p =
            rcgen::CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>())
                .unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.extended_key_usages = vec![purpose];
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A server certificate for `localhost` signed by this CA, and its key: both PEM.
    pub fn localhost_server(&self) -> (String, String) {
        self.issue(
            "localhost",
            &["localhost"],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        )
    }
}
