//! Glob patterns on key names and principals: `*` matches any run of characters
//! (including none), `?` exactly one character, everything else itself.
//!
//! There is no escape and no character class: `[`, `\` and `/` are literal, so
//! `spiffe://hospital/ns/ehr/*` matches every identity under that prefix, across
//! `/`. Matching is on Unicode characters (`?` is one `char`, not one byte) and is
//! case-sensitive.
//!
//! A [`Glob`] is validated once, when a policy or role is parsed, and compiled:
//! a pattern without wildcards is compared as a string, a pattern of only `*`
//! matches at once, and any other splits at its stars into an anchored head, an
//! anchored tail and the segments between, each found at its leftmost place. That
//! greedy choice is always right (a later segment only gains room from an earlier
//! one ending sooner), so there is no backtracking across stars: the worst case is
//! O(text × pattern), never exponential.
//!
//! This module does not know what it is matching: key-name character rules are
//! checked by the policy parser.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest pattern accepted, in bytes (a SPIFFE ID is at most 2048 bytes;
/// key names at most 128).
pub const MAX_GLOB_LEN: usize = 2048;

/// A validated glob pattern (see the module docs).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Glob {
    source: Box<str>,
    matcher: Matcher,
}

/// Why a pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GlobError {
    /// The pattern is the empty string (it would match only the empty name,
    /// which no key or principal has).
    #[error("the pattern is empty")]
    Empty,
    /// The pattern is longer than [`MAX_GLOB_LEN`] bytes.
    #[error("the pattern is {0} bytes long; at most {MAX_GLOB_LEN} are allowed")]
    TooLong(usize),
    /// The pattern contains a control character (a paste accident, never a name).
    #[error("the pattern contains a control character")]
    ControlCharacter,
}

impl Glob {
    /// Validates and compiles `pattern`.
    pub fn new(pattern: &str) -> Result<Self, GlobError> {
        if pattern.is_empty() {
            return Err(GlobError::Empty);
        }
        if pattern.len() > MAX_GLOB_LEN {
            return Err(GlobError::TooLong(pattern.len()));
        }
        if pattern.chars().any(char::is_control) {
            return Err(GlobError::ControlCharacter);
        }
        Ok(Self {
            matcher: Matcher::compile(pattern),
            source: pattern.into(),
        })
    }

