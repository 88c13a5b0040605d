//! Field quirks of the open-source DM 1.2 client of PROTOCOL.md B.6 ("More observed in the field"),
//! each of which the simulated devices can reproduce, to test servers against them.
//!
//! Names, as [`Quirks`] parses and prints them (comma-separated; `all` turns every one on):
//!
//! - `trailing-bytes`: the bytes after the root end of the server's last message are put in front of
//!   the device's next message, before the XML declaration;
//! - `nul-in-lists`: the child list of an interior node (`Get`) ends with a NUL byte;
//! - `acl-on-add`: a node added under a parent that does not grant the server `Replace` gets the ACL
//!   `Get=*&Add=S&Delete=S&Replace=S` instead of an empty one;
//! - `text-nonce`: an `AAuthData` sent as text (Format `chr` or none) is used verbatim as the nonce bytes;
//! - `forget-nonce`: at the end of every session the server's nonce is replaced by one it cannot know.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// The quirk names, in the order [`Quirks`] prints them.
pub const QUIRK_NAMES: [&str; 5] = [
    "trailing-bytes",
    "nul-in-lists",
    "acl-on-add",
    "text-nonce",
    "forget-nonce",
];

/// Which field quirks a simulated device reproduces (module documentation). `Default`: none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Quirks {
    /// `trailing-bytes`.
    pub trailing_bytes: bool,
    /// `nul-in-lists`.
    pub nul_in_lists: bool,
    /// `acl-on-add`.
    pub acl_on_add: bool,
    /// `text-nonce`.
    pub text_nonce: bool,
    /// `forget-nonce`.
    pub forget_nonce: bool,
}

/// A quirk list named something else than the known quirks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown quirk '{0}' (valid: trailing-bytes, nul-in-lists, acl-on-add, text-nonce, forget-nonce, all)"
)]
pub struct UnknownQuirk(pub String);

impl Quirks {
    /// No quirk: a well-behaved device.
    pub const NONE: Quirks = Quirks {
        trailing_bytes: false,
        nul_in_lists: false,
        acl_on_add: false,
        text_nonce: false,
        forget_nonce: false,
    };

    /// Every quirk.
    pub const ALL: Quirks = Quirks {
        trailing_bytes: true,
        nul_in_lists: true,
        acl_on_add: true,
        text_nonce: true,
        forget_nonce: true,
    };

    /// Whether no quirk is on.
    pub fn is_empty(&self) -> bool {
        *self == Quirks::NONE
    }

    fn flags(&self) -> [bool; 5] {
        [
            self.trailing_bytes,
            self.nul_in_lists,
            self.acl_on_add,
            self.text_nonce,
            self.forget_nonce,
        ]
    }

    fn flag_mut(&mut self, name: &str) -> Option<&mut bool> {
        Some(match name {
            "trailing-bytes" => &mut self.trailing_bytes,
            "nul-in-lists" => &mut self.nul_in_lists,
            "acl-on-add" => &mut self.acl_on_add,
            "text-nonce" => &mut self.text_nonce,
            "forget-nonce" => &mut self.forget_nonce,
            _ => return None,
        })
    }
}

impl FromStr for Quirks {
    type Err = UnknownQuirk;

    /// A comma-separated list of quirk names (white space around names allowed, empty entries
    /// skipped); `all` is every quirk; an empty string is none.
    fn from_str(list: &str) -> Result<Self, Self::Err> {
        let mut quirks = Quirks::NONE;
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "all" {
                quirks = Quirks::ALL;
                continue;
            }
            let flag = quirks
                .flag_mut(name)
                .ok_or_else(|| UnknownQuirk(name.to_string()))?;
            *flag = true;
        }
        Ok(quirks)
    }
}

impl fmt::Display for Quirks {
    /// The names of the quirks that are on, comma-separated, in [`QUIRK_NAMES`] order (empty: none).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (name, on) in QUIRK_NAMES.iter().zip(self.flags()) {
            if on {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_name_and_prints_it_back() {
        let cases = [
            (
                "trailing-bytes",
                Quirks {
                    trailing_bytes: true,
                    ..Quirks::NONE
                },
            ),
            (
                "nul-in-lists",
                Quirks {
                    nul_in_lists: true,
                    ..Quirks::NONE
                },
            ),
            (
                "acl-on-add",
                Quirks {
                    acl_on_add: true,
                    ..Quirks::NONE
                },
            ),
            (
                "text-nonce",
                Quirks {
                    text_nonce: true,
                    ..Quirks::NONE
                },
            ),
            (
                "forget-nonce",
                Quirks {
                    forget_nonce: true,
                    ..Quirks::NONE
                },
            ),
        ];
        for (name, want) in cases {
            let got: Quirks = name.parse().unwrap();
            assert_eq!(got, want, "{name}");
            assert_eq!(got.to_string(), name);
        }
        let two: Quirks = " forget-nonce , trailing-bytes ".parse().unwrap();
        assert!(two.forget_nonce && two.trailing_bytes);
        assert!(!two.nul_in_lists && !two.acl_on_add && !two.text_nonce);
        assert_eq!(two.to_string(), "trailing-bytes,forget-nonce");
        assert_eq!(two.to_string().parse::<Quirks>().unwrap(), two);
    }

    #[test]
    fn all_empty_and_unknown() {
        let all: Quirks = "all".parse().unwrap();
        assert_eq!(all, Quirks::ALL);
        assert_eq!(all.to_string(), QUIRK_NAMES.join(","));
        assert_eq!(all.to_string().parse::<Quirks>().unwrap(), Quirks::ALL);
        assert_eq!("text-nonce,all".parse::<Quirks>().unwrap(), Quirks::ALL);
        let none: Quirks = "".parse().unwrap();
        assert!(none.is_empty());
        assert_eq!(none, Quirks::default());
        assert_eq!(none.to_string(), "");
        let err = "text-nonce,nul-in-list".parse::<Quirks>().unwrap_err();
        assert_eq!(err, UnknownQuirk("nul-in-list".into()));
        let text = err.to_string();
        assert!(text.contains("'nul-in-list'"), "{text}");
        for name in QUIRK_NAMES {
            assert!(text.contains(name), "{text}");
        }
        // Names are exact.
        assert!("Text-Nonce".parse::<Quirks>().is_err());
        assert!("text_nonce".parse::<Quirks>().is_err());
    }
}
