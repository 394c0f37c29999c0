//! `memory::harden` in a process of its own: this test binary holds only this
//! test, so the limits it sets (core dumps off for good, memory locked) touch no
//! other test.
#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use rustix::process::{
    DumpableBehavior, Resource, Rlimit, dumpable_behavior, getrlimit, setrlimit,
};

/// A `/proc/self/status` field, e.g. `VmLck` → "0 kB".
fn status_field(name: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("{name} not in /proc/self/status"))
}

/// Whether the process may lock memory beyond RLIMIT_MEMLOCK (CAP_IPC_LOCK, bit 14).
fn has_cap_ipc_lock() -> bool {
    let caps = u64::from_str_radix(&status_field("CapEff"), 16).unwrap();
    caps & (1 << 14) != 0
}

#[test]
fn harden_disables_core_dumps_and_locks_memory() {
    assert_ne!(
        getrlimit(Resource::Core).maximum,
        Some(0),
        "precondition: core dumps allowed before"
    );
    assert_eq!(
        status_field("VmLck"),
        "0 kB",
        "precondition: nothing locked"
    );

    if !has_cap_ipc_lock() {
        // Without CAP_IPC_LOCK, a memlock limit of 0 makes locking fail: the error
        // names the cause, and core dumps are off all the same.
        setrlimit(
            Resource::Memlock,
            Rlimit {
                current: Some(0),
                maximum: getrlimit(Resource::Memlock).maximum,
            },
        )
        .unwrap();
        let err = cipherd_server::memory::harden(true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("RLIMIT_MEMLOCK is 0 bytes"), "{err}");
    } else {
        let hardened = cipherd_server::memory::harden(true).unwrap();
        assert!(hardened.locked);
        let locked = status_field("VmLck");
        assert_ne!(locked, "0 kB", "mlockall locked nothing");
    }

    let core = getrlimit(Resource::Core);
    assert_eq!((core.current, core.maximum), (Some(0), Some(0)));
    assert_eq!(dumpable_behavior().unwrap(), DumpableBehavior::NotDumpable);
}
