//! Policies: rules of key-name globs × operations, purposes and break-glass, and
//! the one pure decision function.
//!
//! SKELETON: the policy helper owns this module and replaces this file.
