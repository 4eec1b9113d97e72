mod common;
use common::{rows, Target};
#[tokio::test]
async fn probe() {
    let t = Target::duckdb();
    let sink = t.open().await;
    for q in [
        "select arg_max(x, (t, m)) filter (where x is not null) from (values ('a', 1, 'z'), (null, 3, 'a'), ('b', 2, 'b'), ('c', 2, 'c')) v(x, t, m)",
        "select arg_max(x, {'t': t, 'm': m}) filter (where x is not null) from (values ('a', 1, 'z'), (null, 3, 'a'), ('b', 2, 'b'), ('c', 2, 'c')) v(x, t, m)",
        "select greatest(NULL, 1), greatest(2, NULL)",
    ] {
        eprintln!("{q}\n -> {:?}", sink.query(q).await.map(|r| r.rows));
    }
    let _ = rows;
}
