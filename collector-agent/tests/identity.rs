//! Identity resolution and profiles, computed in the warehouse, checked the same way
//! on a real DuckDB file and a real PostgreSQL server.

mod common;

use collector_agent::identity::{self, IdentityConfig, IdentityStats, Limits};
use collector_agent::sinks::duckdb::DuckDbSink;
use collector_agent::sinks::Sink;
use common::{load, one, rows, s, Target};
use serde_json::{json, Value};

async fn resolve(sink: &dyn Sink, cfg: &IdentityConfig) -> IdentityStats {
    let mut session = sink.session().await.unwrap().expect("a SQL warehouse");
    identity::run(&mut *session, cfg).await.unwrap()
}

/// The person of an id.
async fn person(sink: &dyn Sink, id_type: &str, id: &str) -> Option<String> {
    one(
        sink,
        &format!(
            "SELECT person_id FROM identities WHERE id_type = '{id_type}' AND id_value = '{id}'"
        ),
    )
    .await
}

// Anonymous pages, then sign-in, then an alias on a second device: one person with
// every id, event and trait.
async fn one_person_across_devices(t: &Target) {
    let sink = t.open().await;
    let cfg = IdentityConfig::default();
    load(&*sink, 1, json!([
        {"type": "page", "messageId": "p1", "anonymousId": "a1", "name": "Pricing", "timestamp": "2026-11-20T09:00:00.000Z"},
        {"type": "identify", "messageId": "i1", "anonymousId": "a1", "userId": "u1",
         "traits": {"plan": "free", "email": "hash-e1"}, "timestamp": "2026-11-20T09:01:00.000Z"},
    ]))
    .await;
    let first = resolve(&*sink, &cfg).await;
    assert_eq!(first.refused, 0);
    let p = person(&*sink, "user_id", "u1").await.unwrap();
    assert_eq!(p, identity::person_id(&("user_id".into(), "u1".into())));
    assert_eq!(
        person(&*sink, "anonymous_id", "a1").await.as_deref(),
        Some(p.as_str())
    );
    assert_eq!(
        person(&*sink, "email", "hash-e1").await.as_deref(),
        Some(p.as_str())
    );

    // Device two: browses anonymously, then the SDK aliases its anonymous id.
    load(&*sink, 2, json!([
        {"type": "page", "messageId": "p2", "anonymousId": "a2", "name": "Home", "timestamp": "2026-11-20T10:00:00.000Z"},
        {"type": "track", "messageId": "t2", "anonymousId": "a2", "event": "Product Added", "timestamp": "2026-11-20T10:01:00.000Z"},
        {"type": "alias", "messageId": "al2", "anonymousId": "a2", "previousId": "a2", "userId": "u1", "timestamp": "2026-11-20T10:02:00.000Z"},
        {"type": "identify", "messageId": "i2", "userId": "u1", "traits": {"plan": "pro"}, "timestamp": "2026-11-20T10:03:00.000Z"},
    ]))
    .await;
    let second = resolve(&*sink, &cfg).await;
    assert_eq!(
        person(&*sink, "anonymous_id", "a2").await.as_deref(),
        Some(p.as_str())
    );
    // The anonymous person of device two merged into u1's, and the log says by which event.
    assert_eq!(second.merges, 1);
    assert_eq!(
        rows(&*sink, "SELECT message_id, from_person, into_person FROM identity_merges WHERE kind = 'merged' AND message_id = 'al2'").await,
        vec![vec![
            s("al2"),
            Some(identity::person_id(&("anonymous_id".into(), "a2".into()))),
            Some(p.clone())
        ]]
    );
    // One profile: every id, all six events, the latest value of each trait.
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM profiles")
            .await
            .as_deref(),
        Some("1")
    );
    let profile = rows(
        &*sink,
        "SELECT person_id, CAST(user_ids AS VARCHAR), CAST(anonymous_ids AS VARCHAR), CAST(emails AS VARCHAR), event_count, first_seen, last_seen FROM profiles",
    )
    .await;
    let compact = |v: &Option<String>| v.as_deref().map(|t| t.replace(' ', ""));
    assert_eq!(profile[0][0].as_deref(), Some(p.as_str()));
    assert_eq!(compact(&profile[0][1]).as_deref(), Some("[\"u1\"]"));
    assert_eq!(compact(&profile[0][2]).as_deref(), Some("[\"a1\",\"a2\"]"));
    assert_eq!(compact(&profile[0][3]).as_deref(), Some("[\"hash-e1\"]"));
    assert_eq!(profile[0][4].as_deref(), Some("6"));
    assert_eq!(profile[0][5].as_deref(), Some("2026-11-20T09:00:00.000Z"));
    assert_eq!(profile[0][6].as_deref(), Some("2026-11-20T10:03:00.000Z"));
    let traits: Value = serde_json::from_str(
        &one(&*sink, "SELECT CAST(traits AS VARCHAR) FROM profiles")
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(traits, json!({"plan": "pro", "email": "hash-e1"}));

    // Every merge is in the log: device one's anonymous person and the email joined
    // u1 at sign-in (i1), device two's at the alias (al2).
    assert_eq!(
        rows(&*sink, "SELECT message_id, a_value, b_value, kind FROM identity_merges ORDER BY message_id, b_value").await,
        vec![
            vec![s("al2"), s("a2"), s("u1"), s("merged")],
            vec![s("i1"), s("u1"), s("hash-e1"), s("merged")],
            vec![s("i1"), s("a1"), s("u1"), s("merged")],
        ]
    );
    // `collector-agent profile` finds the person by any id.
    let found = identity::profile::lookup(t.dialect(), "a2", |q| {
        let sink = sink.clone();
        async move { Ok(sink.query(&q).await?) }
    })
    .await
    .unwrap()
    .expect("found");
    assert_eq!(
        (found.person_id.as_str(), found.event_count),
        (p.as_str(), 6)
    );
    let latest: Vec<_> = found.last_events.iter().map(|e| e[3].clone()).collect();
    assert_eq!(
        latest,
        vec![s("i2"), s("al2"), s("t2"), s("p2"), s("i1"), s("p1")]
    );
    let text = found.to_text();
    assert!(
        text.contains("plan = \"pro\"") && text.contains("a1, a2"),
        "{text}"
    );
    // Running again with nothing new changes nothing.
    let third = resolve(&*sink, &cfg).await;
    assert_eq!((third.new_edges, third.merges, third.refused), (0, 0, 0));
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM identity_merges")
            .await
            .as_deref(),
        Some("3")
    );
}

