//! The conformance suite: the [`Store`] contract as executable properties, run
//! unchanged against every backend.
//!
//! A backend's tests call [`run`] with a factory that opens a fresh, empty store:
//!
//! ```no_run
//! # async fn example() {
//! cipherd_store::conformance::run(|| async {
//!     cipherd_store::SqliteStore::in_memory().await.expect("open store")
//! })
//! .await;
//! # }
//! ```
//!
//! Each property gets its own store from the factory, and [`run`] panics on the
//! first property that fails, naming it and saying what was expected. Properties
//! spawn tokio tasks, so call it from a tokio runtime, preferably multi-threaded
//! (`#[tokio::test(flavor = "multi_thread")]`) so the concurrency properties race
//! for real.
//!
//! The suite checks behaviour through the trait only; backend specifics (pragmas,
//! file permissions, reopening) are tested beside each backend. It never checks
//! durability across crashes.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::{Change, Error, Record, Snapshot, Store, path};

/// Runs every property against stores made by `make`, each on a fresh store;
/// panics with the name of the first property that fails and why.
///
/// `make` must return an empty store each time (for a shared database: a fresh
/// database or schema), because properties assume they are alone in the store.
pub async fn run<S, F, Fut>(mut make: F)
where
    S: Store,
    F: FnMut() -> Fut,
    Fut: Future<Output = S>,
{
    check(
        "get_missing_is_none",
        get_missing_is_none(make().await).await,
    );
    check("create_then_get", create_then_get(make().await).await);
    check(
        "create_twice_is_already_exists",
        create_twice(make().await).await,
    );
    check("compare_and_set", compare_and_set(make().await).await);
    check(
        "compare_and_set_missing_is_conflict",
        cas_missing(make().await).await,
    );
    check("delete", delete(make().await).await);
    check(
        "no_aba_after_delete_and_recreate",
        no_aba(make().await).await,
    );
    check(
        "revisions_are_store_wide",
        store_wide_revisions(make().await).await,
    );
    check("list_by_prefix", list_by_prefix(make().await).await);
    check("list_paging", list_paging(make().await).await);
    check(
        "scan_matches_list_and_get",
        scan_matches_list_and_get(make().await).await,
    );
    check(
        "invalid_paths_are_rejected",
        invalid_paths(make().await).await,
    );
    check(
        "concurrent_increments",
        concurrent_increments(make().await).await,
    );
    check("concurrent_creates", concurrent_creates(make().await).await);
    check("change_feed_in_order", change_feed(make().await).await);
    check("large_values_round_trip", large_values(make().await).await);
    check("errors_omit_values", errors_omit_values(make().await).await);
    check("ping", ping(make().await).await);
    check(
        "snapshot_is_point_in_time",
        snapshot_is_point_in_time(make().await).await,
    );
    check(
        "import_into_empty_store",
        import_into_empty(make().await).await,
    );
    check(
        "import_refuses_a_non_empty_store",
        import_refuses_non_empty(make().await).await,
    );
    check(
        "import_dropped_or_failed_writes_nothing",
        import_all_or_nothing(make().await).await,
    );
}

/// How many tasks race in the concurrency properties.
const RACERS: u64 = 32;

/// How long the change-feed property waits for one change.
const FEED_TIMEOUT: Duration = Duration::from_secs(10);

/// A property's outcome: `Err` says what went wrong.
type Outcome = Result<(), String>;

/// Panics with a clear message if a property failed.
fn check(name: &str, outcome: Outcome) {
    if let Err(why) = outcome {
        panic!("store conformance: property `{name}` failed: {why}");
    }
}

/// Fails the property with a formatted message unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// Turns a store error into a property failure saying which call failed.
trait Context<T> {
    fn context(self, call: &str) -> Result<T, String>;
}

impl<T> Context<T> for crate::Result<T> {
    fn context(self, call: &str) -> Result<T, String> {
        self.map_err(|e| format!("{call} failed unexpectedly: {e}"))
    }
}

/// Describes a result for a failure message without printing any value bytes.
fn describe<T: Debug>(result: &crate::Result<T>) -> String {
    match result {
        Ok(v) => format!("Ok({v:?})"),
        Err(e) => format!("Err({e:?})"),
    }
}

/// Describes a read result without printing the (possibly large) value.
fn describe_read(result: &crate::Result<Option<Record>>) -> String {
    match result {
        Ok(Some(r)) => format!(
            "Ok(Some(record of {} bytes at revision {}))",
            r.value.len(),
            r.revision
        ),
        Ok(None) => "Ok(None)".into(),
        Err(e) => format!("Err({e:?})"),
    }
}

