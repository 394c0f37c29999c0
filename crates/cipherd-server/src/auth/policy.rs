//! Policies: named lists of rules (key-name globs × operations, with optional
//! purposes of use and break-glass), and [`decide`], the one pure function that
//! says whether a call is allowed.
//!
//! A policy document is TOML, a list of `[[rule]]` tables (the operator's guide,
//! with examples, is `docs/policies.md`):
//!
//! ```toml
//! [[rule]]
//! keys = ["patients", "clinic-*"]
//! operations = ["encrypt", "decrypt"]
//!
//! [[rule]]
//! keys = ["patients"]
//! operations = ["decrypt"]
//! break_glass = true
//! ```
//!
//! The semantics, all in [`decide`]: default deny; a principal gets the union of
//! every rule of every policy bound to it; a rule matches a call when it lists the
//! operation, one of its globs matches the key (key-scoped operations only), and
//! its purpose condition holds: a rule with `purposes` needs one of them, a rule
//! with `break_glass = true` needs purpose `emergency` and a non-empty reason, a
//! plain rule ignores the purpose. A call allowed only by break-glass rules is
//! [`Decision::Allow`] with `break_glass: true`, for the audit record to flag.
//!
//! [`Policy::parse`] validates a whole document before anything is stored, with
//! errors naming the rule and the problem; the parsed form is precompiled
//! (operation bit sets, exact key names apart from globs) so that deciding
//! allocates nothing. This module does no I/O and knows nothing of principals,
//! tokens or storage: which policies apply to a caller is decided elsewhere.

use std::{fmt, str::FromStr, sync::LazyLock};

use super::glob::{Glob, GlobError};

/// The reserved name of the built-in policy that allows everything
/// ([`Policy::root`]); no document can be stored under it.
pub const ROOT_POLICY: &str = "root";

/// The purpose a break-glass call carries.
pub const EMERGENCY: &str = "emergency";

/// The largest policy document accepted, in bytes.
pub const MAX_POLICY_BYTES: usize = 64 * 1024;

/// The most rules one policy may have.
pub const MAX_RULES: usize = 1024;

/// What a call does, as policies name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    /// `encrypt`: Encrypt, and the destination side of a cross-key Rewrap.
    Encrypt,
    /// `decrypt`
    Decrypt,
    /// `rewrap`: re-encrypt under the key's latest version (the source side of a
    /// cross-key rewrap).
    Rewrap,
    /// `datakey`: generate a data key wrapped under the key.
    Datakey,
    /// `key.create`
    KeyCreate,
    /// `key.read`: read a key's metadata, list keys.
    KeyRead,
    /// `key.rotate`
    KeyRotate,
    /// `key.config`: change a key's settings.
    KeyConfig,
    /// `key.trim`: remove old versions.
    KeyTrim,
    /// `key.delete`
    KeyDelete,
    /// `key.export`: export key material.
    KeyExport,
    /// `key.backup`: back up a key sealed under the instance's backup wrapping
    /// key, and restore such a backup under the key's name.
    KeyBackup,
    /// `system`: seal and the other system administration.
    System,
    /// `token`: create, list, look up and revoke tokens.
    Token,
    /// `role`: manage roles.
    Role,
    /// `policy`: manage policies.
    Policy,
    /// `audit`: audit administration (the investigator's HMAC).
    Audit,
    /// `backup`: stream a backup of the whole store (`SystemService.Backup`).
    /// Encrypted as stored, but every key's material and the sealed root key
    /// leave with it: grant it as sparingly as `system`.
    Backup,
}

impl Operation {
    /// Every operation, key-scoped ones first.
    pub const ALL: [Operation; 18] = [
        Operation::Encrypt,
        Operation::Decrypt,
        Operation::Rewrap,
        Operation::Datakey,
        Operation::KeyCreate,
        Operation::KeyRead,
        Operation::KeyRotate,
        Operation::KeyConfig,
        Operation::KeyTrim,
        Operation::KeyDelete,
        Operation::KeyExport,
        Operation::KeyBackup,
        Operation::System,
        Operation::Token,
        Operation::Role,
        Operation::Policy,
        Operation::Audit,
        Operation::Backup,
    ];

    /// The name used in policy documents and audit records.
    pub const fn as_str(self) -> &'static str {
        match self {
            Operation::Encrypt => "encrypt",
            Operation::Decrypt => "decrypt",
            Operation::Rewrap => "rewrap",
            Operation::Datakey => "datakey",
            Operation::KeyCreate => "key.create",
            Operation::KeyRead => "key.read",
            Operation::KeyRotate => "key.rotate",
            Operation::KeyConfig => "key.config",
            Operation::KeyTrim => "key.trim",
            Operation::KeyDelete => "key.delete",
            Operation::KeyExport => "key.export",
            Operation::KeyBackup => "key.backup",
            Operation::System => "system",
            Operation::Token => "token",
            Operation::Role => "role",
            Operation::Policy => "policy",
            Operation::Audit => "audit",
            Operation::Backup => "backup",
        }
    }

    /// Whether the operation acts on a named key (rules for it need `keys`).
    pub const fn is_key_scoped(self) -> bool {
        !matches!(
            self,
            Operation::System
                | Operation::Token
                | Operation::Role
                | Operation::Policy
                | Operation::Audit
                | Operation::Backup
        )
    }

    /// Whether calls of this operation may carry a purpose of use (and so rules
    /// for it may list `purposes` or be `break_glass`).
    pub const fn takes_purpose(self) -> bool {
        matches!(
            self,
            Operation::Decrypt | Operation::Rewrap | Operation::Datakey
        )
    }

    const fn bit(self) -> u32 {
        1 << self as u32
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Operation {
    type Err = UnknownOperation;

    fn from_str(name: &str) -> Result<Self, UnknownOperation> {
        Operation::ALL
            .into_iter()
            .find(|op| op.as_str() == name)
            .ok_or_else(|| UnknownOperation(name.to_owned()))
    }
}

/// A name that is not one of the [`Operation`]s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown operation {0:?}")]
pub struct UnknownOperation(pub String);

/// Whether `word` is a well-formed purpose of use: `^[a-z][a-z0-9_-]{0,31}$`
/// (`treatment`, `payment`, `operations`, `research`, `emergency`, or a word the
/// site defines). The request path checks a call's purpose with this too.
pub fn is_purpose_word(word: &str) -> bool {
    let bytes = word.as_bytes();
    matches!(bytes.first(), Some(b'a'..=b'z'))
        && bytes.len() <= 32
        && bytes
            .iter()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
}

/// A call to be decided: what it does, to which key, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access<'a> {
    /// The operation.
    pub operation: Operation,
    /// The key, for key-scoped operations. `None` on a key-scoped operation asks
    /// for it on every key (listing): only a rule with a glob that matches every
    /// name (`*`) allows that. Ignored for administration operations.
    pub key: Option<&'a str>,
    /// The call's purpose of use, if it carries one.
    pub purpose: Option<&'a str>,
    /// The call's free-text reason, if it carries one (break-glass needs it).
    pub reason: Option<&'a str>,
}

