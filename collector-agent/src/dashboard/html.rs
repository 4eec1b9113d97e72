//! The dashboard page: plain HTML, every figure in a table (with `<meter>` bars), the
//! time series also as a chart (`app.js` draws it with uPlot from the JSON embedded in
//! the page). Headings in order, labelled forms, captions and header cells for screen
//! readers, a skip link, visible focus, and colours with at least 4.5:1 contrast.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::data::{diff, Data, HistoryRow, Rate};
use crate::privacy::Person;

/// HTML-escapes text.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "
:root { color-scheme: light; }
body { font: 15px/1.5 system-ui, -apple-system, 'Segoe UI', sans-serif; color: #1a1a1a; background: #fff; margin: 0; }
header, main { max-width: 1100px; margin: 0 auto; padding: 0 20px; }
header { border-bottom: 1px solid #767676; padding-bottom: 8px; }
h1 { font-size: 1.6rem; margin: 16px 0 4px; }
h2 { font-size: 1.25rem; margin: 32px 0 8px; border-top: 1px solid #d0d0d0; padding-top: 16px; }
h3 { font-size: 1.05rem; margin: 20px 0 6px; }
a { color: #0b57d0; }
a:focus, button:focus, input:focus, select:focus, summary:focus { outline: 3px solid #0b57d0; outline-offset: 2px; }
.skip, .visually { position: absolute; left: -9999px; }
.skip:focus { left: 8px; top: 8px; background: #fff; padding: 6px; }
nav ul { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 4px 16px; margin: 8px 0; }
table { border-collapse: collapse; margin: 8px 0 16px; font-variant-numeric: tabular-nums; min-width: 440px; }
caption { text-align: left; font-weight: 600; padding: 4px 0; }
th, td { border-bottom: 1px solid #d0d0d0; padding: 4px 10px; text-align: left; vertical-align: top; }
td.n { text-align: right; }
meter { width: 120px; height: 14px; vertical-align: middle; margin-right: 6px; }
.chart { min-height: 320px; }
.summary { display: flex; gap: 24px; flex-wrap: wrap; margin: 8px 0; }
.summary div { border: 1px solid #767676; border-radius: 6px; padding: 8px 12px; }
.summary strong { display: block; font-size: 1.4rem; }
.warn { color: #8a1c1c; }
pre.diff { background: #f6f6f6; padding: 8px; overflow-x: auto; }
.del { color: #8a1c1c; background: #fde8e8; display: block; }
.add { color: #14532d; background: #e3f4e8; display: block; }
form.inline { display: flex; gap: 8px; align-items: end; flex-wrap: wrap; }
label { display: block; font-weight: 600; }
input, select, button { font: inherit; padding: 4px 8px; }
button { background: #0b57d0; color: #fff; border: 0; border-radius: 4px; padding: 6px 14px; cursor: pointer; }
";

fn pct(r: Option<&Rate>) -> String {
    match r.and_then(|r| r.percent().map(|p| (p, r))) {
        Some((p, r)) => format!(
            "<meter min=\"0\" max=\"100\" value=\"{p}\" aria-hidden=\"true\"></meter>{p}% <small>({} of {})</small>",
            r.granted, r.decided
        ),
        None => "–".into(),
    }
}

fn count_bars(out: &mut String, caption: &str, head: &[&str], rows: &[(Vec<String>, u64)]) {
    let max = rows.iter().map(|r| r.1).max().unwrap_or(0).max(1);
    let _ = write!(out, "<table><caption>{}</caption><thead><tr>", esc(caption));
    for h in head {
        let _ = write!(out, "<th scope=\"col\">{}</th>", esc(h));
    }
    out.push_str("<th scope=\"col\">count</th></tr></thead><tbody>");
    if rows.is_empty() {
        let _ = write!(out, "<tr><td colspan=\"{}\">none</td></tr>", head.len() + 1);
    }
    for (cells, n) in rows {
        out.push_str("<tr>");
        for (i, c) in cells.iter().enumerate() {
            if i == 0 {
                let _ = write!(out, "<th scope=\"row\">{}</th>", esc(c));
            } else {
                let _ = write!(out, "<td>{}</td>", esc(c));
            }
        }
        let _ = write!(
            out,
            "<td class=\"n\"><meter min=\"0\" max=\"{max}\" value=\"{n}\" aria-hidden=\"true\"></meter>{n}</td></tr>"
        );
    }
    out.push_str("</tbody></table>");
}

fn source_label(s: &str) -> &str {
    match s {
        "explicit" => "explicit choice",
        "gpc" => "GPC signal",
        "tcf" => "TCF string",
        "default" => "region default",
        "necessary" => "always on (necessary)",
        other => other,
    }
}

fn rate_table(
    out: &mut String,
    caption: &str,
    row_head: &str,
    rows: &BTreeMap<String, BTreeMap<String, Rate>>,
    cols: &[String],
    id: &str,
) {
    let _ = write!(
        out,
        "<table id=\"{id}\"><caption>{}</caption><thead><tr><th scope=\"col\">{}</th>",
        esc(caption),
        esc(row_head)
    );
    for c in cols {
        let _ = write!(out, "<th scope=\"col\">{}</th>", esc(c));
    }
    out.push_str("</tr></thead><tbody>");
    if rows.is_empty() {
        let _ = write!(
            out,
            "<tr><td colspan=\"{}\">no decisions in this window</td></tr>",
            cols.len() + 1
        );
    }
    for (k, per) in rows {
        let _ = write!(
            out,
            "<tr data-key=\"{}\"><th scope=\"row\">{}</th>",
            esc(k),
            esc(k)
        );
        for c in cols {
            let _ = write!(out, "<td data-cat=\"{}\">{}</td>", esc(c), pct(per.get(c)));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
}

/// The whole page.
pub fn render(
    d: &Data,
    policy_version: Option<&str>,
    person: Option<&(String, (Person, Vec<HistoryRow>))>,
) -> String {
    let mut out = String::with_capacity(64 * 1024);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>Consent audit · edge collector</title><link rel=\"icon\" href=\"data:,\"><link rel=\"stylesheet\" href=\"/dashboard/uplot.css\"><style>{STYLE}</style></head><body>
<a class=\"skip\" href=\"#main\">Skip to the figures</a>
<header><h1>Consent audit</h1>
<p>Last {} day(s), since {} (UTC). Policy in force: <code>{}</code>.</p>
<form class=\"inline\" method=\"get\" action=\"/dashboard\"><div><label for=\"days\">Window</label><select id=\"days\" name=\"days\">",
        d.days,
        esc(&d.since),
        esc(policy_version.unwrap_or("not configured (set privacy in agent.toml)"))
    );
    for n in [1, 7, 30, 90, 365] {
        let sel = if n == d.days { " selected" } else { "" };
        let _ = write!(out, "<option value=\"{n}\"{sel}>{n} day(s)</option>");
    }
    out.push_str("</select></div><button type=\"submit\">Show</button></form>
<nav aria-label=\"Sections\"><ul><li><a href=\"#rates\">Consent rates</a></li><li><a href=\"#regions\">By region</a></li><li><a href=\"#sources\">By source</a></li><li><a href=\"#withheld\">Withheld and hashed</a></li><li><a href=\"#policies\">Policy versions</a></li><li><a href=\"#activations\">Activations</a></li><li><a href=\"#requests\">Privacy requests</a></li><li><a href=\"#person\">One person</a></li></ul></nav></header>
<main id=\"main\">");
    let withheld: u64 = d.withheld.values().sum();
    let sent: u64 = d
        .activations
        .iter()
        .filter(|a| a.1 == "sent")
        .map(|a| a.3)
        .sum();
    let held: u64 = d
        .activations
        .iter()
        .filter(|a| a.1 != "sent")
        .map(|a| a.3)
        .sum();
    let _ = write!(
        out,
        "<div class=\"summary\" role=\"group\" aria-label=\"Summary\"><div id=\"sum-decisions\"><strong>{}</strong> visitor decisions</div><div id=\"sum-withheld\"><strong>{withheld}</strong> events withheld at the edge</div><div id=\"sum-sent\"><strong>{sent}</strong> activations sent</div><div id=\"sum-held\"><strong>{held}</strong> activations withheld or failed</div><div id=\"sum-requests\"><strong>{}</strong> privacy requests</div></div>",
        d.decisions,
        d.requests.len()
    );

    // Consent rates over time.
    out.push_str("<section id=\"rates\" aria-labelledby=\"rates-h\"><h2 id=\"rates-h\">Consent rates per category over time</h2>
<p>Share of visitors granting each category, per day: a visitor's decision is their latest stored event of the day, with the consent the edge resolved for it.</p>
<figure><div id=\"rates-chart\" class=\"chart\" role=\"img\" aria-label=\"Line chart of the percent of visitors granting each consent category per day. The table below holds the same figures.\"></div><figcaption>Percent granted per day and category (the table below has the counts).</figcaption></figure>");
    let series = serde_json::json!({
        "days": d.by_day.keys().collect::<Vec<_>>(),
        "categories": d.categories,
        "percent": d.categories.iter().map(|c| d.by_day.values().map(|per| per.get(c).and_then(|r| r.percent())).collect::<Vec<_>>()).collect::<Vec<_>>(),
    });
    // JSON inside a script element: `<` escaped so no text can close it.
    let _ = write!(
        out,
        "<script type=\"application/json\" id=\"rates-data\">{}</script>",
        series.to_string().replace('<', "\\u003c")
    );
    rate_table(
        &mut out,
        "Percent granted per day",
        "day",
        &d.by_day,
        &d.categories,
        "rates-table",
    );
    out.push_str("</section>");

    out.push_str(
        "<section id=\"regions\" aria-labelledby=\"regions-h\"><h2 id=\"regions-h\">By region</h2>",
    );
    rate_table(
        &mut out,
        "Percent granted per region (the region the policy applied)",
        "region",
        &d.by_region,
        &d.categories,
        "regions-table",
    );
    out.push_str("</section>");

    out.push_str("<section id=\"sources\" aria-labelledby=\"sources-h\"><h2 id=\"sources-h\">By source of the decision</h2><p>What decided each category: the visitor's explicit choice, a Global Privacy Control signal, an IAB TCF string, or the region's default.</p>");
    let sources: Vec<String> = {
        let mut all: Vec<String> = d
            .by_source
            .values()
            .flat_map(|m| m.keys().cloned())
            .collect();
        all.sort();
        all.dedup();
        all
    };
    let _ = write!(out, "<table id=\"sources-table\"><caption>Decisions per category and source: percent granted (granted of decided)</caption><thead><tr><th scope=\"col\">category</th>");
    for s in &sources {
        let _ = write!(out, "<th scope=\"col\">{}</th>", esc(source_label(s)));
    }
    out.push_str("</tr></thead><tbody>");
    for (cat, per) in &d.by_source {
        let _ = write!(
            out,
            "<tr data-key=\"{}\"><th scope=\"row\">{}</th>",
            esc(cat),
            esc(cat)
        );
        for s in &sources {
            let _ = write!(
                out,
                "<td data-source=\"{}\">{}</td>",
                esc(s),
                pct(per.get(s))
            );
        }
        out.push_str("</tr>");
    }
    if d.by_source.is_empty() {
        let _ = write!(
            out,
            "<tr><td colspan=\"{}\">no decisions in this window</td></tr>",
            sources.len() + 1
        );
    }
    out.push_str("</tbody></table></section>");

    out.push_str("<section id=\"withheld\" aria-labelledby=\"withheld-h\"><h2 id=\"withheld-h\">Withheld at the edge, and PII handled</h2>");
    if let Some(e) = &d.edge_error {
        let _ = write!(
            out,
            "<p class=\"warn\" role=\"status\">The edge's counters could not be read: {}</p>",
            esc(e)
        );
    }
    let rows: Vec<(Vec<String>, u64)> = d
        .withheld
        .iter()
        .map(|(k, v)| (vec![k.clone()], *v))
        .collect();
    count_bars(
        &mut out,
        "Events the edge did not store, by reason (since the edge's queue began)",
        &["reason"],
        &rows,
    );
    let rows: Vec<(Vec<String>, u64)> = d
        .pii
        .iter()
        .map(|(k, v)| {
            let (kind, action) = k.split_once(':').unwrap_or((k.as_str(), ""));
            (vec![kind.to_string(), action.to_string()], *v)
        })
        .collect();
    count_bars(
        &mut out,
        "PII fields hashed, sealed or redacted at the edge, by kind (stored events in the window)",
        &["kind", "action"],
        &rows,
    );
    let rows: Vec<(Vec<String>, u64)> =
        d.notes.iter().map(|(k, v)| (vec![k.clone()], *v)).collect();
    count_bars(
        &mut out,
        "Events stored with a note (the edge's counters)",
        &["note"],
        &rows,
    );
    out.push_str("</section>");

    out.push_str("<section id=\"policies\" aria-labelledby=\"policies-h\"><h2 id=\"policies-h\">Policy versions in force</h2><table id=\"policies-table\"><caption>Each version of privacy.toml the stored events were collected under</caption><thead><tr><th scope=\"col\">version</th><th scope=\"col\">first seen</th><th scope=\"col\">last seen</th><th scope=\"col\">events</th></tr></thead><tbody>");
    for p in &d.policies {
        let _ = write!(
            out,
            "<tr><th scope=\"row\"><code>{}</code></th><td>{}</td><td>{}</td><td class=\"n\">{}</td></tr>",
            esc(&p.version),
            esc(p.first_seen.as_deref().unwrap_or("–")),
            esc(p.last_seen.as_deref().unwrap_or("–")),
            p.events
        );
    }
    if d.policies.is_empty() {
        out.push_str("<tr><td colspan=\"4\">none yet</td></tr>");
    }
    out.push_str("</tbody></table>");
    let known: Vec<_> = d.policies.iter().filter(|p| p.text.is_some()).collect();
    for w in known.windows(2) {
        let (a, b) = (w[0], w[1]);
        let _ = write!(out, "<details><summary>What changed from <code>{}</code> to <code>{}</code></summary><pre class=\"diff\">", esc(&a.version), esc(&b.version));
        for (tag, line) in diff(
            a.text.as_deref().unwrap_or(""),
            b.text.as_deref().unwrap_or(""),
        ) {
            match tag {
                '-' => {
                    let _ = write!(
                        out,
                        "<span class=\"del\"><span class=\"visually\">removed: </span>- {}</span>",
                        esc(&line)
                    );
                }
                '+' => {
                    let _ = write!(
                        out,
                        "<span class=\"add\"><span class=\"visually\">added: </span>+ {}</span>",
                        esc(&line)
                    );
                }
                _ => {}
            }
        }
        out.push_str("</pre></details>");
    }
    if known.len() < 2 {
        out.push_str("<p>Diffs appear once the agent has recorded two versions' texts (it records the policy it runs with at start).</p>");
    }
    out.push_str("</section>");

    out.push_str("<section id=\"activations\" aria-labelledby=\"activations-h\"><h2 id=\"activations-h\">Activations sent and withheld</h2>");
    let rows: Vec<(Vec<String>, u64)> = d
        .activations
        .iter()
        .map(|(dest, action, reason, n)| (vec![dest.clone(), action.clone(), reason.clone()], *n))
        .collect();
    count_bars(
        &mut out,
        "Per destination, action and consent reason (in the window)",
        &["destination", "action", "reason"],
        &rows,
    );
    out.push_str("</section>");

    out.push_str("<section id=\"requests\" aria-labelledby=\"requests-h\"><h2 id=\"requests-h\">Privacy requests</h2><table id=\"requests-table\"><caption>Every request, newest first (<code>collector-agent privacy request status ID</code> shows each store)</caption><thead><tr><th scope=\"col\">id</th><th scope=\"col\">kind</th><th scope=\"col\">status</th><th scope=\"col\">received</th><th scope=\"col\">completed</th><th scope=\"col\">requested by</th></tr></thead><tbody>");
    for r in &d.requests {
        let _ = write!(
            out,
            "<tr><th scope=\"row\"><code>{}</code></th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.id),
            r.kind.as_str(),
            esc(&r.status),
            esc(&r.received_at),
            esc(r.completed_at.as_deref().unwrap_or("–")),
            esc(&r.requested_by)
        );
    }
    if d.requests.is_empty() {
        out.push_str("<tr><td colspan=\"6\">none</td></tr>");
    }
    out.push_str("</tbody></table></section>");

    let asked = person.map(|p| p.0.as_str()).unwrap_or("");
    let _ = write!(
        out,
        "<section id=\"person\" aria-labelledby=\"person-h\"><h2 id=\"person-h\">One person's consent history</h2>
<form class=\"inline\" method=\"get\" action=\"/dashboard#person\"><input type=\"hidden\" name=\"days\" value=\"{}\"><div><label for=\"person-id\">User id, anonymous id, email or person id</label><input id=\"person-id\" name=\"person\" value=\"{}\" size=\"36\" autocomplete=\"off\"></div><button type=\"submit\">Look up</button></form>",
        d.days,
        esc(asked)
    );
    if let Some((id, (who, rows))) = person {
        let ids: Vec<String> = who.ids.iter().map(|(t, v)| format!("{t}: {v}")).collect();
        let _ = write!(
            out,
            "<p id=\"person-ids\">{} event(s) for {}; ids: {}</p>",
            rows.len(),
            esc(id),
            esc(&ids.join(", "))
        );
        out.push_str("<table id=\"person-table\"><caption>Every stored event of theirs with the consent resolved for it, oldest first</caption><thead><tr><th scope=\"col\">time</th><th scope=\"col\">event</th><th scope=\"col\">region</th><th scope=\"col\">granted</th><th scope=\"col\">denied</th><th scope=\"col\">sources</th><th scope=\"col\">policy</th></tr></thead><tbody>");
        for r in rows {
            let list = |v: &serde_json::Value| {
                v.as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default()
            };
            let sources = r
                .sources
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}: {}", source_label(v.as_str().unwrap_or(""))))
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_default();
            let _ = write!(
                out,
                "<tr><th scope=\"row\">{}</th><td>{} <code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
                esc(r.timestamp.as_deref().unwrap_or("")),
                esc(&r.kind),
                esc(&r.message_id),
                esc(r.region.as_deref().unwrap_or("")),
                esc(&list(&r.granted)),
                esc(&list(&r.denied)),
                esc(&sources),
                esc(r.policy_version.as_deref().unwrap_or(""))
            );
        }
        if rows.is_empty() {
            out.push_str("<tr><td colspan=\"7\">nothing stored under this id</td></tr>");
        }
        out.push_str("</tbody></table>");
    }
    out.push_str("</section></main><script src=\"/dashboard/uplot.js\"></script><script src=\"/dashboard/app.js\"></script></body></html>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
    }

    #[test]
    fn an_empty_warehouse_renders_every_section() {
        let page = render(&Data::default(), None, None);
        for id in [
            "rates",
            "regions",
            "sources",
            "withheld",
            "policies",
            "activations",
            "requests",
            "person",
        ] {
            assert!(page.contains(&format!("<section id=\"{id}\"")), "{id}");
        }
        assert!(page.contains("no decisions in this window"));
    }
}