async fn get_missing_is_none<S: Store>(store: S) -> Outcome {
    let got = store.get("nothing/here").await;
    ensure!(
        matches!(got, Ok(None)),
        "get of a never-written path: expected Ok(None), got {}",
        describe_read(&got)
    );
    Ok(())
}

async fn create_then_get<S: Store>(store: S) -> Outcome {
    let revision = store
        .create("keys/a", b"ciphertext-a")
        .await
        .context("create")?;
    ensure!(
        revision >= 1,
        "create returned revision 0; revisions start at 1"
    );
    let got = store.get("keys/a").await.context("get")?;
    ensure!(
        got == Some(Record {
            value: b"ciphertext-a".to_vec(),
            revision
        }),
        "get after create: expected the value at revision {revision}, got {}",
        describe_read(&Ok(got))
    );
    // The empty value is a value, not an absence.
    let empty_rev = store
        .create("keys/empty", b"")
        .await
        .context("create empty")?;
    let got = store.get("keys/empty").await.context("get empty")?;
    ensure!(
        got == Some(Record {
            value: Vec::new(),
            revision: empty_rev
        }),
        "empty value: expected Some(empty at {empty_rev}), got {}",
        describe_read(&Ok(got))
    );
    Ok(())
}

async fn create_twice<S: Store>(store: S) -> Outcome {
    let revision = store.create("keys/a", b"first").await.context("create")?;
    let second = store.create("keys/a", b"second").await;
    ensure!(
        matches!(&second, Err(Error::AlreadyExists { path }) if path == "keys/a"),
        "second create: expected AlreadyExists {{ path: \"keys/a\" }}, got {}",
        describe(&second)
    );
    let got = store.get("keys/a").await.context("get")?;
    ensure!(
        got == Some(Record {
            value: b"first".to_vec(),
            revision
        }),
        "a failed create changed the record: {}",
        describe_read(&Ok(got))
    );
    Ok(())
}

async fn compare_and_set<S: Store>(store: S) -> Outcome {
    let r1 = store.create("keys/a", b"v1").await.context("create")?;
    let r2 = store
        .compare_and_set("keys/a", r1, b"v2")
        .await
        .context("compare_and_set with the current revision")?;
    ensure!(
        r2 > r1,
        "compare_and_set returned revision {r2}, not above {r1}"
    );
    let got = store.get("keys/a").await.context("get")?;
    ensure!(
        got == Some(Record {
            value: b"v2".to_vec(),
            revision: r2
        }),
        "get after compare_and_set: expected v2 at {r2}, got {}",
        describe_read(&Ok(got))
    );
    let stale = store.compare_and_set("keys/a", r1, b"v3").await;
    ensure!(
        matches!(&stale, Err(Error::Conflict { path }) if path == "keys/a"),
        "compare_and_set with a stale revision: expected Conflict, got {}",
        describe(&stale)
    );
    let future = store.compare_and_set("keys/a", r2 + 1000, b"v3").await;
    ensure!(
        matches!(future, Err(Error::Conflict { .. })),
        "compare_and_set with a revision never issued: expected Conflict, got {}",
        describe(&future)
    );
    let got = store.get("keys/a").await.context("get")?;
    ensure!(
        got.as_ref().map(|r| (r.value.as_slice(), r.revision)) == Some((b"v2".as_slice(), r2)),
        "a failed compare_and_set changed the record: {}",
        describe_read(&Ok(got))
    );
    Ok(())
}

async fn cas_missing<S: Store>(store: S) -> Outcome {
    // Documented choice: absent is Conflict (the read is stale), not NotFound.
    for revision in [0, 1, u64::MAX] {
        let result = store.compare_and_set("keys/none", revision, b"v").await;
        ensure!(
            matches!(&result, Err(Error::Conflict { path }) if path == "keys/none"),
            "compare_and_set on a missing path at revision {revision}: \
             expected Conflict, got {}",
            describe(&result)
        );
    }
    let got = store.get("keys/none").await;
    ensure!(
        matches!(got, Ok(None)),
        "a failed compare_and_set created a record: {}",
        describe_read(&got)
    );
    Ok(())
}

