//! cipherd on PostgreSQL: a dev-mode server on a fresh database keeps its keys
//! across a restart, and two replicas sharing one database see each other's
//! rotations (a newer version in a ciphertext at once; for encryption through
//! the change feed over LISTEN/NOTIFY), and a replica whose listener was cut off
//! while a token was revoked reloads once it is back (the resync), so the
//! revoked token stops working there too; and on a private cluster of its own,
//! a database outage (stopped with `pg_ctl stop -m immediate`, started again)
//! that cached keys serve through and that both replicas recover from without a
//! restart; and three replicas sharing rotations, revocations, scheduled
//! deletions and scheduled rotations (once a period).
//!
//! Needs PostgreSQL: `make test` starts it (`scripts/ensure-postgres.sh`).
#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use std::{
    os::unix::fs::PermissionsExt as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use cipherd_e2e::{
    Client, Code, EncryptOptions, TestServer, create_key, decrypt, encrypt, expect_err, get_key,
    pb, reply, rotate,
};
use cipherd_server::{DEV_SHARE_FILE, config::StorageParams};
use cipherd_store::PostgresConfig;
use cipherd_test_support::postgres::{TestDatabase, params_on};
use sqlx::{AssertSqlSafe, Executor};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dev_server_on_postgres_keeps_its_keys_across_a_restart() {
    let db = TestDatabase::create("e2e_restart").await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(params_on(&db, dir.path(), true)).await;
    let client = server.client().await;
    create_key(&client, "patients", pb::KeyType::Aes256Gcm96).await;
    let sealed = encrypt(&client, "patients", b"record 1").await.ciphertext;
    drop(client);
    server.stop().await;

    let server = TestServer::start(params_on(&db, dir.path(), true)).await;
    let client = server.client().await;
    let status = client.status().await.unwrap();
    assert!(status.initialized && !status.sealed, "{status:?}");
    assert_eq!(status.storage, "postgres");
    assert_eq!(
        decrypt(&client, "patients", &sealed).await.unwrap(),
        &b"record 1"[..]
    );
    // The key goes on where it left off.
    assert_eq!(rotate(&client, "patients").await.latest_version, 2);
    drop(client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_on_one_replica_is_usable_on_the_other_at_once() {
    let db = TestDatabase::create("e2e_replicas").await;
    let (first, _first_dir, second, _second_dir) = two_replicas(&db).await;
    let token = first.root_token().expect("dev root token");
    let one = first.client().await;
    let other = second.client_with_token(&token).await;

    create_key(&one, "shared", pb::KeyType::Aes256Gcm96).await;
    let v1 = encrypt(&one, "shared", b"from one").await.ciphertext;
    assert_eq!(
        decrypt(&other, "shared", &v1).await.unwrap(),
        &b"from one"[..]
    );
    // The other replica has the key cached at version 1 now; rotate on the first.
    assert_eq!(rotate(&one, "shared").await.latest_version, 2);
    let v2 = encrypt(&one, "shared", b"after rotation").await;
    assert_eq!(v2.key_version, 2);
    assert_eq!(
        decrypt(&other, "shared", &v2.ciphertext).await.unwrap(),
        &b"after rotation"[..]
    );
    // Encrypting picks the latest version from the cache, which only the change
    // feed (NOTIFY from the first replica) invalidates: wait for it to arrive.
    create_key(&one, "fed", pb::KeyType::Aes256Gcm96).await;
    assert_eq!(encrypt(&other, "fed", b"x").await.key_version, 1);
    rotate(&one, "fed").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let version = encrypt(&other, "fed", b"x").await.key_version;
        if version == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other replica still encrypts under version {version} 10 s after the rotation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop((one, other));
    second.stop().await;
    first.stop().await;
}

/// A token created through one replica works on another at once, even when
/// that replica's change feed is cut off: it reads an unknown token from the
/// database before refusing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_token_works_on_another_replica_before_its_notification() {
    let db = TestDatabase::create("e2e_token_miss").await;
    let (first, _first_dir, second, _second_dir) = two_replicas(&db).await;
    let admin_a = first.client().await;
    // Warm both replicas' pools, then cut their listeners off and keep them off.
    let on_b_root = second
        .client_with_token(&first.root_token().expect("dev root token"))
        .await;
    on_b_root.lookup_token(None).await.unwrap();
    let mut admin = cut_off_listeners(&db).await;

    let created = admin_a
        .create_token(vec!["root".into()], None, "miss-test")
        .await
        .unwrap();
    let on_b = second
        .client_with_token(created.token.expose_secret())
        .await;
    let info = on_b.lookup_token(None).await.expect("accepted at once");
    assert_eq!(info.accessor, created.info.accessor);

    allow_connections(&mut admin, &db, true).await;
    drop((admin_a, on_b, on_b_root));
    second.stop().await;
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_feed_was_cut_off_still_learns_of_a_revocation() {
    let db = TestDatabase::create("e2e_resync").await;
    let (first, _first_dir, second, _second_dir) = two_replicas(&db).await;
    let admin_a = first.client().await;
    let created = admin_a
        .create_token(vec!["root".into()], None, "resync-test")
        .await
        .unwrap();
    let accessor = created.info.accessor.clone();
    let on_b = second
        .client_with_token(created.token.expose_secret())
        .await;
    // The second replica learns of the new token from the change feed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = on_b.lookup_token(None).await {
        assert!(
            Instant::now() < deadline,
            "the second replica still refuses the new token 10 s after it was created: {e}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Cut both replicas' listeners off, and keep them off (no new connection to
    // the database) while the token is revoked through the first replica: the
    // second cannot hear of it.
    let mut admin = cut_off_listeners(&db).await;
    admin_a.revoke_token(&accessor).await.unwrap();
    assert!(
        on_b.lookup_token(None).await.is_ok(),
        "the second replica cannot have heard of the revocation yet"
    );

    // Once the listener is back, the replica reloads what it caches (the
    // resync), so the revoked token stops working there too.
    allow_connections(&mut admin, &db, true).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match on_b.lookup_token(None).await {
            Err(e) if e.code() == Some(Code::Unauthenticated) => break,
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "the second replica still accepts a token revoked 30 s ago"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop((admin_a, on_b));
    second.stop().await;
    first.stop().await;
}

/// Refuses new connections to `db` and terminates both replicas' change-feed
/// listeners, so that neither hears of changes until connections are allowed
/// again; their pools' open connections keep working. Returns the admin
/// connection that did it.
async fn cut_off_listeners(db: &TestDatabase) -> sqlx::PgConnection {
    let mut admin = db.admin().await;
    allow_connections(&mut admin, db, false).await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND application_name = 'cipherd-listener'",
    )
    .bind(db.name())
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(killed, [true, true], "one listener per replica");
    admin
}

async fn allow_connections(admin: &mut sqlx::PgConnection, db: &TestDatabase, allow: bool) {
    let database = db.name();
    admin
        .execute(AssertSqlSafe(format!(
            "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS {allow}"
        )))
        .await
        .unwrap();
}

/// Two dev-mode replicas on `db`, each with its own data dir, unsealed with the
/// same dev share.
async fn two_replicas(
    db: &TestDatabase,
) -> (TestServer, tempfile::TempDir, TestServer, tempfile::TempDir) {
    let first_dir = tempfile::tempdir().unwrap();
    let first = TestServer::start(params_on(db, first_dir.path(), true)).await;
    let second_dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        first_dir.path().join(DEV_SHARE_FILE),
        second_dir.path().join(DEV_SHARE_FILE),
    )
    .unwrap();
    let second = TestServer::start(params_on(db, second_dir.path(), true)).await;
    (first, first_dir, second, second_dir)
}

/// PostgreSQL stopped (`pg_ctl stop -m immediate`) under load, then started again,
/// with two replicas and without restarting them: encryption and decryption on
/// cached keys go on throughout; a 96-bit-nonce version that needs a new usage
/// block fails closed (UNAVAILABLE, and every encryption it did answer is in its
/// durable count); admin writes answer UNAVAILABLE and health turns NOT_SERVING;
/// once the database is back, health is SERVING, admin writes work and the change
/// feed carries a rotation to the other replica again. The shared cluster serves
/// other tests, so this one runs a private cluster of its own ([`PrivateCluster`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_keeps_cached_keys_serving_and_recovers_without_a_restart() {
    const BLOCK: u64 = 16;
    let mut cluster = PrivateCluster::create().await;
    let params = |dir: &std::path::Path| {
        let mut params = cipherd_server::Params::for_data_dir(dir, true);
        params.storage = StorageParams::Postgres {
            config: PostgresConfig::new(cluster.url()).unwrap(),
        };
        params.usage.reservation_block = BLOCK;
        params
    };
    let first_dir = tempfile::tempdir().unwrap();
    let first = TestServer::start(params(first_dir.path())).await;
    let second_dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        first_dir.path().join(DEV_SHARE_FILE),
        second_dir.path().join(DEV_SHARE_FILE),
    )
    .unwrap();
    let second = TestServer::start(params(second_dir.path())).await;
    let token = first.root_token().unwrap();
    // No client retries: every call below is answered the first time, or the
    // test sees the failure.
    let connect = |server: &TestServer| {
        let options = cipherd_client::ClientOptions {
            retries: 0,
            ..server.client_options().with_token(token.as_str())
        };
        let endpoint = server.endpoint();
        async move { Client::connect_with(endpoint, options).await.unwrap() }
    };
    let one = connect(&first).await;
    let other = connect(&second).await;
    create_key(&one, "steady", pb::KeyType::Xaes256Gcm).await;
    create_key(&one, "counted", pb::KeyType::Aes256Gcm96).await;
    // Both keys cached on both replicas, and a usage block reserved on the first.
    for client in [&one, &other] {
        for key in ["steady", "counted"] {
            let sealed = encrypt(client, key, b"warm").await.ciphertext;
            decrypt(client, key, &sealed).await.unwrap();
        }
    }
    let mut counted_ok: u64 = 1;
    let health = |server: &TestServer| {
        let endpoint = server.endpoint();
        async move {
            let channel = tonic::transport::Channel::from_shared(endpoint)
                .unwrap()
                .connect()
                .await
                .unwrap();
            HealthClient::new(channel)
        }
    };
    let mut health_one = health(&first).await;
    assert_eq!(serving(&mut health_one).await, ServingStatus::Serving);

    // A load of encrypt/decrypt on the cached key through both replicas, for the
    // whole test: every call must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = [one.clone(), other.clone()]
        .into_iter()
        .map(|client| {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut done = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let plaintext = format!("row {done}");
                    let sealed = client
                        .encrypt("steady", plaintext.clone(), &EncryptOptions::default())
                        .await
                        .unwrap_or_else(|e| panic!("encrypt {done}: {e}"));
                    let back = client
                        .decrypt("steady", sealed.ciphertext, Bytes::new(), Bytes::new())
                        .await
                        .unwrap_or_else(|e| panic!("decrypt {done}: {e}"));
                    assert_eq!(back.plaintext, plaintext.as_bytes());
                    done += 1;
                }
                done
            })
        })
        .collect();

    cluster.stop_immediately().await;
    let outage = Instant::now();
    // Health turns NOT_SERVING (the store probe's ping fails).
    let deadline = Instant::now() + Duration::from_secs(15);
    while serving(&mut health_one).await != ServingStatus::NotServing {
        assert!(
            Instant::now() < deadline,
            "still SERVING 15 s into the outage"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let not_serving = outage.elapsed();
    // Admin writes: UNAVAILABLE (retryable), never anything else, once the pool
    // gives up on a connection (its acquire timeout, 10 s).
    let started = Instant::now();
    let create = reply(
        one.admin()
            .create_key(pb::CreateKeyRequest {
                name: "during".into(),
                ..Default::default()
            })
            .await,
    );
    expect_err(create, Code::Unavailable, "STORAGE_UNAVAILABLE");
    let create_refused = started.elapsed();
    let started = Instant::now();
    let rotation = reply(
        one.admin()
            .rotate_key(pb::RotateKeyRequest {
                name: "steady".into(),
            })
            .await,
    );
    expect_err(rotation, Code::Unavailable, "STORAGE_UNAVAILABLE");
    let rotate_refused = started.elapsed();
    for took in [create_refused, rotate_refused] {
        assert!(
            took < Duration::from_secs(20),
            "an admin write took {took:?} to fail"
        );
    }
    // The 96-bit-nonce key: what is left of its block (reserved before the
    // outage), then UNAVAILABLE (a new block needs a durable write), never an
    // encryption beyond what was reserved.
    let mut counted_during: u64 = 0;
    let started = Instant::now();
    let refused = loop {
        match one
            .transit()
            .encrypt(pb::EncryptRequest {
                key: "counted".into(),
                plaintext: Bytes::from_static(b"counted"),
                ..Default::default()
            })
            .await
        {
            Ok(_) => counted_during += 1,
            Err(status) => break cipherd_client::Error::from(status),
        }
        assert!(
            counted_during < BLOCK,
            "{counted_during} encryptions during the outage, out of a block of {BLOCK} \
             of which one was used before"
        );
    };
    expect_err::<()>(Err(refused), Code::Unavailable, "STORAGE_UNAVAILABLE");
    let block_refused = started.elapsed();
    counted_ok += counted_during;
    // The load goes on meanwhile (checked by its tasks); let it run a while into
    // the outage: until the first replica's health has flipped and then some.
    let during = Instant::now();
    while during.elapsed() < Duration::from_secs(2) {
        decrypt(
            &other,
            "steady",
            &encrypt(&other, "steady", b"outage").await.ciphertext,
        )
        .await
        .unwrap();
    }

    let down = outage.elapsed();
    cluster.start().await;
    let restarted = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    while serving(&mut health_one).await != ServingStatus::Serving {
        assert!(
            Instant::now() < deadline,
            "NOT_SERVING 30 s after the database came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered = restarted.elapsed();
    // Admin writes work again, and the rotation reaches the other replica through
    // the change feed (its listener reconnected on its own).
    create_key(&one, "after", pb::KeyType::Xaes256Gcm).await;
    assert_eq!(rotate(&one, "steady").await.latest_version, 2);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let version = encrypt(&other, "steady", b"x").await.key_version;
        if version == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other replica still encrypts under version {version} 30 s after the rotation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fed = restarted.elapsed();
    // The counted key reserves blocks again, and its durable count covers every
    // encryption it ever answered.
    encrypt(&one, "counted", b"again").await;
    counted_ok += 1;
    let key = get_key(&one, "counted").await;
    assert!(
        key.versions[0].encryptions > counted_ok,
        "count {} not above the {} encryptions answered here (the other replica did one more)",
        key.versions[0].encryptions,
        counted_ok
    );

    stop.store(true, Ordering::Relaxed);
    let mut loaded = 0;
    for task in load {
        loaded += task.await.expect("the load never failed");
    }
    eprintln!(
        "outage: NOT_SERVING {not_serving:?} after the stop; CreateKey refused in {create_refused:?}, \
         RotateKey in {rotate_refused:?}; the counted key did {counted_during} encryptions, then \
         was refused (in {block_refused:?}); database down for {down:?}; SERVING {recovered:?} \
         after it was back; the rotation on the other replica {fed:?} after it was back; {loaded} \
         encrypt+decrypt pairs under load, none failed; counted key: {counted_ok} encryptions \
         answered by this replica, durable count {count}",
        count = key.versions[0].encryptions
    );
    assert!(loaded > 0);
    drop((one, other));
    second.stop().await;
    first.stop().await;
}

/// The gated health status (service "").
async fn serving(health: &mut HealthClient<tonic::transport::Channel>) -> ServingStatus {
    health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// A PostgreSQL cluster of one test's own, in a temp dir, on a free port of
/// 127.0.0.1, so that the test may stop it without disturbing the shared one.
/// Its binaries are PostgreSQL 15's Debian paths, or `CIPHERD_TEST_PG_BIN`. It
/// runs as the `postgres` user when the test runs as root (initdb refuses root).
/// Stopped (immediately) when dropped.
struct PrivateCluster {
    dir: tempfile::TempDir,
    port: u16,
    running: bool,
}

impl PrivateCluster {
    /// initdb, then [`PrivateCluster::start`].
    async fn create() -> Self {
        let dir = tempfile::tempdir().unwrap();
        if is_root() {
            // The temp dir is root's (mode 0700): open it to the cluster's user.
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            run(std::process::Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path()))
            .await;
        }
        let mut cluster = Self {
            dir,
            port: 0,
            running: false,
        };
        let mut initdb = cluster.pg_command("initdb");
        initdb
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(cluster.data());
        run(&mut initdb).await;
        // A port nobody listens on now (the cluster binds it a moment later).
        cluster.port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        cluster.start().await;
        cluster
    }

    /// `pg_ctl start`, waiting until it accepts connections (pg_ctl -w polls);
    /// also after [`PrivateCluster::stop_immediately`].
    async fn start(&mut self) {
        let mut start = self.pg_command("pg_ctl");
        start
            .args(["-w", "-t", "60", "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .arg("-o")
            .arg(format!(
                "-p {} -c listen_addresses=127.0.0.1 -k {}",
                self.port,
                self.dir.path().display()
            ))
            .arg("start");
        run(&mut start).await;
        self.running = true;
    }

    /// `pg_ctl stop -m immediate`: every backend killed, no checkpoint (crash
    /// recovery at the next start).
    async fn stop_immediately(&mut self) {
        let mut stop = self.pg_command("pg_ctl");
        stop.args(["-w", "-m", "immediate", "-D"])
            .arg(self.data())
            .arg("stop");
        run(&mut stop).await;
        self.running = false;
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    /// A PostgreSQL program, as the `postgres` user when we are root.
    fn pg_command(&self, program: &str) -> std::process::Command {
        let bin = std::env::var("CIPHERD_TEST_PG_BIN")
            .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
        let program = std::path::Path::new(&bin).join(program);
        if is_root() {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            std::process::Command::new(program)
        }
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if self.running {
            let mut stop = self.pg_command("pg_ctl");
            let _ = stop
                .args(["-w", "-m", "immediate", "-D"])
                .arg(self.data())
                .arg("stop")
                .output();
        }
    }
}

/// Runs `command` to completion off the runtime's threads; panics with its
/// output if it fails.
async fn run(command: &mut std::process::Command) {
    let shown = format!("{command:?}");
    let mut command = tokio::process::Command::from(std::mem::replace(
        command,
        std::process::Command::new("true"),
    ));
    let out = command
        .output()
        .await
        .unwrap_or_else(|e| panic!("{shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

/// Three replicas on one database: a rotation through one is used by the other
/// two, a token revoked through one is refused by all, a deletion scheduled
/// through one refuses use on all and is cancelled through another, and a key
/// with an `auto_rotate_period` is rotated once per period although all three
/// sweep for due rotations every 20 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_rotations_revocations_deletions_and_scheduled_rotations() {
    let db = TestDatabase::create("e2e_three").await;
    let first_dir = tempfile::tempdir().unwrap();
    let replica = |dir: &std::path::Path| {
        let mut params = params_on(&db, dir, true);
        params.lifecycle.housekeeping_interval = Duration::from_millis(20);
        params.lifecycle.min_auto_rotate_period = Duration::from_secs(1);
        params
    };
    let a = TestServer::start(replica(first_dir.path())).await;
    let mut others = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            first_dir.path().join(DEV_SHARE_FILE),
            dir.path().join(DEV_SHARE_FILE),
        )
        .unwrap();
        others.push((TestServer::start(replica(dir.path())).await, dir));
    }
    let token = a.root_token().expect("dev root token");
    let ca = a.client().await;
    let cb = others[0].0.client_with_token(&token).await;
    let cc = others[1].0.client_with_token(&token).await;
    let until = |what: String| {
        let deadline = Instant::now() + Duration::from_secs(10);
        move || assert!(Instant::now() < deadline, "{what} within 10 s")
    };

    // A rotation through B: A and C encrypt under it (through the change feed).
    create_key(&ca, "shared", pb::KeyType::Xaes256Gcm).await;
    for c in [&ca, &cb, &cc] {
        assert_eq!(encrypt(c, "shared", b"v1").await.key_version, 1);
    }
    assert_eq!(rotate(&cb, "shared").await.latest_version, 2);
    for (name, c) in [("A", &ca), ("C", &cc)] {
        let check = until(format!("{name} encrypting under v2"));
        while encrypt(c, "shared", b"v2").await.key_version != 2 {
            check();
            tokio::task::yield_now().await;
        }
    }

    // A token created through A, revoked through C: refused everywhere.
    let created = ca
        .create_token(vec!["root".into()], None, "three")
        .await
        .unwrap();
    let mut as_token: Vec<Client> = Vec::new();
    for server in [&a, &others[0].0, &others[1].0] {
        as_token.push(
            server
                .client_with_token(created.token.expose_secret())
                .await,
        );
    }
    for c in &as_token {
        c.lookup_token(None)
            .await
            .expect("the new token works everywhere");
    }
    cc.revoke_token(&created.info.accessor).await.unwrap();
    for (i, c) in as_token.iter().enumerate() {
        let check = until(format!("replica {i} refusing the revoked token"));
        while c.lookup_token(None).await.is_ok() {
            check();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // A deletion scheduled through A refuses use on B and C; cancelled through B.
    reply(
        ca.admin()
            .update_key_config(pb::UpdateKeyConfigRequest {
                name: "shared".into(),
                deletion_allowed: Some(true),
                ..Default::default()
            })
            .await,
    )
    .unwrap();
    reply(
        ca.admin()
            .delete_key(pb::DeleteKeyRequest {
                name: "shared".into(),
                ..Default::default()
            })
            .await,
    )
    .unwrap();
    for (name, c) in [("B", &cb), ("C", &cc)] {
        let check = until(format!("{name} refusing a key pending deletion"));
        loop {
            match c
                .encrypt("shared", &b"x"[..], &EncryptOptions::default())
                .await
            {
                Err(e) if e.reason() == Some("KEY_PENDING_DELETION") => break,
                Ok(_) => check(),
                Err(e) => panic!("{name}: {e}"),
            }
            tokio::task::yield_now().await;
        }
    }
    reply(
        cb.admin()
            .cancel_key_deletion(pb::CancelKeyDeletionRequest {
                name: "shared".into(),
            })
            .await,
    )
    .unwrap();
    let check = until("C using the key again".into());
    while cc
        .encrypt("shared", &b"x"[..], &EncryptOptions::default())
        .await
        .is_err()
    {
        check();
        tokio::task::yield_now().await;
    }

    // Scheduled rotation every second, three replicas sweeping: once a period.
    let started = Instant::now();
    reply(
        ca.admin()
            .create_key(pb::CreateKeyRequest {
                name: "rotating".into(),
                auto_rotate_period: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await,
    )
    .unwrap();
    let check = until("three scheduled rotations".into());
    while get_key(&cc, "rotating").await.latest_version < 4 {
        check();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let key = get_key(&cb, "rotating").await;
    let elapsed = started.elapsed().as_secs_f64();
    let rotations = f64::from(key.latest_version - 1);
    assert!(
        rotations <= elapsed + 1.0,
        "{rotations} rotations in {elapsed:.2} s with a period of 1 s: more than one per period"
    );
    // Consecutive versions are a period apart (not two in one sweep).
    let created: Vec<i64> = key
        .versions
        .iter()
        .map(|v| {
            let t = v.created_at.unwrap();
            t.seconds * 1000 + i64::from(t.nanos / 1_000_000)
        })
        .collect();
    for pair in created.windows(2) {
        assert!(
            pair[1] - pair[0] >= 1000,
            "versions {pair:?} less than a period apart"
        );
    }
    drop((ca, cb, cc, as_token));
    for (server, _dir) in others {
        server.stop().await;
    }
    a.stop().await;
}

/// An `aes256-gcm96` usage limit holds across replicas: two replicas encrypting
/// under one version at once, with `refuse` at the limit, answer at most the
/// limit between them (each reserves its own blocks in the database, never one
/// the other holds), and at least the limit minus the unused rest of one block
/// per replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_limit_holds_across_replicas() {
    const LIMIT: u64 = 600;
    const BLOCK: u64 = 40;
    let db = TestDatabase::create("e2e_limit").await;
    let replica = |dir: &std::path::Path| {
        let mut params = params_on(&db, dir, true);
        params.usage.limit = LIMIT;
        params.usage.reservation_block = BLOCK;
        params.usage.on_limit = cipherd_server::config::LimitAction::Refuse;
        params
    };
    let first_dir = tempfile::tempdir().unwrap();
    let first = TestServer::start(replica(first_dir.path())).await;
    let second_dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        first_dir.path().join(DEV_SHARE_FILE),
        second_dir.path().join(DEV_SHARE_FILE),
    )
    .unwrap();
    let second = TestServer::start(replica(second_dir.path())).await;
    let token = first.root_token().expect("dev root token");
    let one = first.client().await;
    let other = second.client_with_token(&token).await;
    create_key(&one, "capped", pb::KeyType::Aes256Gcm96).await;

    let workers: Vec<_> = [one.clone(), other.clone(), one.clone(), other.clone()]
        .into_iter()
        .map(|client| {
            tokio::spawn(async move {
                let mut answered = 0u64;
                loop {
                    match client
                        .encrypt("capped", &b"x"[..], &EncryptOptions::default())
                        .await
                    {
                        Ok(r) => {
                            assert_eq!(r.key_version, 1, "no rotation with refuse");
                            answered += 1;
                        }
                        Err(e) if e.reason() == Some("KEY_USAGE_EXHAUSTED") => return answered,
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    let mut total = 0;
    for w in workers {
        total += w.await.unwrap();
    }
    assert!(
        total <= LIMIT,
        "{total} encryptions answered under a limit of {LIMIT}"
    );
    assert!(
        total >= LIMIT - 2 * BLOCK,
        "{total}: more than one unused block per replica was lost"
    );
    let key = get_key(&one, "capped").await;
    assert_eq!(
        key.versions[0].encryptions, LIMIT,
        "the stored count is at the limit"
    );
    eprintln!("limit {LIMIT} across two replicas: {total} encryptions answered");
    drop((one, other));
    second.stop().await;
    first.stop().await;
}
