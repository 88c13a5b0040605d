//! SyncML DM status codes and alert codes (PROTOCOL.md B.4), kept as numbers.
//!
//! Each enum names the codes this project uses and keeps any other number in `Other(u16)`, so
//! `from_code(n).code() == n` for every `u16`. Equality and hashing go by the number:
//! `StatusCode::Other(200) == StatusCode::Ok`.

use std::fmt;
use std::hash::{Hash, Hasher};

/// Defines a code enum from one table: variant, number, description.
macro_rules! code_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $unknown:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $num:literal => $desc:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy)]
        pub enum $name {
            $( $(#[$vmeta])* #[doc = $desc] $variant, )*
            /// A number this table does not name.
            Other(u16),
        }

        impl $name {
            /// Every named code, in ascending order.
            pub const ALL: &'static [$name] = &[ $( $name::$variant, )* ];

            /// The number on the wire.
            pub fn code(self) -> u16 {
                match self {
                    $( $name::$variant => $num, )*
                    $name::Other(n) => n,
                }
            }

            /// The named variant for `code`, or `Other(code)`.
            pub fn from_code(code: u16) -> Self {
                match code {
                    $( $num => $name::$variant, )*
                    other => $name::Other(other),
                }
            }

            /// A short human description.
            pub fn description(self) -> &'static str {
                match self.normalized() {
                    $( $name::$variant => $desc, )*
                    $name::Other(_) => $unknown,
                }
            }

            /// Whether the number is one of the named codes.
            pub fn is_known(self) -> bool {
                !matches!(self.normalized(), $name::Other(_))
            }

            /// `Other(n)` turned into the named variant when `n` is listed.
            fn normalized(self) -> Self {
                Self::from_code(self.code())
            }
        }

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                self.code() == other.code()
            }
        }

        impl Eq for $name {}

        impl Hash for $name {
            fn hash<H: Hasher>(&self, state: &mut H) {
                self.code().hash(state);
            }
        }

        impl PartialOrd for $name {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }

        impl Ord for $name {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                self.code().cmp(&other.code())
            }
        }

        impl From<u16> for $name {
            fn from(code: u16) -> Self {
                Self::from_code(code)
            }
        }

        impl From<$name> for u16 {
            fn from(code: $name) -> u16 {
                code.code()
            }
        }

        /// `404 not found`.
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{} {}", self.code(), self.description())
            }
        }

        /// Serialized as the bare number.
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_u16(self.code())
            }
        }

        impl std::str::FromStr for $name {
            type Err = std::num::ParseIntError;

            /// Parses the decimal number (surrounding white space allowed).
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.trim().parse::<u16>().map(Self::from_code)
            }
        }
    };
}

code_enum! {
    /// A SyncML status code (the `Data` of a `Status`).
    StatusCode, "unknown status code" {
        Ok = 200 => "OK",
        AcceptedForProcessing = 202 => "accepted for processing",
        AuthenticationAccepted = 212 => "authentication accepted",
        ChunkedItemAccepted = 213 => "chunked item accepted",
        OperationCancelled = 214 => "operation cancelled",
        NotExecuted = 215 => "not executed",
        AtomicRollBackOk = 216 => "atomic roll back OK",
        BadRequest = 400 => "bad request",
        InvalidCredentials = 401 => "invalid credentials",
        Forbidden = 403 => "forbidden",
        NotFound = 404 => "not found",
        CommandNotAllowed = 405 => "command not allowed",
        OptionalFeatureNotSupported = 406 => "optional feature not supported",
        MissingCredentials = 407 => "missing credentials",
        Conflict = 409 => "conflict",
        Gone = 410 => "gone",
        IncompleteCommand = 412 => "incomplete command",
        RequestEntityTooLarge = 413 => "request entity too large",
        UnsupportedMediaType = 415 => "unsupported media type",
        AlreadyExists = 418 => "already exists",
        DeviceFull = 420 => "device full",
        SizeMismatch = 424 => "size mismatch",
        PermissionDenied = 425 => "permission denied",
        CommandFailed = 500 => "command failed",
        CommandNotImplemented = 501 => "command not implemented",
        ServiceUnavailable = 503 => "service unavailable",
        ProcessingError = 506 => "processing error",
        AtomicFailed = 507 => "atomic failed",
        AtomicRollBackFailed = 516 => "atomic roll back failed",
    }
}

