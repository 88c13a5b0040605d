//! The command executor: runs a server's management commands on a device tree as that server, per the
//! command table of docs/device-side.md, and produces the `Status` and `Results` commands to answer.
//! Pure: no IO, no clock, no randomness.
//!
//! | command | right checked | result |
//! |---|---|---|
//! | `Add` (Format `node` → interior, else leaf with `Data`) | `Add` on the parent | 200; 404; 405 parent is a leaf; 418 exists |
//! | `Replace` of a value | `Replace` on the node | 200; 404; 405 interior node |
//! | `Replace` of `<uri>?prop=ACL` | B.3 (own `Replace` on an interior node, or `Replace` on the parent) | 200; 425 no right (first); 500 malformed ACL; 405 root `Add` not `*` |
//! | `Delete` | `Delete` on the node | 200; 404; 405 the root; when a server's last account goes, its ServerID leaves the root ACL (B.3) |
//! | `Get` | `Get` | `Results`; `AAuthSecret` / `AAuthData` are never read: 405 |
//! | `Get` of `<uri>?prop=ACL` | `Get` | `Results` with the node's own ACL (empty: inherited) |
//! | `Atomic` | each inner command | all or nothing: 216 / failing code / 507 |
//! | `Sequence` | each inner command | in order, 200 |
//! | `Exec`, `Copy` | — | 406 |
//!
//! No permission: 425. Choices beyond the table (see the crate documentation): a missing or invalid
//! target URI is 400; URIs may be written relative (`DevInfo/Man` = `./DevInfo/Man`) and with a trailing
//! `/`; other properties and queries (`?prop=Format`, `?list=…`) are 406; a chunked item (`MoreData`) is
//! 406; `Delete` or `Add` of a property is 405; an `Alert` 1100, 1101 or 1222 gets 200, an `Alert` 1223
//! (session abort) ends the session without an answer, any other `Alert` gets 406; `Status` and `Results`
//! from the server are not answered; a command with `NoResp` gets no `Status` (but its `Results`).
//!
//! An `Add` or `Replace` of an `AAuthData` leaf sets its Format from the item's (else the command's)
//! `Meta`: `b64`/`bin` mark a value that is the base64 of the nonce bytes, anything else (or none) a
//! text value (which only the `text-nonce` quirk reads as text, see [`Device::credential_with`]).
//! [`ExecOptions::quirks`] adds the quirks of [`Quirks`] that concern commands: `nul-in-lists` and
//! `acl-on-add`.
//!
//! [`Device::credential_with`]: crate::Device::credential_with

use std::str::FromStr;

use dm_protocol::acl::{Acl, AclCommand};
use dm_protocol::codes::{AlertCode, StatusCode};
use dm_protocol::syncml::{Command, ItemCommand, Location, Meta, Results, Status};
use dm_protocol::syncml::{Container, Item};
use dm_protocol::tnds::{Format, NodeType};
use dm_protocol::tree::{DmTree, NONCE_NODE_NAME};
use dm_protocol::types::DmUri;

use crate::quirks::Quirks;

/// Node names whose values a device never gives out (B.2: no Get).
pub const UNREADABLE_NODES: [&str; 2] = ["AAuthSecret", "AAuthData"];

/// Stands for the NUL byte that ends a child list under the `nul-in-lists` quirk: XML cannot carry a
/// NUL, so the session puts it in the encoded message in place of this character before `</Data>`
/// (a private-use character, see [`with_nul_bytes`]).
pub const NUL_PLACEHOLDER: char = '\u{10FFFD}';

/// The encoded message with each [`NUL_PLACEHOLDER`] that ends a `Data` element replaced by a NUL byte
/// (the `nul-in-lists` quirk).
pub fn with_nul_bytes(encoded: &str) -> Vec<u8> {
    let marked = format!("{NUL_PLACEHOLDER}</Data>");
    // U+0000 is one NUL byte in UTF-8.
    encoded.replace(&marked, "\0</Data>").into_bytes()
}

/// How the executor behaves beyond the command table. `Default`: as the table says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExecOptions {
    /// As the C client of PROTOCOL.md B.6: an `Atomic` gets no status, its commands run one by one and
    /// nothing is rolled back.
    pub without_atomic: bool,
    /// The field quirks to reproduce (`nul-in-lists` and `acl-on-add` concern the executor).
    pub quirks: Quirks,
}

/// What executing one server message produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Execution {
    /// The `Status` and `Results` commands to answer with, in order, `CmdID`s numbered from the first id
    /// given to [`execute`].
    pub responses: Vec<Command>,
    /// How many item operations (`Add`, `Replace`, `Delete`, `Get`, `Exec`, `Copy` items) reached the
    /// tree, whatever their outcome (rolled back ones included; the 216 of commands an `Atomic` skipped
    /// after its failure are not counted).
    pub executed: usize,
    /// The server sent `Alert` 1223 (session abort): the session ends without an answer.
    pub abort: bool,
    /// Every change that stayed on the tree (rolled back ones are not here), one line each:
    /// `<Add|Replace|Delete> <target> <digest of the data>` (the data may be a secret; only a digest is
    /// kept). Lets a test see a change that reached the device twice.
    pub changes: Vec<String>,
}

/// Runs `commands` (the body of one server message whose `MsgID` is `msg_ref`) on `tree` as `server`.
/// Never panics, whatever the commands.
pub fn execute(
    tree: &mut DmTree,
    server: &str,
    msg_ref: &str,
    commands: &[Command],
    first_cmd_id: u32,
) -> Execution {
    execute_with_options(
        tree,
        server,
        msg_ref,
        commands,
        first_cmd_id,
        ExecOptions::default(),
    )
}

/// [`execute`] as the C client of PROTOCOL.md B.6 does it: an `Atomic` gets no status, its commands run
/// one by one and nothing is rolled back.
pub fn execute_without_atomic(
    tree: &mut DmTree,
    server: &str,
    msg_ref: &str,
    commands: &[Command],
    first_cmd_id: u32,
) -> Execution {
    let options = ExecOptions {
        without_atomic: true,
        ..ExecOptions::default()
    };
    execute_with_options(tree, server, msg_ref, commands, first_cmd_id, options)
}

/// [`execute`] with the behaviour `options` describe.
pub fn execute_with_options(
    tree: &mut DmTree,
    server: &str,
    msg_ref: &str,
    commands: &[Command],
    first_cmd_id: u32,
    options: ExecOptions,
) -> Execution {
    let mut run = Run {
        tree,
        server,
        msg_ref,
        out: Vec::new(),
        executed: 0,
        abort: false,
        atomic: !options.without_atomic,
        quirks: options.quirks,
        changes: Vec::new(),
    };
    for command in commands {
        run.command(command, false);
        if run.abort {
            break;
        }
    }
    let mut responses = run.out;
    number(&mut responses, first_cmd_id);
    Execution {
        responses,
        executed: run.executed,
        abort: run.abort,
        changes: run.changes,
    }
}

/// The answer to a message the device refuses as a whole (a wrong or missing server credential): one
/// `Status` with `code` for every command and item, nested ones included; nothing is executed.
pub fn refuse_all(
    msg_ref: &str,
    commands: &[Command],
    code: StatusCode,
    first_cmd_id: u32,
) -> Vec<Command> {
    let mut tree = DmTree::new();
    let mut run = Run {
        tree: &mut tree,
        server: "",
        msg_ref,
        out: Vec::new(),
        executed: 0,
        abort: false,
        atomic: true,
        quirks: Quirks::NONE,
        changes: Vec::new(),
    };
    for command in commands {
        run.skip(command, code);
    }
    let mut out = run.out;
    number(&mut out, first_cmd_id);
    out
}