// A placeholder user id never joins two visitors; the refusal is logged with its reason.
async fn block_list_stops_a_bad_merge(t: &Target) {
    let sink = t.open().await;
    let cfg = IdentityConfig {
        block: vec!["test-user".into()],
        ..IdentityConfig::default()
    };
    load(&*sink, 1, json!([
        {"type": "identify", "messageId": "b1", "anonymousId": "x1", "userId": "undefined", "timestamp": "2026-11-20T09:00:00.000Z"},
        {"type": "identify", "messageId": "b2", "anonymousId": "x2", "userId": "undefined", "timestamp": "2026-11-20T09:01:00.000Z"},
        {"type": "track", "messageId": "b3", "anonymousId": "x2", "userId": "Test-User", "event": "E", "timestamp": "2026-11-20T09:02:00.000Z"},
        {"type": "track", "messageId": "b4", "anonymousId": "x3", "userId": "0", "event": "E", "timestamp": "2026-11-20T09:03:00.000Z"},
    ]))
    .await;
    resolve(&*sink, &cfg).await;
    let x1 = person(&*sink, "anonymous_id", "x1").await.unwrap();
    let x2 = person(&*sink, "anonymous_id", "x2").await.unwrap();
    assert_ne!(x1, x2);
    // Blocked ids are no one's.
    assert_eq!(
        one(
            &*sink,
            "SELECT count(*) FROM identities WHERE id_type = 'user_id'"
        )
        .await
        .as_deref(),
        Some("0")
    );
    assert_eq!(
        rows(&*sink, "SELECT message_id, reason FROM identity_merges WHERE kind = 'refused' ORDER BY message_id").await,
        vec![
            vec![s("b1"), s("blocked id: undefined")],
            vec![s("b2"), s("blocked id: undefined")],
            vec![s("b3"), s("blocked id: Test-User")],
            vec![s("b4"), s("blocked id: 0")],
        ]
    );
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM profiles")
            .await
            .as_deref(),
        Some("3")
    );
}

// A shared device: the first user to sign in keeps it; the second sign-in is refused
// (one user id per person) and says why. A later-arriving earlier event reorders it.
async fn limits_refuse_a_merge_and_late_events_reorder(t: &Target) {
    let sink = t.open().await;
    let cfg = IdentityConfig::default();
    load(&*sink, 1, json!([
        {"type": "identify", "messageId": "s2", "anonymousId": "kiosk", "userId": "bob", "timestamp": "2026-11-20T09:05:00.000Z"},
    ]))
    .await;
    resolve(&*sink, &cfg).await;
    let bob = identity::person_id(&("user_id".into(), "bob".into()));
    assert_eq!(person(&*sink, "anonymous_id", "kiosk").await, Some(bob));
    // Alice signed in on the kiosk earlier; her event arrives late.
    load(&*sink, 2, json!([
        {"type": "identify", "messageId": "s1", "anonymousId": "kiosk", "userId": "alice", "timestamp": "2026-11-20T09:00:00.000Z"},
    ]))
    .await;
    let stats = resolve(&*sink, &cfg).await;
    assert_eq!(stats.refused, 1);
    let alice = identity::person_id(&("user_id".into(), "alice".into()));
    assert_eq!(person(&*sink, "anonymous_id", "kiosk").await, Some(alice));
    assert_eq!(
        rows(
            &*sink,
            "SELECT a_value, b_value, status, reason FROM identity_edges ORDER BY b_value"
        )
        .await,
        vec![
            vec![s("kiosk"), s("alice"), s("accepted"), None],
            vec![
                s("kiosk"),
                s("bob"),
                s("refused"),
                s("would give one person 2 user_ids (limit 1)")
            ],
        ]
    );
}

// The profile holds the latest consent decision per category, with its source.
async fn profiles_hold_the_latest_consent(t: &Target) {
    let sink = t.open().await;
    let evidence = |granted: Value, denied: Value, source: &str| {
        json!({"consent": {"resolved": {"policy_version": "v7", "region": "EU", "granted": granted, "denied": denied,
            "sources": {"analytics": source, "marketing": source}, "gpc": false}}})
    };
    load(&*sink, 1, json!([
        {"type": "page", "messageId": "c1", "anonymousId": "v1", "timestamp": "2026-11-20T09:00:00.000Z",
         "context": evidence(json!(["analytics", "marketing"]), json!([]), "explicit")},
        {"type": "track", "messageId": "c2", "anonymousId": "v1", "event": "E", "timestamp": "2026-11-20T09:10:00.000Z",
         "context": evidence(json!(["analytics"]), json!(["marketing"]), "gpc")},
    ]))
    .await;
    resolve(&*sink, &IdentityConfig::default()).await;
    let consent: Value = serde_json::from_str(
        &one(&*sink, "SELECT CAST(consent AS VARCHAR) FROM profiles")
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        consent,
        json!({
            "analytics": {"granted": true, "source": "gpc", "policy_version": "v7", "at": "2026-11-20T09:10:00.000Z"},
            "marketing": {"granted": false, "source": "gpc", "policy_version": "v7", "at": "2026-11-20T09:10:00.000Z"},
        })
    );
}

// An erasure removes an event and its edge and lists the ids to resolve again: the
// next run splits them off, and says so.
async fn removed_edges_split_people_and_say_so(t: &Target) {
    let sink = t.open().await;
    let cfg = IdentityConfig::default();
    load(&*sink, 1, json!([
        {"type": "identify", "messageId": "j1", "anonymousId": "w1", "userId": "wu", "timestamp": "2026-11-20T09:00:00.000Z"},
        {"type": "identify", "messageId": "j2", "anonymousId": "w2", "userId": "wu", "timestamp": "2026-11-20T09:01:00.000Z"},
    ]))
    .await;
    resolve(&*sink, &cfg).await;
    let wu = person(&*sink, "user_id", "wu").await;
    assert_eq!(person(&*sink, "anonymous_id", "w2").await, wu);
    // As an erasure of the event would leave it: its row, its edge and its pair's
    // activity gone.
    for sql in [
        "DELETE FROM identifies WHERE message_id = 'j2'",
        "DELETE FROM identity_edges WHERE message_id = 'j2'",
        "DELETE FROM collector_id_activity WHERE anonymous_id = 'w2'",
        "INSERT INTO identity_dirty VALUES ('anonymous_id', 'w2', 'erasure'), ('user_id', 'wu', 'erasure')",
    ] {
        sink.query(sql).await.unwrap();
    }
    let stats = resolve(&*sink, &cfg).await;
    assert_eq!(stats.splits, 1);
    let w2 = identity::person_id(&("anonymous_id".into(), "w2".into()));
    assert_eq!(person(&*sink, "anonymous_id", "w2").await, Some(w2.clone()));
    assert_eq!(person(&*sink, "anonymous_id", "w1").await, wu);
    assert_eq!(
        rows(
            &*sink,
            "SELECT a_value, from_person, into_person FROM identity_merges WHERE kind = 'split'"
        )
        .await,
        vec![vec![s("w2"), wu.clone(), Some(w2)]]
    );
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM identity_dirty")
            .await
            .as_deref(),
        Some("0")
    );
}

