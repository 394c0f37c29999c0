//! Glob patterns (`*`, `?`) on key names and principals.
//!
//! SKELETON: the policy helper owns this module and replaces this file.
