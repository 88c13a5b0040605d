//! The node ACL grammar of OMA-TS-DM_TND 1.2 §7.7.1 (PROTOCOL.md B.3): parse, format, evaluate one ACL.
//!
//! `acl := acl-value | (no value)`, `acl-value := entry ('&' entry)*`,
//! `entry := command '=' server ('+' server)*`. Inheritance across the tree lives in [`crate::tree`].

use std::fmt;
use std::str::FromStr;

/// The commands an ACL can grant. There is no entry for Copy.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum AclCommand {
    Add,
    Delete,
    Exec,
    Get,
    Replace,
}

impl AclCommand {
    pub const ALL: [AclCommand; 5] = [
        AclCommand::Add,
        AclCommand::Delete,
        AclCommand::Exec,
        AclCommand::Get,
        AclCommand::Replace,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AclCommand::Add => "Add",
            AclCommand::Delete => "Delete",
            AclCommand::Exec => "Exec",
            AclCommand::Get => "Get",
            AclCommand::Replace => "Replace",
        }
    }
}

impl FromStr for AclCommand {
    type Err = AclError;

    fn from_str(s: &str) -> Result<Self, AclError> {
        AclCommand::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| AclError::UnknownCommand(s.to_string()))
    }
}

impl fmt::Display for AclCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an ACL value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    #[error("ACL entry '{0}' has no '=': entries are command=server(+server)*")]
    MissingEquals(String),
    #[error("ACL command '{0}' is not one of Add, Delete, Exec, Get, Replace")]
    UnknownCommand(String),
    #[error("ACL entry for {0} names no server")]
    NoServer(AclCommand),
    #[error(
        "ACL server name '{0}' contains a character the grammar forbids (= & * + or white space)"
    )]
    BadServer(String),
    #[error("ACL has an empty entry (a stray '&')")]
    EmptyEntry,
}

/// One `command=server+server…` entry. `*` is kept as a server name: it grants everyone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct AclEntry {
    pub command: AclCommand,
    pub servers: Vec<String>,
}

/// An ACL value. An empty ACL is "no value": the node inherits its nearest ancestor's ACL, whole.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Acl {
    pub entries: Vec<AclEntry>,
}

fn valid_server(name: &str) -> bool {
    name == "*"
        || (!name.is_empty()
            && name.chars().all(|c| {
                !c.is_whitespace() && !c.is_control() && !matches!(c, '=' | '&' | '*' | '+')
            }))
}

impl Acl {
    /// The ACL with no value.
    pub fn empty() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The default root ACL of a DM 1.2 tree.
    pub fn default_root() -> Self {
        Self {
            entries: vec![
                AclEntry {
                    command: AclCommand::Add,
                    servers: vec!["*".to_string()],
                },
                AclEntry {
                    command: AclCommand::Get,
                    servers: vec!["*".to_string()],
                },
            ],
        }
    }

    /// Does this ACL grant `command` to `server`? (`*` grants everyone.)
    pub fn allows(&self, command: AclCommand, server: &str) -> bool {
        self.entries
            .iter()
            .filter(|e| e.command == command)
            .flat_map(|e| e.servers.iter())
            .any(|s| s == "*" || s == server)
    }

    /// The servers named for a command, in order, without duplicates.
    pub fn servers(&self, command: AclCommand) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for s in self
            .entries
            .iter()
            .filter(|e| e.command == command)
            .flat_map(|e| e.servers.iter())
        {
            if !out.contains(&s.as_str()) {
                out.push(s);
            }
        }
        out
    }

    /// The commands granted to `server` explicitly (by name or `*`).
    pub fn rights_of(&self, server: &str) -> Vec<AclCommand> {
        AclCommand::ALL
            .into_iter()
            .filter(|c| self.allows(*c, server))
            .collect()
    }

    /// Sets the servers of `command` (replacing its entries, keeping the position of the first one);
    /// an empty list removes the command.
    pub fn set(&mut self, command: AclCommand, servers: Vec<String>) {
        let first = self.entries.iter().position(|e| e.command == command);
        self.entries.retain(|e| e.command != command);
        if servers.is_empty() {
            return;
        }
        let entry = AclEntry { command, servers };
        match first {
            Some(at) if at <= self.entries.len() => self.entries.insert(at, entry),
            _ => self.entries.push(entry),
        }
    }

    /// Grants `command` to `server` (no-op when already named explicitly).
    pub fn grant(&mut self, command: AclCommand, server: &str) {
        let mut servers: Vec<String> = self
            .servers(command)
            .into_iter()
            .map(String::from)
            .collect();
        if !servers.iter().any(|s| s == server) {
            servers.push(server.to_string());
        }
        self.set(command, servers);
    }

    /// Removes `server` from `command`'s entry (a `*` stays).
    pub fn revoke(&mut self, command: AclCommand, server: &str) {
        let servers: Vec<String> = self
            .servers(command)
            .into_iter()
            .filter(|s| *s != server)
            .map(String::from)
            .collect();
        self.set(command, servers);
    }
}

