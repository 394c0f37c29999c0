//! A fresh PostgreSQL database per test, dropped when the test ends (even if it
//! panics).
//!
//! The server is the one at `CIPHERD_TEST_POSTGRES_URL` (default
//! [`DEFAULT_ADMIN_URL`]), whose user must be allowed to `CREATE DATABASE`. If it
//! cannot be reached the test fails, saying how to start it: the tests that need
//! PostgreSQL never skip themselves silently. `make test` starts the local
//! cluster first (`scripts/ensure-postgres.sh`).
//!
//! Shared, as this one file, by the store's tests and by `cipherd-test-support`
//! (which includes it with `#[path]`), so there is one implementation.

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};

/// The admin connection used when `CIPHERD_TEST_POSTGRES_URL` is not set.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The environment variable that points the tests at another server.
pub const ADMIN_URL_ENV: &str = "CIPHERD_TEST_POSTGRES_URL";

/// A database created for one test; dropped (with `WITH (FORCE)`, closing any
/// connection still open to it) when this value is dropped.
pub struct TestDatabase {
    name: String,
    admin_url: String,
    url: String,
}

impl TestDatabase {
    /// Creates an empty UTF-8 database named after `label` and this process.
    ///
    /// # Panics
    ///
    /// If PostgreSQL cannot be reached or refuses: the message says how to start it.
    pub async fn create(label: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let admin_url = std::env::var(ADMIN_URL_ENV).unwrap_or_else(|_| DEFAULT_ADMIN_URL.into());
        let label: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(24)
            .collect();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "cipherd_test_{label}_{}_{}_{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = admin_connection(&admin_url).await;
        admin
            .execute(AssertSqlSafe(format!(
                "CREATE DATABASE \"{name}\" ENCODING 'UTF8' TEMPLATE template0"
            )))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} failed: {e}"));
        let _ = admin.close().await;
        let url = with_database(&admin_url, &name);
        Self {
            name,
            admin_url,
            url,
        }
    }

    /// The connection URL of this database (the admin URL's credentials and
    /// parameters, another database name).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A connection to the server's admin database, for tests that reach behind
    /// the store (terminating backends, faking a newer schema).
    pub async fn admin(&self) -> PgConnection {
        admin_connection(&self.admin_url).await
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // On a thread of its own with its own runtime: Drop cannot await, and the
        // test's runtime may be shutting down (or be the current-thread kind).
        let admin_url = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let mut admin = PgConnection::connect(&admin_url)
                    .await
                    .map_err(|e| e.to_string())?;
                admin
                    .execute(AssertSqlSafe(sql))
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = admin.close().await;
                Ok::<_, String>(())
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// Connects to the admin database or panics with instructions.
async fn admin_connection(admin_url: &str) -> PgConnection {
    match PgConnection::connect(admin_url).await {
        Ok(conn) => conn,
        Err(e) => panic!(
            "these tests need PostgreSQL, and it cannot be reached at {} ({ADMIN_URL_ENV}): {e}\n\
             Start the local cluster with `scripts/ensure-postgres.sh` (what `make test` runs \
             first), i.e. `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, \
             or set {ADMIN_URL_ENV} to a server whose user may CREATE DATABASE.",
            without_password(admin_url)
        ),
    }
}

/// `url` with its database (the path) replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{database}?{query}"),
        None => format!("{server}/{database}"),
    }
}

/// `url` without a password, for messages.
fn without_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return "[unparsable URL]".into();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{}{user}@{}", &url[..scheme_end], &rest[at + 1..])
        }
        None => url.to_owned(),
    }
}
