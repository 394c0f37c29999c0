//! Store path rules, shared by every backend.
//!
//! A path is a non-empty UTF-8 string of at most [`MAX_LEN`] bytes, with no NUL
//! and no leading `/`. Nothing else is interpreted: `/` is an ordinary character
//! that callers use as a separator by convention (`keys/patients/v/3`).
//!
//! This module also computes the exclusive upper bound of a prefix
//! ([`prefix_upper_bound`]) so that backends list by a range query on an index
//! (`path >= prefix AND path < bound`) instead of `LIKE`, whose `%` and `_`
//! wildcards would make some prefixes match paths they should not. Both bounds
//! assume the backend compares paths in byte order (SQLite's default `BINARY`
//! collation; in PostgreSQL the column needs `COLLATE "C"`).

use crate::{Error, Result};

/// The longest path, in bytes (not characters).
pub const MAX_LEN: usize = 512;

/// Checks that `path` may name a record.
///
/// Returns [`Error::InvalidPath`] saying which rule it breaks: empty, longer than
/// [`MAX_LEN`] bytes, containing NUL, or starting with `/`.
pub fn validate(path: &str) -> Result<()> {
    if path.is_empty() {
        return Err(Error::InvalidPath("path is empty".into()));
    }
    validate_prefix(path)
}

/// Checks that `prefix` may be passed to [`Store::list`](crate::Store::list): the
/// same rules as [`validate`] except that the empty prefix (list everything) is
/// allowed.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    if prefix.len() > MAX_LEN {
        return Err(Error::InvalidPath(format!(
            "path is {} bytes long, over the limit of {MAX_LEN}",
            prefix.len()
        )));
    }
    if prefix.contains('\0') {
        return Err(Error::InvalidPath("path contains a NUL character".into()));
    }
    if prefix.starts_with('/') {
        return Err(Error::InvalidPath("path starts with '/'".into()));
    }
    Ok(())
}

/// The smallest string greater than every string that starts with `prefix`, or
/// `None` if there is none (the empty prefix, or one made only of `U+10FFFF`).
///
/// So `s.starts_with(prefix)` exactly when `s >= prefix` and, if the bound is
/// `Some(b)`, `s < b`, in byte order. The bound is valid UTF-8, so it binds as
/// text: the last character that is not `U+10FFFF` is replaced by the next
/// character (skipping the surrogate gap) and everything after it is dropped.
/// Because UTF-8 byte order is code point order and no character lies between a
/// character and its successor, no string outside the prefix falls in the range.
pub fn prefix_upper_bound(prefix: &str) -> Option<String> {
    let mut bound = prefix.to_owned();
    while let Some(last) = bound.pop() {
        if let Some(next) = next_char(last) {
            bound.push(next);
            return Some(bound);
        }
    }
    None
}

/// The character with the next code point after `c`, or `None` after `U+10FFFF`.
fn next_char(c: char) -> Option<char> {
    match c {
        char::MAX => None,
        // The surrogates U+D800..=U+DFFF are not characters.
        '\u{D7FF}' => Some('\u{E000}'),
        _ => char::from_u32(u32::from(c) + 1),
    }
}

/// The bounds of a `list` or `scan` page over the primary-key index.
pub(crate) struct KeyRange<'a> {
    /// Start strictly after this cursor (only if it is at or past the prefix: a
    /// cursor before the prefix is the same as no cursor).
    pub(crate) after: Option<&'a str>,
    /// The first path past every path with the prefix (`None`: no upper bound).
    pub(crate) upper: Option<String>,
    /// At most this many paths (at least 1).
    pub(crate) limit: i64,
}

impl<'a> KeyRange<'a> {
    /// Validates `prefix`; `None` when `limit` is 0 (an empty page).
    pub(crate) fn new(
        prefix: &str,
        start_after: Option<&'a str>,
        limit: usize,
    ) -> Result<Option<Self>> {
        validate_prefix(prefix)?;
        if limit == 0 {
            return Ok(None);
        }
        Ok(Some(Self {
            after: start_after.filter(|cursor| *cursor >= prefix),
            upper: prefix_upper_bound(prefix),
            limit: i64::try_from(limit).unwrap_or(i64::MAX),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_and_limit_paths() {
        for ok in ["a", "keys/patients/v/3", "a/", "a%_b", "é"] {
            assert!(validate(ok).is_ok(), "{ok:?}");
        }
        assert!(validate(&"x".repeat(MAX_LEN)).is_ok());
        assert!(validate(&"é".repeat(MAX_LEN / 2)).is_ok());
    }

    #[test]
    fn rejects_bad_paths() {
        let long = "x".repeat(MAX_LEN + 1);
        let long_multibyte = format!("{}x", "é".repeat(MAX_LEN / 2));
        for bad in ["", "/a", "a\0b", &long, &long_multibyte] {
            assert!(
                matches!(validate(bad), Err(Error::InvalidPath(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn empty_prefix_is_allowed_but_bad_prefixes_are_not() {
        assert!(validate_prefix("").is_ok());
        assert!(validate_prefix("/").is_err());
        assert!(validate_prefix("a\0").is_err());
    }

    #[test]
    fn upper_bounds() {
        assert_eq!(prefix_upper_bound(""), None);
        assert_eq!(prefix_upper_bound("a"), Some("b".into()));
        assert_eq!(prefix_upper_bound("keys/"), Some("keys0".into()));
        assert_eq!(prefix_upper_bound("a%"), Some("a&".into()));
        assert_eq!(prefix_upper_bound("a\u{D7FF}"), Some("a\u{E000}".into()));
        assert_eq!(prefix_upper_bound("a\u{10FFFF}"), Some("b".into()));
        assert_eq!(prefix_upper_bound("\u{10FFFF}\u{10FFFF}"), None);
        assert_eq!(prefix_upper_bound("\u{7F}"), Some("\u{80}".into()));
    }

    #[test]
    fn upper_bound_brackets_exactly_the_prefixed_strings() {
        let prefixes = ["a", "ab", "a\u{7F}", "a\u{10FFFF}", "é", "\u{D7FF}"];
        let samples = [
            "",
            "a",
            "a\0",
            "a\u{7F}",
            "a\u{7F}z",
            "a\u{80}",
            "a\u{10FFFF}",
            "a\u{10FFFF}z",
            "ab",
            "abc",
            "ac",
            "b",
            "é",
            "éa",
            "ê",
            "\u{D7FF}",
            "\u{D7FF}x",
            "\u{E000}",
        ];
        for prefix in prefixes {
            let bound = prefix_upper_bound(prefix);
            for s in samples {
                let in_range = s >= prefix && bound.as_deref().is_none_or(|b| s < b);
                assert_eq!(in_range, s.starts_with(prefix), "{prefix:?} / {s:?}");
            }
        }
    }
}