async fn delete<S: Store>(store: S) -> Outcome {
    let r1 = store.create("keys/a", b"v1").await.context("create")?;
    let r2 = store
        .compare_and_set("keys/a", r1, b"v2")
        .await
        .context("cas")?;
    let stale = store.delete("keys/a", r1).await;
    ensure!(
        matches!(&stale, Err(Error::Conflict { path }) if path == "keys/a"),
        "delete with a stale revision: expected Conflict, got {}",
        describe(&stale)
    );
    let got = store.get("keys/a").await.context("get")?;
    ensure!(
        got.as_ref().map(|r| r.revision) == Some(r2),
        "a failed delete changed the record: {}",
        describe_read(&Ok(got))
    );
    store
        .delete("keys/a", r2)
        .await
        .context("delete with the current revision")?;
    let got = store.get("keys/a").await;
    ensure!(
        matches!(got, Ok(None)),
        "get after delete: expected Ok(None), got {}",
        describe_read(&got)
    );
    let again = store.delete("keys/a", r2).await;
    ensure!(
        matches!(&again, Err(Error::NotFound { path }) if path == "keys/a"),
        "second delete: expected NotFound, got {}",
        describe(&again)
    );
    let never = store.delete("keys/never", 1).await;
    ensure!(
        matches!(never, Err(Error::NotFound { .. })),
        "delete of a never-written path: expected NotFound, got {}",
        describe(&never)
    );
    Ok(())
}

async fn no_aba<S: Store>(store: S) -> Outcome {
    let old = store.create("keys/a", b"same").await.context("create")?;
    store.delete("keys/a", old).await.context("delete")?;
    let new = store.create("keys/a", b"same").await.context("re-create")?;
    ensure!(
        new > old,
        "re-create after delete returned revision {new}, not above the deleted {old}: \
         revisions must never be reused"
    );
    let stale = store.compare_and_set("keys/a", old, b"stale write").await;
    ensure!(
        matches!(stale, Err(Error::Conflict { .. })),
        "compare_and_set with the revision from before delete and re-create: \
         expected Conflict (ABA), got {}",
        describe(&stale)
    );
    let stale = store.delete("keys/a", old).await;
    ensure!(
        matches!(stale, Err(Error::Conflict { .. })),
        "delete with the revision from before delete and re-create: expected Conflict, got {}",
        describe(&stale)
    );
    let got = store.get("keys/a").await.context("get")?;
    ensure!(
        got == Some(Record {
            value: b"same".to_vec(),
            revision: new
        }),
        "the re-created record changed: {}",
        describe_read(&Ok(got))
    );
    Ok(())
}

async fn store_wide_revisions<S: Store>(store: S) -> Outcome {
    let mut issued = Vec::new();
    issued.push(store.create("a", b"1").await.context("create a")?);
    issued.push(store.create("b", b"1").await.context("create b")?);
    issued.push(
        store
            .compare_and_set("a", issued[0], b"2")
            .await
            .context("cas a")?,
    );
    store.delete("b", issued[1]).await.context("delete b")?;
    issued.push(store.create("c", b"1").await.context("create c")?);
    issued.push(store.create("b", b"1").await.context("re-create b")?);
    issued.push(
        store
            .compare_and_set("c", issued[3], b"2")
            .await
            .context("cas c")?,
    );
    ensure!(
        issued.windows(2).all(|w| w[0] < w[1]),
        "revisions across paths must strictly increase, got {issued:?}"
    );
    Ok(())
}

/// Paths for the listing properties, in the byte order `list` must return them.
const ORDERED: [&str; 10] = [
    "o/B",
    "o/Z",
    "o/a",
    "o/a/b",
    "o/a0",
    "o/z",
    "o/~",
    "o/é",
    "o/\u{10FFFF}",
    "o/\u{10FFFF}z",
];

/// Paths near the `o/` prefix that must never be listed under it.
const OUTSIDE: [&str; 5] = ["o", "o.x", "o0", "n/x", "p/x"];

/// Paths whose `%` and `_` would be wildcards in a careless `LIKE`.
const LITERAL: [&str; 7] = ["l/a%", "l/a%b", "l/a_", "l/a_b", "l/aXb", "l/ab", "l/a"];

