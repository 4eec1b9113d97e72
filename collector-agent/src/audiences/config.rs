//! `audiences.toml`: audiences by name, each a declarative rule or SQL.
//!
//! ```toml
//! [audiences.pricing_no_purchase_7d]
//! description = "Viewed /pricing in the last 7 days, no purchase since"
//! requires = ["marketing"]                       # consent categories (privacy.toml)
//! performed = { type = "page", where = { path = "/pricing" }, within = "7d" }
//! not_performed_after = { event = "Order Completed" }
//!
//! [audiences.cart_abandoners_15m]
//! requires = ["marketing"]
//! performed = { event = "Product Added", within = "24h", older_than = "15m" }
//! not_performed_after = { event = "Order Completed" }
//!
//! [audiences.pro_users]
//! traits = { plan = "pro" }                      # latest trait values (profiles)
//!
//! [audiences.big_spenders]
//! sql = "SELECT person_id FROM profiles WHERE event_count > 100"
//! ```
//!
//! `performed`: an event (`event = "Name"`, a track) or a page/screen view (`type`),
//! with property equality filters (`where`, compared as text; `name` on a page or
//! screen is its name), at least `at_least` times (default 1) within `within` of now,
//! and, with `older_than`, the latest of them at least that long ago.
//! `not_performed_after`: no such event after the latest qualifying one (within
//! `within` of it, or ever when absent). `traits`: latest trait values equal these.
//! `requires`: the person's current consent grants every one of these categories.
//! `sql`: any query over the warehouse returning `person_id` (then only `requires`
//! may be added).

use std::collections::BTreeMap;
use std::time::Duration;

use collector_core::policy::line_col;
use serde::Deserialize;
use toml::Spanned;

/// One problem in the file, with its place (the same shape as the privacy file's).
pub use collector_core::policy::PolicyError as FileError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    audiences: BTreeMap<String, Spanned<RawAudience>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudience {
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    requires: Vec<String>,
    #[serde(default)]
    performed: Option<RawEvent>,
    #[serde(default)]
    not_performed_after: Option<RawEvent>,
    #[serde(default)]
    traits: BTreeMap<String, toml::Value>,
    #[serde(default)]
    sql: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    #[serde(default)]
    event: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default, rename = "where")]
    filters: BTreeMap<String, toml::Value>,
    #[serde(default)]
    within: Option<String>,
    #[serde(default)]
    older_than: Option<String>,
    #[serde(default)]
    at_least: Option<u32>,
}

/// Which events a rule counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventRef {
    /// A track event by name.
    Track(String),
    /// A page or screen view.
    View(&'static str),
}

/// An event condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRule {
    pub what: EventRef,
    /// Property (or `name`) equalities, compared as text.
    pub filters: Vec<(String, String)>,
    pub within: Option<Duration>,
    pub older_than: Option<Duration>,
    pub at_least: u32,
}

/// What decides membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Definition {
    Rule {
        performed: Option<EventRule>,
        not_performed_after: Option<EventRule>,
        traits: Vec<(String, String)>,
    },
    Sql(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audience {
    pub name: String,
    pub description: Option<String>,
    pub requires: Vec<String>,
    pub definition: Definition,
}

/// `"15m"`, `"24h"`, `"7d"`, `"90s"`, `"2w"`.
pub fn parse_window(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a window like \"15m\", \"24h\" or \"7d\""))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(format!("{s:?}: the unit must be s, m, h, d or w")),
    };
    if n == 0 {
        return Err(format!("{s:?}: a window must be longer than zero"));
    }
    Ok(Duration::from_secs(n * secs))
}

fn value_text(v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "{other} cannot be compared (use a string, number or boolean)"
        )),
    }
}

fn event_rule(raw: RawEvent, key: &str) -> Result<EventRule, String> {
    let what = match (raw.event, raw.kind.as_deref()) {
        (Some(e), None | Some("track")) if !e.is_empty() => EventRef::Track(e),
        (None, Some("page")) => EventRef::View("page"),
        (None, Some("screen")) => EventRef::View("screen"),
        (None, Some(other)) => {
            return Err(format!(
            "{key}.type must be \"page\" or \"screen\" (or give event = \"Name\"), got {other:?}"
        ))
        }
        _ => {
            return Err(format!(
                "{key} needs event = \"Name\" (a track) or type = \"page\"/\"screen\""
            ))
        }
    };
    let mut filters = Vec::new();
    for (k, v) in raw.filters {
        filters.push((
            k.clone(),
            value_text(&v).map_err(|e| format!("{key}.where.{k}: {e}"))?,
        ));
    }
    let window = |w: Option<String>, name: &str| {
        w.map(|w| parse_window(&w).map_err(|e| format!("{key}.{name}: {e}")))
            .transpose()
    };
    let within = window(raw.within, "within")?;
    let older_than = window(raw.older_than, "older_than")?;
    if let (Some(w), Some(o)) = (within, older_than) {
        if o >= w {
            return Err(format!("{key}: older_than must be shorter than within"));
        }
    }
    let at_least = raw.at_least.unwrap_or(1);
    if at_least == 0 {
        return Err(format!("{key}.at_least must be at least 1"));
    }
    Ok(EventRule {
        what,
        filters,
        within,
        older_than,
        at_least,
    })
}