/// The outcome of [`decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Allowed.
    Allow {
        /// Only break-glass rules allowed it: the audit record flags the call.
        break_glass: bool,
    },
    /// Not allowed (PERMISSION_DENIED).
    Deny,
}

impl Decision {
    /// Whether the call may go ahead.
    pub fn is_allowed(self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

/// Decides `access` against the union of `policies` (see the module docs).
///
/// Pure and allocation-free; an empty slice denies everything.
pub fn decide(policies: &[&Policy], access: &Access<'_>) -> Decision {
    let bit = access.operation.bit();
    let key_scoped = access.operation.is_key_scoped();
    let emergency = access.purpose == Some(EMERGENCY)
        && access
            .reason
            .is_some_and(|reason| !reason.trim().is_empty());
    let mut break_glass = false;
    for policy in policies {
        if policy.operations & bit == 0 {
            continue;
        }
        for rule in policy.rules.iter() {
            if rule.operations & bit == 0 {
                continue;
            }
            if rule.break_glass {
                // One break-glass match is as good as many: look only for a
                // plain rule from here on.
                if break_glass || !emergency {
                    continue;
                }
            } else if let Some(purposes) = &rule.purposes {
                let Some(purpose) = access.purpose else {
                    continue;
                };
                if !purposes.iter().any(|p| **p == *purpose) {
                    continue;
                }
            }
            if key_scoped && !rule.keys.matches(access.key) {
                continue;
            }
            if !rule.break_glass {
                return Decision::Allow { break_glass: false };
            }
            break_glass = true;
        }
    }
    if break_glass {
        Decision::Allow { break_glass: true }
    } else {
        Decision::Deny
    }
}

/// A named, validated, precompiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    name: Box<str>,
    source: Box<str>,
    rules: Box<[Rule]>,
    /// The union of the rules' operations, to skip a policy at once.
    operations: u32,
}

impl Policy {
    /// Validates `name` and parses `document`; nothing is stored yet.
    pub fn parse(name: &str, document: &str) -> Result<Policy, PolicyError> {
        Self::validate_name(name)?;
        Self::parse_unchecked(name, document)
    }

    /// Checks a policy name: `^[a-z0-9][a-z0-9_.-]{0,63}$`, and not `root`.
    pub fn validate_name(name: &str) -> Result<(), PolicyError> {
        let bytes = name.as_bytes();
        let well_formed = matches!(bytes.first(), Some(b'a'..=b'z' | b'0'..=b'9'))
            && bytes.len() <= 64
            && bytes
                .iter()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-'));
        if !well_formed {
            return Err(PolicyError::InvalidName(name.to_owned()));
        }
        if name == ROOT_POLICY {
            return Err(PolicyError::Reserved);
        }
        Ok(())
    }

    /// The built-in `root` policy: every operation on every key.
    pub fn root() -> &'static Policy {
        static ROOT: LazyLock<Policy> = LazyLock::new(|| {
            Policy::parse_unchecked(ROOT_POLICY, &root_document())
                .expect("the built-in root document is valid (tested)")
        });
        &ROOT
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The document it was parsed from, as written (for `policy read`).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether this is the built-in `root` policy.
    pub fn is_root(&self) -> bool {
        *self.name == *ROOT_POLICY
    }

    /// How many rules it has.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    fn parse_unchecked(name: &str, document: &str) -> Result<Policy, PolicyError> {
        if document.len() > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge(document.len()));
        }
        let table: toml::Table =
            toml::from_str(document).map_err(|e| PolicyError::Syntax(e.to_string()))?;
        if let Some(field) = table.keys().find(|k| *k != "rule") {
            return Err(PolicyError::UnknownField(field.clone()));
        }
        let rules = match table.get("rule") {
            None => return Err(PolicyError::NoRules),
            Some(toml::Value::Array(rules)) => rules,
            Some(_) => return Err(PolicyError::RuleNotATable(1)),
        };
        if rules.is_empty() {
            return Err(PolicyError::NoRules);
        }
        if rules.len() > MAX_RULES {
            return Err(PolicyError::TooManyRules(rules.len()));
        }
        let rules = rules
            .iter()
            .enumerate()
            .map(|(i, value)| {
                let index = i + 1;
                let toml::Value::Table(table) = value else {
                    return Err(PolicyError::RuleNotATable(index));
                };
                Rule::parse(table).map_err(|problem| PolicyError::Rule { index, problem })
            })
            .collect::<Result<Box<[Rule]>, _>>()?;
        Ok(Policy {
            name: name.into(),
            source: document.into(),
            operations: rules.iter().fold(0, |all, rule| all | rule.operations),
            rules,
        })
    }
}