async fn list_by_prefix<S: Store>(store: S) -> Outcome {
    // Create out of order so insertion order cannot pass for byte order.
    for p in ORDERED.iter().rev().chain(&OUTSIDE).chain(&LITERAL) {
        store
            .create(p, b"v")
            .await
            .context(&format!("create {p:?}"))?;
    }
    let listed = store.list("o/", None, 100).await.context("list o/")?;
    ensure!(
        listed == ORDERED,
        "list(\"o/\") must return exactly the paths under it in byte order \
         (uppercase before lowercase, é and U+10FFFF last; is the collation bytewise?): \
         expected {ORDERED:?}, got {listed:?}"
    );
    let cases: [(&str, &[&str]); 7] = [
        ("l/a%", &["l/a%", "l/a%b"]),
        ("l/a_", &["l/a_", "l/a_b"]),
        (
            "l/a",
            &["l/a", "l/a%", "l/a%b", "l/aXb", "l/a_", "l/a_b", "l/ab"],
        ),
        ("o/a", &["o/a", "o/a/b", "o/a0"]),
        ("o/\u{10FFFF}", &["o/\u{10FFFF}", "o/\u{10FFFF}z"]),
        ("o/a/b/c", &[]),
        ("zzz", &[]),
    ];
    for (prefix, expected) in cases {
        let listed = store.list(prefix, None, 100).await.context("list")?;
        ensure!(
            listed == expected,
            "list({prefix:?}): `%` and `_` are literal and order is bytewise; \
             expected {expected:?}, got {listed:?}"
        );
    }
    let mut everything: Vec<&str> = ORDERED
        .iter()
        .chain(&OUTSIDE)
        .chain(&LITERAL)
        .copied()
        .collect();
    everything.sort_unstable(); // str order is byte order
    let listed = store
        .list("", None, 1000)
        .await
        .context("list everything")?;
    ensure!(
        listed == everything,
        "list(\"\") must return every path in byte order: expected {everything:?}, got {listed:?}"
    );
    Ok(())
}

async fn list_paging<S: Store>(store: S) -> Outcome {
    for p in ORDERED.iter().chain(&OUTSIDE) {
        store
            .create(p, b"v")
            .await
            .context(&format!("create {p:?}"))?;
    }
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = store
            .list("o/", cursor.as_deref(), 3)
            .await
            .context("list page")?;
        ensure!(page.len() <= 3, "a page exceeded the limit of 3: {page:?}");
        let last_page = page.len() < 3;
        cursor = page.last().cloned().or(cursor);
        pages.extend(page);
        if last_page {
            break;
        }
        ensure!(
            pages.len() <= ORDERED.len(),
            "paging does not terminate: {pages:?}"
        );
    }
    ensure!(
        pages == ORDERED,
        "paging by 3 with start_after must visit every path once, in order: \
         expected {ORDERED:?}, got {pages:?}"
    );
    let cases: [(Option<&str>, usize, &[&str]); 6] = [
        // A cursor that is not a stored path.
        (Some("o/a."), 4, &["o/a/b", "o/a0", "o/z", "o/~"]),
        // A cursor equal to the prefix (which is not stored here).
        (Some("o/"), 2, &["o/B", "o/Z"]),
        // A cursor before the prefix is the same as none.
        (Some("a"), 2, &["o/B", "o/Z"]),
        // A cursor past the prefix leaves nothing.
        (Some("p"), 100, &[]),
        (Some("o/\u{10FFFF}z"), 100, &[]),
        (None, 0, &[]),
    ];
    for (start_after, limit, expected) in cases {
        let listed = store.list("o/", start_after, limit).await.context("list")?;
        ensure!(
            listed == expected,
            "list(\"o/\", {start_after:?}, {limit}): expected {expected:?}, got {listed:?}"
        );
    }
    Ok(())
}

async fn scan_matches_list_and_get<S: Store>(store: S) -> Outcome {
    for (i, p) in ORDERED.iter().chain(&OUTSIDE).enumerate() {
        store
            .create(p, format!("value {i}").as_bytes())
            .await
            .context(&format!("create {p:?}"))?;
    }
    // Updated and deleted records show their current state.
    let first = store
        .get(ORDERED[0])
        .await
        .context("get")?
        .ok_or("missing")?;
    let updated = store
        .compare_and_set(ORDERED[0], first.revision, b"updated")
        .await
        .context("cas")?;
    let second = store
        .get(ORDERED[1])
        .await
        .context("get")?
        .ok_or("missing")?;
    store
        .delete(ORDERED[1], second.revision)
        .await
        .context("delete")?;
    let all = store.scan("o/", None, 100).await.context("scan")?;
    let expected_first = Record {
        value: b"updated".to_vec(),
        revision: updated,
    };
    ensure!(
        all.first() == Some(&(ORDERED[0].to_owned(), expected_first)),
        "scan must return the updated value and revision of {:?} first, got {:?}",
        ORDERED[0],
        all.first()
    );
    let cases: [(Option<&str>, usize); 6] = [
        (None, 100),
        (None, 3),
        (Some("o/a."), 4),
        (Some("a"), 2),
        (Some("p"), 100),
        (None, 0),
    ];
    for (start_after, limit) in cases {
        let listed = store.list("o/", start_after, limit).await.context("list")?;
        let scanned = store.scan("o/", start_after, limit).await.context("scan")?;
        let paths: Vec<&str> = scanned.iter().map(|(p, _)| p.as_str()).collect();
        ensure!(
            paths == listed,
            "scan(\"o/\", {start_after:?}, {limit}) paths {paths:?} differ from list {listed:?}"
        );
        for (path, record) in &scanned {
            let got = store.get(path).await.context("get")?;
            ensure!(
                got.as_ref() == Some(record),
                "scan returned a record for {path:?} that get does not"
            );
        }
    }
    Ok(())
}

