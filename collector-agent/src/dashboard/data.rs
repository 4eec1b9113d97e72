//! The dashboard's figures, computed from the warehouse (the consent evidence stamped
//! on every stored event, the activation log, the privacy requests, the policies seen)
//! and the edge's counters (what it withheld and why). Served as JSON too
//! (`/dashboard/data.json`), so a test or a script reads the same numbers.
//!
//! A **consent decision** is one visitor's (anonymous id, else user id) latest stored
//! event of a day (UTC): per category, granted or denied, with the source of the
//! decision (`explicit` choice, `gpc`, `tcf`, region `default`, `necessary`) and the
//! region, as the edge resolved them.

use std::collections::BTreeMap;

use collector_core::EventKind;
use serde::Serialize;
use serde_json::Value;

use crate::audiences::eval::at;
use crate::sinks::{list, lit, Dialect, SinkError, SqlSession};

/// Granted and decided (granted + denied) counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Rate {
    pub granted: u64,
    pub decided: u64,
}

impl Rate {
    fn add(&mut self, granted: bool, n: u64) {
        self.decided += n;
        if granted {
            self.granted += n;
        }
    }

    /// Percent granted, one decimal.
    pub fn percent(&self) -> Option<f64> {
        (self.decided > 0)
            .then(|| (self.granted as f64 * 1000.0 / self.decided as f64).round() / 10.0)
    }
}

/// A policy version as the stored events show it, with its text when the agent
/// recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicySeen {
    pub version: String,
    pub first_seen: Option<String>,
    pub last_seen: Option<String>,
    pub events: u64,
    pub text: Option<String>,
}

/// One stored event's consent, for a person's history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryRow {
    pub timestamp: Option<String>,
    pub kind: String,
    pub message_id: String,
    pub region: Option<String>,
    pub granted: Value,
    pub denied: Value,
    pub sources: Value,
    pub policy_version: Option<String>,
    pub gpc: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Data {
    pub days: u32,
    pub since: String,
    pub categories: Vec<String>,
    /// Visitors' decisions in the window (see the module docs).
    pub decisions: u64,
    /// Per day (`YYYY-MM-DD`), per category.
    pub by_day: BTreeMap<String, BTreeMap<String, Rate>>,
    /// Per region, per category.
    pub by_region: BTreeMap<String, BTreeMap<String, Rate>>,
    /// Per category, per source.
    pub by_source: BTreeMap<String, BTreeMap<String, Rate>>,
    /// Events the edge did not store, by reason (all time; the edge's counters).
    pub withheld: BTreeMap<String, u64>,
    /// Events stored with a note (PII found, TC string ignored, …; the edge's
    /// counters).
    pub notes: BTreeMap<String, u64>,
    /// `None` when the edge could not be asked.
    pub edge_error: Option<String>,
    /// PII fields handled at the edge, by `kind:action` (`email:hash`), over stored
    /// events in the window.
    pub pii: BTreeMap<String, u64>,
    pub policies: Vec<PolicySeen>,
    /// `(destination, action, reason)` → count, in the window.
    pub activations: Vec<(String, String, String, u64)>,
    pub requests: Vec<crate::privacy::Request>,
}

/// `col`'s JSON value at `path`, as JSON text.
fn json_raw(d: Dialect, col: &str, path: &[&str]) -> String {
    match d {
        Dialect::Postgres => format!(
            "CAST({col}{} AS VARCHAR)",
            path.iter()
                .map(|k| format!("->{}", lit(d, k)))
                .collect::<String>()
        ),
        _ => format!(
            "CAST(json_extract({col}, '$.{}') AS VARCHAR)",
            path.iter()
                .map(|k| format!("\"{k}\""))
                .collect::<Vec<_>>()
                .join(".")
        ),
    }
}

fn json_str(d: Dialect, col: &str, path: &[&str]) -> String {
    crate::audiences::eval::json_text(d, col, path)
}

