//! The merge rule, pure: given every edge of a region (a connected part of the identity
//! graph) and the limits, which edges join people and which are refused. Edges are
//! taken in their canonical order (event timestamp, then message id, then the ids), so
//! the result depends only on the set of edges, never on the order they arrived in.

use std::collections::HashMap;

use foldhash::HashMapExt;

use super::config::Limits;

/// An identifier: `(type, value)`, e.g. `("user_id", "u1")`.
pub type Id = (String, String);

/// One edge of the graph: two ids seen together in one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    pub a: Id,
    pub b: Id,
    pub message_id: String,
    /// The event's timestamp, as the warehouse renders it (RFC 3339 UTC, so text
    /// order is time order).
    pub ts: String,
}

impl Edge {
    fn order_key(&self) -> (&str, &str, &Id, &Id) {
        (&self.ts, &self.message_id, &self.a, &self.b)
    }
}

/// What happened to one edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Joined two groups of ids (or they were joined already).
    Accepted,
    /// Would have broken a limit; the groups stay apart.
    Refused(String),
}

/// The region resolved: each id's person (the canonical id of its group), and each
/// edge's verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    pub person_of: HashMap<Id, Id>,
    pub verdicts: Vec<(Edge, Verdict)>,
}

/// Which id names a group: the highest-priority type (user id, then email, then
/// anonymous id), then the one first seen, then the smallest value.
fn rank(t: &str) -> u8 {
    match t {
        "user_id" => 0,
        "email" => 1,
        "anonymous_id" => 2,
        _ => 3,
    }
}

struct Groups {
    parent: Vec<usize>,
    /// Per group (its root), ids of each type: `counts[root * types + type]`.
    counts: Vec<u32>,
    size: Vec<u32>,
}

impl Groups {
    fn find(&mut self, mut i: usize) -> usize {
        while self.parent[i] != i {
            self.parent[i] = self.parent[self.parent[i]];
            i = self.parent[i];
        }
        i
    }
}