/// The `root` policy's document: one rule for every key-scoped operation on
/// `*`, one for the administration operations.
fn root_document() -> String {
    let list = |key_scoped: bool| {
        Operation::ALL
            .iter()
            .filter(|op| op.is_key_scoped() == key_scoped)
            .map(|op| format!("{:?}", op.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "# built in: every operation on every key\n\
         [[rule]]\nkeys = [\"*\"]\noperations = [{}]\n\n\
         [[rule]]\noperations = [{}]\n",
        list(true),
        list(false)
    )
}

/// Why a policy name or document was refused (INVALID_ARGUMENT, reason
/// `INVALID_POLICY`); the message is for the operator who wrote it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The name does not have the form `^[a-z0-9][a-z0-9_.-]{0,63}$`.
    #[error(
        "policy name {0:?} is invalid: 1 to 64 of a-z, 0-9, '_', '.', '-', starting with a letter or digit"
    )]
    InvalidName(String),
    /// The name is `root`.
    #[error("the policy name \"root\" is reserved for the built-in policy that allows everything")]
    Reserved,
    /// The document is larger than [`MAX_POLICY_BYTES`].
    #[error("the policy document is {0} bytes; at most {MAX_POLICY_BYTES} are allowed")]
    TooLarge(usize),
    /// The document is not valid TOML (the message says where).
    #[error("the policy document is not valid TOML: {0}")]
    Syntax(String),
    /// A top-level field other than `rule`.
    #[error("unknown top-level field {0:?}: a policy is a list of [[rule]] tables")]
    UnknownField(String),
    /// No `[[rule]]` at all (a policy that allows nothing is a mistake).
    #[error("the policy has no [[rule]]")]
    NoRules,
    /// More than [`MAX_RULES`] rules.
    #[error("the policy has {0} rules; at most {MAX_RULES} are allowed")]
    TooManyRules(usize),
    /// `rule` is not an array of tables (write `[[rule]]`, not `[rule]`).
    #[error("rule {0}: not a table; write each rule as a [[rule]] table")]
    RuleNotATable(usize),
    /// One rule is wrong.
    #[error("rule {index}: {problem}")]
    Rule {
        /// The rule's position in the document, from 1.
        index: usize,
        /// What is wrong with it.
        problem: RuleProblem,
    },
}

/// What is wrong with one rule of a policy document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleProblem {
    /// A field other than `keys`, `operations`, `purposes`, `break_glass`.
    #[error("unknown field {0:?} (a rule has keys, operations, purposes and break_glass)")]
    UnknownField(String),
    /// `operations` is missing.
    #[error("operations is missing")]
    MissingOperations,
    /// `operations` is an empty list.
    #[error("operations is empty")]
    EmptyOperations,
    /// A field is not a list of strings.
    #[error("{0} must be a list of strings")]
    NotAListOfStrings(&'static str),
    /// `break_glass` is not `true` or `false`.
    #[error("break_glass must be true or false")]
    BreakGlassNotABool,
    /// An operation name is not known.
    #[error("{0}")]
    UnknownOperation(UnknownOperation),
    /// Key-scoped and administration operations in one rule.
    #[error(
        "operations mixes key operations ({key}) and administration operations ({admin}); write two rules"
    )]
    MixedOperations {
        /// A key-scoped operation of the rule.
        key: Operation,
        /// An administration operation of the rule.
        admin: Operation,
    },
    /// A rule with key-scoped operations has no `keys`.
    #[error("keys is missing (key operations need the key names or globs they apply to)")]
    MissingKeys,
    /// `keys` is an empty list.
    #[error("keys is empty")]
    EmptyKeys,
    /// `keys` on a rule of administration operations, which act on no key.
    #[error("keys is set, but {0} acts on no key; drop keys from this rule")]
    KeysWithoutKeyOperations(Operation),
    /// A key glob is not a valid pattern.
    #[error("keys: {pattern:?}: {error}")]
    BadGlob {
        /// The pattern as written.
        pattern: String,
        /// Why it was refused.
        error: GlobError,
    },
    /// A key glob has a character no key name has.
    #[error(
        "keys: {0:?} can match no key: key names have only A-Z, a-z, 0-9, '_', '.', '-' (and globs '*', '?')"
    )]
    BadKeyCharacter(String),
    /// `purposes` or `break_glass` on an operation that takes no purpose.
    #[error("{field} is only allowed with decrypt, rewrap and datakey, not {operation}")]
    PurposeNotAllowed {
        /// `purposes` or `break_glass`.
        field: &'static str,
        /// The operation that takes no purpose.
        operation: Operation,
    },
    /// `purposes` is an empty list (the rule could never match).
    #[error("purposes is empty; drop it to allow any purpose")]
    EmptyPurposes,
    /// A purpose is not a word `^[a-z][a-z0-9_-]{0,31}$`.
    #[error(
        "purposes: {0:?} is not a purpose word (1 to 32 of a-z, 0-9, '_', '-', starting with a letter)"
    )]
    BadPurpose(String),
    /// `emergency` in `purposes`: emergency access is break-glass, always with a
    /// reason and flagged in the audit record.
    #[error("purposes: \"emergency\" is for break-glass rules; write break_glass = true instead")]
    EmergencyPurpose,
    /// `purposes` together with `break_glass = true`.
    #[error(
        "purposes and break_glass = true together: a break-glass rule always takes purpose \"emergency\""
    )]
    PurposesWithBreakGlass,
}

/// One compiled rule.
#[derive(Debug, Clone)]
struct Rule {
    operations: u32,
    keys: KeySet,
    /// `None`: any purpose (or none).
    purposes: Option<Box<[Box<str>]>>,
    break_glass: bool,
}