/// Every stored event (the six Segment tables) received since `since`, with the
/// columns the dashboard reads.
fn events(filter: &str) -> String {
    EventKind::ALL
        .iter()
        .map(|k| {
            format!(
                "SELECT '{}' AS kind, message_id, anonymous_id, user_id, \"timestamp\", received_at, context FROM {} WHERE {filter}",
                k.as_str(),
                k.table()
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ")
}

fn n(v: &Option<String>) -> u64 {
    v.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn strings(text: &Option<String>) -> Vec<String> {
    text.as_deref()
        .and_then(|t| serde_json::from_str::<Vec<String>>(t).ok())
        .unwrap_or_default()
}

/// The figures for the last `days` days before `now_ms`.
pub async fn compute(
    s: &mut dyn SqlSession,
    categories: &[String],
    days: u32,
    now_ms: i64,
) -> Result<Data, SinkError> {
    let d = s.dialect();
    let since_ms = now_ms - i64::from(days) * 86_400_000;
    let since = at(d, since_ms);
    let window = format!("received_at >= {since}");
    let mut data = Data {
        days,
        since: collector_core::timestamp::format_ms(since_ms),
        categories: categories.to_vec(),
        ..Data::default()
    };
    let resolved = |p: &str| json_raw(d, "context", &["consent", "resolved", p]);
    let latest = format!(
        "SELECT day, region, g, dn, src, COUNT(*) FROM (
           SELECT CAST(CAST(received_at AS DATE) AS VARCHAR) AS day, {region} AS region, {g} AS g, {dn} AS dn, {src} AS src,
                  ROW_NUMBER() OVER (PARTITION BY CAST(received_at AS DATE), COALESCE(anonymous_id, user_id, message_id) ORDER BY \"timestamp\" DESC, message_id DESC) AS rn
           FROM ({events}) e WHERE {g} IS NOT NULL
         ) x WHERE rn = 1 GROUP BY day, region, g, dn, src ORDER BY day",
        region = json_str(d, "context", &["consent", "resolved", "region"]),
        g = resolved("granted"),
        dn = resolved("denied"),
        src = resolved("sources"),
        events = events(&window),
    );
    for row in s.query(&latest).await?.rows {
        let day = row[0].clone().unwrap_or_default();
        let region = row[1].clone().unwrap_or_else(|| "unknown".into());
        let granted = strings(&row[2]);
        let denied = strings(&row[3]);
        let sources: BTreeMap<String, String> = row[4]
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default();
        let count = n(&row[5]);
        data.decisions += count;
        for (cat, is_granted) in granted
            .iter()
            .map(|c| (c, true))
            .chain(denied.iter().map(|c| (c, false)))
        {
            data.by_day
                .entry(day.clone())
                .or_default()
                .entry(cat.clone())
                .or_default()
                .add(is_granted, count);
            data.by_region
                .entry(region.clone())
                .or_default()
                .entry(cat.clone())
                .or_default()
                .add(is_granted, count);
            let source = sources
                .get(cat)
                .cloned()
                .unwrap_or_else(|| "unknown".into());
            data.by_source
                .entry(cat.clone())
                .or_default()
                .entry(source)
                .or_default()
                .add(is_granted, count);
        }
    }
    // PII handled at the edge, by kind and action.
    let pii = resolved("pii");
    let r = s
        .query(&format!(
            "SELECT p, COUNT(*) FROM (SELECT {pii} AS p FROM ({}) e) x WHERE p IS NOT NULL GROUP BY p",
            events(&window)
        ))
        .await?;
    for row in r.rows {
        let map: BTreeMap<String, String> = row[0]
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default();
        for kind_action in map.values() {
            *data.pii.entry(kind_action.clone()).or_default() += n(&row[1]);
        }
    }
    // Policy versions in force, with the texts the agent recorded.
    let pv = json_str(d, "context", &["consent", "resolved", "policy_version"]);
    let seen = s
        .query(&format!(
            "SELECT v, MIN(received_at), MAX(received_at), COUNT(*) FROM (SELECT {pv} AS v, received_at FROM ({}) e) x WHERE v IS NOT NULL GROUP BY v ORDER BY 2",
            events("TRUE")
        ))
        .await?;
    let texts = s
        .query("SELECT version, first_seen, policy FROM policy_versions ORDER BY first_seen")
        .await?;
    for row in seen.rows {
        let version = row[0].clone().unwrap_or_default();
        let text = texts
            .rows
            .iter()
            .find(|t| t[0].as_deref() == Some(version.as_str()))
            .and_then(|t| t[2].clone());
        data.policies.push(PolicySeen {
            version,
            first_seen: row[1].clone(),
            last_seen: row[2].clone(),
            events: n(&row[3]),
            text,
        });
    }
    for t in texts.rows {
        let version = t[0].clone().unwrap_or_default();
        if !data.policies.iter().any(|p| p.version == version) {
            data.policies.push(PolicySeen {
                version,
                first_seen: t[1].clone(),
                last_seen: None,
                events: 0,
                text: t[2].clone(),
            });
        }
    }
    // Activations sent and withheld, by destination and reason.
    let r = s
        .query(&format!(
            "SELECT destination, action, CASE WHEN action IN ('withheld', 'unreachable') THEN COALESCE(detail, '') ELSE '' END AS reason, COUNT(*)
             FROM activation_log WHERE logged_at >= {since} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        ))
        .await?;
    data.activations = r
        .rows
        .iter()
        .map(|row| {
            (
                row[0].clone().unwrap_or_default(),
                row[1].clone().unwrap_or_default(),
                row[2].clone().unwrap_or_default(),
                n(&row[3]),
            )
        })
        .collect();
    data.requests = crate::privacy::list(s).await?;
    Ok(data)
}

/// One person's consent over time: every stored event of every id of theirs (found
/// as the privacy requests find people), oldest first.
pub async fn history(
    s: &mut dyn SqlSession,
    id: &str,
    hasher: Option<&collector_core::pii::PiiHasher>,
) -> Result<(crate::privacy::Person, Vec<HistoryRow>), SinkError> {
    let d = s.dialect();
    let mut subject = crate::privacy::Subject {
        user_ids: vec![id.to_string()],
        anonymous_ids: vec![id.to_string()],
        email_hashes: Vec::new(),
    };
    if id.contains('@') {
        if let Some(h) = hasher {
            subject
                .email_hashes
                .push(h.hash(collector_core::pii::PiiKind::Email, id, ""));
        }
    } else if id.starts_with(collector_core::pii::HASH_PREFIX) {
        subject.email_hashes.push(id.to_string());
    }
    let mut person = crate::privacy::resolve(s, &subject, &[]).await?;
    // A person id typed in: their ids.
    let r = s
        .query(&format!(
            "SELECT id_type, id_value FROM identities WHERE person_id = {}",
            lit(d, id)
        ))
        .await?;
    for row in r.rows {
        if let (Some(t), Some(v)) = (row[0].clone(), row[1].clone()) {
            person.ids.insert((t, v));
            person.person_ids.insert(id.to_string());
        }
    }
    let users: Vec<String> = person
        .ids
        .iter()
        .filter(|(t, _)| t == "user_id")
        .map(|(_, v)| v.clone())
        .collect();
    let anons: Vec<String> = person
        .ids
        .iter()
        .filter(|(t, _)| t == "anonymous_id")
        .map(|(_, v)| v.clone())
        .collect();
    let filter = format!(
        "(user_id IN ({}) OR anonymous_id IN ({}))",
        list(d, users.iter()),
        list(d, anons.iter())
    );
    let res = |p: &str| json_raw(d, "context", &["consent", "resolved", p]);
    let txt = |p: &str| json_str(d, "context", &["consent", "resolved", p]);
    let r = s
        .query(&format!(
            "SELECT \"timestamp\", kind, message_id, {}, {}, {}, {}, {}, {} FROM ({}) e ORDER BY \"timestamp\", message_id LIMIT 1000",
            txt("region"),
            res("granted"),
            res("denied"),
            res("sources"),
            txt("policy_version"),
            res("gpc"),
            events(&filter)
        ))
        .await?;
    let json = |v: &Option<String>| {
        v.as_deref()
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or(Value::Null)
    };
    let rows = r
        .rows
        .iter()
        .map(|row| HistoryRow {
            timestamp: row[0].clone(),
            kind: row[1].clone().unwrap_or_default(),
            message_id: row[2].clone().unwrap_or_default(),
            region: row[3].clone(),
            granted: json(&row[4]),
            denied: json(&row[5]),
            sources: json(&row[6]),
            policy_version: row[7].clone(),
            gpc: row[8].clone(),
        })
        .collect();
    Ok((person, rows))
}

/// A line diff of two policy texts: `(' ' | '-' | '+', line)`, by longest common
/// subsequence (policies are short).
pub fn diff(old: &str, new: &str) -> Vec<(char, String)> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            out.push((' ', a[i].to_string()));
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push(('+', b[j].to_string()));
            j += 1;
        } else {
            out.push(('-', a[i].to_string()));
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_diff_marks_removed_and_added_lines() {
        let d = diff("a\nb\nc\n", "a\nc\nd\n");
        assert_eq!(
            d,
            vec![
                (' ', "a".into()),
                ('-', "b".into()),
                (' ', "c".into()),
                ('+', "d".into())
            ]
        );
        assert!(diff("x", "x").iter().all(|(c, _)| *c == ' '));
    }

    #[test]
    fn rates_round_to_one_decimal() {
        let mut r = Rate::default();
        r.add(true, 2);
        r.add(false, 1);
        assert_eq!(r.percent(), Some(66.7));
        assert_eq!(Rate::default().percent(), None);
    }
}
