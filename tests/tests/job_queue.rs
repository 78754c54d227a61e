//! The shim's cluster job queue on a real PostgreSQL (Debian's postgresql
//! package, started here in a private data directory).

use crank_tests::postgres::Postgres;

#[test]
fn postgres_keeps_its_data_across_a_restart() {
    let mut pg = Postgres::start();
    pg.psql("crank", "CREATE TABLE t (v int); INSERT INTO t VALUES (7)");
    pg.restart();
    assert_eq!(pg.psql("crank", "SELECT v FROM t"), "7", "{}", pg.log());
}