// Ids are whatever a client sends: quotes and backslashes are ids like any other. The
// run resolves them and `collector-agent profile` finds the person by each, in every
// warehouse (ClickHouse reads a backslash in a literal as an escape, as PostgreSQL does
// with `standard_conforming_strings = off`, which the tests' server has).
async fn ids_with_quotes_and_backslashes_are_ids(t: &Target) {
    let sink = t.open().await;
    let (user, anon) = ("o'brien\\", "a\\' OR 1=1 OR '\\");
    load(&*sink, 1, json!([
        {"type": "page", "messageId": "p1", "anonymousId": anon, "name": "Home", "timestamp": "2026-11-20T09:00:00.000Z"},
        {"type": "identify", "messageId": "i1", "anonymousId": anon, "userId": user,
         "traits": {"plan": "it's \\ pro"}, "timestamp": "2026-11-20T09:01:00.000Z"},
        {"type": "identify", "messageId": "i2", "anonymousId": "other", "userId": "someone else", "timestamp": "2026-11-20T09:02:00.000Z"},
    ]))
    .await;
    let stats = resolve(&*sink, &IdentityConfig::default()).await;
    assert_eq!(stats.refused, 0);
    let p = identity::person_id(&("user_id".into(), user.into()));
    for id in [user, anon] {
        let found = identity::profile::lookup(t.dialect(), id, |q| {
            let sink = sink.clone();
            async move { Ok(sink.query(&q).await?) }
        })
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{id:?} not found"));
        assert_eq!(
            (found.person_id.as_str(), found.event_count),
            (p.as_str(), 2),
            "{id:?}"
        );
        assert_eq!(found.traits, json!({"plan": "it's \\ pro"}), "{id:?}");
    }
    assert!(
        identity::profile::lookup(t.dialect(), "nobody' OR '1'='1", |q| {
            let sink = sink.clone();
            async move { Ok(sink.query(&q).await?) }
        })
        .await
        .unwrap()
        .is_none()
    );
}

crate::per_target!(
    [duckdb, postgres, postgres_pooled]
    [one_person_across_devices,
    block_list_stops_a_bad_merge,
    limits_refuse_a_merge_and_late_events_reorder,
    profiles_hold_the_latest_consent,
    removed_edges_split_people_and_say_so,
    a_load_is_read_once_however_late_it_commits,
    an_upgraded_warehouse_reads_what_came_since_its_old_watermark,
    a_load_pending_from_before_the_stamp_is_read_whole,
    profiles_are_the_same_whatever_the_order_and_split,
    a_backlog_is_resolved_in_runs_of_bounded_size,
    an_upgraded_warehouse_fills_the_activity_from_every_event,
    ids_with_quotes_and_backslashes_are_ids,]
);

// The Parquet lake: identity runs in its state file, reading the events from its
// files (which the last three scenarios above cannot edit in place).
crate::per_target!(
    [parquet]
    [one_person_across_devices,
    block_list_stops_a_bad_merge,
    limits_refuse_a_merge_and_late_events_reorder,
    profiles_hold_the_latest_consent,
    the_block_list_is_the_same_in_sql_and_in_rust,
    profiles_are_the_same_whatever_the_order_and_split,
    a_backlog_is_resolved_in_runs_of_bounded_size,
    an_upgraded_warehouse_fills_the_activity_from_every_event,
    ids_with_quotes_and_backslashes_are_ids,]
);

// ClickHouse has no DELETE or UPDATE of events (the last three scenarios edit events in
// place to stage their case); its own way of reading each load once is checked below.
crate::per_target!(
    [clickhouse, clickhouse_current]
    [one_person_across_devices,
    block_list_stops_a_bad_merge,
    limits_refuse_a_merge_and_late_events_reorder,
    profiles_hold_the_latest_consent,
    the_block_list_is_the_same_in_sql_and_in_rust,
    each_load_is_read_once_in_clickhouse,
    ids_with_quotes_and_backslashes_are_ids,]
);

// ClickHouse: a run marks the loads it read (`collector_identity_read`) last, so the
// next run reads only what came since; a load whose mark was lost (a run stopped
// before its end) is read again, which changes nothing.
async fn each_load_is_read_once_in_clickhouse(t: &Target) {
    let sink = t.open().await;
    let cfg = IdentityConfig::default();
    load(&*sink, 1, json!([
        {"type": "identify", "messageId": "i1", "anonymousId": "a1", "userId": "u1", "timestamp": "2026-11-20T09:00:00.000Z"},
    ]))
    .await;
    assert_eq!(resolve(&*sink, &cfg).await.new_edges, 1);
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM identity_pending")
            .await
            .as_deref(),
        Some("0")
    );
    let again = resolve(&*sink, &cfg).await;
    assert_eq!(
        (again.new_edges, again.region_ids, again.profiles),
        (0, 0, 0)
    );
    load(&*sink, 2, json!([
        {"type": "identify", "messageId": "i2", "anonymousId": "a2", "userId": "u1", "timestamp": "2026-11-20T09:05:00.000Z"},
    ]))
    .await;
    let second = resolve(&*sink, &cfg).await;
    assert_eq!((second.new_edges, second.merges), (1, 1));
    // The marks are lost: both loads are read again, and nothing changes.
    sink.query("TRUNCATE TABLE collector_identity_read")
        .await
        .unwrap();
    let before = rows(
        &*sink,
        "SELECT id_type, id_value, person_id FROM identities ORDER BY id_type, id_value",
    )
    .await;
    let merges = one(&*sink, "SELECT count(*) FROM identity_merges").await;
    let replay = resolve(&*sink, &cfg).await;
    assert_eq!((replay.new_edges, replay.merges), (0, 0));
    assert_eq!(
        rows(
            &*sink,
            "SELECT id_type, id_value, person_id FROM identities ORDER BY id_type, id_value"
        )
        .await,
        before
    );
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM identity_merges").await,
        merges
    );
    assert_eq!(
        rows(
            &*sink,
            "SELECT event_count, CAST(anonymous_ids AS VARCHAR) FROM profiles"
        )
        .await,
        vec![vec![s("2"), s(r#"["a1","a2"]"#)]]
    );
}

// Every load marks itself for identity in its own transaction, so a load whose rows
// were stamped long before it committed (a slow transaction; another agent) is still
// read, exactly once: there is no time window to fall out of.
async fn a_load_is_read_once_however_late_it_commits(t: &Target) {
    let sink = t.open().await;
    let cfg = IdentityConfig::default();
    load(&*sink, 1, json!([
        {"type": "identify", "messageId": "i1", "anonymousId": "a1", "userId": "u1", "timestamp": "2026-11-20T09:00:00.000Z"},
    ]))
    .await;
    resolve(&*sink, &cfg).await;
    load(&*sink, 2, json!([
        {"type": "identify", "messageId": "i2", "anonymousId": "a2", "userId": "u2", "timestamp": "2026-11-20T09:05:00.000Z"},
    ]))
    .await;
    // Its transaction began two hours before the run above (its rows and its pending
    // mark are stamped with that time, as a load stamps both).
    for sql in [
        "UPDATE identifies SET loaded_at = loaded_at - INTERVAL '2 hours' WHERE message_id = 'i2'",
        "UPDATE identity_pending SET loaded_at = loaded_at - INTERVAL '2 hours'",
    ] {
        sink.query(sql).await.unwrap();
    }
    let late = resolve(&*sink, &cfg).await;
    assert_eq!(late.new_edges, 1);
    assert_eq!(
        person(&*sink, "anonymous_id", "a2").await,
        Some(identity::person_id(&("user_id".into(), "u2".into())))
    );
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM profiles")
            .await
            .as_deref(),
        Some("2")
    );
    // Read once: the next run has nothing to read.
    let again = resolve(&*sink, &cfg).await;
    assert_eq!((again.new_edges, again.region_ids), (0, 0));
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM identity_pending")
            .await
            .as_deref(),
        Some("0")
    );
}