/// Gives the responses consecutive `CmdID`s.
fn number(responses: &mut [Command], first: u32) {
    for (i, response) in responses.iter_mut().enumerate() {
        let id = u64::from(first).saturating_add(i as u64).to_string();
        match response {
            Command::Status(s) => s.cmd_id = id,
            Command::Results(r) => r.cmd_id = id,
            _ => {}
        }
    }
}

/// What an item addresses: a node, or a property of it.
enum Address {
    Node(DmUri),
    Acl(DmUri),
    /// Another property or query: not supported.
    Other,
}

/// Reads an item's target: `./A/B`, `A/B`, `.`, a trailing `/` accepted; `?prop=ACL` addresses the ACL.
fn address(item: &Item) -> Result<Address, StatusCode> {
    let text = item
        .target
        .as_ref()
        .map(|t| t.loc_uri.trim())
        .ok_or(StatusCode::BadRequest)?;
    let (path, query) = match text.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (text, None),
    };
    let uri = parse_uri(path).ok_or(StatusCode::BadRequest)?;
    match query {
        None => Ok(Address::Node(uri)),
        Some("prop=ACL") => Ok(Address::Acl(uri)),
        Some(_) => Ok(Address::Other),
    }
}

/// One line of [`Execution::changes`]: the command, its target and a digest of its data.
fn change_line(name: &str, item: &Item) -> String {
    use std::hash::{Hash, Hasher};
    let mut digest = std::collections::hash_map::DefaultHasher::new();
    item.data.hash(&mut digest);
    let target = item.target.as_ref().map_or("", |t| t.loc_uri.as_str());
    format!("{name} {target} {:016x}", digest.finish())
}

fn parse_uri(path: &str) -> Option<DmUri> {
    let path = if path.len() > 1 {
        path.strip_suffix('/').unwrap_or(path)
    } else {
        path
    };
    if path == "." || path.starts_with("./") {
        DmUri::from_str(path).ok()
    } else if path.is_empty() {
        None
    } else {
        DmUri::from_str(&format!("./{path}")).ok()
    }
}

fn code(n: u16) -> StatusCode {
    StatusCode::from_code(n)
}

/// The format the server gave an item: the item's `Meta/Format`, else the command's.
fn item_format<'a>(cmd_meta: Option<&'a Meta>, item: &'a Item) -> Option<&'a str> {
    item.meta
        .as_deref()
        .and_then(|m| m.format.as_deref())
        .or_else(|| cmd_meta.and_then(|m| m.format.as_deref()))
        .map(str::trim)
}

fn item_type<'a>(cmd_meta: Option<&'a Meta>, item: &'a Item) -> Option<&'a str> {
    item.meta
        .as_deref()
        .and_then(|m| m.type_.as_deref())
        .or_else(|| cmd_meta.and_then(|m| m.type_.as_deref()))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Add,
    Replace,
    Delete,
    Get,
    Unsupported,
}

struct Run<'a> {
    tree: &'a mut DmTree,
    server: &'a str,
    msg_ref: &'a str,
    out: Vec<Command>,
    executed: usize,
    abort: bool,
    /// `Atomic` is implemented (false: the B.6 client's behaviour, see [`execute_without_atomic`]).
    atomic: bool,
    quirks: Quirks,
    changes: Vec<String>,
}