async fn invalid_paths<S: Store>(store: S) -> Outcome {
    let too_long = "x".repeat(path::MAX_LEN + 1);
    let too_long_multibyte = format!("{}x", "é".repeat(path::MAX_LEN / 2));
    let invalid = ["", "/keys/a", "keys\0a", &too_long, &too_long_multibyte];
    for p in invalid {
        let shown = shorten(p);
        let got = store.get(p).await;
        ensure!(
            matches!(got, Err(Error::InvalidPath(_))),
            "get({shown}): expected InvalidPath, got {}",
            describe_read(&got)
        );
        let created = store.create(p, b"v").await;
        ensure!(
            matches!(created, Err(Error::InvalidPath(_))),
            "create({shown}): expected InvalidPath, got {}",
            describe(&created)
        );
        let cas = store.compare_and_set(p, 1, b"v").await;
        ensure!(
            matches!(cas, Err(Error::InvalidPath(_))),
            "compare_and_set({shown}): expected InvalidPath, got {}",
            describe(&cas)
        );
        let deleted = store.delete(p, 1).await;
        ensure!(
            matches!(deleted, Err(Error::InvalidPath(_))),
            "delete({shown}): expected InvalidPath, got {}",
            describe(&deleted)
        );
        if !p.is_empty() {
            let listed = store.list(p, None, 10).await;
            ensure!(
                matches!(listed, Err(Error::InvalidPath(_))),
                "list({shown}): expected InvalidPath, got {}",
                describe(&listed)
            );
        }
    }
    let listed = store
        .list("", None, 10)
        .await
        .context("list of invalid paths")?;
    ensure!(listed.is_empty(), "invalid paths were stored: {listed:?}");
    // The limits themselves are valid.
    let longest = "x".repeat(path::MAX_LEN);
    let longest_multibyte = "é".repeat(path::MAX_LEN / 2);
    for p in [
        longest.as_str(),
        &longest_multibyte,
        "trailing/",
        "a//b",
        "%_",
    ] {
        let revision = store
            .create(p, b"v")
            .await
            .context(&format!("create {}", shorten(p)))?;
        let got = store.get(p).await.context("get")?;
        ensure!(
            got.map(|r| r.revision) == Some(revision),
            "valid path {} did not round-trip",
            shorten(p)
        );
    }
    Ok(())
}

/// A path short enough to print in a failure message.
fn shorten(p: &str) -> String {
    if p.len() > 40 {
        format!(
            "<{} bytes starting {:?}>",
            p.len(),
            p.chars().take(8).collect::<String>()
        )
    } else {
        format!("{p:?}")
    }
}

async fn concurrent_increments<S: Store>(store: S) -> Outcome {
    let store = Arc::new(store);
    let mut feed = store.subscribe();
    let start = store
        .create("counter", &0u64.to_be_bytes())
        .await
        .context("create")?;
    let mut tasks = Vec::new();
    for _ in 0..RACERS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move { increment(&*store).await }));
    }
    let mut won_on = BTreeSet::new();
    for task in tasks {
        let (read_revision, new_revision) = task
            .await
            .map_err(|e| format!("an incrementing task panicked: {e}"))??;
        ensure!(
            won_on.insert(read_revision),
            "two compare_and_sets both succeeded on revision {read_revision}"
        );
        ensure!(
            new_revision > read_revision,
            "compare_and_set went backwards"
        );
    }
    let record = store
        .get("counter")
        .await
        .context("get")?
        .ok_or("counter vanished")?;
    let value = <[u8; 8]>::try_from(record.value.as_slice())
        .map_err(|_| format!("counter value has {} bytes, not 8", record.value.len()))?;
    let total = u64::from_be_bytes(value);
    ensure!(
        total == RACERS,
        "{RACERS} tasks each incremented once with compare_and_set; the counter is {total}: \
         lost updates"
    );
    ensure!(
        record.revision > start,
        "final revision not above the initial one"
    );
    // The feed must report the racing writes in commit order: for one path,
    // strictly increasing revisions, ending at the final one.
    let mut announced = Vec::new();
    while announced.last() != Some(&record.revision) {
        let change = recv_change(&mut feed).await?;
        let revision = change
            .revision
            .ok_or("a delete was announced; none happened")?;
        if announced.last() != Some(&revision) {
            announced.push(revision);
        }
    }
    ensure!(
        u64::try_from(announced.len()) == Ok(RACERS + 1)
            && announced.windows(2).all(|w| w[0] < w[1]),
        "the change feed must announce the create and {RACERS} updates in commit order, \
         got revisions {announced:?}"
    );
    Ok(())
}