// A run reads only the rows at or after its loads' lowest `loaded_at` stamp; a load
// pending from before the stamp was kept (migration 14) has none, and a run that takes
// it reads the tables whole, so its rows are read however old their `loaded_at`.
async fn a_load_pending_from_before_the_stamp_is_read_whole(t: &Target) {
    let sink = t.open().await;
    let cfg = IdentityConfig::default();
    load(&*sink, 1, json!([
        {"type": "identify", "messageId": "i1", "anonymousId": "a1", "userId": "u1", "timestamp": "2026-11-20T09:00:00.000Z"},
    ]))
    .await;
    load(&*sink, 2, json!([
        {"type": "identify", "messageId": "i2", "anonymousId": "a2", "userId": "u2", "timestamp": "2026-11-20T09:05:00.000Z"},
    ]))
    .await;
    assert_eq!(
        one(
            &*sink,
            "SELECT count(*) FROM identity_pending WHERE loaded_at IS NOT NULL"
        )
        .await
        .as_deref(),
        Some("2")
    );
    // The first load as the release before left it: no stamp; its rows hours older.
    for sql in [
        "UPDATE identifies SET loaded_at = loaded_at - INTERVAL '2 hours' WHERE message_id = 'i1'",
        "UPDATE identity_pending SET loaded_at = NULL WHERE load_id = (SELECT min(load_id) FROM identity_pending)",
    ] {
        sink.query(sql).await.unwrap();
    }
    let run = resolve(&*sink, &cfg).await;
    assert_eq!(run.new_edges, 2);
    for (a, u) in [("a1", "u1"), ("a2", "u2")] {
        assert_eq!(
            person(&*sink, "anonymous_id", a).await,
            Some(identity::person_id(&("user_id".into(), u.into())))
        );
    }
}

// The lake reads a run's events from its loads' files, named by the manifest. A file
// committed but not yet renamed into place (the rename failed: here its partition's
// folder cannot be made) is read where it is, not skipped: the load is marked read in
// the same run, so an event skipped then would never join its person.
#[tokio::test]
async fn a_lake_run_reads_a_committed_file_not_yet_in_place() {
    // Files committed but not in place.
    async fn staged(sink: &dyn Sink) -> Option<String> {
        one(
            sink,
            "SELECT count(*) FROM loaded_batches WHERE staged IS NOT NULL",
        )
        .await
    }
    let t = Target::parquet();
    let Target::Parquet(dir) = &t else {
        unreachable!()
    };
    let sink = t.open().await;
    let cfg = IdentityConfig::default();
    let blocker = dir.path().join("lake/table=identifies");
    std::fs::write(&blocker, b"not a folder").unwrap();
    load(&*sink, 1, json!([
        {"type": "identify", "messageId": "i1", "anonymousId": "a1", "userId": "u1", "timestamp": "2026-11-20T09:00:00.000Z"}
    ]))
    .await;
    assert_eq!(staged(&*sink).await.as_deref(), Some("1"));
    let first = resolve(&*sink, &cfg).await;
    assert_eq!(first.new_edges, 1);
    let p = identity::person_id(&("user_id".into(), "u1".into()));
    assert_eq!(person(&*sink, "anonymous_id", "a1").await, Some(p.clone()));
    // Once the folder can be made, the next load puts the file in place; the next run
    // reads only that load.
    std::fs::remove_file(&blocker).unwrap();
    load(&*sink, 2, json!([
        {"type": "track", "messageId": "t1", "userId": "u1", "event": "E", "timestamp": "2026-11-20T10:00:00.000Z"}
    ]))
    .await;
    assert_eq!(staged(&*sink).await.as_deref(), Some("0"));
    let next = resolve(&*sink, &cfg).await;
    assert_eq!(next.new_edges, 0);
    assert_eq!(
        rows(&*sink, "SELECT person_id, event_count FROM profiles").await,
        vec![vec![Some(p), s("2")]]
    );
}

// A warehouse from a release that kept a time watermark: its loads since the watermark
// carry no mark. The first run reads them from the watermark, once, and drops it.
async fn an_upgraded_warehouse_reads_what_came_since_its_old_watermark(t: &Target) {
    let sink = t.open().await;
    let cfg = IdentityConfig::default();
    load(&*sink, 1, json!([
        {"type": "identify", "messageId": "i1", "anonymousId": "a1", "userId": "u1", "timestamp": "2026-11-20T09:00:00.000Z"},
    ]))
    .await;
    // As the old release left it: no marks, a watermark before the load.
    for sql in [
        "DELETE FROM identity_pending",
        "DELETE FROM collector_identity_state",
        "INSERT INTO collector_identity_state VALUES ('scan_from', CAST('2000-01-01 00:00:00' AS TIMESTAMP))",
    ] {
        sink.query(sql).await.unwrap();
    }
    let first = resolve(&*sink, &cfg).await;
    assert_eq!(first.new_edges, 1);
    assert_eq!(
        person(&*sink, "anonymous_id", "a1").await,
        Some(identity::person_id(&("user_id".into(), "u1".into())))
    );
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM collector_identity_state")
            .await
            .as_deref(),
        Some("0")
    );
    let again = resolve(&*sink, &cfg).await;
    assert_eq!((again.new_edges, again.region_ids), (0, 0));
}

/// Events of a few visitors on shared devices, with user ids, emails and aliases.
fn scenario_events() -> Vec<Value> {
    let mut out = Vec::new();
    for i in 0..36u32 {
        let anon = format!("d{}", i % 6);
        let ts = format!("2026-11-20T09:{:02}:00.000Z", (i * 17) % 60);
        let id = format!("m{i:02}");
        let ev = match i % 4 {
            0 => {
                json!({"type": "identify", "messageId": id, "anonymousId": anon, "userId": format!("u{}", i % 5),
                        "traits": {"email": format!("e{}", i % 3)}, "timestamp": ts})
            }
            1 => json!({"type": "page", "messageId": id, "anonymousId": anon, "timestamp": ts}),
            2 => {
                json!({"type": "alias", "messageId": id, "anonymousId": anon, "previousId": format!("u{}", i % 7), "userId": format!("u{}", i % 5), "timestamp": ts})
            }
            _ => {
                json!({"type": "track", "messageId": id, "anonymousId": anon, "userId": format!("u{}", (i + 1) % 5), "event": "E", "timestamp": ts})
            }
        };
        out.push(ev);
    }
    out
}

