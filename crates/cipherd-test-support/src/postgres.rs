//! A fresh PostgreSQL database per test, and server parameters that use it.
//!
//! [`TestDatabase`] is the store's own test helper
//! (`crates/cipherd-store/tests/support/postgres.rs`), included here so that
//! both crates share one implementation: it creates a uniquely named database
//! through the admin URL in `CIPHERD_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and drops it when dropped. If
//! PostgreSQL is down, the test fails saying how to start it
//! (`scripts/ensure-postgres.sh`, which `make test` runs first).

use std::path::Path;

use cipherd_server::{Params, config::StorageParams};
use cipherd_store::PostgresConfig;

#[path = "../../cipherd-store/tests/support/postgres.rs"]
mod shared;

pub use shared::{ADMIN_URL_ENV, DEFAULT_ADMIN_URL, TestDatabase};

/// [`Params::for_data_dir`], storing in `db` instead of the data dir's SQLite
/// file (the data dir still holds the dev-mode files and the audit log).
pub fn params_on(db: &TestDatabase, data_dir: &Path, dev: bool) -> Params {
    let mut params = Params::for_data_dir(data_dir, dev);
    params.storage = StorageParams::Postgres {
        config: PostgresConfig::new(db.url()).expect("the test database's URL"),
    };
    params
}