/// Resolves a region. `ids` are every id of the region (ids without edges stay alone);
/// `edges` may come in any order.
pub fn resolve<'a>(ids: &'a [Id], edges: &'a [Edge], limits: &Limits) -> Resolution {
    let mut index: foldhash::HashMap<&Id, usize> = foldhash::HashMap::new();
    let mut all: Vec<&Id> = Vec::new();
    for id in ids.iter().chain(edges.iter().flat_map(|e| [&e.a, &e.b])) {
        if !index.contains_key(id) {
            index.insert(id, all.len());
            all.push(id);
        }
    }
    // Id types, in order of appearance (three in practice).
    let mut types: Vec<&str> = Vec::new();
    for id in &all {
        if !types.contains(&id.0.as_str()) {
            types.push(&id.0);
        }
    }
    let nt = types.len().max(1);
    let mut counts = vec![0u32; all.len() * nt];
    for (i, id) in all.iter().enumerate() {
        let t = types.iter().position(|t| *t == id.0).unwrap_or(0);
        counts[i * nt + t] = 1;
    }
    let mut g = Groups {
        parent: (0..all.len()).collect(),
        counts,
        size: vec![1; all.len()],
    };
    // When each id was first seen in an edge (canonical order), for naming groups.
    let mut first: foldhash::HashMap<&Id, &str> = foldhash::HashMap::new();
    let mut sorted: Vec<&Edge> = edges.iter().collect();
    sorted.sort_by(|x, y| x.order_key().cmp(&y.order_key()));
    for e in &sorted {
        for id in [&e.a, &e.b] {
            first.entry(id).or_insert(e.ts.as_str());
        }
    }
    let mut verdicts = Vec::with_capacity(sorted.len());
    for e in sorted {
        let (ra, rb) = (g.find(index[&e.a]), g.find(index[&e.b]));
        if ra == rb {
            verdicts.push((e.clone(), Verdict::Accepted));
            continue;
        }
        let mut broken = None;
        for (k, t) in types.iter().enumerate() {
            let n = g.counts[rb * nt + k];
            if n == 0 {
                continue;
            }
            let total = g.counts[ra * nt + k] + n;
            let limit = limits.of(t);
            if total > limit {
                broken = Some(format!(
                    "would give one person {total} {t}s (limit {limit})"
                ));
                break;
            }
        }
        if broken.is_none() && g.size[ra] + g.size[rb] > limits.max_ids {
            broken = Some(format!(
                "would give one person {} ids (limit {})",
                g.size[ra] + g.size[rb],
                limits.max_ids
            ));
        }
        match broken {
            Some(reason) => verdicts.push((e.clone(), Verdict::Refused(reason))),
            None => {
                for k in 0..nt {
                    g.counts[ra * nt + k] += std::mem::take(&mut g.counts[rb * nt + k]);
                }
                g.size[ra] += g.size[rb];
                g.parent[rb] = ra;
                verdicts.push((e.clone(), Verdict::Accepted));
            }
        }
    }
    // Name each group by its best id.
    let key = |id: &'a Id| {
        (
            rank(&id.0),
            first.get(id).copied().unwrap_or("~"),
            id.1.as_str(),
        )
    };
    let mut best: Vec<Option<usize>> = vec![None; all.len()];
    for i in 0..all.len() {
        let r = g.find(i);
        match best[r] {
            Some(b) if key(all[b]) <= key(all[i]) => {}
            _ => best[r] = Some(i),
        }
    }
    let mut person_of = HashMap::with_capacity(all.len());
    for (i, id) in all.iter().enumerate() {
        let r = g.find(i);
        let b = best[r].unwrap_or(r);
        person_of.insert((*id).clone(), all[b].clone());
    }
    Resolution {
        person_of,
        verdicts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(t: &str, v: &str) -> Id {
        (t.to_string(), v.to_string())
    }

    fn edge(a: Id, b: Id, m: &str, ts: &str) -> Edge {
        Edge {
            a,
            b,
            message_id: m.into(),
            ts: ts.into(),
        }
    }

    #[test]
    fn a_shared_device_joins_the_first_user_and_refuses_the_second() {
        let anon = id("anonymous_id", "a1");
        let u1 = id("user_id", "u1");
        let u2 = id("user_id", "u2");
        let edges = vec![
            edge(anon.clone(), u2.clone(), "m2", "2026-11-25T10:05:00.000Z"),
            edge(anon.clone(), u1.clone(), "m1", "2026-11-25T10:00:00.000Z"),
        ];
        let r = resolve(&[], &edges, &Limits::default());
        assert_eq!(r.person_of[&anon], u1);
        assert_eq!(r.person_of[&u2], u2);
        let refused: Vec<_> = r
            .verdicts
            .iter()
            .filter(|(_, v)| matches!(v, Verdict::Refused(_)))
            .map(|(e, v)| (e.message_id.clone(), v.clone()))
            .collect();
        assert_eq!(
            refused,
            vec![(
                "m2".to_string(),
                Verdict::Refused("would give one person 2 user_ids (limit 1)".into())
            )]
        );
    }

    #[test]
    fn the_result_does_not_depend_on_the_order_of_edges() {
        let mut edges = Vec::new();
        for i in 0..30 {
            let a = id("anonymous_id", &format!("a{}", i % 7));
            let b = if i % 3 == 0 {
                id("email", &format!("e{}", i % 4))
            } else {
                id("user_id", &format!("u{}", i % 5))
            };
            edges.push(edge(
                a,
                b,
                &format!("m{i:02}"),
                &format!("2026-11-25T10:{:02}:00.000Z", (i * 7) % 60),
            ));
        }
        let limits = Limits {
            max_ids: 6,
            ..Limits::default()
        };
        let want = resolve(&[], &edges, &limits);
        let mut seed = 7u64;
        for _ in 0..50 {
            // Fisher–Yates with a small LCG.
            for i in (1..edges.len()).rev() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                edges.swap(i, (seed >> 33) as usize % (i + 1));
            }
            let got = resolve(&[], &edges, &limits);
            assert_eq!(got.person_of, want.person_of);
        }
    }
}