/// Loads `evs` in the given order and split, resolving after each load; the people.
async fn people_after(
    sink: &dyn Sink,
    evs: &[Value],
    splits: &[usize],
    cfg: &IdentityConfig,
) -> Vec<Vec<Option<String>>> {
    let mut start = 0;
    for (n, end) in splits.iter().chain([&evs.len()]).enumerate() {
        if *end > start {
            load(sink, n as i64 + 1, Value::Array(evs[start..*end].to_vec())).await;
            resolve(sink, cfg).await;
        }
        start = *end;
    }
    rows(
        sink,
        "SELECT id_type, id_value, person_id FROM identities ORDER BY id_type, id_value",
    )
    .await
}

// Property: any permutation of the same events, loaded in any split, gives the same
// people (late and replayed events included: every load repeats a few earlier ones).
#[tokio::test]
async fn any_order_of_the_same_events_gives_the_same_people() {
    let cfg = tight_limits();
    let evs = scenario_events();
    let dir = tempfile::tempdir().unwrap();
    let sink = DuckDbSink::open(&dir.path().join("ref.duckdb")).unwrap();
    let want = people_after(&sink, &evs, &[], &cfg).await;
    assert!(want.len() > 10, "{want:?}");
    // The scenario exercises the limits (refusals) and merges, not only easy joins.
    let refused = one(
        &sink,
        "SELECT count(*) FROM identity_edges WHERE status = 'refused'",
    )
    .await;
    let accepted = one(
        &sink,
        "SELECT count(*) FROM identity_edges WHERE status = 'accepted'",
    )
    .await;
    assert!(
        refused.unwrap().parse::<u32>().unwrap() >= 3,
        "too few refusals"
    );
    assert!(
        accepted.unwrap().parse::<u32>().unwrap() >= 5,
        "too few joins"
    );
    for (round, (order, splits)) in shuffles(&evs, 6).into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let sink = DuckDbSink::open(&dir.path().join(format!("w{round}.duckdb"))).unwrap();
        let got = people_after(&sink, &order, &splits, &cfg).await;
        assert_eq!(got, want, "round {round}, splits {splits:?}");
    }
}

/// The scenario's events with traits and consent evidence that change over time, each
/// sent again an hour later (same ids, another message id) with other traits and
/// consent: every pair of ids has events to merge, whichever load each lands in.
fn profile_events() -> Vec<Value> {
    let first = scenario_events();
    let again = first
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let mut e = e.clone();
            e["messageId"] = json!(format!("{}-again", e["messageId"].as_str().unwrap()));
            e["timestamp"] = json!(format!("2026-11-20T10:{:02}:00.000Z", (i * 23) % 60));
            (i + 1, e)
        })
        .collect::<Vec<_>>();
    first
        .into_iter()
        .enumerate()
        .chain(again)
        .map(|(i, mut e)| {
            if e["type"] == "identify" {
                e["traits"]["plan"] = json!(format!("p{}", i % 3));
                e["traits"][format!("k{}", i % 4)] = json!(i);
            }
            let (granted, denied) = if i % 3 == 0 {
                (json!(["analytics", "marketing"]), json!([]))
            } else {
                (json!(["analytics"]), json!(["marketing"]))
            };
            if i % 5 != 4 {
                e["context"] = json!({"consent": {"resolved": {
                    "policy_version": format!("v{}", i % 2), "granted": granted, "denied": denied,
                    "sources": {"analytics": "explicit", "marketing": if i % 2 == 0 { "gpc" } else { "explicit" }}}}});
            }
            e
        })
        .collect()
}

/// Every profile, JSON parsed (key order is not part of a JSON object).
async fn profiles(sink: &dyn Sink) -> Vec<(Vec<Option<String>>, Vec<Value>)> {
    rows(
        sink,
        "SELECT person_id, first_seen, last_seen, event_count,
                CAST(user_ids AS VARCHAR), CAST(anonymous_ids AS VARCHAR), CAST(emails AS VARCHAR),
                CAST(traits AS VARCHAR), CAST(consent AS VARCHAR)
         FROM profiles ORDER BY person_id",
    )
    .await
    .into_iter()
    .map(|mut r| {
        let json = r
            .split_off(4)
            .into_iter()
            .map(|v| serde_json::from_str(&v.unwrap()).unwrap())
            .collect();
        (r, json)
    })
    .collect()
}

// Profiles are kept from each pair of ids' activity, to which each run adds only the
// events it read: loaded in any order and split (replays included), the same events
// give the same profiles as all of them loaded and resolved at once.
async fn profiles_are_the_same_whatever_the_order_and_split(t: &Target) {
    let cfg = tight_limits();
    let evs = profile_events();
    let sink = t.open().await;
    people_after(&*sink, &evs, &[], &cfg).await;
    let want = profiles(&*sink).await;
    drop(sink);
    assert!(want.len() > 5, "{want:?}");
    // The profiles have counts, traits and consent to get wrong.
    assert!(want.iter().any(|(r, j)| r[3].as_deref() != Some("1")
        && j[3].as_object().is_some_and(|o| o.len() >= 2)
        && j[4].as_object().is_some_and(|o| o.len() == 2)));
    for (round, (order, splits)) in shuffles(&evs, 3).into_iter().enumerate() {
        let t = t.fresh();
        let sink = t.open().await;
        people_after(&*sink, &order, &splits, &cfg).await;
        assert_eq!(
            profiles(&*sink).await,
            want,
            "round {round}, splits {splits:?}"
        );
    }
}

// A backlog (many loads waiting, as after a drain of hours of an edge's spool) is read in
// runs of about `events_per_run` events, one transaction each, so its memory is bounded
// by that rather than by the backlog: the same people and profiles as one run over it
// all, and nothing left waiting.
async fn a_backlog_is_resolved_in_runs_of_bounded_size(t: &Target) {
    let mut cfg = tight_limits();
    let evs = profile_events();
    let sink = t.open().await;
    let want_people = people_after(&*sink, &evs, &[], &cfg).await;
    let want = profiles(&*sink).await;
    drop(sink);
    let t = t.fresh();
    let sink = t.open().await;
    let per_load = evs.len().div_ceil(6);
    for (n, chunk) in evs.chunks(per_load).enumerate() {
        load(&*sink, n as i64 + 1, Value::Array(chunk.to_vec())).await;
    }
    cfg.events_per_run = (per_load * 2) as u64;
    let stats = resolve(&*sink, &cfg).await;
    // Two loads a run (the second starts below the bound), six loads.
    assert_eq!(stats.runs, 3, "{stats:?}");
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM identity_pending")
            .await
            .as_deref(),
        Some("0")
    );
    assert_eq!(
        rows(
            &*sink,
            "SELECT id_type, id_value, person_id FROM identities ORDER BY id_type, id_value"
        )
        .await,
        want_people
    );
    assert_eq!(profiles(&*sink).await, want);
    // With nothing waiting, one run (for ids marked dirty), reading nothing.
    let idle = resolve(&*sink, &cfg).await;
    assert_eq!((idle.runs, idle.profiles), (1, 0), "{idle:?}");
}

