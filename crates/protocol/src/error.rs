//! The one error type every decoder returns: where it failed, why, and the status code a peer gets.

use std::fmt;

/// What kind of rule a document broke. Each kind maps to the HTTP / DM status code the gateway answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Not UTF-8, not well-formed XML, or broken binary framing.
    NotWellFormed,
    /// A `<!DOCTYPE>` where none is allowed, or one with an internal subset.
    Doctype,
    /// An entity reference other than the five predefined ones or a character reference.
    Entity,
    /// Nesting deeper than the limit.
    TooDeep,
    /// Body larger than the configured limit (413).
    TooLarge,
    /// A required element, attribute or value is absent.
    Missing,
    /// An element that is not allowed here (unknown, misplaced, duplicated or out of order).
    Unexpected,
    /// A value that breaks a lexical or semantic rule of the contract.
    InvalidValue,
    /// A protocol version this implementation does not speak.
    UnsupportedVersion,
    /// A digest or credential that does not verify.
    BadDigest,
}

impl ErrorKind {
    /// The status code a receiver answers for this kind of error (PROTOCOL.md A.2).
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::TooLarge => 413,
            ErrorKind::BadDigest => 401,
            _ => 400,
        }
    }
}

/// A rejected document: `field` is the path of the element or attribute at fault
/// (e.g. `DelegationMessage/DELEGATION_NOTIF/Del_Info/Scope/URI`), `reason` says why.
/// Never contains secret values: reasons name rules, not the offending secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DecodeError {
    pub kind: ErrorKind,
    pub field: String,
    pub reason: String,
    /// Byte offset in the input where the problem was noticed, when known.
    pub offset: Option<u64>,
}

impl DecodeError {
    pub fn new(kind: ErrorKind, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            kind,
            field: field.into(),
            reason: reason.into(),
            offset: None,
        }
    }

    pub fn at(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }

    /// The status code to answer with (400, 401 or 413).
    pub fn status(&self) -> u16 {
        self.kind.status()
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = if self.field.is_empty() {
            "document"
        } else {
            &self.field
        };
        write!(f, "{field}: {} (status {}", self.reason, self.status())?;
        if let Some(offset) = self.offset {
            write!(f, ", byte {offset}")?;
        }
        write!(f, ")")
    }
}

impl std::error::Error for DecodeError {}

/// Shorthand used throughout the codecs.
pub type Result<T, E = DecodeError> = std::result::Result<T, E>;
