//! Rows for `COPY … (FORMAT binary)`: PostgreSQL's binary copy format, for the types
//! the sink creates. Instants and numbers go over as the server stores them, so the
//! server parses none of them (a `timestamptz` from text costs PostgreSQL ~0.35 µs,
//! and an event row has five); `jsonb` still goes as text behind its version byte.
//!
//! A table goes in binary only when every column's type in the database is the one
//! the sink created ([`PgType::name`]); a column an operator changed, or a value with
//! no exact binary form, sends the table as CSV, which the server casts as before.

use std::collections::HashMap;

use collector_core::timestamp::parse_canonical_us;

use crate::sinks::schema::LogicalType;
use crate::sinks::tables::Cell;

/// The types the sink creates, as `COPY` sends them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PgType {
    Text,
    Jsonb,
    Timestamptz,
    Float8,
    Bool,
}

impl PgType {
    pub(super) fn of(ty: LogicalType) -> PgType {
        match ty {
            LogicalType::Text => PgType::Text,
            LogicalType::Json => PgType::Jsonb,
            LogicalType::Timestamp => PgType::Timestamptz,
            LogicalType::Double => PgType::Float8,
            LogicalType::Boolean => PgType::Bool,
        }
    }

    /// The type's name as `format_type` prints it.
    pub(super) fn name(self) -> &'static str {
        match self {
            PgType::Text => "text",
            PgType::Jsonb => "jsonb",
            PgType::Timestamptz => "timestamp with time zone",
            PgType::Float8 => "double precision",
            PgType::Bool => "boolean",
        }
    }
}

/// The file header: signature, flags (no OIDs), no header extension.
pub(super) const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The file trailer: a field count of -1.
pub(super) const TRAILER: &[u8] = &[0xff, 0xff];

/// PostgreSQL's epoch (2000-01-01T00:00:00Z) in Unix microseconds.
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// Unix microseconds as a `timestamptz` field (microseconds since 2000-01-01).
pub(super) fn timestamptz(unix_us: i64) -> [u8; 8] {
    (unix_us - PG_EPOCH_US).to_be_bytes()
}

/// The columns of a table whose database types match `types` (by column name), or
/// `None` when one does not (or is missing): then the table goes as CSV.
pub(super) fn binary_types(
    columns: &[(String, LogicalType)],
    physical: &HashMap<String, String>,
) -> Option<Vec<PgType>> {
    columns
        .iter()
        .map(|(name, ty)| {
            let t = PgType::of(*ty);
            (physical.get(name).map(String::as_str) == Some(t.name())).then_some(t)
        })
        .collect()
}