// A warehouse from before the activity tables (migration 13; the lake's 10): the first
// run after the upgrade computes them from every event, so a profile keeps what its
// person did before.
async fn an_upgraded_warehouse_fills_the_activity_from_every_event(t: &Target) {
    let cfg = IdentityConfig::default();
    let sink = t.open().await;
    load(&*sink, 1, json!([
        {"type": "page", "messageId": "p1", "anonymousId": "a1", "timestamp": "2026-11-20T09:00:00.000Z",
         "context": {"consent": {"resolved": {"policy_version": "v1", "granted": ["analytics"], "denied": [],
                     "sources": {"analytics": "explicit"}}}}},
        {"type": "identify", "messageId": "i1", "anonymousId": "a1", "userId": "u1", "timestamp": "2026-11-20T09:01:00.000Z",
         "traits": {"plan": "free", "seats": 2}},
    ]))
    .await;
    resolve(&*sink, &cfg).await;
    // As the release before left it.
    let version = if matches!(t, Target::Parquet(_)) {
        10
    } else {
        13
    };
    let undo = format!(
        "DROP TABLE collector_id_activity; DROP TABLE collector_id_traits; DROP TABLE collector_id_consent;
         DELETE FROM collector_migrations WHERE version = {version}"
    );
    match t {
        Target::Parquet(dir) => {
            drop(sink);
            ::duckdb::Connection::open(dir.path().join("lake/_collector/state.duckdb"))
                .unwrap()
                .execute_batch(&undo)
                .unwrap();
        }
        _ => {
            for sql in undo.split(';') {
                sink.query(sql).await.unwrap();
            }
            drop(sink);
        }
    }
    let sink = t.open().await;
    load(&*sink, 2, json!([
        {"type": "track", "messageId": "t1", "userId": "u1", "event": "E", "timestamp": "2026-11-20T10:00:00.000Z",
         "context": {"consent": {"resolved": {"policy_version": "v2", "granted": ["marketing"], "denied": [],
                     "sources": {"marketing": "explicit"}}}}},
    ]))
    .await;
    resolve(&*sink, &cfg).await;
    let got = profiles(&*sink).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let (r, j) = &got[0];
    assert_eq!(r[3].as_deref(), Some("3"), "{got:?}");
    assert_eq!(r[1].as_deref(), Some("2026-11-20T09:00:00.000Z"), "{got:?}");
    assert_eq!(j[3], json!({"plan": "free", "seats": 2}));
    assert_eq!(j[4]["analytics"]["policy_version"], json!("v1"), "{got:?}");
    assert_eq!(j[4]["marketing"]["policy_version"], json!("v2"), "{got:?}");
    assert_eq!(
        rows(
            &*sink,
            "SELECT anonymous_id, user_id, event_count FROM collector_id_activity ORDER BY anonymous_id, user_id"
        )
        .await,
        vec![
            vec![s(""), s("u1"), s("1")],
            vec![s("a1"), s(""), s("1")],
            vec![s("a1"), s("u1"), s("1")],
        ]
    );
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM collector_identity_state")
            .await
            .as_deref(),
        Some("0")
    );
}

/// `rounds` shuffles of `evs` (a fixed seed), each with a few replays at the end and
/// three split points.
fn shuffles(evs: &[Value], rounds: usize) -> Vec<(Vec<Value>, Vec<usize>)> {
    let mut seed = 11u64;
    let mut next = |n: usize| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize % n
    };
    (0..rounds)
        .map(|_| {
            let mut order = evs.to_vec();
            for i in (1..order.len()).rev() {
                order.swap(i, next(i + 1));
            }
            // Replays: a few events again at the end.
            for _ in 0..4 {
                let again = order[next(order.len())].clone();
                order.push(again);
            }
            let mut splits: Vec<usize> = (0..3).map(|_| next(order.len())).collect();
            splits.sort();
            (order, splits)
        })
        .collect()
}

/// The limits the order scenarios use (they make refusals common).
fn tight_limits() -> IdentityConfig {
    IdentityConfig {
        limits: Limits {
            email: 2,
            max_ids: 5,
            ..Limits::default()
        },
        ..IdentityConfig::default()
    }
}

// ClickHouse resolves with SQL of its own: the same events, in order or shuffled and
// split, give it the same people and the same edge verdicts as DuckDB.
#[tokio::test]
async fn clickhouse_gives_the_same_people_as_duckdb_in_any_order() {
    same_people_as_duckdb_in_any_order(
        collector_e2e::clickhouse::LocalClickHouse::start().unwrap(),
    )
    .await;
}

#[tokio::test]
async fn current_clickhouse_gives_the_same_people_as_duckdb_in_any_order() {
    same_people_as_duckdb_in_any_order(
        collector_e2e::clickhouse::LocalClickHouse::start_current().unwrap(),
    )
    .await;
}

async fn same_people_as_duckdb_in_any_order(ch: collector_e2e::clickhouse::LocalClickHouse) {
    let cfg = tight_limits();
    let evs = scenario_events();
    let dir = tempfile::tempdir().unwrap();
    let duck = DuckDbSink::open(&dir.path().join("ref.duckdb")).unwrap();
    let want = people_after(&duck, &evs, &[], &cfg).await;
    let verdicts = "SELECT a_type, a_value, b_type, b_value, status, reason FROM identity_edges ORDER BY a_type, a_value, b_type, b_value";
    let want_verdicts = rows(&duck, verdicts).await;
    let mut runs = vec![(evs.clone(), Vec::new())];
    runs.extend(shuffles(&evs, 3));
    for (round, (order, splits)) in runs.into_iter().enumerate() {
        let sink = collector_agent::sinks::clickhouse::ClickHouseSink::connect(
            &collector_agent::config::ClickHouseConfig {
                database: format!("w{round}"),
                ..collector_agent::config::ClickHouseConfig::at(&ch.url)
            },
        )
        .await
        .unwrap();
        let got = people_after(&sink, &order, &splits, &cfg).await;
        assert_eq!(got, want, "round {round}, splits {splits:?}");
        assert_eq!(rows(&sink, verdicts).await, want_verdicts, "round {round}");
    }
}

// The block list means the same in SQL as in Rust.
#[tokio::test]
async fn the_block_list_is_the_same_in_sql_and_in_rust_duckdb() {
    the_block_list_is_the_same_in_sql_and_in_rust(&Target::duckdb()).await;
}

