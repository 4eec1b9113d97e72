//! `collector-agent status`: what an operator asks first. Per shard, the backlog at the
//! edge and how old its oldest sealed batch is (the lag); from the warehouse, when the
//! last load committed and how many events are quarantined and batches dead-lettered.

use std::fmt;

use collector_core::drain::DrainStats;
use collector_core::timestamp::{format_ms, parse_ms};

use crate::sinks::QueryResult;

/// The status, gathered once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub now_ms: i64,
    pub edge: DrainStats,
    /// `MAX(loaded_at)` over the event tables, if anything was loaded.
    pub last_load: Option<String>,
    pub quarantined: u64,
    pub dead_letters: u64,
    /// Why the edge's side is missing (unreachable, the drain secret refused), if it is.
    pub edge_error: Option<String>,
    /// Why the warehouse's side is missing, if it is.
    pub warehouse_error: Option<String>,
}

/// The SQL that reads the warehouse side (the same in every sink).
pub const WAREHOUSE_SQL: &str = "SELECT (SELECT max(loaded_at) FROM (SELECT max(loaded_at) AS loaded_at FROM tracks UNION ALL SELECT max(loaded_at) FROM pages UNION ALL SELECT max(loaded_at) FROM identifies UNION ALL SELECT max(loaded_at) FROM screens UNION ALL SELECT max(loaded_at) FROM groups UNION ALL SELECT max(loaded_at) FROM aliases) AS l) AS last_load, (SELECT count(*) FROM quarantine) AS quarantined, (SELECT count(*) FROM dead_letters) AS dead_letters";

impl Status {
    pub fn new(now_ms: i64, edge: DrainStats, warehouse: &QueryResult) -> Status {
        let row = warehouse.rows.first();
        let cell = |i: usize| row.and_then(|r| r.get(i)).cloned().flatten();
        let num = |i: usize| cell(i).and_then(|v| v.parse().ok()).unwrap_or(0);
        Status {
            now_ms,
            edge,
            // ClickHouse's `max` of no rows is the type's default, the epoch, where
            // the others answer NULL: no warehouse loads anything at the epoch.
            last_load: cell(0).filter(|t| parse_ms(t).is_none_or(|ms| ms > 0)),
            quarantined: num(1),
            dead_letters: num(2),
            edge_error: None,
            warehouse_error: None,
        }
    }

    /// The status from what each side answered: a side that failed is reported as
    /// missing, with its error, and the other is shown as it is.
    pub fn gather(
        now_ms: i64,
        edge: Result<DrainStats, String>,
        warehouse: Result<QueryResult, String>,
    ) -> Status {
        let (edge, edge_error) = match edge {
            Ok(e) => (e, None),
            Err(e) => (DrainStats::default(), Some(e)),
        };
        let (warehouse, warehouse_error) = match warehouse {
            Ok(w) => (w, None),
            Err(e) => (
                QueryResult {
                    columns: Vec::new(),
                    rows: Vec::new(),
                },
                Some(e),
            ),
        };
        Status {
            edge_error,
            warehouse_error,
            ..Status::new(now_ms, edge, &warehouse)
        }
    }

    /// Which sides are missing, named, if any.
    pub fn missing(&self) -> Option<String> {
        match (&self.edge_error, &self.warehouse_error) {
            (None, None) => None,
            (Some(_), None) => Some("the edge did not answer".into()),
            (None, Some(_)) => Some("the warehouse did not answer".into()),
            (Some(_), Some(_)) => Some("neither the edge nor the warehouse answered".into()),
        }
    }

    /// The longest any sealed batch has waited, in ms (0 with no backlog).
    pub fn lag_ms(&self) -> i64 {
        self.edge
            .shards
            .iter()
            .filter_map(|s| s.oldest_sealed_ms)
            .map(|t| (self.now_ms - t).max(0))
            .max()
            .unwrap_or(0)
    }

