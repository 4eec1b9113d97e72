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
        )?;
        writeln!(
            f,
            "warehouse: last load {}; quarantined {}; dead letters {}",
            self.last_load.as_deref().unwrap_or("never"),
            self.quarantined,
            self.dead_letters
        )?;
        write!(f, "as of {}", format_ms(self.now_ms))
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
    }
}
