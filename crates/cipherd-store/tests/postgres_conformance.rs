//! Runs the store conformance suite against the PostgreSQL backend on the real
//! server (a fresh database per property), plus what only a shared backend has:
//! replicas that see each other's writes, compare-and-set across instances, the
//! listener's reconnection; and the backend's own checks: refusing a newer schema
//! or a rewound sequence, TLS verify-full, and which failures are UNAVAILABLE.
//!
//! Needs PostgreSQL (see `support/postgres.rs`): `make test` starts it; run alone,
//! `scripts/ensure-postgres.sh` first.

#[path = "support/postgres.rs"]
mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cipherd_store::{Change, Error, PostgresConfig, PostgresStore, Store, conformance};
use sqlx::{Connection, Executor};
use support::TestDatabase;
use tokio::sync::broadcast;

/// How long a test waits for a change to arrive.
const WAIT: Duration = Duration::from_secs(10);

async fn open(db: &TestDatabase) -> PostgresStore {
    let config = PostgresConfig::new(db.url()).expect("test URL");
    PostgresStore::open(&config)
        .await
        .expect("open PostgreSQL store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_conforms() {
    let databases: Arc<Mutex<Vec<TestDatabase>>> = Arc::default();
    conformance::run(|| {
        let databases = Arc::clone(&databases);
        async move {
            let db = TestDatabase::create("conformance").await;
            let store = open(&db).await;
            databases.lock().expect("not poisoned").push(db);
            store
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_replica_reaches_the_others_feed() {
    let db = TestDatabase::create("replicas").await;
    let one = open(&db).await;
    let other = open(&db).await;
    let mut feed = other.subscribe();

    let created = one.create("keys/a", b"v1").await.expect("create");
    assert_eq!(
        next_record_change(&mut feed).await,
        Change {
            path: "keys/a".into(),
            revision: Some(created)
        }
    );
    let updated = one
        .compare_and_set("keys/a", created, b"v2")
        .await
        .expect("cas");
    assert_eq!(next_record_change(&mut feed).await.revision, Some(updated));
    // The other replica reads the write and builds on it.
    let record = other.get("keys/a").await.expect("get").expect("record");
    assert_eq!(
        (record.value.as_slice(), record.revision),
        (&b"v2"[..], updated)
    );
    other.delete("keys/a", updated).await.expect("delete");
    let mut own = one.subscribe();
    let marker = other.create("keys/m", b"m").await.expect("create marker");
    assert_eq!(
        next_record_change(&mut feed).await,
        Change {
            path: "keys/a".into(),
            revision: None
        }
    );
    // `own` may still hear of the delete, which was in flight when it subscribed.
    let mut seen = next_record_change(&mut own).await;
    if seen.path == "keys/a" {
        seen = next_record_change(&mut own).await;
    }
    assert_eq!(
        seen,
        Change {
            path: "keys/m".into(),
            revision: Some(marker)
        }
    );
    // A stale compare-and-set through the first replica is refused.
    assert!(matches!(
        one.compare_and_set("keys/a", updated, b"stale").await,
        Err(Error::Conflict { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_is_exclusive_across_instances() {
    const TASKS_PER_STORE: u64 = 12;
    let db = TestDatabase::create("cas_across").await;
    let stores = [Arc::new(open(&db).await), Arc::new(open(&db).await)];
    stores[0]
        .create("counter", &0u64.to_be_bytes())
        .await
        .expect("create");
    let mut tasks = Vec::new();
    for store in &stores {
        for _ in 0..TASKS_PER_STORE {
            let store = Arc::clone(store);
            tasks.push(tokio::spawn(async move {
                loop {
                    let record = store.get("counter").await.expect("get").expect("record");
                    let n = u64::from_be_bytes(record.value.try_into().expect("8 bytes"));
                    match store
                        .compare_and_set("counter", record.revision, &(n + 1).to_be_bytes())
                        .await
                    {
                        Ok(_) => return record.revision,
                        Err(Error::Conflict { .. }) => tokio::task::yield_now().await,
                        Err(e) => panic!("compare_and_set: {e}"),
                    }
                }
            }));
        }
    }
    let mut won_on = std::collections::BTreeSet::new();
    for task in tasks {
        let revision = task.await.expect("task");
        assert!(
            won_on.insert(revision),
            "two writers won on revision {revision}"
        );
    }
    let record = stores[1]
        .get("counter")
        .await
        .expect("get")
        .expect("record");
    let total = u64::from_be_bytes(record.value.try_into().expect("8 bytes"));
    assert_eq!(total, 2 * TASKS_PER_STORE, "lost updates across instances");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_listener_reconnects_and_tells_subscribers_to_resync() {
    let db = TestDatabase::create("reconnect").await;
    let store = open(&db).await;
    let mut feed = store.subscribe();
    let before = store.create("keys/before", b"x").await.expect("create");
    assert_eq!(next_record_change(&mut feed).await.revision, Some(before));

    // Kill the listener's connection from the server side.
    let mut admin = db.admin().await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND application_name = 'cipherd-listener'",
    )
    .bind(db.name())
    .fetch_all(&mut admin)
    .await
    .expect("terminate the listener");
    assert_eq!(killed, [true], "exactly one listener connection");

    // The subscriber is told it may have missed changes…
    let told = tokio::time::timeout(WAIT, feed.recv()).await;
    assert!(
        matches!(&told, Ok(Ok(change)) if change.is_resync()),
        "expected the resync marker within {WAIT:?} of losing the listener, got {told:?}"
    );
    // …and the feed works again afterwards, for writes from anywhere.
    let after = store.create("keys/after", b"y").await.expect("create");
    assert_eq!(
        next_record_change(&mut feed).await,
        Change {
            path: "keys/after".into(),
            revision: Some(after)
        }
    );
    // A write made behind cipherd's back (by hand, in SQL) is announced too.
    let mut conn = sqlx::PgConnection::connect(db.url())
        .await
        .expect("connect");
    let by_hand: i64 = sqlx::query_scalar(
        "INSERT INTO records (path, value, revision) \
         VALUES ('keys/by-hand', '\\x00', nextval('revisions')) RETURNING revision",
    )
    .fetch_one(&mut conn)
    .await
    .expect("insert by hand");
    assert_eq!(
        next_record_change(&mut feed).await,
        Change {
            path: "keys/by-hand".into(),
            revision: Some(u64::try_from(by_hand).expect("positive"))
        }
    );
    let _ = conn.close().await;
    let _ = admin.close().await;
}

/// With `resync_interval` set, subscribers are told to resync periodically
/// although no connection was lost, and notifications keep flowing between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_resyncs_periodically() {
    let db = TestDatabase::create("periodic_resync").await;
    let mut config = PostgresConfig::new(db.url()).expect("test URL");
    config.resync_interval = Duration::from_millis(200);
    let store = PostgresStore::open(&config).await.expect("open");
    let mut feed = store.subscribe();
    for round in 0..2 {
        let told = tokio::time::timeout(WAIT, feed.recv()).await;
        assert!(
            matches!(&told, Ok(Ok(change)) if change.is_resync()),
            "round {round}: expected a periodic resync within {WAIT:?}, got {told:?}"
        );
        let rev = store
            .create(&format!("keys/periodic-{round}"), b"x")
            .await
            .expect("create");
        assert_eq!(next_record_change(&mut feed).await.revision, Some(rev));
    }
    // The default: every 5 minutes, never zero.
    assert_eq!(
        PostgresConfig::new(db.url())
            .expect("test URL")
            .resync_interval,
        Duration::from_secs(300)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_database_from_a_newer_schema() {
    let db = TestDatabase::create("newer_schema").await;
    let store = open(&db).await;
    store.create("keys/a", b"x").await.expect("create");
    let mut conn = sqlx::PgConnection::connect(db.url())
        .await
        .expect("connect");
    conn.execute(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (999, 'from the future', true, '\\x00', 0)",
    )
    .await
    .expect("fake a newer migration");
    let _ = conn.close().await;
    store.close().await;
    drop(store);

    let config = PostgresConfig::new(db.url()).expect("test URL");
    let err = PostgresStore::open(&config)
        .await
        .expect_err("open must refuse a newer schema");
    assert!(matches!(err, Error::Backend(_)), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("schema version 999") && message.contains("newer"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_revision_sequence_behind_the_records() {
    let db = TestDatabase::create("sequence_behind").await;
    let store = open(&db).await;
    store.create("keys/a", b"x").await.expect("create");
    store.create("keys/b", b"x").await.expect("create");
    let mut conn = sqlx::PgConnection::connect(db.url())
        .await
        .expect("connect");
    conn.execute("SELECT setval('revisions', 1)")
        .await
        .expect("rewind the sequence");
    let _ = conn.close().await;
    store.close().await;
    drop(store);
    let config = PostgresConfig::new(db.url()).expect("test URL");
    let err = PostgresStore::open(&config).await.expect_err("must refuse");
    assert!(matches!(err, Error::Corrupt(_)), "{err:?}");
    assert!(err.to_string().contains("revision sequence"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_a_server_whose_certificate_is_not_from_the_ca() {
    let db = TestDatabase::create("tls").await;
    // A CA that never signed the server's certificate (if the server has TLS at
    // all): verify-full must refuse to connect, where the default `prefer` would
    // have connected.
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().expect("CA key");
    let ca = params.self_signed(&key).expect("self-signed CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write CA");

    let mut config = PostgresConfig::new(db.url()).expect("test URL");
    config.ca_file = Some(ca_file);
    let err = PostgresStore::open(&config)
        .await
        .expect_err("verify-full with the wrong CA must not connect");
    // Misconfiguration, not a passing outage: not retried.
    assert!(matches!(err, Error::Backend(_)), "{err:?}");
    assert!(
        err.to_string().contains("verify-full"),
        "names the mode: {err}"
    );
    // Without the CA the same database opens.
    config.ca_file = None;
    open_config(&config).await;
}

async fn open_config(config: &PostgresConfig) -> PostgresStore {
    PostgresStore::open(config)
        .await
        .expect("open PostgreSQL store")
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_and_the_password_stays_out() {
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let config = PostgresConfig::new("postgres://cipherd:hunter2-secret@127.0.0.1:1/cipherd")
        .expect("valid URL");
    let err = PostgresStore::open(&config)
        .await
        .expect_err("nothing listens there");
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("hunter2-secret"), "{shown}");
    assert!(
        shown.contains("127.0.0.1:1"),
        "the message names the server: {shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_past_its_timeout_is_unavailable() {
    let db = TestDatabase::create("statement_timeout").await;
    let mut config = PostgresConfig::new(db.url()).expect("test URL");
    config.statement_timeout = Duration::from_millis(200);
    let store = open_config(&config).await;
    let revision = store.create("keys/a", b"x").await.expect("create");
    // Another session holds the row lock, so the compare-and-set waits on it
    // until PostgreSQL cancels the statement.
    let mut holder = sqlx::PgConnection::connect(db.url())
        .await
        .expect("connect");
    holder.execute("BEGIN").await.expect("begin");
    holder
        .execute("SELECT 1 FROM records WHERE path = 'keys/a' FOR UPDATE")
        .await
        .expect("lock the row");
    let started = std::time::Instant::now();
    let err = store
        .compare_and_set("keys/a", revision, b"y")
        .await
        .expect_err("the row is locked past the timeout");
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert!(started.elapsed() < WAIT, "took {:?}", started.elapsed());
    holder.execute("ROLLBACK").await.expect("rollback");
    let _ = holder.close().await;
    // Nothing was written; with the lock gone the same write succeeds.
    store
        .compare_and_set("keys/a", revision, b"y")
        .await
        .expect("compare-and-set after the lock is released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_dropped_after_its_first_poll_still_commits_and_is_announced() {
    let db = TestDatabase::create("cancelled").await;
    let store = open(&db).await;
    let mut feed = store.subscribe();
    let write = store.create("keys/a", b"x");
    // Poll the write once (it starts), then drop it.
    tokio::select! {
        biased;
        _ = write => panic!("a write to PostgreSQL cannot finish within its first poll"),
        () = std::future::ready(()) => {}
    }
    let change = next_record_change(&mut feed).await;
    assert_eq!(change.path, "keys/a");
    let record = store.get("keys/a").await.expect("get").expect("committed");
    assert_eq!(change.revision, Some(record.revision));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_store_is_unavailable() {
    let db = TestDatabase::create("closed").await;
    let store = open(&db).await;
    store.close().await;
    assert!(matches!(store.ping().await, Err(Error::Unavailable(_))));
    assert!(matches!(
        store.create("a", b"x").await,
        Err(Error::Unavailable(_))
    ));
}

/// The next change naming a record (skipping resync markers), failing on
/// timeout, lag or close.
async fn next_record_change(feed: &mut broadcast::Receiver<Change>) -> Change {
    loop {
        match tokio::time::timeout(WAIT, feed.recv()).await {
            Err(_) => panic!("no change within {WAIT:?}"),
            Ok(Ok(change)) if change.is_resync() => {}
            Ok(Ok(change)) => return change,
            Ok(Err(e)) => panic!("change feed: {e}"),
        }
    }
}