impl Run<'_> {
    fn status(&mut self, cmd: &str, cmd_ref: &str, data: StatusCode, target: Option<&str>) {
        let mut status = Status::new("", self.msg_ref, cmd_ref, cmd, data);
        if let Some(target) = target {
            status.target_refs.push(target.to_string());
        }
        self.out.push(Command::Status(status));
    }

    /// Runs one command. Returns false when something in it failed; inside an `Atomic` (`atomic`), the
    /// first failure stops the command and the rest of it is answered 216.
    fn command(&mut self, command: &Command, atomic: bool) -> bool {
        match command {
            Command::Status(_) | Command::Results(_) => true,
            Command::Alert(alert) => {
                if alert.data == AlertCode::SessionAbort {
                    self.abort = true;
                    return true;
                }
                let ok = matches!(
                    alert.data,
                    AlertCode::DisplayMessage | AlertCode::ContinueOrAbort | AlertCode::NextMessage
                );
                let data = if ok {
                    StatusCode::Ok
                } else {
                    StatusCode::OptionalFeatureNotSupported
                };
                if !alert.no_resp {
                    self.status("Alert", &alert.cmd_id, data, None);
                }
                ok
            }
            Command::Add(c) => self.items("Add", Kind::Add, c, atomic),
            Command::Replace(c) => self.items("Replace", Kind::Replace, c, atomic),
            Command::Delete(c) => self.items("Delete", Kind::Delete, c, atomic),
            Command::Get(c) => self.items("Get", Kind::Get, c, atomic),
            Command::Copy(c) => self.items("Copy", Kind::Unsupported, c, atomic),
            Command::Exec(e) => {
                self.executed += 1;
                if !e.no_resp {
                    let target = e.item.target.as_ref().map(|t| t.loc_uri.as_str());
                    self.status(
                        "Exec",
                        &e.cmd_id,
                        StatusCode::OptionalFeatureNotSupported,
                        target,
                    );
                }
                false
            }
            Command::Atomic(c) if !self.atomic => {
                let mut all_ok = true;
                for inner in &c.commands {
                    all_ok &= self.command(inner, false);
                }
                all_ok
            }
            Command::Atomic(c) => self.atomic(c),
            Command::Sequence(c) => self.sequence(c, atomic),
        }
    }

    fn items(&mut self, name: &str, kind: Kind, c: &ItemCommand, atomic: bool) -> bool {
        let mut results = Vec::new();
        let mut all_ok = true;
        for (i, item) in c.items.iter().enumerate() {
            let target = item.target.as_ref().map(|t| t.loc_uri.as_str());
            let (data, result) = self.item(kind, c.meta.as_deref(), item);
            if data.is_success() && matches!(kind, Kind::Add | Kind::Replace | Kind::Delete) {
                self.changes.push(change_line(name, item));
            }
            if !c.no_resp {
                self.status(name, &c.cmd_id, data, target);
            }
            if let Some(result) = result {
                results.push(result);
            }
            if !data.is_success() {
                all_ok = false;
                if atomic {
                    for rest in c.items.iter().skip(i + 1) {
                        let target = rest.target.as_ref().map(|t| t.loc_uri.as_str());
                        self.status(name, &c.cmd_id, StatusCode::AtomicRollBackOk, target);
                    }
                    break;
                }
            }
        }
        if !results.is_empty() {
            self.out.push(Command::Results(Results {
                cmd_id: String::new(),
                msg_ref: Some(self.msg_ref.to_string()),
                cmd_ref: c.cmd_id.clone(),
                meta: None,
                target_refs: Vec::new(),
                source_refs: Vec::new(),
                items: results,
            }));
        }
        all_ok
    }

    fn atomic(&mut self, c: &Container) -> bool {
        let start = self.out.len();
        if !c.no_resp {
            self.status("Atomic", &c.cmd_id, StatusCode::Ok, None);
        }
        let snapshot = self.tree.clone();
        let changes_before = self.changes.len();
        let mut failed_at = None;
        for (i, inner) in c.commands.iter().enumerate() {
            if !self.command(inner, true) {
                failed_at = Some(i);
                break;
            }
        }
        let Some(failed_at) = failed_at else {
            return true;
        };
        *self.tree = snapshot;
        self.changes.truncate(changes_before);
        // The atomic's own status (if any) is the first; what ran inside is rolled back: its successes
        // become 216, its Results are dropped, the failure keeps its code.
        let inner_start = if c.no_resp { start } else { start + 1 };
        let mut kept = Vec::with_capacity(self.out.len().saturating_sub(start));
        for (i, response) in self.out.drain(start..).enumerate() {
            match response {
                Command::Results(_) if start + i >= inner_start => {}
                Command::Status(mut s) if start + i >= inner_start => {
                    if s.data.is_success() {
                        s.data = StatusCode::AtomicRollBackOk;
                    }
                    kept.push(Command::Status(s));
                }
                Command::Status(mut s) => {
                    s.data = StatusCode::AtomicFailed;
                    kept.push(Command::Status(s));
                }
                other => kept.push(other),
            }
        }
        self.out.extend(kept);
        for inner in c.commands.iter().skip(failed_at + 1) {
            self.skip(inner, StatusCode::AtomicRollBackOk);
        }
        false
    }

    fn sequence(&mut self, c: &Container, atomic: bool) -> bool {
        if !c.no_resp {
            self.status("Sequence", &c.cmd_id, StatusCode::Ok, None);
        }
        let mut all_ok = true;
        for (i, inner) in c.commands.iter().enumerate() {
            if !self.command(inner, atomic) {
                all_ok = false;
                if atomic {
                    for rest in c.commands.iter().skip(i + 1) {
                        self.skip(rest, StatusCode::AtomicRollBackOk);
                    }
                    break;
                }
            }
        }
        all_ok
    }

    /// Answers a command without running it: `data` for it and for each of its items and inner commands.
    fn skip(&mut self, command: &Command, data: StatusCode) {
        match command {
            Command::Status(_) | Command::Results(_) => {}
            Command::Alert(a) => {
                if !a.no_resp {
                    self.status("Alert", &a.cmd_id, data, None);
                }
            }
            Command::Add(c)
            | Command::Replace(c)
            | Command::Delete(c)
            | Command::Get(c)
            | Command::Copy(c) => {
                if !c.no_resp {
                    for item in &c.items {
                        let target = item.target.as_ref().map(|t| t.loc_uri.as_str());
                        self.status(command.name(), &c.cmd_id, data, target);
                    }
                }
            }
            Command::Exec(e) => {
                if !e.no_resp {
                    let target = e.item.target.as_ref().map(|t| t.loc_uri.as_str());
                    self.status("Exec", &e.cmd_id, data, target);
                }
            }
            Command::Atomic(c) | Command::Sequence(c) => {
                if !c.no_resp {
                    self.status(command.name(), &c.cmd_id, data, None);
                }
                for inner in &c.commands {
                    self.skip(inner, data);
                }
            }
        }
    }

    /// Runs one item: its status, and for a `Get` the item for `Results`.
    fn item(
        &mut self,
        kind: Kind,
        cmd_meta: Option<&Meta>,
        item: &Item,
    ) -> (StatusCode, Option<Item>) {
        let address = match address(item) {
            Ok(a) => a,
            Err(status) => return (status, None),
        };
        if kind == Kind::Unsupported {
            self.executed += 1;
            return (StatusCode::OptionalFeatureNotSupported, None);
        }
        if item.more_data {
            self.executed += 1;
            return (StatusCode::OptionalFeatureNotSupported, None);
        }
        self.executed += 1;
        let source = item
            .target
            .as_ref()
            .map(|t| t.loc_uri.clone())
            .unwrap_or_default();
        match (kind, address) {
            (_, Address::Other) => (StatusCode::OptionalFeatureNotSupported, None),
            (Kind::Add | Kind::Delete, Address::Acl(_)) => (StatusCode::CommandNotAllowed, None),
            (Kind::Add, Address::Node(uri)) => (self.add(cmd_meta, item, &uri), None),
            (Kind::Replace, Address::Node(uri)) => (self.replace(cmd_meta, item, &uri), None),
            (Kind::Replace, Address::Acl(uri)) => (self.replace_acl(item, &uri), None),
            (Kind::Delete, Address::Node(uri)) => (self.delete(&uri), None),
            (Kind::Get, Address::Node(uri)) => match self.get(&uri) {
                Ok((format, data)) => (StatusCode::Ok, Some(result(source, format, data))),
                Err(status) => (status, None),
            },
            (Kind::Get, Address::Acl(uri)) => match self.get_acl(&uri) {
                Ok(data) => (StatusCode::Ok, Some(result(source, "chr", data))),
                Err(status) => (status, None),
            },
            (Kind::Unsupported, _) => (StatusCode::OptionalFeatureNotSupported, None),
        }
    }

    fn check(&self, command: AclCommand, uri: &DmUri) -> Result<(), StatusCode> {
        self.tree
            .check(self.server, command, uri)
            .map_err(|denied| code(denied.status()))
    }

    fn add(&mut self, cmd_meta: Option<&Meta>, item: &Item, uri: &DmUri) -> StatusCode {
        if let Err(status) = self.check(AclCommand::Add, uri) {
            return status;
        }
        let format = item_format(cmd_meta, item);
        let done = if format == Some("node") {
            self.tree.add_interior(uri)
        } else {
            let value = item.data.clone().unwrap_or_default();
            let format = format.and_then(Format::from_name);
            let node_type = item_type(cmd_meta, item).map(|t| NodeType::Mime(t.to_string()));
            self.tree.add_leaf(uri, value, format, node_type)
        };
        if let Err(e) = done {
            return code(e.status());
        }
        if self.quirks.acl_on_add {
            self.acl_of_its_choosing(uri);
        }
        StatusCode::Ok
    }

    /// The `acl-on-add` quirk: a node added under a parent whose own ACL does not grant the server
    /// `Replace` gets `Get=*&Add=S&Delete=S&Replace=S` instead of an empty ACL. The client looks at the
    /// parent's own ACL only: an empty one (inherited) grants nothing, which is how, in the field, the
    /// children of a freshly added account all became readable by every server.
    fn acl_of_its_choosing(&mut self, uri: &DmUri) {
        let Some(parent) = uri.parent() else {
            return;
        };
        let grants_replace = self
            .tree
            .acl(&parent)
            .is_ok_and(|acl| acl.allows(AclCommand::Replace, self.server));
        if grants_replace {
            return;
        }
        let s = self.server;
        // A ServerID that cannot be written in an ACL leaves the node with an empty one.
        if let Ok(acl) = Acl::from_str(&format!("Get=*&Add={s}&Delete={s}&Replace={s}")) {
            // Cannot fail: the node was just added.
            let _ = self.tree.set_acl(uri, acl);
        }
    }

    fn replace(&mut self, cmd_meta: Option<&Meta>, item: &Item, uri: &DmUri) -> StatusCode {
        if let Err(status) = self.check(AclCommand::Replace, uri) {
            return status;
        }
        let value = item.data.clone().unwrap_or_default();
        if let Err(e) = self.tree.replace_value(uri, value) {
            return code(e.status());
        }
        // A nonce is bytes (Format b64/bin: the value is their base64) or text, as the server sent it.
        if uri.name() == Some(NONCE_NODE_NAME) {
            let format = item_format(cmd_meta, item).and_then(Format::from_name);
            // Cannot fail: the leaf was just replaced.
            let _ = self.tree.set_format(uri, format);
        }
        StatusCode::Ok
    }

    fn replace_acl(&mut self, item: &Item, uri: &DmUri) -> StatusCode {
        if !self.tree.exists(uri) {
            return StatusCode::NotFound;
        }
        // B.3: no right is 425 whatever the value; then a malformed ACL is 500 (B.6).
        if let Err(denied) = self.tree.check_acl_change(self.server, uri) {
            return code(denied.status());
        }
        let text = item.data.as_deref().unwrap_or("").trim();
        let Ok(acl) = Acl::from_str(text) else {
            return StatusCode::CommandFailed;
        };
        if let Err(denied) = self.tree.check_set_acl(self.server, uri, &acl) {
            return code(denied.status());
        }
        match self.tree.set_acl(uri, acl) {
            Ok(()) => StatusCode::Ok,
            Err(e) => code(e.status()),
        }
    }

    fn delete(&mut self, uri: &DmUri) -> StatusCode {
        if uri.is_root() {
            return StatusCode::CommandNotAllowed;
        }
        if let Err(status) = self.check(AclCommand::Delete, uri) {
            return status;
        }
        let before = account_server_ids(self.tree);
        match self.tree.delete(uri) {
            Ok(()) => {
                // B.3: a ServerID whose last account is gone leaves the root ACL (an entry left
                // without servers becomes `*`).
                let after = account_server_ids(self.tree);
                for gone in before.iter().filter(|id| !after.contains(id)) {
                    self.tree.remove_server_from_root_acl(gone);
                }
                StatusCode::Ok
            }
            Err(e) => code(e.status()),
        }
    }

    /// A node's format and value: a leaf's value, or an interior node's child names joined by `/`.
    fn get(&self, uri: &DmUri) -> Result<(&'static str, String), StatusCode> {
        self.check(AclCommand::Get, uri)?;
        if uri.name().is_some_and(|n| UNREADABLE_NODES.contains(&n)) {
            return Err(StatusCode::CommandNotAllowed);
        }
        let node = self.tree.get(uri).map_err(|e| code(e.status()))?;
        match node.value() {
            Some(value) => Ok((
                node.format().map_or("chr", Format::as_str),
                value.to_string(),
            )),
            None => {
                let names: Vec<&str> = node.children().iter().map(|c| c.name()).collect();
                let mut list = names.join("/");
                if self.quirks.nul_in_lists {
                    list.push(NUL_PLACEHOLDER);
                }
                Ok(("node", list))
            }
        }
    }

    fn get_acl(&self, uri: &DmUri) -> Result<String, StatusCode> {
        self.check(AclCommand::Get, uri)?;
        let acl = self.tree.acl(uri).map_err(|e| code(e.status()))?;
        Ok(acl.to_string())
    }
}