/// Receives one change, failing on timeout, lag or a closed feed.
async fn recv_change(feed: &mut broadcast::Receiver<Change>) -> Result<Change, String> {
    match tokio::time::timeout(FEED_TIMEOUT, feed.recv()).await {
        Err(_) => Err(format!("no change within {FEED_TIMEOUT:?}")),
        Ok(Err(broadcast::error::RecvError::Lagged(n))) => Err(format!(
            "subscriber lagged by {n} after a handful of writes"
        )),
        Ok(Err(broadcast::error::RecvError::Closed)) => {
            Err("the change feed closed while the store is alive".into())
        }
        Ok(Ok(change)) => Ok(change),
    }
}

/// Read-modify-CAS one increment, retrying on conflict. Returns the revision the
/// winning write was based on and the revision it produced.
async fn increment<S: Store>(store: &S) -> Result<(u64, u64), String> {
    // Each retry follows another task's success, so RACERS tries always suffice;
    // the margin is for backends that may report spurious conflicts.
    for _ in 0..RACERS * 100 {
        let record = store
            .get("counter")
            .await
            .context("get")?
            .ok_or("counter vanished")?;
        let value = <[u8; 8]>::try_from(record.value.as_slice())
            .map_err(|_| "counter value is not 8 bytes".to_string())?;
        let next = u64::from_be_bytes(value) + 1;
        match store
            .compare_and_set("counter", record.revision, &next.to_be_bytes())
            .await
        {
            Ok(revision) => return Ok((record.revision, revision)),
            Err(Error::Conflict { .. }) => tokio::task::yield_now().await,
            Err(e) => return Err(format!("compare_and_set failed unexpectedly: {e}")),
        }
    }
    Err("an increment kept conflicting: compare_and_set never succeeds".into())
}

async fn concurrent_creates<S: Store>(store: S) -> Outcome {
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    for i in 0..RACERS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            store
                .create("contested", &i.to_be_bytes())
                .await
                .map(|r| (i, r))
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        match task
            .await
            .map_err(|e| format!("a creating task panicked: {e}"))?
        {
            Ok(win) => winners.push(win),
            Err(Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(format!("create failed unexpectedly: {e}")),
        }
    }
    ensure!(
        winners.len() == 1,
        "{RACERS} racing creates of one path: expected exactly one to succeed, {} did",
        winners.len()
    );
    let (winner, revision) = winners[0];
    let got = store.get("contested").await.context("get")?;
    ensure!(
        got == Some(Record {
            value: winner.to_be_bytes().to_vec(),
            revision
        }),
        "the stored record is not the winner's: {}",
        describe_read(&Ok(got))
    );
    Ok(())
}

async fn change_feed<S: Store>(store: S) -> Outcome {
    let mut feed = store.subscribe();
    let created = store.create("keys/a", b"v1").await.context("create")?;
    let updated = store
        .compare_and_set("keys/a", created, b"v2")
        .await
        .context("cas")?;
    // Failed writes must not be announced.
    let _ = store.create("keys/a", b"again").await;
    let _ = store.compare_and_set("keys/a", created, b"stale").await;
    let _ = store.delete("keys/a", created).await;
    store.delete("keys/a", updated).await.context("delete")?;
    let marker = store
        .create("keys/marker", b"end")
        .await
        .context("create marker")?;

    let expected = [
        Change {
            path: "keys/a".into(),
            revision: Some(created),
        },
        Change {
            path: "keys/a".into(),
            revision: Some(updated),
        },
        Change {
            path: "keys/a".into(),
            revision: None,
        },
        Change {
            path: "keys/marker".into(),
            revision: Some(marker),
        },
    ];
    let mut seen: Vec<Change> = Vec::new();
    while seen.len() < expected.len() {
        let change = recv_change(&mut feed)
            .await
            .map_err(|e| format!("{e}; expected {expected:?}, saw {seen:?}"))?;
        // A shared backend may deliver a change twice; repeats are harmless.
        if seen.last() != Some(&change) {
            seen.push(change);
        }
    }
    ensure!(
        seen == expected,
        "change feed: expected create, update, delete then the marker, in order, \
         and nothing for failed writes: expected {expected:?}, got {seen:?}"
    );
    Ok(())
}