impl Rule {
    fn parse(table: &toml::Table) -> Result<Rule, RuleProblem> {
        if let Some(field) = table.keys().find(|k| {
            !matches!(
                k.as_str(),
                "keys" | "operations" | "purposes" | "break_glass"
            )
        }) {
            return Err(RuleProblem::UnknownField(field.clone()));
        }

        let names = string_list(table, "operations")?.ok_or(RuleProblem::MissingOperations)?;
        if names.is_empty() {
            return Err(RuleProblem::EmptyOperations);
        }
        let operations = names
            .iter()
            .map(|name| name.parse::<Operation>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(RuleProblem::UnknownOperation)?;
        let key_op = operations.iter().copied().find(|op| op.is_key_scoped());
        let admin_op = operations.iter().copied().find(|op| !op.is_key_scoped());
        if let (Some(key), Some(admin)) = (key_op, admin_op) {
            return Err(RuleProblem::MixedOperations { key, admin });
        }

        let keys = match (string_list(table, "keys")?, admin_op) {
            (Some(_), Some(admin)) => return Err(RuleProblem::KeysWithoutKeyOperations(admin)),
            (None, Some(_)) => KeySet::default(),
            (None, None) => return Err(RuleProblem::MissingKeys),
            (Some(patterns), None) => KeySet::parse(&patterns)?,
        };

        let break_glass = match table.get("break_glass") {
            None => false,
            Some(toml::Value::Boolean(b)) => *b,
            Some(_) => return Err(RuleProblem::BreakGlassNotABool),
        };
        let purposes = string_list(table, "purposes")?;
        let needs_purpose = if purposes.is_some() {
            Some("purposes")
        } else if break_glass {
            Some("break_glass")
        } else {
            None
        };
        if let Some(field) = needs_purpose
            && let Some(&operation) = operations.iter().find(|op| !op.takes_purpose())
        {
            return Err(RuleProblem::PurposeNotAllowed { field, operation });
        }
        if break_glass && purposes.is_some() {
            return Err(RuleProblem::PurposesWithBreakGlass);
        }
        let purposes = match purposes {
            None => None,
            Some(words) if words.is_empty() => return Err(RuleProblem::EmptyPurposes),
            Some(words) => {
                for word in &words {
                    if !is_purpose_word(word) {
                        return Err(RuleProblem::BadPurpose(word.to_string()));
                    }
                    if *word == EMERGENCY {
                        return Err(RuleProblem::EmergencyPurpose);
                    }
                }
                Some(words.into_iter().map(Box::from).collect())
            }
        };

        Ok(Rule {
            operations: operations.iter().fold(0, |all, op| all | op.bit()),
            keys,
            purposes,
            break_glass,
        })
    }
}

/// A rule's key names and globs, split so that exact names are compared as
/// strings.
#[derive(Debug, Clone, Default)]
struct KeySet {
    /// A glob matching every name is present.
    everything: bool,
    exact: Box<[Box<str>]>,
    globs: Box<[Glob]>,
}

impl KeySet {
    fn parse(patterns: &[&str]) -> Result<KeySet, RuleProblem> {
        if patterns.is_empty() {
            return Err(RuleProblem::EmptyKeys);
        }
        let mut set = KeySet::default();
        let mut exact = Vec::new();
        let mut globs = Vec::new();
        for &pattern in patterns {
            let glob = Glob::new(pattern).map_err(|error| RuleProblem::BadGlob {
                pattern: pattern.to_owned(),
                error,
            })?;
            if !pattern
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'*' | b'?'))
            {
                return Err(RuleProblem::BadKeyCharacter(pattern.to_owned()));
            }
            if glob.matches_everything() {
                set.everything = true;
            } else if glob.is_exact() {
                exact.push(Box::from(pattern));
            } else {
                globs.push(glob);
            }
        }
        set.exact = exact.into();
        set.globs = globs.into();
        Ok(set)
    }

    /// `None` (every key) matches only a set with an everything glob.
    fn matches(&self, key: Option<&str>) -> bool {
        if self.everything {
            return true;
        }
        let Some(key) = key else {
            return false;
        };
        self.exact.iter().any(|name| **name == *key) || self.globs.iter().any(|g| g.matches(key))
    }
}

/// `table[field]` as a list of strings; `None` when absent.
fn string_list<'t>(
    table: &'t toml::Table,
    field: &'static str,
) -> Result<Option<Vec<&'t str>>, RuleProblem> {
    let Some(value) = table.get(field) else {
        return Ok(None);
    };
    let toml::Value::Array(items) = value else {
        return Err(RuleProblem::NotAListOfStrings(field));
    };
    items
        .iter()
        .map(|item| item.as_str().ok_or(RuleProblem::NotAListOfStrings(field)))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn policy(document: &str) -> Policy {
        Policy::parse("test", document).expect("valid policy")
    }

    fn access<'a>(operation: Operation, key: Option<&'a str>) -> Access<'a> {
        Access {
            operation,
            key,
            purpose: None,
            reason: None,
        }
    }

    fn with_purpose<'a>(
        operation: Operation,
        key: &'a str,
        purpose: Option<&'a str>,
        reason: Option<&'a str>,
    ) -> Access<'a> {
        Access {
            operation,
            key: Some(key),
            purpose,
            reason,
        }
    }

    const ALLOW: Decision = Decision::Allow { break_glass: false };
    const BREAK_GLASS: Decision = Decision::Allow { break_glass: true };

    const ISSUE_EXAMPLE: &str = r#"
