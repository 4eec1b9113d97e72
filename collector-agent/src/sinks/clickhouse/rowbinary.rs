//! Rows tables' rows in ClickHouse's `RowBinary` format: each value as the server
//! stores it (little-endian numbers, seconds or milliseconds for instants, days for
//! dates, length-prefixed strings), so the server parses no JSON. The values are the
//! ones the `JSONEachRow` path sends: a number that does not parse, or an instant
//! outside what the column holds, is NULL (the value stays in `raw`).
//!
//! `RowBinary` carries no types: a table goes in it only when every column has, in
//! `system.columns`, the type the sink created it with ([`Layout::new`]); otherwise it
//! goes as `JSONEachRow`, which the server converts by name and type.

use std::collections::HashMap;

use collector_core::timestamp::{parse_canonical_ms, parse_ms};

use crate::sinks::schema::{LogicalType, LOADED_AT};
use crate::sinks::tables::Cell;

/// The latest instant a `DateTime` holds (2105-12-31T23:59:59.999Z), exclusive.
pub(super) const MAX_INSTANT_MS: i64 = 4_291_747_199_000;

/// How one column is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Field {
    /// A key (`message_id`, `users.id`): a `String`, never NULL.
    Key,
    /// A `Nullable` value of a logical type.
    Value(LogicalType),
}

/// How a rows table's columns are written, checked against its types in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Layout {
    pub fields: Vec<Field>,
    /// Instants in milliseconds (`DateTime64(3, 'UTC')`), else in seconds (`DateTime`).
    pub ms_precision: bool,
}

impl Layout {
    /// The layout of `columns` (then `loaded_at`, `_version`, `_received` when
    /// `received`, and `_mid` when `mid`: `users`), or `None` when a column's type in
    /// `physical` (name → type, from `system.columns`) is not the sink's:
    /// `sql_type(ty, nullable)` as created.
    pub(super) fn new(
        columns: &[(Field, &str)],
        received: bool,
        mid: bool,
        ms_precision: bool,
        physical: &HashMap<String, String>,
        sql_type: impl Fn(LogicalType, bool) -> String,
    ) -> Option<Layout> {
        let has = |name: &str, ty: &str| physical.get(name).map(String::as_str) == Some(ty);
        let extras = has(LOADED_AT, &sql_type(LogicalType::Timestamp, false))
            && has("_version", "UInt64")
            && (!received || has("_received", "Date"))
            && (!mid || has("_mid", "String"));
        let fits = |(f, name): &(Field, &str)| match f {
            Field::Key => has(name, &sql_type(LogicalType::Text, false)),
            Field::Value(ty) => has(name, &sql_type(*ty, true)),
        };
        (extras && columns.iter().all(fits)).then(|| Layout {
            fields: columns.iter().map(|(f, _)| *f).collect(),
            ms_precision,
        })
    }

    /// Appends one row: its cells, `loaded_at` (Unix ms), `_version`, the `_received`
    /// day when given and `_mid` when given. `false`, with `out` as it was, when the row
    /// does not fit (a key without a value, a day past what `Date` holds).
    pub(super) fn row(
        &self,
        cells: &[Cell<'_>],
        loaded_at_ms: i64,
        version: u64,
        received_day: Option<i64>,
        mid: Option<&str>,
        out: &mut Vec<u8>,
    ) -> bool {
        let start = out.len();
        let ok = cells.len() == self.fields.len()
            && self
                .fields
                .iter()
                .zip(cells)
                .all(|(f, c)| self.cell(*f, c.as_deref(), out))
            && self.instant(loaded_at_ms, out)
            && {
                out.extend_from_slice(&version.to_le_bytes());
                true
            }
            && match received_day {
                None => true,
                Some(d) => match u16::try_from(d) {
                    Ok(d) => {
                        out.extend_from_slice(&d.to_le_bytes());
                        true
                    }
                    Err(_) => false,
                },
            }
            && {
                if let Some(m) = mid {
                    string(m, out);
                }
                true
            };
        if !ok {
            out.truncate(start);
        }
        ok
    }

    fn cell(&self, field: Field, v: Option<&str>, out: &mut Vec<u8>) -> bool {
        let ty = match (field, v) {
            (Field::Key, Some(v)) => {
                string(v, out);
                return true;
            }
            (Field::Key, None) => return false,
            (Field::Value(_), None) => {
                out.push(1);
                return true;
            }
            (Field::Value(ty), Some(_)) => ty,
        };
        let v = v.unwrap_or_default();
        match ty {
            LogicalType::Text | LogicalType::Json => {
                out.push(0);
                string(v, out);
            }
            LogicalType::Double => match v.parse::<f64>() {
                Ok(f) if f.is_finite() => {
                    out.push(0);
                    out.extend_from_slice(&f.to_le_bytes());
                }
                _ => out.push(1),
            },
            LogicalType::Boolean => out.extend_from_slice(&[0, u8::from(v == "true")]),
            LogicalType::Timestamp => {
                match parse_canonical_ms(v)
                    .or_else(|| parse_ms(v))
                    .filter(|ms| (0..MAX_INSTANT_MS).contains(ms))
                {
                    Some(ms) => {
                        out.push(0);
                        self.instant(ms, out);
                    }
                    None => out.push(1),
                }
            }
        }
        true
    }

    /// An instant already known to be in range.
    fn instant(&self, ms: i64, out: &mut Vec<u8>) -> bool {
        if !(0..MAX_INSTANT_MS).contains(&ms) {
            return false;
        }
        if self.ms_precision {
            out.extend_from_slice(&ms.to_le_bytes());
        } else {
            // In range, so it fits; whole seconds, as the text form was cut.
            out.extend_from_slice(&((ms / 1000) as u32).to_le_bytes());
        }
        true
    }
}

/// A `String`: its length as an unsigned LEB128 varint, then its bytes.
fn string(v: &str, out: &mut Vec<u8>) {
    let mut n = v.len() as u64;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(v.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected(ms: bool) -> impl Fn(LogicalType, bool) -> String {
        move |ty, nullable| {
            let t = match ty {
                LogicalType::Text | LogicalType::Json => "String",
                LogicalType::Double => "Float64",
                LogicalType::Boolean => "UInt8",
                LogicalType::Timestamp if ms => "DateTime64(3, 'UTC')",
                LogicalType::Timestamp => "DateTime",
            };
            if nullable {
                format!("Nullable({t})")
            } else {
                t.to_string()
            }
        }
    }

    fn physical(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn layout(ms: bool) -> Layout {
        let cols = [
            (Field::Key, "message_id"),
            (Field::Value(LogicalType::Text), "t"),
            (Field::Value(LogicalType::Double), "d"),
            (Field::Value(LogicalType::Boolean), "b"),
            (Field::Value(LogicalType::Timestamp), "ts"),
        ];
        let instant = if ms {
            "DateTime64(3, 'UTC')"
        } else {
            "DateTime"
        };
        let nullable_instant = format!("Nullable({instant})");
        let types = physical(&[
            ("message_id", "String"),
            ("t", "Nullable(String)"),
            ("d", "Nullable(Float64)"),
            ("b", "Nullable(UInt8)"),
            ("ts", &nullable_instant),
            ("loaded_at", instant),
            ("_version", "UInt64"),
            ("_received", "Date"),
        ]);
        Layout::new(&cols, true, false, ms, &types, expected(ms)).expect("the sink's own types")
    }

    fn cells<'a>(v: &[Option<&'a str>]) -> Vec<Cell<'a>> {
        v.iter().map(|c| c.map(Into::into)).collect()
    }