impl FromStr for Acl {
    type Err = AclError;

    fn from_str(s: &str) -> Result<Self, AclError> {
        if s.is_empty() {
            return Ok(Self::empty());
        }
        let mut entries = Vec::new();
        for raw in s.split('&') {
            if raw.is_empty() {
                return Err(AclError::EmptyEntry);
            }
            let (command, servers) = raw
                .split_once('=')
                .ok_or_else(|| AclError::MissingEquals(raw.to_string()))?;
            let command: AclCommand = command.parse()?;
            if servers.is_empty() {
                return Err(AclError::NoServer(command));
            }
            let servers = servers
                .split('+')
                .map(|name| {
                    if valid_server(name) {
                        Ok(name.to_string())
                    } else if name.is_empty() {
                        Err(AclError::NoServer(command))
                    } else {
                        Err(AclError::BadServer(name.to_string()))
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            entries.push(AclEntry { command, servers });
        }
        Ok(Self { entries })
    }
}

impl fmt::Display for Acl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, entry) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str("&")?;
            }
            write!(f, "{}=", entry.command)?;
            for (j, server) in entry.servers.iter().enumerate() {
                if j > 0 {
                    f.write_str("+")?;
                }
                f.write_str(server)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_contract_example() {
        let text = "Add=dms2&Delete=dms2&Exec=dms2&Get=dms2+dms1&Replace=dms2";
        let acl: Acl = text.parse().unwrap();
        assert_eq!(acl.entries.len(), 5);
        assert!(acl.allows(AclCommand::Get, "dms1"));
        assert!(!acl.allows(AclCommand::Replace, "dms1"));
        assert_eq!(acl.to_string(), text);
    }

    #[test]
    fn star_grants_everyone_and_may_stand_beside_names() {
        let acl: Acl = "Get=*+dms1&Add=*".parse().unwrap();
        assert!(acl.allows(AclCommand::Get, "anyone"));
        assert!(acl.allows(AclCommand::Add, "x"));
        assert!(!acl.allows(AclCommand::Delete, "x"));
    }

    #[test]
    fn refuses_what_the_grammar_does_not_allow() {
        for (bad, why) in [
            ("Get=", "no server"),
            ("Get", "no ="),
            ("Get=a&", "empty entry"),
            ("&Get=a", "empty entry"),
            ("Get=a+", "empty server"),
            ("Get=a b", "space"),
            ("Get=a*b", "star inside a name"),
            ("Copy=a", "no Copy entry"),
            ("get=a", "commands are case-sensitive"),
            ("Get=a=b", "= in a name"),
        ] {
            assert!(bad.parse::<Acl>().is_err(), "{bad}: {why}");
        }
        assert!("".parse::<Acl>().unwrap().is_empty());
    }

    #[test]
    fn edits_keep_order() {
        let mut acl: Acl = "Get=dms1&Replace=dms1".parse().unwrap();
        acl.grant(AclCommand::Get, "dms2");
        acl.revoke(AclCommand::Replace, "dms1");
        assert_eq!(acl.to_string(), "Get=dms1+dms2");
        acl.set(AclCommand::Add, vec!["*".into()]);
        assert_eq!(acl.to_string(), "Get=dms1+dms2&Add=*");
    }

    fn server() -> impl Strategy<Value = String> {
        prop_oneof![Just("*".to_string()), "[a-zA-Z0-9._:@-]{1,12}"]
    }

    fn acl() -> impl Strategy<Value = Acl> {
        prop::collection::vec(
            (
                prop::sample::select(AclCommand::ALL.to_vec()),
                prop::collection::vec(server(), 1..4),
            )
                .prop_map(|(command, servers)| AclEntry { command, servers }),
            0..6,
        )
        .prop_map(|entries| Acl { entries })
    }

    proptest! {
        #[test]
        fn format_then_parse_is_identity(acl in acl()) {
            let text = acl.to_string();
            prop_assert_eq!(text.parse::<Acl>().unwrap(), acl);
        }

        #[test]
        fn parse_never_panics_and_reformats_exactly(s in "[A-Za-z=&+* .]{0,40}") {
            if let Ok(acl) = s.parse::<Acl>() {
                prop_assert_eq!(acl.to_string(), s);
            }
        }
    }
}