[[rule]]
keys = ["patients", "clinic-*"]
operations = ["encrypt", "decrypt"]
"#;

    #[test]
    fn operation_names_round_trip_and_are_classified() {
        for op in Operation::ALL {
            assert_eq!(op.as_str().parse::<Operation>(), Ok(op));
            assert_eq!(op.to_string(), op.as_str());
        }
        let key_scoped: Vec<_> = Operation::ALL
            .into_iter()
            .filter(|op| op.is_key_scoped())
            .collect();
        assert_eq!(key_scoped.len(), 12);
        assert_eq!(&Operation::ALL[..12], &key_scoped[..]);
        assert_eq!("key.rotate".parse::<Operation>(), Ok(Operation::KeyRotate));
        assert_eq!(
            "Encrypt".parse::<Operation>(),
            Err(UnknownOperation("Encrypt".into()))
        );
        // Every operation has its own bit.
        let bits = Operation::ALL.iter().fold(0u32, |all, op| {
            assert_eq!(all & op.bit(), 0);
            all | op.bit()
        });
        assert_eq!(bits, (1 << Operation::ALL.len()) - 1);
    }

    #[test]
    fn the_issue_example_allows_exactly_what_it_says() {
        let p = policy(ISSUE_EXAMPLE);
        let d = |op, key| decide(&[&p], &access(op, Some(key)));
        assert_eq!(d(Operation::Encrypt, "patients"), ALLOW);
        assert_eq!(d(Operation::Decrypt, "clinic-north"), ALLOW);
        assert_eq!(d(Operation::Decrypt, "clinic-"), ALLOW);
        assert_eq!(d(Operation::Decrypt, "clinic"), Decision::Deny);
        assert_eq!(d(Operation::Decrypt, "patients-archive"), Decision::Deny);
        assert_eq!(d(Operation::Rewrap, "patients"), Decision::Deny);
        assert_eq!(d(Operation::KeyRotate, "patients"), Decision::Deny);
        assert_eq!(d(Operation::KeyDelete, "clinic-x"), Decision::Deny);
        assert_eq!(
            decide(&[&p], &access(Operation::Policy, None)),
            Decision::Deny
        );
        // Key-scoped without a key (listing) needs a `*` rule.
        assert_eq!(
            decide(&[&p], &access(Operation::Encrypt, None)),
            Decision::Deny
        );
        // A plain rule ignores the purpose.
        assert_eq!(
            decide(
                &[&p],
                &with_purpose(Operation::Decrypt, "patients", Some("research"), None)
            ),
            ALLOW
        );
        assert_eq!(p.name(), "test");
        assert_eq!(p.source(), ISSUE_EXAMPLE);
        assert_eq!(p.rule_count(), 1);
        assert!(!p.is_root());
    }

    #[test]
    fn default_deny() {
        assert_eq!(
            decide(&[], &access(Operation::Encrypt, Some("patients"))),
            Decision::Deny
        );
        assert_eq!(
            decide(&[], &access(Operation::System, None)),
            Decision::Deny
        );
    }

    #[test]
    fn union_of_policies_and_rules() {
        let encrypt = policy("[[rule]]\nkeys = [\"a\"]\noperations = [\"encrypt\"]\n");
        let decrypt = policy(
            "[[rule]]\nkeys = [\"b\"]\noperations = [\"decrypt\"]\n\
             [[rule]]\noperations = [\"token\"]\n",
        );
        let both = [&encrypt, &decrypt];
        assert_eq!(decide(&both, &access(Operation::Encrypt, Some("a"))), ALLOW);
        assert_eq!(decide(&both, &access(Operation::Decrypt, Some("b"))), ALLOW);
        assert_eq!(decide(&both, &access(Operation::Token, None)), ALLOW);
        // Union, not a cross product: encrypt on b is nobody's rule.
        assert_eq!(
            decide(&both, &access(Operation::Encrypt, Some("b"))),
            Decision::Deny
        );
        assert_eq!(
            decide(&[&encrypt], &access(Operation::Decrypt, Some("b"))),
            Decision::Deny
        );
        assert_eq!(
            decide(&both, &access(Operation::Role, None)),
            Decision::Deny
        );
    }

    #[test]
    fn admin_rules_ignore_the_key() {
        let p = policy("[[rule]]\noperations = [\"system\", \"audit\"]\n");
        assert_eq!(decide(&[&p], &access(Operation::System, None)), ALLOW);
        assert_eq!(
            decide(&[&p], &access(Operation::Audit, Some("whatever"))),
            ALLOW
        );
        assert_eq!(
            decide(&[&p], &access(Operation::Token, None)),
            Decision::Deny
        );
    }

    #[test]
    fn purposes_restrict_the_rule() {
        let p = policy(
            "[[rule]]\nkeys = [\"patients\"]\noperations = [\"decrypt\", \"datakey\"]\n\
             purposes = [\"treatment\", \"payment\"]\n",
        );
        let d = |op, purpose| decide(&[&p], &with_purpose(op, "patients", purpose, None));
        assert_eq!(d(Operation::Decrypt, Some("treatment")), ALLOW);
        assert_eq!(d(Operation::Datakey, Some("payment")), ALLOW);
        assert_eq!(d(Operation::Decrypt, Some("research")), Decision::Deny);
        assert_eq!(d(Operation::Decrypt, None), Decision::Deny);
        assert_eq!(d(Operation::Decrypt, Some("emergency")), Decision::Deny);
        assert_eq!(d(Operation::Rewrap, Some("treatment")), Decision::Deny);
    }

    #[test]
    fn break_glass_needs_emergency_and_a_reason() {
        let p = policy(
            "[[rule]]\nkeys = [\"patients\"]\noperations = [\"decrypt\"]\nbreak_glass = true\n",
        );
        let d = |purpose, reason| {
            decide(
                &[&p],
                &with_purpose(Operation::Decrypt, "patients", purpose, reason),
            )
        };
        assert_eq!(
            d(Some("emergency"), Some("patient unconscious in ER")),
            BREAK_GLASS
        );
        assert_eq!(d(Some("emergency"), None), Decision::Deny);
        assert_eq!(d(Some("emergency"), Some("")), Decision::Deny);
        assert_eq!(d(Some("emergency"), Some(" \t\n")), Decision::Deny);
        assert_eq!(d(Some("treatment"), Some("reason")), Decision::Deny);
        assert_eq!(d(None, Some("reason")), Decision::Deny);
        assert_eq!(
            decide(
                &[&p],
                &with_purpose(Operation::Decrypt, "other", Some("emergency"), Some("r"))
            ),
            Decision::Deny
        );
    }

    #[test]
    fn a_plain_match_is_not_flagged_even_beside_break_glass() {
        let glass =
            policy("[[rule]]\nkeys = [\"*\"]\noperations = [\"decrypt\"]\nbreak_glass = true\n");
        let plain = policy("[[rule]]\nkeys = [\"patients\"]\noperations = [\"decrypt\"]\n");
        let emergency = with_purpose(Operation::Decrypt, "patients", Some("emergency"), Some("r"));
        // Whatever the order, an ordinary rule wins: the call needed no break-glass.
        assert_eq!(decide(&[&glass, &plain], &emergency), ALLOW);
        assert_eq!(decide(&[&plain, &glass], &emergency), ALLOW);
        let elsewhere = with_purpose(Operation::Decrypt, "labs", Some("emergency"), Some("r"));
        assert_eq!(decide(&[&glass, &plain], &elsewhere), BREAK_GLASS);
        // The same within one policy.
        let mixed = policy(
            "[[rule]]\nkeys = [\"*\"]\noperations = [\"decrypt\"]\nbreak_glass = true\n\
             [[rule]]\nkeys = [\"patients\"]\noperations = [\"decrypt\"]\n",
        );
        assert_eq!(decide(&[&mixed], &emergency), ALLOW);
        assert_eq!(decide(&[&mixed], &elsewhere), BREAK_GLASS);
    }

    #[test]
    fn listing_needs_a_star_rule() {
        let p = policy("[[rule]]\nkeys = [\"*\"]\noperations = [\"key.read\"]\n");
        assert_eq!(decide(&[&p], &access(Operation::KeyRead, None)), ALLOW);
        let q = policy("[[rule]]\nkeys = [\"a*\"]\noperations = [\"key.read\"]\n");
        assert_eq!(
            decide(&[&q], &access(Operation::KeyRead, None)),
            Decision::Deny
        );
        assert_eq!(
            decide(&[&q], &access(Operation::KeyRead, Some("ab"))),
            ALLOW
        );
    }

    #[test]
    fn root_allows_everything_and_cannot_be_written() {
        let root = Policy::root();
        assert!(root.is_root());
        assert_eq!(root.name(), "root");
        for op in Operation::ALL {
            for key in [None, Some("patients"), Some("x")] {
                for purpose in [None, Some("research"), Some("emergency")] {
                    let a = Access {
                        operation: op,
                        key,
                        purpose,
                        reason: None,
                    };
                    assert_eq!(decide(&[root], &a), ALLOW, "{a:?}");
                }
            }
        }
        assert_eq!(
            Policy::parse("root", ISSUE_EXAMPLE).unwrap_err(),
            PolicyError::Reserved
        );
        assert_eq!(Policy::validate_name("root"), Err(PolicyError::Reserved));
        // Its source is a real policy document (parses under another name).
        assert_eq!(policy(root.source()).rule_count(), 2);
    }

    #[test]
    fn policy_names() {
        for good in ["a", "0", "clinic-readers", "ehr.api_v2", &"a".repeat(64)] {
            assert_eq!(Policy::validate_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "_a",
            "A",
            "a b",
            "a/b",
            "é",
            &"a".repeat(65),
        ] {
            assert!(
                matches!(Policy::validate_name(bad), Err(PolicyError::InvalidName(_))),
                "{bad}"
            );
            assert!(Policy::parse(bad, ISSUE_EXAMPLE).is_err());
        }
    }

    #[test]
    fn purpose_words() {
        for good in ["treatment", "a", "x-ray_2", &format!("a{}", "b".repeat(31))] {
            assert!(is_purpose_word(good), "{good}");
        }
        for bad in ["", "Treatment", "1a", "-a", "a b", "é", &"a".repeat(33)] {
            assert!(!is_purpose_word(bad), "{bad}");
        }
    }

    fn rule_problem(document: &str) -> (usize, RuleProblem) {
        match Policy::parse("test", document) {
            Err(PolicyError::Rule { index, problem }) => (index, problem),
            other => panic!("expected a rule problem, got {other:?}"),
        }
    }

    #[test]
    fn document_errors() {
        let err = |doc: &str| Policy::parse("test", doc).unwrap_err();
        assert!(matches!(err("[[rule]\nkeys = "), PolicyError::Syntax(_)));
        assert!(matches!(err("keys = [\"a\"]\n"), PolicyError::UnknownField(f) if f == "keys"));
        assert_eq!(err(""), PolicyError::NoRules);
        assert_eq!(err("rule = []"), PolicyError::NoRules);
        assert_eq!(
            err("[rule]\nkeys = [\"a\"]\noperations = [\"encrypt\"]\n"),
            PolicyError::RuleNotATable(1)
        );
        assert_eq!(err("rule = [1]"), PolicyError::RuleNotATable(1));
        let big = format!("# {}\n{ISSUE_EXAMPLE}", "x".repeat(MAX_POLICY_BYTES));
        assert!(matches!(err(&big), PolicyError::TooLarge(_)));
        let many = "[[rule]]\noperations = [\"token\"]\n".repeat(MAX_RULES + 1);
        assert_eq!(err(&many), PolicyError::TooManyRules(MAX_RULES + 1));
        // Messages name the rule and the problem.
        let message = err(&format!(
            "{ISSUE_EXAMPLE}\n[[rule]]\nkeys = [\"a\"]\noperations = [\"encryp\"]\n"
        ))
        .to_string();
        assert_eq!(message, "rule 2: unknown operation \"encryp\"");
        let syntax = err("[[rule]]\nkeys = [\"a\"\n").to_string();
        assert!(syntax.contains("line 2"), "{syntax}");
    }

    #[test]
    fn rule_errors() {
        use RuleProblem as P;
        let cases: Vec<(&str, RuleProblem)> = vec![
            (
                "keys = [\"a\"]\noperations = [\"encrypt\"]\nkey = \"a\"",
                P::UnknownField("key".into()),
            ),
            ("keys = [\"a\"]", P::MissingOperations),
            ("keys = [\"a\"]\noperations = []", P::EmptyOperations),
            (
                "keys = [\"a\"]\noperations = \"encrypt\"",
                P::NotAListOfStrings("operations"),
            ),
            (
                "keys = \"a\"\noperations = [\"encrypt\"]",
                P::NotAListOfStrings("keys"),
            ),
            (
                "keys = [\"a\", 1]\noperations = [\"encrypt\"]",
                P::NotAListOfStrings("keys"),
            ),
            (
                "keys = [\"a\"]\noperations = [\"encrypt\", \"delete\"]",
                P::UnknownOperation(UnknownOperation("delete".into())),
            ),
            (
                "keys = [\"a\"]\noperations = [\"encrypt\", \"policy\"]",
                P::MixedOperations {
                    key: Operation::Encrypt,
                    admin: Operation::Policy,
                },
            ),
            ("operations = [\"encrypt\"]", P::MissingKeys),
            ("keys = []\noperations = [\"encrypt\"]", P::EmptyKeys),
            (
                "keys = [\"a\"]\noperations = [\"token\"]",
                P::KeysWithoutKeyOperations(Operation::Token),
            ),
            (
                "keys = [\"\"]\noperations = [\"encrypt\"]",
                P::BadGlob {
                    pattern: String::new(),
                    error: GlobError::Empty,
                },
            ),
            (
                "keys = [\"clinic/*\"]\noperations = [\"encrypt\"]",
                P::BadKeyCharacter("clinic/*".into()),
            ),
            (
                "keys = [\"a\"]\noperations = [\"encrypt\"]\npurposes = [\"treatment\"]",
                P::PurposeNotAllowed {
                    field: "purposes",
                    operation: Operation::Encrypt,
                },
            ),
            (
                "keys = [\"a\"]\noperations = [\"decrypt\", \"key.export\"]\nbreak_glass = true",
                P::PurposeNotAllowed {
                    field: "break_glass",
                    operation: Operation::KeyExport,
                },
            ),
            (
                "operations = [\"system\"]\nbreak_glass = true",
                P::PurposeNotAllowed {
                    field: "break_glass",
                    operation: Operation::System,
                },
            ),
            (
                "keys = [\"a\"]\noperations = [\"decrypt\"]\npurposes = []",
                P::EmptyPurposes,
            ),
            (
                "keys = [\"a\"]\noperations = [\"decrypt\"]\npurposes = [\"Treatment\"]",
                P::BadPurpose("Treatment".into()),
            ),
            (
                "keys = [\"a\"]\noperations = [\"decrypt\"]\npurposes = [\"emergency\"]",
                P::EmergencyPurpose,
            ),
            (
                "keys = [\"a\"]\noperations = [\"decrypt\"]\npurposes = [\"treatment\"]\nbreak_glass = true",
                P::PurposesWithBreakGlass,
            ),
            (
                "keys = [\"a\"]\noperations = [\"decrypt\"]\nbreak_glass = \"yes\"",
                P::BreakGlassNotABool,
            ),
        ];
        for (body, expected) in cases {
            let document = format!("{ISSUE_EXAMPLE}\n[[rule]]\n{body}\n");
            assert_eq!(rule_problem(&document), (2, expected), "{body}");
        }
        // break_glass = false is an ordinary rule, allowed anywhere.
        let p =
            policy("[[rule]]\nkeys = [\"a\"]\noperations = [\"encrypt\"]\nbreak_glass = false\n");
        assert_eq!(decide(&[&p], &access(Operation::Encrypt, Some("a"))), ALLOW);
    }

    #[test]
    fn error_messages_read_well() {
        let (_, problem) = rule_problem(
            "[[rule]]\nkeys = [\"a\"]\noperations = [\"encrypt\"]\npurposes = [\"treatment\"]\n",
        );
        assert_eq!(
            problem.to_string(),
            "purposes is only allowed with decrypt, rewrap and datakey, not encrypt"
        );
        let e = Policy::parse(
            "test",
            "[[rule]]\nkeys = [\"a\"]\noperations = [\"encrypt\"]\nkey = 1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("rule 1: unknown field \"key\""), "{e}");
    }

    /// Every example in `docs/policies.md` is a valid policy, and the error
    /// messages it quotes are the ones the parser gives.
    #[test]
    fn the_operator_guide_is_accurate() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/policies.md");
        let text = std::fs::read_to_string(path).expect("docs/policies.md");
        let mut blocks = 0;
        for (i, block) in text.split("```toml\n").skip(1).enumerate() {
            let document = block.split("```").next().expect("closed block");
            Policy::parse("example", document)
                .unwrap_or_else(|e| panic!("example {} does not parse: {e}", i + 1));
            blocks += 1;
        }
        assert!(blocks >= 8, "{blocks} examples");
        let quoted = text
            .split("```text\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("the error list");
        for document in [
            "[[rule]]\nkeys = [\"a\"]\noperations = [\"encryp\"]\n",
            "[[rule]]\nkeys = [\"a\"]\noperations = [\"encrypt\"]\nkey = 1\n",
            "[[rule]]\nkeys = [\"a\"]\noperations = [\"encrypt\"]\npurposes = [\"x\"]\n",
            "[[rule]]\nkeys = [\"clinic/*\"]\noperations = [\"encrypt\"]\n",
            "[[rule]]\nkeys = [\"a\"]\noperations = [\"encrypt\", \"token\"]\n",
            "[[rule]]\nkeys = [\"a\"]\noperations = [\"system\"]\n",
            "[[rule]]\nkeys = [\"a\"]\noperations = [\"decrypt\"]\npurposes = [\"emergency\"]\n",
            "keys = [\"a\"]\n",
            "[rule]\noperations = [\"token\"]\n",
            "",
        ] {
            let message = Policy::parse("test", document)
                .expect_err("invalid")
                .to_string();
            // The guide's rule numbers are illustrative: compare after "rule N: ".
            let tail = message
                .split_once(": ")
                .filter(|(head, _)| head.starts_with("rule "))
                .map_or(message.as_str(), |(_, t)| t);
            assert!(quoted.contains(tail), "docs/policies.md lacks {message:?}");
        }
        let syntax = Policy::parse("test", "[[rule]]\nkeys = [\"a\"\n")
            .expect_err("invalid")
            .to_string();
        assert!(
            syntax.starts_with("the policy document is not valid TOML: TOML parse error at line"),
            "{syntax}"
        );
    }

    #[test]
    fn the_guide_glob_table_holds() {
        let cases: &[(&str, &[&str], &[&str])] = &[
            ("patients", &["patients"], &["patients-2", "Patients"]),
            (
                "clinic-*",
                &["clinic-", "clinic-north"],
                &["clinic", "my-clinic-x"],
            ),
            ("*-prod", &["ehr-prod"], &["ehr-prod-old"]),
            ("lab-??", &["lab-01"], &["lab-1", "lab-001"]),
        ];
        for &(pattern, yes, no) in cases {
            let g = Glob::new(pattern).expect("valid");
            for name in yes {
                assert!(g.matches(name), "{pattern} {name}");
            }
            for name in no {
                assert!(!g.matches(name), "{pattern} {name}");
            }
        }
    }

    // ---- the reference model -------------------------------------------------

    /// A rule as generated: plain data, decided by enumeration.
    #[derive(Debug, Clone)]
    struct ModelRule {
        keys: Option<Vec<&'static str>>,
        operations: Vec<Operation>,
        purposes: Option<Vec<&'static str>>,
        break_glass: bool,
    }

    fn model_glob(pattern: &[u8], text: &[u8]) -> bool {
        match pattern.split_first() {
            None => text.is_empty(),
            Some((b'*', rest)) => (0..=text.len()).any(|i| model_glob(rest, &text[i..])),
            Some((b'?', rest)) => !text.is_empty() && model_glob(rest, &text[1..]),
            Some((c, rest)) => text.first() == Some(c) && model_glob(rest, &text[1..]),
        }
    }

    fn model_matches(rule: &ModelRule, a: &Access<'_>) -> bool {
        if !rule.operations.contains(&a.operation) {
            return false;
        }
        if a.operation.is_key_scoped() {
            let keys = rule.keys.as_deref().unwrap_or_default();
            let key_ok = match a.key {
                Some(key) => keys
                    .iter()
                    .any(|g| model_glob(g.as_bytes(), key.as_bytes())),
                None => keys.iter().any(|g| g.bytes().all(|b| b == b'*')),
            };
            if !key_ok {
                return false;
            }
        }
        if rule.break_glass {
            a.purpose == Some("emergency") && a.reason.is_some_and(|r| !r.trim().is_empty())
        } else if let Some(purposes) = &rule.purposes {
            a.purpose.is_some_and(|p| purposes.contains(&p))
        } else {
            true
        }
    }

    fn model_decide(policies: &[Vec<ModelRule>], a: &Access<'_>) -> Decision {
        let matching: Vec<&ModelRule> = policies
            .iter()
            .flatten()
            .filter(|rule| model_matches(rule, a))
            .collect();
        if matching.is_empty() {
            Decision::Deny
        } else if matching.iter().all(|rule| rule.break_glass) {
            Decision::Allow { break_glass: true }
        } else {
            Decision::Allow { break_glass: false }
        }
    }

    fn render(rules: &[ModelRule]) -> String {
        let list = |items: &[&str]| {
            items
                .iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut doc = String::new();
        for rule in rules {
            doc.push_str("[[rule]]\n");
            if let Some(keys) = &rule.keys {
                doc.push_str(&format!("keys = [{}]\n", list(keys)));
            }
            let ops: Vec<&str> = rule.operations.iter().map(|op| op.as_str()).collect();
            doc.push_str(&format!("operations = [{}]\n", list(&ops)));
            if let Some(purposes) = &rule.purposes {
                doc.push_str(&format!("purposes = [{}]\n", list(purposes)));
            }
            if rule.break_glass {
                doc.push_str("break_glass = true\n");
            }
        }
        doc
    }

    const KEY_PATTERNS: &[&str] = &["a", "ab", "b", "a*", "*b", "?", "a?", "*", "**", "*a*"];
    const KEYS: &[&str] = &["a", "ab", "b", "ba", "abb", "c"];
    const PURPOSES: &[&str] = &["treatment", "research", "payment"];
    const CALL_PURPOSES: &[&str] = &["treatment", "research", "payment", "emergency"];
    const REASONS: &[&str] = &["", " \t", "fire on ward 3"];
    const PURPOSE_OPS: &[Operation] = &[Operation::Decrypt, Operation::Rewrap, Operation::Datakey];

    fn subset<T: Clone + fmt::Debug + 'static>(items: &[T]) -> impl Strategy<Value = Vec<T>> {
        proptest::sample::subsequence(items.to_vec(), 1..=items.len())
    }

    fn rule_strategy() -> impl Strategy<Value = ModelRule> {
        // Key-scoped operations come first in ALL (checked above).
        let split = Operation::ALL
            .iter()
            .filter(|op| op.is_key_scoped())
            .count();
        let (key_ops, admin_ops) = Operation::ALL.split_at(split);
        let key_rule =
            (subset(key_ops), subset(KEY_PATTERNS)).prop_map(|(operations, keys)| ModelRule {
                keys: Some(keys),
                operations,
                purposes: None,
                break_glass: false,
            });
        let purpose_rule = (
            subset(PURPOSE_OPS),
            subset(KEY_PATTERNS),
            prop::option::of(subset(PURPOSES)),
            any::<bool>(),
        )
            .prop_map(|(operations, keys, purposes, glass)| ModelRule {
                keys: Some(keys),
                operations,
                break_glass: glass && purposes.is_none(),
                purposes,
            });
        let admin_rule = subset(admin_ops).prop_map(|operations| ModelRule {
            keys: None,
            operations,
            purposes: None,
            break_glass: false,
        });
        prop_oneof![1 => key_rule, 2 => purpose_rule, 1 => admin_rule]
    }

    fn access_strategy() -> impl Strategy<Value = Access<'static>> {
        (
            prop::sample::select(Operation::ALL.to_vec()),
            prop::option::weighted(0.9, prop::sample::select(KEYS)),
            prop::option::of(prop::sample::select(CALL_PURPOSES)),
            prop::option::of(prop::sample::select(REASONS)),
        )
            .prop_map(|(operation, key, purpose, reason)| Access {
                operation,
                key,
                purpose,
                reason,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn decide_agrees_with_the_reference_model(
            policies in proptest::collection::vec(
                proptest::collection::vec(rule_strategy(), 1..5), 0..4),
            accesses in proptest::collection::vec(access_strategy(), 1..16),
        ) {
            let parsed: Vec<Policy> = policies
                .iter()
                .enumerate()
                .map(|(i, rules)| Policy::parse(&format!("p{i}"), &render(rules)))
                .collect::<Result<_, _>>()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let refs: Vec<&Policy> = parsed.iter().collect();
            for a in &accesses {
                prop_assert_eq!(decide(&refs, a), model_decide(&policies, a), "{:?}", a);
            }
        }

        #[test]
        fn the_order_of_policies_does_not_matter(
            policies in proptest::collection::vec(
                proptest::collection::vec(rule_strategy(), 1..4), 1..4),
            a in access_strategy(),
        ) {
            let parsed: Vec<Policy> = policies
                .iter()
                .map(|rules| Policy::parse("p", &render(rules)))
                .collect::<Result<_, _>>()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let forward: Vec<&Policy> = parsed.iter().collect();
            let backward: Vec<&Policy> = parsed.iter().rev().collect();
            prop_assert_eq!(decide(&forward, &a), decide(&backward, &a));
        }

        #[test]
        fn parsing_never_panics(document in "[\\[\\]a-z_=\"\\n ,.*?0-9-]{0,200}") {
            let _ = Policy::parse("p", &document);
        }
    }
}
