//! Glob patterns (`*`, `?`) on key names and principals.
//!
//! PLACEHOLDER until the policy helper's module lands.

/// A validated glob pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

/// A pattern that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("bad glob {0:?}")]
pub struct GlobError(pub String);

impl Glob {
    /// Parses `pattern`.
    pub fn new(pattern: &str) -> Result<Self, GlobError> {
        if pattern.is_empty() {
            return Err(GlobError(pattern.into()));
        }
        Ok(Self(pattern.to_owned()))
    }

    /// Whether `text` matches.
    pub fn matches(&self, text: &str) -> bool {
        fn m(p: &[u8], t: &[u8]) -> bool {
            match p.split_first() {
                None => t.is_empty(),
                Some((b'*', rest)) => (0..=t.len()).any(|i| m(rest, &t[i..])),
                Some((b'?', rest)) => !t.is_empty() && m(rest, &t[1..]),
                Some((c, rest)) => t.first() == Some(c) && m(rest, &t[1..]),
            }
        }
        m(self.0.as_bytes(), text.as_bytes())
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