/// The `ServerID` values of the accounts under `./DMAcc`.
fn account_server_ids(tree: &DmTree) -> Vec<String> {
    let Ok(dmacc) = DmUri::from_str("./DMAcc") else {
        return Vec::new();
    };
    let Ok(keys) = tree.children(&dmacc) else {
        return Vec::new();
    };
    keys.into_iter()
        .filter_map(|key| dmacc.join(key).ok()?.join("ServerID").ok())
        .filter_map(|u| tree.value(&u).ok().map(String::from))
        .collect()
}

fn result(source: String, format: &str, data: String) -> Item {
    Item {
        target: None,
        source: Some(Location::new(source)),
        meta: Some(Box::new(Meta {
            format: Some(format.to_string()),
            ..Meta::default()
        })),
        data: Some(data),
        more_data: false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::device::{DefaultAccount, Device};
    use dm_protocol::auth::encode_nonce;
    use dm_protocol::syncml::{Alert, Exec};
    use dm_protocol::tnds;

    const S: &str = "dms1.example";
    const OTHER: &str = "dms2.example";

    fn device() -> Device {
        Device::with_default_tree(
            "IMEI:1",
            &DefaultAccount {
                server_id: S.into(),
                addr: "http://127.0.0.1:1/dm".into(),
                server_secret: "srv-secret".into(),
                server_nonce_b64: encode_nonce(b"n1"),
                client_name: "client".into(),
                client_secret: "cli-secret".into(),
                client_nonce_b64: encode_nonce(b"n2"),
            },
        )
        .unwrap()
    }

    fn tree() -> DmTree {
        device().tree().clone()
    }

    fn u(s: &str) -> DmUri {
        s.parse().unwrap()
    }

    fn item_cmd(id: &str, items: Vec<Item>) -> ItemCommand {
        ItemCommand::new(id, items)
    }

    fn add_leaf(id: &str, target: &str, value: &str) -> Command {
        Command::Add(item_cmd(id, vec![Item::target(target).with_data(value)]))
    }

    fn add_node(id: &str, target: &str) -> Command {
        Command::Add(item_cmd(
            id,
            vec![
                Item::target(target)
                    .with_data("")
                    .with_meta(Meta::format_type("node", "")),
            ],
        ))
    }

    fn replace(id: &str, target: &str, value: &str) -> Command {
        Command::Replace(item_cmd(id, vec![Item::target(target).with_data(value)]))
    }

    fn delete(id: &str, target: &str) -> Command {
        Command::Delete(item_cmd(id, vec![Item::target(target)]))
    }

    fn get(id: &str, target: &str) -> Command {
        Command::Get(item_cmd(id, vec![Item::target(target)]))
    }

    fn run(tree: &mut DmTree, server: &str, commands: Vec<Command>) -> Execution {
        execute(tree, server, "2", &commands, 2)
    }

    /// (Cmd, CmdRef, code, first TargetRef) of every Status.
    fn statuses(e: &Execution) -> Vec<(String, String, u16, Option<String>)> {
        e.responses
            .iter()
            .filter_map(|c| match c {
                Command::Status(s) => Some((
                    s.cmd.clone(),
                    s.cmd_ref.clone(),
                    s.data.code(),
                    s.target_refs.first().cloned(),
                )),
                _ => None,
            })
            .collect()
    }

    fn codes(e: &Execution) -> Vec<u16> {
        statuses(e).into_iter().map(|s| s.2).collect()
    }

    fn results(e: &Execution) -> Vec<&Results> {
        e.responses
            .iter()
            .filter_map(|c| match c {
                Command::Results(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    fn export(tree: &DmTree) -> String {
        tnds::encode(&tree.to_tnds())
    }

    #[test]
    fn statuses_carry_refs_and_ids() {
        let mut t = tree();
        let e = run(
            &mut t,
            S,
            vec![
                replace("7", "./Vendor/Acme/Settings/Volume", "9"),
                get("8", "./Vendor/Acme/Settings/Volume"),
            ],
        );
        assert_eq!(e.executed, 2);
        let Command::Status(s) = &e.responses[0] else {
            panic!()
        };
        assert_eq!(
            (
                s.cmd_id.as_str(),
                s.msg_ref.as_str(),
                s.cmd_ref.as_str(),
                s.cmd.as_str()
            ),
            ("2", "2", "7", "Replace")
        );
        assert_eq!(s.target_refs, vec!["./Vendor/Acme/Settings/Volume"]);
        let Command::Results(r) = &e.responses[2] else {
            panic!()
        };
        assert_eq!(r.cmd_id, "4");
        assert_eq!(r.cmd_ref, "8");
        assert_eq!(r.msg_ref.as_deref(), Some("2"));
        let item = &r.items[0];
        assert_eq!(
            item.source.as_ref().unwrap().loc_uri,
            "./Vendor/Acme/Settings/Volume"
        );
        assert_eq!(item.data.as_deref(), Some("9"));
        assert_eq!(item.meta.as_ref().unwrap().format.as_deref(), Some("chr"));
    }

    #[test]
    fn one_status_per_item() {
        let mut t = tree();
        let e = run(
            &mut t,
            S,
            vec![Command::Get(item_cmd(
                "3",
                vec![
                    Item::target("./DevInfo/Man"),
                    Item::target("./DevInfo/Nope"),
                    Item::target("./DevInfo/Mod"),
                ],
            ))],
        );
        assert_eq!(codes(&e), vec![200, 404, 200]);
        let r = results(&e);
        assert_eq!(r.len(), 1);
        let data: Vec<_> = r[0].items.iter().map(|i| i.data.clone().unwrap()).collect();
        assert_eq!(data, vec!["Acme", "X100"]);
    }

    #[test]
    fn acl_enforced_per_server_with_inheritance() {
        let mut t = tree();
        // ./DevInfo inherits the root: Get=* and Replace=S.
        let e = run(
            &mut t,
            OTHER,
            vec![
                get("1", "./DevInfo/Man"),
                replace("2", "./DevInfo/Lang", "fr"),
                get("3", "./Vendor/Acme/Settings/Volume"),
                replace("4", "./Vendor/Acme/Settings/Volume", "1"),
                add_leaf("5", "./Vendor/New", "x"),
                delete("6", "./Vendor/Other/Info"),
                get("7", "./DMAcc"),
                add_leaf("8", "./TopLevel", "x"),
            ],
        );
        assert_eq!(codes(&e), vec![200, 425, 425, 425, 425, 425, 425, 200]);
        let e = run(
            &mut t,
            S,
            vec![
                replace("1", "./DevInfo/Lang", "fr"),
                get("2", "./Vendor/Acme/Settings/Volume"),
                replace("3", "./Vendor/Acme/Settings/Volume", "1"),
                add_leaf("4", "./Vendor/New", "x"),
                delete("5", "./Vendor/Other/Info"),
                get("6", "./DMAcc"),
            ],
        );
        assert_eq!(codes(&e), vec![200, 200, 200, 200, 200, 200]);
        assert_eq!(t.value(&u("./Vendor/New")).unwrap(), "x");
        assert!(!t.exists(&u("./Vendor/Other/Info")));
        // A node's own ACL replaces the inherited one, whole.
        t.set_acl(
            &u("./Vendor/Acme"),
            Acl::from_str(&format!("Get={OTHER}")).unwrap(),
        )
        .unwrap();
        let e = run(&mut t, S, vec![get("1", "./Vendor/Acme/Settings/Volume")]);
        assert_eq!(codes(&e), vec![425]);
        let e = run(
            &mut t,
            OTHER,
            vec![get("1", "./Vendor/Acme/Settings/Volume")],
        );
        assert_eq!(codes(&e), vec![200]);
    }

    #[test]
    fn add_replace_delete_codes() {
        let mut t = tree();
        let e = run(
            &mut t,
            S,
            vec![
                add_node("1", "./Vendor/Acme/Apps/App2"),
                add_leaf("2", "./Vendor/Acme/Apps/App2/Version", "2.0"),
                add_leaf("3", "./Vendor/Acme/Apps/App2/Version", "2.0"),
                add_leaf("4", "./Vendor/Missing/Leaf", "x"),
                add_leaf("5", "./Vendor/Acme/Settings/Volume/Sub", "x"),
                replace("6", "./Vendor/Acme/Settings", "x"),
                replace("7", "./Vendor/Nope", "x"),
                delete("8", "./Vendor/Nope"),
                delete("9", "."),
                delete("10", "./Vendor/Acme/Apps/App2"),
            ],
        );
        assert_eq!(
            codes(&e),
            vec![200, 200, 418, 404, 405, 405, 404, 404, 405, 200]
        );
        assert!(!t.exists(&u("./Vendor/Acme/Apps/App2")));
    }

    #[test]
    fn add_keeps_format_and_relative_uris() {
        let mut t = tree();
        let e = run(
            &mut t,
            S,
            vec![Command::Add(item_cmd(
                "1",
                vec![
                    Item::target("Vendor/Acme/Settings/Mute")
                        .with_data("false")
                        .with_meta(Meta::format_type("bool", "text/plain")),
                ],
            ))],
        );
        assert_eq!(codes(&e), vec![200]);
        let e = run(&mut t, S, vec![get("2", "./Vendor/Acme/Settings/Mute")]);
        let r = results(&e);
        assert_eq!(
            r[0].items[0].meta.as_ref().unwrap().format.as_deref(),
            Some("bool")
        );
        let e = run(&mut t, S, vec![get("3", "./Vendor/Acme/Settings/")]);
        assert_eq!(
            results(&e)[0].items[0].data.as_deref(),
            Some("Brightness/Mute/Volume")
        );
        assert_eq!(
            results(&e)[0].items[0]
                .meta
                .as_ref()
                .unwrap()
                .format
                .as_deref(),
            Some("node")
        );
    }

    #[test]
    fn secrets_are_never_read() {
        let mut t = tree();
        let e = run(
            &mut t,
            S,
            vec![
                get("1", "./DMAcc/dms1.example/AppAuth/SRVCRED/AAuthSecret"),
                get("2", "./DMAcc/dms1.example/AppAuth/CLCRED/AAuthData"),
                get("3", "./DMAcc/dms1.example/AppAuth/CLCRED/AAuthName"),
                get("4", "./DMAcc/dms1.example/AppAuth/CLCRED"),
            ],
        );
        assert_eq!(codes(&e), vec![405, 405, 200, 200]);
        let shown = format!("{:?}", e.responses);
        assert!(!shown.contains("srv-secret") && !shown.contains("cli-secret"));
        // Writing them is a Replace like any other.
        let e = run(
            &mut t,
            S,
            vec![replace(
                "5",
                "./DMAcc/dms1.example/AppAuth/SRVCRED/AAuthSecret",
                "new",
            )],
        );
        assert_eq!(codes(&e), vec![200]);
    }

    #[test]
    fn get_and_replace_acl_property() {
        let mut t = tree();
        let e = run(
            &mut t,
            S,
            vec![
                get("1", "./Vendor?prop=ACL"),
                get("2", "./Vendor/Acme?prop=ACL"),
                get("3", ".?prop=ACL"),
            ],
        );
        assert_eq!(codes(&e), vec![200, 200, 200]);
        let data: Vec<_> = results(&e)
            .iter()
            .map(|r| r.items[0].data.clone().unwrap())
            .collect();
        assert_eq!(
            data,
            vec![
                format!("Add={S}&Delete={S}&Exec={S}&Get={S}&Replace={S}"),
                String::new(),
                format!("Add=*&Get=*&Replace={S}"),
            ]
        );
        assert_eq!(
            results(&e)[0].items[0].source.as_ref().unwrap().loc_uri,
            "./Vendor?prop=ACL"
        );
        // The other server cannot read ./Vendor's ACL (no Get there).
        let e = run(&mut t, OTHER, vec![get("1", "./Vendor?prop=ACL")]);
        assert_eq!(codes(&e), vec![425]);
        let new = format!("Get={S}+{OTHER}&Replace={OTHER}");
        let e = run(
            &mut t,
            S,
            vec![
                replace("1", "./Vendor/Acme/Apps?prop=ACL", &new),
                replace("2", "./Vendor/Acme?prop=ACL", "Get=a&Bogus=b"),
                replace("3", "./Vendor/Nope?prop=ACL", "Get=a"),
                replace("4", ".?prop=ACL", &format!("Add={S}&Get=*")),
                replace(
                    "5",
                    ".?prop=ACL",
                    &format!("Add=*&Get=*&Replace={S}+{OTHER}"),
                ),
                replace("6", "./Vendor?prop=Format", "node"),
            ],
        );
        assert_eq!(codes(&e), vec![200, 500, 404, 405, 200, 406]);
        assert_eq!(t.acl(&u("./Vendor/Acme/Apps")).unwrap().to_string(), new);
        // OTHER now holds Replace on ./Vendor/Acme/Apps (interior): it may change that ACL itself.
        let e = run(
            &mut t,
            OTHER,
            vec![
                replace("1", "./Vendor/Acme/Apps/App1/Version", "2"),
                add_leaf("2", "./Vendor/Acme/Apps/App9", "x"),
                replace(
                    "3",
                    "./Vendor/Acme/Apps?prop=ACL",
                    &format!("Get={OTHER}&Replace={OTHER}"),
                ),
            ],
        );
        // Version inherits the new ACL of Apps (Replace=OTHER); Add is not granted there.
        assert_eq!(codes(&e), vec![200, 425, 200]);
    }

    #[test]
    fn leaf_acl_needs_replace_on_the_parent() {
        let mut t = tree();
        // OTHER gets Replace on the leaf Volume only: that covers its value, not its ACL.
        t.set_acl(
            &u("./Vendor/Acme/Settings/Volume"),
            Acl::from_str(&format!("Get={OTHER}&Replace={OTHER}")).unwrap(),
        )
        .unwrap();
        let e = run(
            &mut t,
            OTHER,
            vec![
                replace("1", "./Vendor/Acme/Settings/Volume", "3"),
                replace(
                    "2",
                    "./Vendor/Acme/Settings/Volume?prop=ACL",
                    &format!("Replace={OTHER}"),
                ),
            ],
        );
        assert_eq!(codes(&e), vec![200, 425]);
        // With Replace on the parent (an interior node) the leaf's ACL can be changed.
        t.set_acl(
            &u("./Vendor/Acme/Settings"),
            Acl::from_str(&format!("Replace={OTHER}")).unwrap(),
        )
        .unwrap();
        let e = run(
            &mut t,
            OTHER,
            vec![replace(
                "3",
                "./Vendor/Acme/Settings/Volume?prop=ACL",
                &format!("Replace={OTHER}"),
            )],
        );
        assert_eq!(codes(&e), vec![200]);
        // S lost Replace on Settings, but holds Replace on ./Vendor/Acme (inherited from ./Vendor): it
        // can take Settings back through its parent.
        let e = run(
            &mut t,
            S,
            vec![
                replace("4", "./Vendor/Acme/Settings/Brightness", "1"),
                replace("5", "./Vendor/Acme/Settings?prop=ACL", ""),
                replace("6", "./Vendor/Acme/Settings/Brightness", "1"),
            ],
        );
        assert_eq!(codes(&e), vec![425, 200, 200]);
    }

    #[test]
    fn atomic_success() {
        let mut t = tree();
        let e = run(
            &mut t,
            S,
            vec![Command::Atomic(Container::new(
                "10",
                vec![
                    add_node("11", "./Vendor/Acme/Apps/App2"),
                    add_leaf("12", "./Vendor/Acme/Apps/App2/Version", "1"),
                    replace(
                        "13",
                        "./Vendor/Acme/Apps/App2?prop=ACL",
                        &format!("Get={OTHER}"),
                    ),
                ],
            ))],
        );
        let s = statuses(&e);
        assert_eq!(s[0], ("Atomic".into(), "10".into(), 200, None));
        assert_eq!(codes(&e), vec![200, 200, 200, 200]);
        assert_eq!(e.executed, 3);
        assert!(t.exists(&u("./Vendor/Acme/Apps/App2/Version")));
        // The journal of changes names each one (the data only as a digest).
        let changed: Vec<_> = e
            .changes
            .iter()
            .map(|c| c.rsplit_once(' ').unwrap().0)
            .collect();
        assert_eq!(
            changed,
            [
                "Add ./Vendor/Acme/Apps/App2",
                "Add ./Vendor/Acme/Apps/App2/Version",
                "Replace ./Vendor/Acme/Apps/App2?prop=ACL",
            ]
        );
    }

    #[test]
    fn atomic_failure_rolls_back_byte_identical() {
        let mut t = tree();
        let before = export(&t);
        let e = run(
            &mut t,
            S,
            vec![Command::Atomic(Container::new(
                "10",
                vec![
                    add_node("11", "./Vendor/Acme/Apps/App2"),
                    replace("12", "./Vendor/Acme/Settings/Volume", "0"),
                    replace("13", "./Vendor/Acme/Apps?prop=ACL", &format!("Get={OTHER}")),
                    delete("14", "./Vendor/Other"),
                    get("15", "./DevInfo/Man"),
                    // Fails: no such node.
                    replace("16", "./Vendor/Nope", "x"),
                    add_leaf("17", "./Vendor/Later", "x"),
                    Command::Sequence(Container::new("18", vec![delete("19", "./Vendor/Acme")])),
                ],
            ))],
        );
        assert_eq!(export(&t), before);
        assert!(e.changes.is_empty(), "rolled back: {:?}", e.changes);
        assert_eq!(
            statuses(&e),
            vec![
                ("Atomic".into(), "10".into(), 507, None),
                (
                    "Add".into(),
                    "11".into(),
                    216,
                    Some("./Vendor/Acme/Apps/App2".into())
                ),
                (
                    "Replace".into(),
                    "12".into(),
                    216,
                    Some("./Vendor/Acme/Settings/Volume".into())
                ),
                (
                    "Replace".into(),
                    "13".into(),
                    216,
                    Some("./Vendor/Acme/Apps?prop=ACL".into())
                ),
                (
                    "Delete".into(),
                    "14".into(),
                    216,
                    Some("./Vendor/Other".into())
                ),
                ("Get".into(), "15".into(), 216, Some("./DevInfo/Man".into())),
                (
                    "Replace".into(),
                    "16".into(),
                    404,
                    Some("./Vendor/Nope".into())
                ),
                (
                    "Add".into(),
                    "17".into(),
                    216,
                    Some("./Vendor/Later".into())
                ),
                ("Sequence".into(), "18".into(), 216, None),
                (
                    "Delete".into(),
                    "19".into(),
                    216,
                    Some("./Vendor/Acme".into())
                ),
            ]
        );
        assert!(results(&e).is_empty(), "a rolled back Get gives no Results");
        // CmdIDs stay consecutive after the Results were dropped.
        let ids: Vec<_> = e.responses.iter().map(|c| c.cmd_id().to_string()).collect();
        let want: Vec<_> = (2..2 + ids.len()).map(|i| i.to_string()).collect();
        assert_eq!(ids, want);
    }

    #[test]
    fn atomic_permission_failure_and_exec() {
        let mut t = tree();
        let before = export(&t);
        let e = run(
            &mut t,
            OTHER,
            vec![Command::Atomic(Container::new(
                "1",
                vec![
                    replace("2", "./DevInfo/Lang", "de"),
                    add_leaf("3", "./Top", "x"),
                ],
            ))],
        );
        assert_eq!(codes(&e), vec![507, 425, 216]);
        assert_eq!(export(&t), before);
        let e = run(
            &mut t,
            S,
            vec![Command::Atomic(Container::new(
                "1",
                vec![
                    replace("2", "./DevInfo/Lang", "de"),
                    Command::Exec(Exec {
                        cmd_id: "3".into(),
                        no_resp: false,
                        meta: None,
                        correlator: None,
                        item: Item::target("./Vendor/Acme/Apps/App1"),
                    }),
                ],
            ))],
        );
        assert_eq!(codes(&e), vec![507, 216, 406]);
        assert_eq!(export(&t), before);
    }

    #[test]
    fn atomic_inside_multi_item_command_stops_at_first_failing_item() {
        let mut t = tree();
        let before = export(&t);
        let e = run(
            &mut t,
            S,
            vec![Command::Atomic(Container::new(
                "1",
                vec![Command::Replace(item_cmd(
                    "2",
                    vec![
                        Item::target("./Vendor/Acme/Settings/Volume").with_data("1"),
                        Item::target("./Vendor/Acme/Settings").with_data("1"),
                        Item::target("./Vendor/Acme/Settings/Brightness").with_data("1"),
                    ],
                ))],
            ))],
        );
        assert_eq!(codes(&e), vec![507, 216, 405, 216]);
        assert_eq!(export(&t), before);
    }

    #[test]
    fn sequence_runs_in_order_and_answers_200() {
        let mut t = tree();
        let e = run(
            &mut t,
            S,
            vec![Command::Sequence(Container::new(
                "1",
                vec![
                    add_node("2", "./Vendor/X"),
                    add_leaf("3", "./Vendor/X/Y", "1"),
                    replace("4", "./Vendor/Nope", "1"),
                    replace("5", "./Vendor/X/Y", "2"),
                ],
            ))],
        );
        assert_eq!(codes(&e), vec![200, 200, 200, 404, 200]);
        assert_eq!(t.value(&u("./Vendor/X/Y")).unwrap(), "2");
    }

    #[test]
    fn exec_copy_alerts_and_bad_targets() {
        let mut t = tree();
        let e = run(
            &mut t,
            S,
            vec![
                Command::Exec(Exec {
                    cmd_id: "1".into(),
                    no_resp: false,
                    meta: None,
                    correlator: None,
                    item: Item::target("./Vendor/Acme/Apps/App1"),
                }),
                Command::Copy(item_cmd(
                    "2",
                    vec![Item::target("./Vendor/A"), Item::target("./Vendor/B")],
                )),
                Command::Get(item_cmd("3", vec![Item::source("./DevInfo/Man")])),
                get("4", "./a//b"),
                get("5", "./Vendor?list=Struct"),
                Command::Alert(Alert::new("6", AlertCode::DisplayMessage)),
                Command::Alert(Alert::new("7", AlertCode::UserInput)),
                Command::Status(Status::new("8", "1", "1", "Alert", StatusCode::Ok)),
            ],
        );
        assert_eq!(codes(&e), vec![406, 406, 406, 400, 400, 406, 200, 406]);
        let e = run(
            &mut t,
            S,
            vec![
                Command::Alert(Alert::new("1", AlertCode::SessionAbort)),
                get("2", "./DevInfo/Man"),
            ],
        );
        assert!(e.abort);
        assert!(e.responses.is_empty());
    }

    #[test]
    fn no_resp_commands_get_no_status() {
        let mut t = tree();
        let mut c = item_cmd("1", vec![Item::target("./DevInfo/Man")]);
        c.no_resp = true;
        let e = run(&mut t, S, vec![Command::Get(c)]);
        assert!(codes(&e).is_empty());
        assert_eq!(results(&e).len(), 1);
    }

    #[test]
    fn refuse_all_answers_every_command() {
        let commands = vec![
            get("1", "./DevInfo/Man"),
            Command::Atomic(Container::new(
                "2",
                vec![
                    replace("3", "./DevInfo/Lang", "x"),
                    Command::Replace(item_cmd(
                        "4",
                        vec![Item::target("./A"), Item::target("./B")],
                    )),
                ],
            )),
            Command::Status(Status::new("5", "1", "1", "Alert", StatusCode::Ok)),
        ];
        let out = refuse_all("3", &commands, StatusCode::InvalidCredentials, 2);
        let got: Vec<_> = out
            .iter()
            .map(|c| match c {
                Command::Status(s) => (s.cmd_ref.clone(), s.data.code(), s.msg_ref.clone()),
                _ => panic!(),
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("1".into(), 401, "3".into()),
                ("2".into(), 401, "3".into()),
                ("3".into(), 401, "3".into()),
                ("4".into(), 401, "3".into()),
                ("4".into(), 401, "3".into()),
            ]
        );
    }

    #[test]
    fn nested_atomic_failure_fails_the_outer() {
        let mut t = tree();
        let before = export(&t);
        let e = run(
            &mut t,
            S,
            vec![Command::Atomic(Container::new(
                "1",
                vec![
                    replace("2", "./DevInfo/Lang", "de"),
                    Command::Atomic(Container::new(
                        "3",
                        vec![replace("4", "./DevInfo/DmV", "9"), delete("5", "./Nope")],
                    )),
                    replace("6", "./DevInfo/Man", "x"),
                ],
            ))],
        );
        assert_eq!(codes(&e), vec![507, 216, 507, 216, 404, 216]);
        assert_eq!(export(&t), before);
    }

    #[test]
    fn deleting_a_servers_last_account_removes_it_from_the_root_acl() {
        // B.3: when a ServerID is removed, it leaves the root ACL; an entry left empty becomes `*`.
        let mut t = tree();
        t.set_acl(
            &u("./DMAcc"),
            Acl::from_str(&format!("Add={S}&Delete={S}&Get={S}&Replace={S}")).unwrap(),
        )
        .unwrap();
        t.set_acl(
            &DmUri::root(),
            Acl::from_str(&format!("Add=*&Get=*+{S}&Replace={S}&Exec={OTHER}+{S}")).unwrap(),
        )
        .unwrap();
        // Inside a failing Atomic the removal is rolled back with the rest.
        let before = export(&t);
        let e = run(
            &mut t,
            S,
            vec![Command::Atomic(Container::new(
                "1",
                vec![delete("2", "./DMAcc/dms1.example"), delete("3", "./Nope")],
            ))],
        );
        assert_eq!(codes(&e), vec![507, 216, 404]);
        assert_eq!(export(&t), before);
        let e = run(&mut t, S, vec![delete("1", "./DMAcc/dms1.example")]);
        assert_eq!(codes(&e), vec![200]);
        assert_eq!(
            t.acl(&DmUri::root()).unwrap().to_string(),
            format!("Add=*&Get=*&Replace=*&Exec={OTHER}")
        );
        // Deleting a node that holds no account leaves the root ACL alone.
        let root = t.acl(&DmUri::root()).unwrap().clone();
        let e = run(&mut t, S, vec![delete("1", "./Vendor/Other")]);
        assert_eq!(codes(&e), vec![200]);
        assert_eq!(t.acl(&DmUri::root()).unwrap(), &root);
    }

    #[test]
    fn without_atomic_the_commands_run_one_by_one_and_nothing_is_rolled_back() {
        // The B.6 client: no status for the Atomic, no roll back.
        let mut t = tree();
        let e = execute_without_atomic(
            &mut t,
            S,
            "2",
            &[Command::Atomic(Container::new(
                "1",
                vec![
                    replace("2", "./DevInfo/Lang", "de"),
                    delete("3", "./Nope"),
                    replace("4", "./DevInfo/DmV", "9"),
                ],
            ))],
            2,
        );
        assert_eq!(codes(&e), vec![200, 404, 200]);
        assert_eq!(t.value(&u("./DevInfo/Lang")).unwrap(), "de");
        assert_eq!(t.value(&u("./DevInfo/DmV")).unwrap(), "9");
    }

    #[test]
    fn no_right_is_425_even_for_a_malformed_acl() {
        let mut t = tree();
        let e = run(
            &mut t,
            OTHER,
            vec![
                replace("1", "./Vendor?prop=ACL", "Get=a b"),
                replace("2", "./Vendor?prop=ACL", "Get=*"),
            ],
        );
        assert_eq!(codes(&e), vec![425, 425]);
        let e = run(
            &mut t,
            S,
            vec![replace("1", "./Vendor?prop=ACL", "Get=a b")],
        );
        assert_eq!(codes(&e), vec![500]);
    }

    fn with_quirks(
        tree: &mut DmTree,
        server: &str,
        quirks: &str,
        commands: Vec<Command>,
    ) -> Execution {
        let options = ExecOptions {
            without_atomic: false,
            quirks: quirks.parse().unwrap(),
        };
        execute_with_options(tree, server, "2", &commands, 2, options)
    }

    #[test]
    fn acl_on_add_gives_new_nodes_an_acl_of_its_choosing_where_the_parent_denies_replace() {
        let commands = || {
            vec![
                // The root grants OTHER Add (`*`) but not Replace.
                add_node("1", "./Top"),
                add_leaf("2", "./Leaf", "x"),
                // ./Top's new ACL grants OTHER Replace: a node below it starts empty.
                add_leaf("3", "./Top/Inner", "y"),
            ]
        };
        let mut t = tree();
        let e = with_quirks(&mut t, OTHER, "acl-on-add", commands());
        assert_eq!(codes(&e), vec![200, 200, 200]);
        for node in ["./Top", "./Leaf"] {
            let acl = t.acl(&u(node)).unwrap();
            assert_eq!(
                acl.to_string(),
                format!("Get=*&Add={OTHER}&Delete={OTHER}&Replace={OTHER}")
            );
            assert!(acl.allows(AclCommand::Get, "anyone"), "{node}: {acl}");
            for command in [AclCommand::Add, AclCommand::Delete, AclCommand::Replace] {
                assert!(acl.allows(command, OTHER), "{node}: {acl}");
                assert!(!acl.allows(command, S), "{node}: {acl}");
            }
            assert!(!acl.allows(AclCommand::Exec, OTHER), "{node}: {acl}");
        }
        assert!(t.acl(&u("./Top/Inner")).unwrap().is_empty());
        // S holds Replace on ./Vendor by its own ACL: a new node there starts empty; below that new
        // node (whose empty ACL inherits S's Replace, but grants nothing itself) the client chooses.
        let e = with_quirks(
            &mut t,
            S,
            "acl-on-add",
            vec![
                add_node("4", "./Vendor/New"),
                add_leaf("5", "./Vendor/New/Leaf", "z"),
            ],
        );
        assert_eq!(codes(&e), vec![200, 200]);
        assert!(t.acl(&u("./Vendor/New")).unwrap().is_empty());
        let leaf = t.acl(&u("./Vendor/New/Leaf")).unwrap();
        assert!(leaf.allows(AclCommand::Get, "anyone"), "{leaf}");
        // Without the quirk every new node starts with an empty ACL (B.3).
        let mut t = tree();
        let e = run(&mut t, OTHER, commands());
        assert_eq!(codes(&e), vec![200, 200, 200]);
        assert!(t.acl(&u("./Top")).unwrap().is_empty());
        assert!(t.acl(&u("./Leaf")).unwrap().is_empty());
    }

    #[test]
    fn nul_in_lists_ends_child_lists_with_a_nul() {
        let commands = || {
            vec![
                get("1", "./Vendor"),
                get("2", "./Vendor/Acme/Settings/Volume"),
            ]
        };
        let data = |e: &Execution| -> Vec<String> {
            results(e)
                .iter()
                .flat_map(|r| r.items.iter())
                .map(|i| i.data.clone().unwrap())
                .collect()
        };
        let mut t = tree();
        let e = with_quirks(&mut t, S, "nul-in-lists", commands());
        assert_eq!(
            data(&e),
            vec![format!("Acme/Other{NUL_PLACEHOLDER}"), "5".to_string()]
        );
        let e = run(&mut t, S, commands());
        assert_eq!(data(&e), vec!["Acme/Other".to_string(), "5".to_string()]);
        // In the encoded message the placeholder before `</Data>` becomes a NUL byte; elsewhere it
        // stays.
        let bytes = with_nul_bytes(&format!(
            "<Data>a/b{NUL_PLACEHOLDER}</Data><Data>{NUL_PLACEHOLDER}x</Data>"
        ));
        let want = format!("<Data>a/b\0</Data><Data>{NUL_PLACEHOLDER}x</Data>");
        assert_eq!(bytes, want.into_bytes());
    }

    #[test]
    fn aauthdata_keeps_the_format_the_server_gave() {
        let data = "./DMAcc/dms1.example/AppAuth/SRVCRED/AAuthData";
        let format = |t: &DmTree| t.get(&u(data)).unwrap().format();
        let mut t = tree();
        let b64 = |id: &str, v: &str, in_item: bool| {
            let meta = Meta {
                format: Some("b64".into()),
                ..Meta::default()
            };
            let mut item = Item::target(data).with_data(v);
            let mut c = item_cmd(id, Vec::new());
            if in_item {
                item = item.with_meta(meta);
            } else {
                c.meta = Some(Box::new(meta));
            }
            c.items.push(item);
            Command::Replace(c)
        };
        let e = run(&mut t, S, vec![b64("1", "Ynl0ZXM=", true)]);
        assert_eq!(codes(&e), vec![200]);
        assert_eq!(format(&t), Some(Format::B64));
        assert_eq!(t.value(&u(data)).unwrap(), "Ynl0ZXM=");
        // No Format: text.
        let e = run(&mut t, S, vec![replace("2", data, "text")]);
        assert_eq!(codes(&e), vec![200]);
        assert_eq!(format(&t), None);
        // The command's Meta counts when the item has none.
        let e = run(&mut t, S, vec![b64("3", "Ynl0ZXM=", false)]);
        assert_eq!(codes(&e), vec![200]);
        assert_eq!(format(&t), Some(Format::B64));
        // Other leaves keep their Format on Replace.
        t.set_format(&u("./DevInfo/Lang"), Some(Format::Chr))
            .unwrap();
        let e = run(&mut t, S, vec![replace("4", "./DevInfo/Lang", "de")]);
        assert_eq!(codes(&e), vec![200]);
        assert_eq!(
            t.get(&u("./DevInfo/Lang")).unwrap().format(),
            Some(Format::Chr)
        );
    }
}