async fn the_block_list_is_the_same_in_sql_and_in_rust(t: &Target) {
    let sink = t.open().await;
    let sink = &*sink;
    let list = collector_core::identity::BlockList::new(["test-user"]);
    let cfg = IdentityConfig {
        block: vec!["test-user".into()],
        ..IdentityConfig::default()
    };
    let values = [
        "",
        "  ",
        "\"\"",
        "'u1'",
        "0",
        "000",
        "-",
        "-1",
        "undefined",
        "NULL",
        " None ",
        "NaN",
        "[object Object]",
        "guest",
        "Test-User",
        "u1",
        "user-42",
        "0a",
        "10",
        "-2",
        "guests",
        "a\"b",
    ];
    let batch: Vec<Value> = values
        .iter()
        .enumerate()
        .map(|(i, v)| json!({"type": "track", "messageId": format!("k{i}"), "anonymousId": format!("anon{i}"), "userId": v, "event": "E"}))
        .collect();
    load(sink, 1, Value::Array(batch)).await;
    resolve(sink, &cfg).await;
    for (i, v) in values.iter().enumerate() {
        let status = rows(
            sink,
            &format!("SELECT e.status FROM tracks t LEFT JOIN identity_edges e ON e.message_id = t.message_id WHERE t.message_id = 'k{i}'"),
        )
        .await;
        // (A user id the collector stored as absent links no one either.)
        let sql_blocked = status[0][0].as_deref() != Some("accepted");
        assert_eq!(sql_blocked, list.blocked(v).is_some(), "{v:?}: {status:?}");
    }
}

mod audiences {
    use super::*;
    use collector_agent::audiences;

    const T0: i64 = 1_795_000_000_000; // 2026-11-19T…, before the events' receipt
    const MIN: i64 = 60_000;

    fn iso(ms: i64) -> String {
        collector_core::timestamp::format_ms(ms)
    }

    fn consent(marketing: bool) -> Value {
        let (granted, denied) = if marketing {
            (json!(["analytics", "marketing"]), json!([]))
        } else {
            (json!(["analytics"]), json!(["marketing"]))
        };
        json!({"consent": {"resolved": {"policy_version": "v1", "granted": granted, "denied": denied,
            "sources": {"analytics": "explicit", "marketing": "explicit"}}}})
    }

    fn seed() -> Vec<audiences::Audience> {
        let src =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../audiences.toml"))
                .unwrap();
        audiences::parse(
            &src,
            Some(&["marketing".to_string(), "analytics".to_string()]),
        )
        .unwrap()
    }