    pub fn backlog_events(&self) -> u64 {
        self.edge
            .shards
            .iter()
            .map(|s| s.sealed_events + s.open_events)
            .sum()
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_edge(f)?;
        match &self.warehouse_error {
            Some(e) => writeln!(f, "warehouse: unavailable: {e}")?,
            None => writeln!(
                f,
                "warehouse: last load {}; quarantined {}; dead letters {}",
                self.last_load.as_deref().unwrap_or("never"),
                self.quarantined,
                self.dead_letters
            )?,
        }
        write!(f, "as of {}", format_ms(self.now_ms))
    }
}

impl Status {
    fn fmt_edge(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(e) = &self.edge_error {
            return writeln!(f, "edge: unavailable: {e}");
        }
        writeln!(
            f,
            "shard  open_events  sealed_batches  sealed_events  leased_batches  lag"
        )?;
        for (i, s) in self.edge.shards.iter().enumerate() {
            let lag = s
                .oldest_sealed_ms
                .map(|t| format!("{:.1} s", (self.now_ms - t).max(0) as f64 / 1000.0))
                .unwrap_or_else(|| "-".into());
            writeln!(
                f,
                "{:<6} {:>11}  {:>14}  {:>13}  {:>14}  {lag}",
                s.shard.unwrap_or(i as u32),
                s.open_events,
                s.sealed_batches,
                s.sealed_events,
                s.leased_batches
            )?;
        }
        writeln!(
            f,
            "backlog: {} events; lag: {:.1} s",
            self.backlog_events(),
            self.lag_ms() as f64 / 1000.0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use collector_core::drain::ShardStats;

    #[test]
    fn lag_is_the_oldest_waiting_batch_and_the_table_says_so() {
        let shards = vec![
            ShardStats {
                shard: Some(0),
                open_events: 3,
                sealed_batches: 2,
                sealed_events: 40,
                oldest_sealed_ms: Some(1_000),
                ..ShardStats::default()
            },
            ShardStats {
                shard: Some(1),
                ..ShardStats::default()
            },
        ];
        let wh = QueryResult {
            columns: vec![
                "last_load".into(),
                "quarantined".into(),
                "dead_letters".into(),
            ],
            rows: vec![vec![
                Some("2026-11-25T10:00:00.000Z".into()),
                Some("2".into()),
                Some("0".into()),
            ]],
        };
        let st = Status::new(13_500, DrainStats::from_shards(shards), &wh);
        assert_eq!(st.lag_ms(), 12_500);
        assert_eq!(st.backlog_events(), 43);
        let text = st.to_string();
        assert!(text.contains("backlog: 43 events; lag: 12.5 s"), "{text}");
        assert!(
            text.contains("last load 2026-11-25T10:00:00.000Z; quarantined 2; dead letters 0"),
            "{text}"
        );
        assert_eq!(st.missing(), None);

        // One side missing: the other is shown, and the missing one named with why.
        let st = Status::gather(13_500, Err("connection refused".into()), Ok(wh.clone()));
        let text = st.to_string();
        assert!(
            text.contains("edge: unavailable: connection refused"),
            "{text}"
        );
        assert!(!text.contains("backlog"), "{text}");
        assert!(text.contains("quarantined 2; dead letters 0"), "{text}");
        assert_eq!(st.missing().as_deref(), Some("the edge did not answer"));
        let shards = DrainStats::from_shards(vec![ShardStats {
            shard: Some(0),
            sealed_events: 5,
            ..ShardStats::default()
        }]);
        let st = Status::gather(13_500, Ok(shards), Err("file locked".into()));
        let text = st.to_string();
        assert!(text.contains("backlog: 5 events"), "{text}");
        assert!(
            text.contains("warehouse: unavailable: file locked"),
            "{text}"
        );
        assert!(!text.contains("last load"), "{text}");
        assert_eq!(
            st.missing().as_deref(),
            Some("the warehouse did not answer")
        );
    }
}