    #[test]
    fn values_are_written_as_clickhouse_stores_them() {
        let mut out = Vec::new();
        let l = layout(false);
        let row = cells(&[
            Some("m"),
            Some("é"),
            Some("2.5"),
            Some("true"),
            Some("1970-01-01T00:01:40.900Z"),
        ]);
        assert!(l.row(&row, 5_000, 7, Some(3), None, &mut out));
        let mut want = vec![1, b'm', 0, 2, 0xc3, 0xa9, 0];
        want.extend(2.5f64.to_le_bytes());
        want.extend([0, 1, 0]);
        want.extend(100u32.to_le_bytes());
        want.extend(5u32.to_le_bytes());
        want.extend(7u64.to_le_bytes());
        want.extend(3u16.to_le_bytes());
        assert_eq!(out, want);

        // Milliseconds where the server has `DateTime64(3)`; NULLs are one byte; a
        // number that does not parse and an instant out of range are NULL.
        let mut out = Vec::new();
        let row = cells(&[
            Some("m"),
            None,
            Some("x"),
            None,
            Some("1960-01-01T00:00:00.000Z"),
        ]);
        assert!(layout(true).row(&row, 5_001, 0, Some(0), None, &mut out));
        let mut want = vec![1, b'm', 1, 1, 1, 1];
        want.extend(5_001i64.to_le_bytes());
        want.extend(0u64.to_le_bytes());
        want.extend(0u16.to_le_bytes());
        assert_eq!(out, want);
    }

    #[test]
    fn long_strings_carry_a_varint_length() {
        let mut out = Vec::new();
        string(&"a".repeat(300), &mut out);
        assert_eq!(&out[..2], &[0xac, 0x02]);
        assert_eq!(out.len(), 302);
    }

    #[test]
    fn a_row_that_does_not_fit_leaves_the_buffer_as_it_was() {
        let l = layout(false);
        let mut out = b"earlier".to_vec();
        assert!(!l.row(
            &cells(&[None, None, None, None, None]),
            0,
            0,
            Some(0),
            None,
            &mut out
        ));
        assert!(!l.row(
            &cells(&[Some("m"), None, None, None, None]),
            0,
            0,
            Some(70_000),
            None,
            &mut out
        ));
        assert!(!l.row(&cells(&[Some("m")]), 0, 0, Some(0), None, &mut out));
        assert_eq!(out, b"earlier");
    }

    #[test]
    fn a_column_of_another_type_means_no_layout() {
        let cols = [
            (Field::Key, "message_id"),
            (Field::Value(LogicalType::Double), "d"),
        ];
        let mut types = physical(&[
            ("message_id", "String"),
            ("d", "Nullable(Float64)"),
            ("loaded_at", "DateTime"),
            ("_version", "UInt64"),
        ]);
        assert!(Layout::new(&cols, false, false, false, &types, expected(false)).is_some());
        // `_received` is only needed where there is one.
        assert!(Layout::new(&cols, true, false, false, &types, expected(false)).is_none());
        types.insert("d".into(), "Nullable(String)".into());
        assert!(Layout::new(&cols, false, false, false, &types, expected(false)).is_none());
        types.remove("d");
        assert!(Layout::new(&cols, false, false, false, &types, expected(false)).is_none());
    }
}