    async fn members(sink: &dyn Sink, audience: &str) -> Vec<Vec<Option<String>>> {
        rows(sink, &format!(
            "SELECT i.id_value FROM audience_membership m JOIN identities i ON i.person_id = m.person_id AND i.id_type = 'anonymous_id'
             WHERE m.audience = '{audience}' AND m.exited_at IS NULL ORDER BY 1")).await
    }

    async fn eval(sink: &dyn Sink, at: i64) -> Vec<audiences::Evaluation> {
        let mut session = sink.session().await.unwrap().unwrap();
        audiences::evaluate(&mut *session, &seed(), at)
            .await
            .unwrap()
    }

    // The seed's two audiences enter and exit at the right times (injected clock), only
    // with marketing consent.
    pub async fn seed_audiences_enter_and_exit_on_time(t: &Target) {
        let sink = t.open().await;
        load(&*sink, 1, json!([
            // v1: pricing now, buys 2 h later.
            {"type": "page", "messageId": "v1p", "anonymousId": "v1", "properties": {"path": "/pricing"}, "timestamp": iso(T0), "context": consent(true)},
            // v2: pricing 8 days ago only.
            {"type": "page", "messageId": "v2p", "anonymousId": "v2", "properties": {"path": "/pricing"}, "timestamp": iso(T0 - 8 * 1440 * MIN), "context": consent(true)},
            // v3: pricing, but no marketing consent.
            {"type": "page", "messageId": "v3p", "anonymousId": "v3", "properties": {"path": "/pricing"}, "timestamp": iso(T0), "context": consent(false)},
            // c1: adds to cart, never orders. c2: adds 25 h ago.
            {"type": "track", "messageId": "c1a", "anonymousId": "c1", "event": "Product Added", "timestamp": iso(T0), "context": consent(true)},
            {"type": "track", "messageId": "c2a", "anonymousId": "c2", "event": "Product Added", "timestamp": iso(T0 - 25 * 60 * MIN), "context": consent(true)},
            // c3: adds, orders 20 min later.
            {"type": "track", "messageId": "c3a", "anonymousId": "c3", "event": "Product Added", "timestamp": iso(T0), "context": consent(true)},
        ]))
        .await;
        resolve(&*sink, &IdentityConfig::default()).await;

        eval(&*sink, T0 + 10 * MIN).await;
        assert_eq!(
            members(&*sink, "pricing_no_purchase_7d").await,
            vec![vec![s("v1")]]
        );
        assert!(
            members(&*sink, "cart_abandoners_15m").await.is_empty(),
            "not yet 15 minutes"
        );

        let e = eval(&*sink, T0 + 16 * MIN).await;
        assert_eq!(
            members(&*sink, "cart_abandoners_15m").await,
            vec![vec![s("c1")], vec![s("c3")]]
        );
        let cart = e
            .iter()
            .find(|e| e.audience == "cart_abandoners_15m")
            .unwrap();
        assert_eq!((cart.entered, cart.exited), (2, 0));

        // c3 orders at +20 min, v1 at +2 h (loaded late, after the fact).
        load(&*sink, 2, json!([
            {"type": "track", "messageId": "c3o", "anonymousId": "c3", "event": "Order Completed", "timestamp": iso(T0 + 20 * MIN), "context": consent(true)},
            {"type": "track", "messageId": "v1o", "anonymousId": "v1", "event": "Order Completed", "timestamp": iso(T0 + 120 * MIN), "context": consent(true)},
        ]))
        .await;
        resolve(&*sink, &IdentityConfig::default()).await;
        let e = eval(&*sink, T0 + 180 * MIN).await;
        assert_eq!(
            members(&*sink, "cart_abandoners_15m").await,
            vec![vec![s("c1")]]
        );
        assert!(members(&*sink, "pricing_no_purchase_7d").await.is_empty());
        let exited: u64 = e.iter().map(|e| e.exited).sum();
        assert_eq!(exited, 2);
        // c1 leaves once its add is more than 24 h old.
        eval(&*sink, T0 + 25 * 60 * MIN).await;
        assert!(members(&*sink, "cart_abandoners_15m").await.is_empty());
        // Every stay is a row: c1 entered at +16 min and exited at +25 h.
        let stays = rows(&*sink,
            "SELECT count(*) FROM audience_membership WHERE audience = 'cart_abandoners_15m' AND exited_at IS NOT NULL").await;
        assert_eq!(stays, vec![vec![s("2")]]);
    }
}

mod audiences_duckdb {
    #[tokio::test]
    async fn seed_audiences_enter_and_exit_on_time() {
        super::audiences::seed_audiences_enter_and_exit_on_time(&super::Target::DuckDb(
            tempfile::tempdir().unwrap(),
        ))
        .await;
    }
}

mod audiences_parquet {
    #[tokio::test]
    async fn seed_audiences_enter_and_exit_on_time() {
        super::audiences::seed_audiences_enter_and_exit_on_time(&super::Target::parquet()).await;
    }
}

mod audiences_clickhouse {
    #[tokio::test]
    async fn seed_audiences_enter_and_exit_on_time() {
        super::audiences::seed_audiences_enter_and_exit_on_time(&super::Target::clickhouse()).await;
    }
}

mod audiences_clickhouse_current {
    #[tokio::test]
    async fn seed_audiences_enter_and_exit_on_time() {
        super::audiences::seed_audiences_enter_and_exit_on_time(
            &super::Target::clickhouse_current(),
        )
        .await;
    }
}

mod audiences_postgres {
    #[tokio::test]
    async fn seed_audiences_enter_and_exit_on_time() {
        super::audiences::seed_audiences_enter_and_exit_on_time(&super::Target::postgres()).await;
    }
}

// `[identity] enabled = false`: this agent loads but leaves people and audiences to
// another (ClickHouse has no lock to share the work safely).
#[tokio::test]
async fn an_agent_with_identity_disabled_leaves_people_alone() {
    let dir = tempfile::tempdir().unwrap();
    let config = |enabled: bool| {
        common::agent_config(
            dir.path(),
            &format!("agent-{enabled}.toml"),
            &format!(
                "[warehouse]\npath = \"{}\"\n[identity]\nenabled = {enabled}\n",
                dir.path().join("w.duckdb").display()
            ),
        )
    };
    let off = config(false);
    let sink = collector_agent::sinks::open(&off.warehouse).await.unwrap();
    load(&*sink, 1, json!([
        {"type": "identify", "messageId": "i1", "anonymousId": "a1", "userId": "u1", "timestamp": "2026-11-20T09:00:00.000Z"},
    ]))
    .await;
    let drainer = collector_agent::Drainer::new(off, sink.clone()).unwrap();
    assert_eq!(drainer.resolve_identity().await.unwrap(), None);
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM identities")
            .await
            .as_deref(),
        Some("0")
    );
    let drainer = collector_agent::Drainer::new(config(true), sink.clone()).unwrap();
    assert_eq!(
        drainer.resolve_identity().await.unwrap().unwrap().new_edges,
        1
    );
}

// A lake that loaded events before it kept an identity graph (its migration 7) gets
// one at the next start: the first run reads every event already in its files (an
// erasure resolves people through this graph), then each run reads only the loads
// since.
#[tokio::test]
async fn a_lake_from_before_identity_resolves_the_events_already_in_its_files() {
    let t = Target::parquet();
    let Target::Parquet(dir) = &t else {
        unreachable!()
    };
    let sink = t.open().await;
    load(&*sink, 1, json!([
        {"type": "page", "messageId": "p1", "anonymousId": "a1", "timestamp": "2026-11-20T09:00:00.000Z"},
        {"type": "identify", "messageId": "i1", "anonymousId": "a1", "userId": "u1", "timestamp": "2026-11-20T09:01:00.000Z"}
    ]))
    .await;
    drop(sink);
    // As a lake of the release before: no identity tables, no pending loads.
    ::duckdb::Connection::open(dir.path().join("lake/_collector/state.duckdb"))
        .unwrap()
        .execute_batch(
            "DROP TABLE identity_edges; DROP TABLE identities; DROP TABLE identity_merges; DROP TABLE profiles;
             DROP TABLE collector_identity_state; DROP TABLE identity_dirty; DROP TABLE identity_pending;
             DROP TABLE audience_membership; DELETE FROM collector_migrations WHERE version IN (7, 12);",
        )
        .unwrap();
    let sink = t.open().await;
    let cfg = IdentityConfig::default();
    resolve(&*sink, &cfg).await;
    let p = person(&*sink, "user_id", "u1").await.unwrap();
    assert_eq!(
        person(&*sink, "anonymous_id", "a1").await.as_deref(),
        Some(p.as_str())
    );
    assert_eq!(
        one(&*sink, "SELECT event_count FROM profiles")
            .await
            .as_deref(),
        Some("2")
    );
    load(&*sink, 2, json!([
        {"type": "track", "messageId": "t1", "userId": "u1", "event": "E", "timestamp": "2026-11-20T10:00:00.000Z"}
    ]))
    .await;
    let next = resolve(&*sink, &cfg).await;
    assert_eq!(next.new_edges, 0);
    assert_eq!(
        one(&*sink, "SELECT event_count FROM profiles")
            .await
            .as_deref(),
        Some("3")
    );
    assert_eq!(
        one(&*sink, "SELECT count(*) FROM identity_pending")
            .await
            .as_deref(),
        Some("0")
    );
}

// The README's lean DuckDB settings (a 32MB cap, small row groups, one thread): a run
// over 10,000 events fits a small pool. Its scan read every event table in one
// `UNION ALL`, whose branches DuckDB holds at once: about 30MB for these events (the
// lean drain bench's ran out of memory there in every run, and the limit was doubled
// for good); with a statement per table the whole run fits 28MB (not 24MB), which is
// the pool here: the test fails with the `UNION ALL` (checked).
#[tokio::test]
async fn a_run_reads_its_events_within_a_small_memory_pool() {
    let dir = tempfile::tempdir().unwrap();
    let sink = DuckDbSink::open_config(&collector_agent::config::DuckDbConfig {
        path: dir.path().join("w.duckdb"),
        memory_cap: Some("32MB".into()),
        row_group_size: Some(16384),
        threads: Some(1),
        ..Default::default()
    })
    .unwrap();
    // 20 loads of 500 (a batch's size is bounded).
    for l in 0..20 {
        let batch: Vec<Value> = (0..500)
            .map(|i| {
                json!({
                    "type": "track", "event": if i % 3 == 0 { "Order Completed" } else { "Product Viewed" },
                    "messageId": format!("m{l}-{i}"), "anonymousId": format!("anon-{}", (l * 500 + i) % 1000),
                    "properties": {"plan": "pro", "price": 19.99, "sku": format!("SKU-{i}")},
                    "context": {
                        "library": {"name": "analytics.js", "version": "5.2.1"},
                        "page": {"path": "/checkout", "url": "https://shop.example/checkout?step=2"},
                        "ip": "203.0.113.0",
                        "consent": {"resolved": {"policy_version": "2026-11-01", "region": "EU",
                            "granted": ["necessary", "analytics"], "denied": ["marketing", "personalization", "sms"],
                            "sources": {"analytics": "tcf", "marketing": "default", "necessary": "always"}, "gpc": false}}
                    },
                    "timestamp": "2026-11-24T12:00:00.000Z"
                })
            })
            .collect();
        load(&sink, l, Value::Array(batch)).await;
    }
    sink.query("SET memory_limit = '28MB'").await.unwrap();
    let stats = resolve(&sink, &IdentityConfig::default()).await;
    assert_eq!(stats.refused, 0);
    assert_eq!(
        one(&sink, "SELECT count(*) FROM profiles").await.as_deref(),
        Some("1000")
    );
}