async fn large_values<S: Store>(store: S) -> Outcome {
    const MIB: usize = 1 << 20;
    // Every byte value, in a pattern that shifts so truncation or reordering shows.
    let first: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    let second: Vec<u8> = (0..MIB).map(|i| (i % 253) as u8 ^ 0xA5).collect();
    let r1 = store
        .create("blobs/big", &first)
        .await
        .context("create 1 MiB")?;
    let got = store.get("blobs/big").await;
    ensure!(
        matches!(&got, Ok(Some(r)) if r.value == first && r.revision == r1),
        "1 MiB value did not round-trip: {}",
        describe_read(&got)
    );
    let r2 = store
        .compare_and_set("blobs/big", r1, &second)
        .await
        .context("compare_and_set 1 MiB")?;
    let got = store.get("blobs/big").await;
    ensure!(
        matches!(&got, Ok(Some(r)) if r.value == second && r.revision == r2),
        "1 MiB value did not round-trip through compare_and_set: {}",
        describe_read(&got)
    );
    Ok(())
}

async fn errors_omit_values<S: Store>(store: S) -> Outcome {
    const MARKER: &str = "VALUE-MUST-NOT-LEAK-7f3a";
    let revision = store
        .create("keys/a", MARKER.as_bytes())
        .await
        .context("create")?;
    let errors = [
        store.create("keys/a", MARKER.as_bytes()).await.err(),
        store
            .compare_and_set("keys/a", revision + 1, MARKER.as_bytes())
            .await
            .err(),
        store
            .compare_and_set("keys/none", 1, MARKER.as_bytes())
            .await
            .err(),
        store.delete("keys/a", revision + 1).await.err(),
    ];
    for (i, error) in errors.iter().enumerate() {
        let error = error
            .as_ref()
            .ok_or(format!("failing call #{i} succeeded"))?;
        let shown = format!("{error} / {error:?}");
        ensure!(
            !shown.contains(MARKER) && !shown.contains("86, 65, 76"),
            "an error contains the record value: {shown}"
        );
    }
    Ok(())
}

async fn ping<S: Store>(store: S) -> Outcome {
    store.ping().await.context("ping")
}

/// Reads a whole snapshot in pages of `page`, checking each page's size.
async fn read_snapshot(
    snapshot: &mut dyn Snapshot,
    page: usize,
) -> Result<Vec<(String, Record)>, String> {
    let mut all = Vec::new();
    loop {
        let got = snapshot.next_page(page).await.context("next_page")?;
        ensure!(
            got.len() <= page,
            "a page of {} exceeded the limit {page}",
            got.len()
        );
        if got.is_empty() {
            return Ok(all);
        }
        all.extend(got);
    }
}

async fn snapshot_is_point_in_time<S: Store>(store: S) -> Outcome {
    let mut before = Vec::new();
    for (path, value) in [
        ("a", "1"),
        ("b/x", "2"),
        ("b/y", "3"),
        ("c", "4"),
        ("d", "5"),
    ] {
        let revision = store
            .create(path, value.as_bytes())
            .await
            .context("create")?;
        before.push((
            path.to_owned(),
            Record {
                value: value.as_bytes().to_vec(),
                revision,
            },
        ));
    }
    let mut snapshot = store.snapshot().await.context("snapshot")?;
    ensure!(
        snapshot.record_count() == 5,
        "the snapshot counts {} records, expected 5",
        snapshot.record_count()
    );
    // Writes after the snapshot began: none of them may show in it.
    let a = &before[0].1;
    store
        .compare_and_set("a", a.revision, b"changed")
        .await
        .context("cas during snapshot")?;
    store
        .delete("c", before[3].1.revision)
        .await
        .context("delete during snapshot")?;
    store
        .create("b/z", b"new")
        .await
        .context("create during snapshot")?;
    store
        .create("e", b"new")
        .await
        .context("create during snapshot")?;
    let seen = read_snapshot(&mut *snapshot, 2).await?;
    let seen_paths: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
    ensure!(
        seen == before,
        "the snapshot must hold exactly the records as they were when it began, in path \
         order, whatever was written meanwhile; got paths {seen_paths:?}"
    );
    ensure!(
        snapshot
            .next_page(2)
            .await
            .context("next_page after the end")?
            .is_empty(),
        "a snapshot read to its end returned more"
    );
    drop(snapshot);
    let now = store.get("a").await.context("get")?;
    ensure!(
        now.is_some_and(|r| r.value == b"changed"),
        "the write made during the snapshot is not in the store"
    );
    let mut later = store.snapshot().await.context("second snapshot")?;
    let paths: Vec<String> = read_snapshot(&mut *later, 100)
        .await?
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    ensure!(
        paths == ["a", "b/x", "b/y", "b/z", "d", "e"] && later.record_count() == 6,
        "a new snapshot must see the writes: {paths:?}"
    );
    Ok(())
}