code_enum! {
    /// A SyncML DM alert code (the `Data` of an `Alert`).
    AlertCode, "unknown alert code" {
        DisplayMessage = 1100 => "display (user interaction)",
        ContinueOrAbort = 1101 => "continue or abort (user interaction)",
        UserInput = 1102 => "user input (user interaction)",
        SingleChoice = 1103 => "single choice (user interaction)",
        MultipleChoice = 1104 => "multiple choice (user interaction)",
        ServerInitiatedMgmt = 1200 => "server-initiated management session",
        ClientInitiatedMgmt = 1201 => "client-initiated management session",
        NextMessage = 1222 => "next message",
        SessionAbort = 1223 => "session abort",
        ClientEvent = 1224 => "client event",
        GenericAlert = 1226 => "generic alert",
    }
}

impl StatusCode {
    /// 2xx: the command (or header) was accepted.
    pub fn is_success(self) -> bool {
        (200..300).contains(&self.code())
    }
}

impl AlertCode {
    /// 1100-1199: the user-interaction alerts.
    pub fn is_user_interaction(self) -> bool {
        (1100..1200).contains(&self.code())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_listed_status_code_keeps_its_number() {
        let expected = [
            200, 202, 212, 213, 214, 215, 216, 400, 401, 403, 404, 405, 406, 407, 409, 410, 412,
            413, 415, 418, 420, 424, 425, 500, 501, 503, 506, 507, 516,
        ];
        let numbers: Vec<u16> = StatusCode::ALL.iter().map(|c| c.code()).collect();
        assert_eq!(numbers, expected);
        for n in expected {
            let code = StatusCode::from_code(n);
            assert!(code.is_known(), "{n}");
            assert!(!matches!(code, StatusCode::Other(_)));
            assert_eq!(code.code(), n);
        }
    }

    #[test]
    fn every_listed_alert_code_keeps_its_number() {
        let expected = [
            1100, 1101, 1102, 1103, 1104, 1200, 1201, 1222, 1223, 1224, 1226,
        ];
        let numbers: Vec<u16> = AlertCode::ALL.iter().map(|c| c.code()).collect();
        assert_eq!(numbers, expected);
        assert_eq!(AlertCode::from_code(1200), AlertCode::ServerInitiatedMgmt);
        assert_eq!(AlertCode::from_code(1201), AlertCode::ClientInitiatedMgmt);
        assert_eq!(AlertCode::from_code(1226), AlertCode::GenericAlert);
        assert!(AlertCode::ContinueOrAbort.is_user_interaction());
        assert!(!AlertCode::NextMessage.is_user_interaction());
    }

    #[test]
    fn round_trip_for_every_number() {
        for n in 0..=u16::MAX {
            assert_eq!(StatusCode::from_code(n).code(), n);
            assert_eq!(AlertCode::from_code(n).code(), n);
        }
    }

    #[test]
    fn other_equals_named_by_number() {
        assert_eq!(StatusCode::Other(200), StatusCode::Ok);
        assert_eq!(StatusCode::Other(425).description(), "permission denied");
        let set: HashSet<StatusCode> = [StatusCode::Other(404), StatusCode::NotFound]
            .into_iter()
            .collect();
        assert_eq!(set.len(), 1);
        assert_eq!(StatusCode::from_code(299), StatusCode::Other(299));
        assert!(!StatusCode::Other(299).is_known());
    }

    #[test]
    fn display_description_and_parse() {
        assert_eq!(StatusCode::NotFound.to_string(), "404 not found");
        assert_eq!(StatusCode::Ok.to_string(), "200 OK");
        assert_eq!(
            StatusCode::Other(299).to_string(),
            "299 unknown status code"
        );
        assert_eq!(AlertCode::SessionAbort.to_string(), "1223 session abort");
        assert_eq!(
            " 425 ".parse::<StatusCode>().unwrap(),
            StatusCode::PermissionDenied
        );
        assert!("abc".parse::<StatusCode>().is_err());
        assert!("70000".parse::<AlertCode>().is_err());
        assert!(StatusCode::AtomicRollBackOk.is_success());
        assert!(!StatusCode::AtomicFailed.is_success());
        let descriptions: HashSet<&str> = StatusCode::ALL.iter().map(|c| c.description()).collect();
        assert_eq!(descriptions.len(), StatusCode::ALL.len());
    }

    #[test]
    fn serializes_as_number() {
        assert_eq!(
            serde_json::to_string(&StatusCode::AlreadyExists).unwrap(),
            "418"
        );
        assert_eq!(
            serde_json::to_string(&AlertCode::Other(1225)).unwrap(),
            "1225"
        );
    }
}
