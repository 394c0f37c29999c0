//! Policies: rules of key-name globs × operations, purposes and break-glass, and
//! the one pure decision function.
//!
//! PLACEHOLDER until the policy helper's module lands.

use std::str::FromStr;

use serde::Deserialize;

use super::glob::Glob;

/// An operation a policy rule can allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Operation {
    Encrypt,
    Decrypt,
    Rewrap,
    Datakey,
    KeyCreate,
    KeyRead,
    KeyRotate,
    KeyConfig,
    KeyTrim,
    KeyDelete,
    KeyExport,
    System,
    Token,
    Role,
    Policy,
    Audit,
}

impl Operation {
    /// Every operation.
    pub const ALL: [Operation; 16] = [
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
        Operation::System,
        Operation::Token,
        Operation::Role,
        Operation::Policy,
        Operation::Audit,
    ];

    /// The name used in policy documents.
    pub fn as_str(self) -> &'static str {
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
            Operation::System => "system",
            Operation::Token => "token",
            Operation::Role => "role",
            Operation::Policy => "policy",
            Operation::Audit => "audit",
        }
    }

    /// Whether the operation concerns one named key.
    pub fn is_key_scoped(self) -> bool {
        !matches!(
            self,
            Operation::System
                | Operation::Token
                | Operation::Role
                | Operation::Policy
                | Operation::Audit
        )
    }
}

impl FromStr for Operation {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, PolicyError> {
        Operation::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| PolicyError(format!("unknown operation {s:?}")))
    }
}

/// A policy document that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// A named, parsed policy.
#[derive(Debug, Clone)]
pub struct Policy {
    name: String,
    rules: Vec<Rule>,
    root: bool,
}

#[derive(Debug, Clone)]
struct Rule {
    keys: Vec<Glob>,
    operations: Vec<Operation>,
    purposes: Option<Vec<String>>,
    break_glass: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    keys: Vec<String>,
    operations: Vec<String>,
    purposes: Option<Vec<String>>,
    #[serde(default)]
    break_glass: bool,
}

impl Policy {
    /// Parses a TOML document.
    pub fn parse(name: &str, document: &str) -> Result<Policy, PolicyError> {
        if name == "root" {
            return Err(PolicyError("the name \"root\" is reserved".into()));
        }
        let doc: Doc = toml::from_str(document).map_err(|e| PolicyError(e.to_string()))?;
        let mut rules = Vec::new();
        for r in doc.rule {
            let operations = r
                .operations
                .iter()
                .map(|o| o.parse())
                .collect::<Result<Vec<Operation>, _>>()?;
            let keys = r
                .keys
                .iter()
                .map(|k| Glob::new(k).map_err(|e| PolicyError(e.to_string())))
                .collect::<Result<Vec<_>, _>>()?;
            rules.push(Rule {
                keys,
                operations,
                purposes: r.purposes,
                break_glass: r.break_glass,
            });
        }
        Ok(Policy {
            name: name.to_owned(),
            rules,
            root: false,
        })
    }

    /// The built-in `root` policy: every operation on every key.
    pub fn root() -> Policy {
        Policy {
            name: "root".into(),
            rules: Vec::new(),
            root: true,
        }
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// One call, as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Access<'a> {
    /// What the call does.
    pub operation: Operation,
    /// The key it concerns, for key-scoped operations.
    pub key: Option<&'a str>,
    /// The purpose of use it declared.
    pub purpose: Option<&'a str>,
    /// The reason it gave.
    pub reason: Option<&'a str>,
}

/// The policy decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; `break_glass` when only break-glass rules allowed it.
    Allow {
        /// Allowed only by a break-glass rule.
        break_glass: bool,
    },
    /// Denied.
    Deny,
}

/// The decision for `access` under the union of `policies` (default deny).
pub fn decide(policies: &[&Policy], access: &Access<'_>) -> Decision {
    let mut glass = false;
    for p in policies {
        if p.root {
            return Decision::Allow { break_glass: false };
        }
        for r in &p.rules {
            if !r.operations.contains(&access.operation) {
                continue;
            }
            if access.operation.is_key_scoped()
                && !access
                    .key
                    .is_some_and(|k| r.keys.iter().any(|g| g.matches(k)))
            {
                continue;
            }
            if let Some(ps) = &r.purposes
                && !access.purpose.is_some_and(|p| ps.iter().any(|x| x == p))
            {
                continue;
            }
            if r.break_glass {
                if access.purpose == Some("emergency")
                    && access.reason.is_some_and(|r| !r.trim().is_empty())
                {
                    glass = true;
                }
                continue;
            }
            return Decision::Allow { break_glass: false };
        }
    }
    if glass {
        Decision::Allow { break_glass: true }
    } else {
        Decision::Deny
    }
}