/// Appends one row (its cells in `types` order, then `loaded_at`), or returns `false`
/// with `out` as it was when a value has no exact binary form.
pub(super) fn row(
    types: &[PgType],
    cells: &[Cell<'_>],
    loaded_at: [u8; 8],
    out: &mut Vec<u8>,
) -> bool {
    if cells.len() != types.len() {
        return false;
    }
    let start = out.len();
    let fields = i16::try_from(types.len() + 1).unwrap_or(i16::MAX);
    out.extend_from_slice(&fields.to_be_bytes());
    for (ty, cell) in types.iter().zip(cells) {
        let ok = match cell.as_deref() {
            None => {
                out.extend_from_slice(&(-1i32).to_be_bytes());
                true
            }
            Some(v) => field(*ty, v, out),
        };
        if !ok {
            out.truncate(start);
            return false;
        }
    }
    out.extend_from_slice(&8i32.to_be_bytes());
    out.extend_from_slice(&loaded_at);
    true
}

/// Appends one non-NULL field: its length, then its bytes.
fn field(ty: PgType, v: &str, out: &mut Vec<u8>) -> bool {
    let bytes =
        |out: &mut Vec<u8>, prefix: &[u8], b: &[u8]| match i32::try_from(prefix.len() + b.len()) {
            Ok(n) => {
                out.extend_from_slice(&n.to_be_bytes());
                out.extend_from_slice(prefix);
                out.extend_from_slice(b);
                true
            }
            Err(_) => false,
        };
    match ty {
        PgType::Text => bytes(out, &[], v.as_bytes()),
        // jsonb's binary form: version 1, then the JSON text.
        PgType::Jsonb => bytes(out, &[1], v.as_bytes()),
        PgType::Timestamptz => match parse_canonical_us(v) {
            Some(us) => bytes(out, &[], &timestamptz(us)),
            None => false,
        },
        // The sinks write doubles as Rust prints them (shortest text that reads back
        // as the same double); read back here, the value is the one the server's
        // correctly rounded parser would have stored.
        PgType::Float8 => match v.parse::<f64>() {
            Ok(f)
                if f.is_finite()
                    && v.bytes()
                        .all(|b| b.is_ascii_digit() || b"-.eE+".contains(&b)) =>
            {
                bytes(out, &[], &f.to_bits().to_be_bytes())
            }
            _ => false,
        },
        PgType::Bool => match v {
            "true" => bytes(out, &[], &[1]),
            "false" => bytes(out, &[], &[0]),
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cells<'a>(v: &[Option<&'a str>]) -> Vec<Cell<'a>> {
        v.iter().map(|c| c.map(Into::into)).collect()
    }

    #[test]
    fn fields_are_encoded_as_postgres_stores_them() {
        let types = [
            PgType::Text,
            PgType::Jsonb,
            PgType::Timestamptz,
            PgType::Float8,
            PgType::Bool,
            PgType::Text,
        ];
        let mut out = Vec::new();
        let row_ok = row(
            &types,
            &cells(&[
                Some("é"),
                Some("{}"),
                Some("2000-01-01T00:00:01.500Z"),
                Some("1.5"),
                Some("true"),
                None,
            ]),
            timestamptz(PG_EPOCH_US),
            &mut out,
        );
        assert!(row_ok);
        let mut want = vec![0, 7];
        want.extend([0, 0, 0, 2, 0xc3, 0xa9]);
        want.extend([0, 0, 0, 3, 1, b'{', b'}']);
        want.extend([0, 0, 0, 8]);
        want.extend(1_500_000i64.to_be_bytes());
        want.extend([0, 0, 0, 8]);
        want.extend(1.5f64.to_bits().to_be_bytes());
        want.extend([0, 0, 0, 1, 1]);
        want.extend([0xff, 0xff, 0xff, 0xff]);
        want.extend([0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(out, want);
    }

    #[test]
    fn a_value_without_an_exact_binary_form_leaves_the_buffer_as_it_was() {
        let before = b"earlier rows".to_vec();
        for (ty, v) in [
            (PgType::Timestamptz, "2026-11-24T13:54:04+01:00"),
            (PgType::Float8, "NaN"),
            (PgType::Float8, "inf"),
            (PgType::Float8, "1e999"),
            (PgType::Bool, "t"),
        ] {
            let mut out = before.clone();
            assert!(
                !row(
                    &[PgType::Text, ty],
                    &cells(&[Some("x"), Some(v)]),
                    [0; 8],
                    &mut out
                ),
                "{v}"
            );
            assert_eq!(out, before);
        }
    }

    #[test]
    fn only_matching_database_types_go_binary() {
        let cols = vec![
            ("a".to_string(), LogicalType::Double),
            ("b".to_string(), LogicalType::Json),
        ];
        let mut physical: HashMap<String, String> = [
            ("a".to_string(), "double precision".to_string()),
            ("b".to_string(), "jsonb".to_string()),
            ("other".to_string(), "numeric".to_string()),
        ]
        .into();
        assert_eq!(
            binary_types(&cols, &physical),
            Some(vec![PgType::Float8, PgType::Jsonb])
        );
        // An operator made `a` numeric: the server must cast it from text.
        physical.insert("a".into(), "numeric".into());
        assert_eq!(binary_types(&cols, &physical), None);
        physical.remove("a");
        assert_eq!(binary_types(&cols, &physical), None);
    }
}