async fn import_into_empty<S: Store>(store: S) -> Outcome {
    let mut feed = store.subscribe();
    let records: Vec<(String, Vec<u8>)> = (0..300u32)
        .map(|i| {
            (
                format!("keys/k{i:03}"),
                i.to_be_bytes().repeat(i as usize % 7 + 1),
            )
        })
        .collect();
    let mut import = store.import().await.context("import")?;
    for (path, value) in &records {
        import.put(path, value).await.context("put")?;
    }
    let count = import.commit().await.context("commit")?;
    ensure!(
        count == 300,
        "commit reported {count} records, expected 300"
    );
    let mut highest = 0;
    let mut revisions = BTreeSet::new();
    for (path, value) in &records {
        let got = store.get(path).await.context("get")?;
        let Some(record) = got else {
            return Err(format!("imported record {path} is missing"));
        };
        ensure!(&record.value == value, "imported record {path} changed");
        ensure!(
            record.revision >= 1,
            "imported record {path} has revision 0"
        );
        revisions.insert(record.revision);
        highest = highest.max(record.revision);
    }
    ensure!(revisions.len() == 300, "imported records share revisions");
    let next = store
        .create("after", b"x")
        .await
        .context("create after import")?;
    ensure!(
        next > highest,
        "a create after the import got revision {next}, not above the imported {highest}"
    );
    // The feed announces the import: a resync marker or the records themselves.
    let change = recv_change(&mut feed).await?;
    ensure!(
        change.is_resync() || change.path.starts_with("keys/k"),
        "the first change after an import is {change:?}, neither a resync nor an \
         imported record"
    );
    let listed = store.list("keys/", None, 1000).await.context("list")?;
    ensure!(
        listed.len() == 300,
        "list shows {} imported records",
        listed.len()
    );
    Ok(())
}

async fn import_refuses_non_empty<S: Store>(store: S) -> Outcome {
    let revision = store
        .create("sys/seal", b"existing")
        .await
        .context("create")?;
    let refused = store.import().await;
    ensure!(
        matches!(refused, Err(Error::NotEmpty)),
        "import into a store with a record must fail with NotEmpty, got {}",
        match &refused {
            Ok(_) => "Ok(an import)".to_owned(),
            Err(e) => format!("Err({e:?})"),
        }
    );
    drop(refused);
    let got = store.get("sys/seal").await.context("get")?;
    ensure!(
        got == Some(Record {
            value: b"existing".to_vec(),
            revision
        }),
        "the refused import changed the record"
    );
    // The refusal released whatever it locked: writes go on.
    store
        .create("other", b"x")
        .await
        .context("create after the refusal")?;
    Ok(())
}

async fn import_all_or_nothing<S: Store>(store: S) -> Outcome {
    // Dropped before commit: nothing.
    let mut import = store.import().await.context("import")?;
    import.put("keys/a", b"1").await.context("put")?;
    import.put("keys/b", b"2").await.context("put")?;
    drop(import);
    // A failed put: nothing either, once dropped.
    let mut import = store.import().await.context("import after a dropped one")?;
    import.put("keys/a", b"1").await.context("put")?;
    let duplicate = import.put("keys/a", b"again").await;
    ensure!(
        matches!(duplicate, Err(Error::AlreadyExists { .. })),
        "a path put twice into one import must be AlreadyExists, got {}",
        describe(&duplicate)
    );
    let invalid = import.put("/bad", b"x").await;
    ensure!(
        matches!(invalid, Err(Error::InvalidPath(_))),
        "an invalid path must be InvalidPath, got {}",
        describe(&invalid)
    );
    drop(import);
    let listed = store.list("", None, 10).await.context("list")?;
    ensure!(
        listed.is_empty(),
        "an import dropped before its commit left records: {listed:?}"
    );
    // The store is still empty and unlocked: an import can be retried.
    let mut import = store.import().await.context("retried import")?;
    import.put("keys/c", b"3").await.context("put")?;
    ensure!(
        import.commit().await.context("commit")? == 1,
        "the retried import did not commit its one record"
    );
    ensure!(
        store.list("", None, 10).await.context("list")? == ["keys/c"],
        "the retried import's record is not alone in the store"
    );
    store
        .create("keys/d", b"4")
        .await
        .context("create after the import")?;
    Ok(())
}