/// Parses and validates the file. `categories`, when given, are the consent categories
/// of `privacy.toml`: `requires` must name them. Every problem is reported.
pub fn parse(src: &str, categories: Option<&[String]>) -> Result<Vec<Audience>, Vec<FileError>> {
    let raw: RawFile = toml::from_str(src).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(src, s.start)).unwrap_or((1, 1));
        vec![FileError {
            line,
            column,
            message: e.message().to_string(),
        }]
    })?;
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for (name, spanned) in raw.audiences {
        let (line, column) = line_col(src, spanned.span().start);
        let mut err = |message: String| {
            errors.push(FileError {
                line,
                column,
                message: format!("audience {name}: {message}"),
            })
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            err("names are lower case letters, digits and _".into());
        }
        let a = spanned.into_inner();
        if let Some(cats) = categories {
            for r in &a.requires {
                if !cats.contains(r) {
                    err(format!(
                        "requires {r:?}, which privacy.toml does not define (categories: {})",
                        cats.join(", ")
                    ));
                }
            }
        }
        let definition = match a.sql {
            Some(sql) => {
                if a.performed.is_some() || a.not_performed_after.is_some() || !a.traits.is_empty()
                {
                    err("give either sql or a rule (performed, not_performed_after, traits), not both".into());
                    continue;
                }
                if sql.trim().is_empty() {
                    err("sql is empty".into());
                    continue;
                }
                Definition::Sql(sql)
            }
            None => {
                if a.performed.is_none() && a.traits.is_empty() {
                    err("needs performed, traits or sql".into());
                    continue;
                }
                if a.not_performed_after.is_some() && a.performed.is_none() {
                    err("not_performed_after needs performed".into());
                    continue;
                }
                let performed = match a.performed.map(|p| event_rule(p, "performed")).transpose() {
                    Ok(p) => p,
                    Err(e) => {
                        err(e);
                        continue;
                    }
                };
                let not_after = match a
                    .not_performed_after
                    .map(|p| event_rule(p, "not_performed_after"))
                    .transpose()
                {
                    Ok(p) => p,
                    Err(e) => {
                        err(e);
                        continue;
                    }
                };
                let mut traits = Vec::new();
                for (k, v) in a.traits {
                    match value_text(&v) {
                        Ok(t) => traits.push((k, t)),
                        Err(e) => err(format!("traits.{k}: {e}")),
                    }
                }
                Definition::Rule {
                    performed,
                    not_performed_after: not_after,
                    traits,
                }
            }
        };
        out.push(Audience {
            name,
            description: a.description,
            requires: a.requires,
            definition,
        });
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        errors.sort_by_key(|e| (e.line, e.column));
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        assert_eq!(parse_window("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_window("7d"), Ok(Duration::from_secs(604_800)));
        assert!(parse_window("7").is_err());
        assert!(parse_window("0h").is_err());
        assert!(parse_window("h").is_err());
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let src = r#"
[audiences.ok]
performed = { event = "A" }

[audiences.bad_window]
performed = { event = "A", within = "7x" }

[audiences.bad_consent]
requires = ["marketting"]
traits = { plan = "pro" }

[audiences.both]
sql = "SELECT 1"
traits = { plan = "pro" }
"#;
        let cats = vec!["marketing".to_string()];
        let errs = parse(src, Some(&cats)).unwrap_err();
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(errs.len(), 3, "{text:?}");
        // At each audience's header, in file order.
        assert!(
            text[0].starts_with("5:1: audience bad_window: performed.within"),
            "{text:?}"
        );
        assert!(
            text[1].starts_with("8:1: audience bad_consent: requires \"marketting\""),
            "{text:?}"
        );
        assert!(
            text[2].starts_with("12:1: audience both: give either sql"),
            "{text:?}"
        );
    }

    #[test]
    fn unknown_keys_are_errors_with_their_line() {
        let errs = parse("[audiences.a]\nperformd = { event = \"A\" }\n", None).unwrap_err();
        assert_eq!(errs[0].line, 2, "{errs:?}");
        assert!(errs[0].message.contains("performd"), "{errs:?}");
    }
}