    /// Whether `text` matches the whole pattern.
    pub fn matches(&self, text: &str) -> bool {
        match &self.matcher {
            Matcher::Exact => *self.source == *text,
            Matcher::Everything => true,
            Matcher::Anchored(segment) => segment.match_at(text, 0) == Some(text.len()),
            Matcher::Stars { head, middle, tail } => {
                let Some(head_end) = head.match_at(text, 0) else {
                    return false;
                };
                let Some(tail_start) = tail.match_back(text, text.len()) else {
                    return false;
                };
                if head_end > tail_start {
                    return false;
                }
                // Segments between the stars may not overlap the tail.
                let between = &text[..tail_start];
                let mut at = head_end;
                for segment in middle.iter() {
                    match segment.find(between, at) {
                        Some(end) => at = end,
                        None => return false,
                    }
                }
                true
            }
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the pattern has no wildcard (it matches only itself).
    pub fn is_exact(&self) -> bool {
        matches!(self.matcher, Matcher::Exact)
    }

    /// Whether the pattern matches every string (it is made only of `*`).
    pub fn matches_everything(&self) -> bool {
        matches!(self.matcher, Matcher::Everything)
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Glob").field(&self.source).finish()
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl std::str::FromStr for Glob {
    type Err = GlobError;

    fn from_str(pattern: &str) -> Result<Self, GlobError> {
        Self::new(pattern)
    }
}

impl TryFrom<String> for Glob {
    type Error = GlobError;

    fn try_from(pattern: String) -> Result<Self, GlobError> {
        Self::new(&pattern)
    }
}

impl From<Glob> for String {
    fn from(glob: Glob) -> String {
        glob.source.into()
    }
}

/// The compiled form of a pattern.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Matcher {
    /// No wildcard: string equality with the source.
    Exact,
    /// Only stars.
    Everything,
    /// `?` but no `*`: one segment covering the whole text.
    Anchored(Segment),
    /// At least one `*`: `head*middle[0]*…*tail`; head and tail may be empty,
    /// middle segments never are.
    Stars {
        head: Segment,
        middle: Box<[Segment]>,
        tail: Segment,
    },
}

impl Matcher {
    fn compile(pattern: &str) -> Self {
        if !pattern.contains(['*', '?']) {
            return Self::Exact;
        }
        if pattern.chars().all(|c| c == '*') {
            return Self::Everything;
        }
        let mut parts = pattern.split('*');
        let head = Segment::compile(parts.next().unwrap_or_default());
        let mut rest: Vec<&str> = parts.collect();
        let Some(tail) = rest.pop() else {
            return Self::Anchored(head);
        };
        Self::Stars {
            head,
            middle: rest
                .into_iter()
                .filter(|part| !part.is_empty())
                .map(Segment::compile)
                .collect(),
            tail: Segment::compile(tail),
        }
    }
}

/// A run of the pattern between stars: literals and `?`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Segment(Box<[Token]>);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Token {
    Literal(Box<str>),
    One,
}

impl Segment {
    fn compile(part: &str) -> Self {
        let mut tokens = Vec::new();
        for (i, piece) in part.split('?').enumerate() {
            if i > 0 {
                tokens.push(Token::One);
            }
            if !piece.is_empty() {
                tokens.push(Token::Literal(piece.into()));
            }
        }
        Self(tokens.into())
    }

    /// Matches the segment starting at byte `at` (a char boundary) of `text`;
    /// returns the byte offset just past it.
    fn match_at(&self, text: &str, mut at: usize) -> Option<usize> {
        for token in self.0.iter() {
            let rest = &text[at..];
            match token {
                Token::Literal(literal) => {
                    if !rest.starts_with(&**literal) {
                        return None;
                    }
                    at += literal.len();
                }
                Token::One => at += rest.chars().next()?.len_utf8(),
            }
        }
        Some(at)
    }

    /// Matches the segment ending at byte `end` (a char boundary) of `text`;
    /// returns the byte offset where it starts.
    fn match_back(&self, text: &str, mut end: usize) -> Option<usize> {
        for token in self.0.iter().rev() {
            let before = &text[..end];
            match token {
                Token::Literal(literal) => {
                    if !before.ends_with(&**literal) {
                        return None;
                    }
                    end -= literal.len();
                }
                Token::One => end -= before.chars().next_back()?.len_utf8(),
            }
        }
        Some(end)
    }

    /// The end of the leftmost match in `text` starting at or after byte `from`.
    fn find(&self, text: &str, from: usize) -> Option<usize> {
        let mut start = from;
        loop {
            // Skip to the next place the first literal occurs, if the segment
            // starts with one: most segments do, and `str::find` is fast.
            if let Some(Token::Literal(first)) = self.0.first() {
                start += text[start..].find(&**first)?;
            }
            if let Some(end) = self.match_at(text, start) {
                return Some(end);
            }
            start += text[start..].chars().next()?.len_utf8();
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The obviously-correct matcher: recursion over characters.
    fn reference(pattern: &[char], text: &[char]) -> bool {
        match pattern.split_first() {
            None => text.is_empty(),
            Some(('*', rest)) => (0..=text.len()).any(|skip| reference(rest, &text[skip..])),
            Some(('?', rest)) => !text.is_empty() && reference(rest, &text[1..]),
            Some((c, rest)) => text.first() == Some(c) && reference(rest, &text[1..]),
        }
    }

    fn reference_str(pattern: &str, text: &str) -> bool {
        let pattern: Vec<char> = pattern.chars().collect();
        let text: Vec<char> = text.chars().collect();
        reference(&pattern, &text)
    }

    fn glob(pattern: &str) -> Glob {
        Glob::new(pattern).expect("valid pattern")
    }

    #[test]
    fn examples() {
        let cases: &[(&str, &str, bool)] = &[
            ("patients", "patients", true),
            ("patients", "patients2", false),
            ("patients", "patient", false),
            ("clinic-*", "clinic-", true),
            ("clinic-*", "clinic-north", true),
            ("clinic-*", "clinic", false),
            ("clinic-*", "xclinic-north", false),
            ("*", "", true),
            ("*", "anything", true),
            ("**", "x", true),
            ("?", "a", true),
            ("?", "é", true),
            ("?", "", false),
            ("?", "ab", false),
            ("a?c", "abc", true),
            ("a?c", "aéc", true),
            ("a?c", "ac", false),
            ("*-prod", "ehr-prod", true),
            ("*-prod", "ehr-prod-old", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "acb", false),
            ("a*a", "a", false),
            ("a*a", "aa", true),
            ("*ab*ab*", "abab", true),
            ("*ab*ab*", "aba", false),
            ("*?", "", false),
            ("*?", "x", true),
            ("ab*?b", "abb", false),
            ("ab*?b", "abxb", true),
            ("ab*?b", "abéb", true),
            (
                "spiffe://hospital/ns/ehr/*",
                "spiffe://hospital/ns/ehr/sa/api",
                true,
            ),
            (
                "spiffe://hospital/ns/ehr/*",
                "spiffe://hospital/ns/billing/sa/api",
                false,
            ),
            ("[a]", "[a]", true),
            ("[a]", "a", false),
            ("Patients", "patients", false),
        ];
        for &(pattern, text, expected) in cases {
            assert_eq!(glob(pattern).matches(text), expected, "{pattern} ~ {text}");
            assert_eq!(
                reference_str(pattern, text),
                expected,
                "reference {pattern}"
            );
        }
    }

    #[test]
    fn compiled_shapes() {
        assert!(glob("patients").is_exact());
        assert!(!glob("patients").matches_everything());
        assert!(glob("***").matches_everything());
        assert!(!glob("a*").is_exact());
        assert!(!glob("a*").matches_everything());
        assert!(!glob("?").is_exact());
    }

    #[test]
    fn invalid_patterns_are_refused() {
        assert_eq!(Glob::new(""), Err(GlobError::Empty));
        assert_eq!(Glob::new("a\nb"), Err(GlobError::ControlCharacter));
        assert_eq!(Glob::new("a\u{7f}"), Err(GlobError::ControlCharacter));
        let long = "a".repeat(MAX_GLOB_LEN + 1);
        assert_eq!(Glob::new(&long), Err(GlobError::TooLong(MAX_GLOB_LEN + 1)));
        assert!(Glob::new(&long[1..]).is_ok());
    }

    #[test]
    fn serde_round_trips_through_the_source_and_validates() {
        let g: Glob = serde_json::from_str("\"clinic-*\"").expect("valid");
        assert!(g.matches("clinic-north"));
        assert_eq!(
            serde_json::to_string(&g).expect("serialize"),
            "\"clinic-*\""
        );
        assert!(serde_json::from_str::<Glob>("\"\"").is_err());
        assert_eq!(g.to_string(), "clinic-*");
        assert_eq!(format!("{g:?}"), "Glob(\"clinic-*\")");
    }

    /// Patterns that make backtracking matchers exponential finish at once.
    #[test]
    fn pathological_patterns_are_fast() {
        let text = "a".repeat(MAX_GLOB_LEN);
        let pattern = format!("{}b", "a*".repeat(40));
        let started = std::time::Instant::now();
        for _ in 0..10 {
            assert!(!glob(&pattern).matches(&text));
        }
        assert!(glob(&format!("{}a", "a*".repeat(40))).matches(&text));
        let elapsed = started.elapsed();
        assert!(
            elapsed < std::time::Duration::from_secs(1),
            "took {elapsed:?}"
        );
    }

    /// Characters that collide often, with a multi-byte one to test `?` on
    /// characters rather than bytes.
    fn text_strategy() -> impl Strategy<Value = String> {
        proptest::collection::vec(prop::sample::select(vec!['a', 'b', 'é', '-']), 0..12)
            .prop_map(|chars| chars.into_iter().collect())
    }

    fn pattern_strategy() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop::sample::select(vec!['a', 'b', 'é', '-', '*', '?']),
            1..9,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn agrees_with_the_reference(pattern in pattern_strategy(), text in text_strategy()) {
            let g = glob(&pattern);
            prop_assert_eq!(g.matches(&text), reference_str(&pattern, &text));
        }

        #[test]
        fn a_text_matches_itself_and_star_variants(text in text_strategy()) {
            prop_assume!(!text.is_empty());
            prop_assert!(glob(&text).matches(&text));
            let (prefix, suffix) = (format!("{text}*"), format!("*{text}"));
            let (longer, earlier) = (format!("{text}xyz"), format!("xyz{text}"));
            prop_assert!(glob(&prefix).matches(&longer));
            prop_assert!(glob(&suffix).matches(&earlier));
        }
    }
}
