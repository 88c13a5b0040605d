//! The delegation plan of PROTOCOL.md A.6 as pure functions: from what was read on the device, which ACLs
//! change and how, the DM Account of the delegated server to add, and the commands that do it; and the
//! snapshot that puts it all back. No IO here: the session module reads the device and sends the commands.

use std::collections::{BTreeMap, BTreeSet};

use dm_protocol::acl::{Acl, AclCommand};
use dm_protocol::delegation::DelType;
use dm_protocol::dmacc::{AppAuth, AuthLevel, DmAccount, Secret};
use dm_protocol::syncml::{Command, Item, ItemCommand, Meta};
use dm_protocol::tnds::{Node, NodeContent};
use dm_protocol::tree::DmTree;
use dm_protocol::types::{DmUri, UtcTime};

/// What the delegating side asks provisioning to do on the device (steps 4-5).
#[derive(Clone)]
pub struct PlanRequest {
    /// `<x>` of `./DMAcc/<x>`, where the delegated server's account goes.
    pub account_key: String,
    /// The delegated server's DM Account, from DELEGATION_START.
    pub account: DmAccount,
    /// D1: this server's ServerID on the device.
    pub delegating: String,
    /// D2: the delegated server's ServerID (equal to the account's ServerID).
    pub delegated: String,
    pub del_type: DelType,
    pub scope: Vec<DmUri>,
    pub not_after: Option<UtcTime>,
    /// The TEMP_DELEGATION_KEY as base64 text: it becomes D2's SRVCRED `AAuthSecret` (A.4).
    pub temp_key_b64: Secret,
}

impl std::fmt::Debug for PlanRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlanRequest")
            .field("account_key", &self.account_key)
            .field("delegating", &self.delegating)
            .field("delegated", &self.delegated)
            .field("del_type", &self.del_type)
            .field("scope", &self.scope)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl PlanRequest {
    pub fn account_uri(&self) -> Result<DmUri, PlanError> {
        DmUri::root()
            .join("DMAcc")
            .and_then(|u| u.join(&self.account_key))
            .map_err(|e| PlanError::new(400, format!("account key: {e}")))
    }
}

/// Why a plan cannot be made; `status` is the DM status code reported (403, 409, 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (status {status})")]
pub struct PlanError {
    pub status: u32,
    pub reason: String,
}

impl PlanError {
    pub fn new(status: u32, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
        }
    }
}

/// What was read from the device before changing it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Observed {
    /// Own ACLs (empty: inherited) of the nodes read.
    pub acls: BTreeMap<DmUri, Acl>,
    /// Children of the interior nodes read.
    pub children: BTreeMap<DmUri, Vec<String>>,
    /// Nodes whose ACL could not be read (no `Get` right); nothing below them was read.
    pub unreadable: BTreeSet<DmUri>,
}

impl Observed {
    /// The ACL in force at `uri`: its own, or the nearest ancestor's with a value, whole (B.3); the root's
    /// default when nothing was read.
    pub fn effective_acl(&self, uri: &DmUri) -> Acl {
        let mut chain = vec![uri.clone()];
        let mut at = uri.clone();
        while let Some(parent) = at.parent() {
            chain.push(parent.clone());
            at = parent;
        }
        chain
            .iter()
            .filter_map(|u| self.acls.get(u))
            .find(|acl| !acl.is_empty())
            .cloned()
            .unwrap_or_else(Acl::default_root)
    }

    /// A tree holding what was read: every node whose ACL was read, with that ACL; interior when its
    /// children were listed or a node below it was read, else a leaf. Enough to decide, as the device
    /// will, whether a server may change an ACL (B.3).
    pub fn model(&self) -> DmTree {
        let mut tree = DmTree::new();
        let parents: BTreeSet<DmUri> = self.acls.keys().filter_map(DmUri::parent).collect();
        let mut uris: Vec<&DmUri> = self.acls.keys().collect();
        uris.sort_by_key(|u| u.segments().count());
        for uri in uris {
            let interior = self.children.contains_key(uri) || parents.contains(uri);
            add_model_node(&mut tree, uri, interior);
            if let Some(acl) = self.acls.get(uri) {
                let _ = tree.set_acl(uri, acl.clone());
            }
        }
        tree
    }

    /// Interior nodes below `root` (not `root` itself) read so far, top-down.
    fn descendants(&self, root: &DmUri) -> Vec<DmUri> {
        let mut out: Vec<DmUri> = self
            .acls
            .keys()
            .filter(|u| *u != root && root.contains(u))
            .cloned()
            .collect();
        out.sort_by_key(|u| u.segments().count());
        out
    }
}

/// Adds `uri` to a model tree (its missing ancestors as interior nodes with an empty ACL).
fn add_model_node(tree: &mut DmTree, uri: &DmUri, interior: bool) {
    if uri.is_root() || tree.exists(uri) {
        return;
    }
    if let Some(parent) = uri.parent() {
        add_model_node(tree, &parent, true);
    }
    let _ = if interior {
        tree.add_interior(uri)
    } else {
        tree.add_leaf(uri, "", None, None)
    };
}

/// One ACL the plan changes: its own ACL before (empty when inherited) and after.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AclChange {
    pub uri: DmUri,
    pub before: Acl,
    pub after: Acl,
}

/// What restore needs: the account added and every ACL changed, with its value before, top-down, and
/// everything read before the change.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub account_uri: DmUri,
    pub acls: Vec<AclChange>,
    /// The nonce given to the delegated server's credential: a repeated apply must reuse it, since
    /// DELEGATION_PREPARED may already carry it.
    pub server_nonce_b64: String,
    /// D1: the server that changed the device and puts it back.
    pub delegating: String,
    /// The nodes whose ACLs the delegation moves (the scope roots; for Full the top-level nodes).
    pub roots: Vec<DmUri>,
    /// What was read before the change: the root, `./DMAcc`, the roots' ancestors and everything below
    /// the roots. Restore puts every ACL below the roots back to what it was here.
    pub before: Observed,
}

impl Snapshot {
    /// Whether restore looks after `uri`: at or below a root, and not at or below a node that could
    /// not be read before the change (nothing is known of those).
    fn covers(&self, uri: &DmUri) -> bool {
        self.roots.iter().any(|r| r.contains(uri))
            && !self.before.unreadable.iter().any(|u| u.contains(uri))
    }
}

/// The nodes whose ACLs the delegation moves: the scope roots, or for Full every top-level node but
/// `./DMAcc` and `./DevInfo` (A.6).
pub fn scope_roots(req: &PlanRequest, observed: &Observed) -> Vec<DmUri> {
    if req.del_type == DelType::Full || req.scope.iter().any(DmUri::is_root) {
        let root = DmUri::root();
        observed
            .children
            .get(&root)
            .map(|names| {
                names
                    .iter()
                    .filter(|n| *n != "DMAcc" && *n != "DevInfo")
                    .filter_map(|n| root.join(n).ok())
                    .collect()
            })
            .unwrap_or_default()
    } else {
        req.scope.clone()
    }
}

/// `acl` with D1's named rights handed to D2; D1 keeps `Get` only. Entries granting `*` stay.
fn hand_over(acl: &Acl, d1: &str, d2: &str) -> Acl {
    let mut out = acl.clone();
    for command in AclCommand::ALL {
        let servers = acl.servers(command);
        if !servers.contains(&d1) {
            continue;
        }
        out.grant(command, d2);
        if command != AclCommand::Get {
            out.revoke(command, d1);
        }
    }
    out
}

fn names(acl: &Acl, server: &str) -> bool {
    AclCommand::ALL
        .into_iter()
        .any(|c| acl.servers(c).contains(&server))
}

/// The ACL changes of the delegation (A.6), top-down; refuses with 403 when D1 could never revoke
/// (no `Replace` on a scope root's parent) and with 409 when the account slot is taken.
pub fn acl_changes(req: &PlanRequest, observed: &Observed) -> Result<Vec<AclChange>, PlanError> {
    let dmacc = DmUri::root()
        .join("DMAcc")
        .map_err(|e| PlanError::new(500, e))?;
    if observed
        .children
        .get(&dmacc)
        .is_some_and(|c| c.contains(&req.account_key))
    {
        return Err(PlanError::new(
            409,
            format!(
                "the device already has an account at ./DMAcc/{}",
                req.account_key
            ),
        ));
    }
    let (d1, d2) = (req.delegating.as_str(), req.delegated.as_str());
    let roots = scope_roots(req, observed);
    if roots.is_empty() {
        return Err(PlanError::new(
            404,
            "no node of the scope was found on the device",
        ));
    }
    let mut changes = Vec::new();
    for root in &roots {
        if !observed.acls.contains_key(root) {
            return Err(PlanError::new(
                404,
                format!("scope node {root} does not exist on the device"),
            ));
        }
        let parent = root.parent().unwrap_or_else(DmUri::root);
        if !observed
            .effective_acl(&parent)
            .allows(AclCommand::Replace, d1)
        {
            return Err(PlanError::new(
                403,
                format!(
                    "{d1} has no Replace right on {parent}, so it could never revoke the delegation of {root}"
                ),
            ));
        }
        let before = observed.acls.get(root).cloned().unwrap_or_default();
        let after = hand_over(&observed.effective_acl(root), d1, d2);
        changes.push(AclChange {
            uri: root.clone(),
            before,
            after,
        });
        for below in observed.descendants(root) {
            let Some(own) = observed.acls.get(&below) else {
                continue;
            };
            if own.is_empty() || !names(own, d1) {
                continue;
            }
            changes.push(AclChange {
                uri: below.clone(),
                before: own.clone(),
                after: hand_over(own, d1, d2),
            });
        }
    }
    Ok(changes)
}

/// The ACL of the delegated server's account node: D1 keeps Delete and Replace (A.6).
pub fn account_acl(d1: &str, d2: &str) -> Acl {
    acl_of(&format!("Add={d1}&Delete={d1}&Get={d1}+{d2}&Replace={d1}"))
}

/// The ACL of every other node of the account: both servers read it, D1 keeps control (it changes
/// the children's ACLs and deletes the account on revocation).
pub fn account_part_acl(d1: &str, d2: &str) -> Acl {
    acl_of(&format!("Delete={d1}&Get={d1}+{d2}&Replace={d1}"))
}

/// The ACL of the account's `AppAuth` leaves other than secrets: D2 may rotate its credentials.
pub fn credential_leaf_acl(d1: &str, d2: &str) -> Acl {
    acl_of(&format!("Delete={d1}&Get={d1}+{d2}&Replace={d1}+{d2}"))
}

/// The ACL of `AAuthSecret` and `AAuthData`: no server may read them (B.2), only D2 replaces them
/// (credential rotation, A.6).
pub fn secret_leaf_acl(d1: &str, d2: &str) -> Acl {
    acl_of(&format!("Delete={d1}&Replace={d2}"))
}

/// Leaves a device never gives out (B.2).
pub fn is_secret_leaf(name: &str) -> bool {
    matches!(name, "AAuthSecret" | "AAuthData")
}

fn acl_of(text: &str) -> Acl {
    text.parse().unwrap_or_default()
}

/// The account as it goes on the device: the TEMP key as D2's server credential with a fresh nonce, and
/// the delegation record under `Ext/Delegation`.
pub fn account_node(req: &PlanRequest, server_nonce_b64: &str) -> Node {
    let mut account = req.account.clone();
    let srv = match account
        .app_auths
        .iter_mut()
        .find(|a| a.level == AuthLevel::Srvcred)
    {
        Some(srv) => srv,
        None => {
            account.app_auths.push(AppAuth {
                key: "srvcred".into(),
                level: AuthLevel::Srvcred,
                auth_type: "DIGEST".into(),
                name: Some(req.delegated.clone()),
                secret: None,
                data: None,
            });
            let last = account.app_auths.len() - 1;
            &mut account.app_auths[last]
        }
    };
    // B.6: the server credential's AAuthName is the ServerID, so that a client taking the package #0
    // digest's name from either gets the same one.
    srv.name = Some(req.delegated.clone());
    srv.secret = Some(req.temp_key_b64.clone());
    srv.data = Some(server_nonce_b64.to_string());
    let mut record = vec![
        Node::leaf("Type", req.del_type.as_str()),
        Node::leaf("DelegatingServer", &req.delegating),
        Node::leaf(
            "Scope",
            req.scope
                .iter()
                .map(DmUri::as_str)
                .collect::<Vec<_>>()
                .join(" "),
        ),
    ];
    if let Some(t) = req.not_after {
        record.push(Node::leaf("NotAfter", t.to_string()));
    }
    record.push(Node::leaf("AutoConnect", "false"));
    let delegation = Node::interior("Delegation", record);
    account.ext = Some(match account.ext.take() {
        Some(mut ext) => {
            if let NodeContent::Children(children) = &mut ext.content {
                children.retain(|c| c.name != "Delegation");
                children.push(delegation);
            }
            ext
        }
        None => Node::interior("Ext", vec![delegation]),
    });
    account.to_node(&req.account_key)
}

/// `Add` commands for a subtree, parents first. Interior nodes carry `Meta/Format node` and `<Data/>`
/// (B.6: a real client crashes on an Add without Data). `AAuthData` goes as binary (`b64`, B.6: a client
/// keeps `chr` text as it is and would digest the base64 characters instead of the nonce).
fn add_commands(parent: &DmUri, node: &Node, out: &mut Vec<Command>) {
    let Ok(uri) = parent.join(&node.name) else {
        return;
    };
    match &node.content {
        NodeContent::Value(v) => {
            let binary = node.name == "AAuthData" && dm_protocol::auth::decode_nonce(v).is_ok();
            let format = if binary { "b64" } else { "chr" };
            out.push(Command::Add(ItemCommand::new(
                "0",
                vec![
                    Item::target(uri.as_str())
                        .with_meta(Meta {
                            format: Some(format.into()),
                            ..Meta::default()
                        })
                        .with_data(v.clone()),
                ],
            )))
        }
        NodeContent::Children(children) => {
            out.push(Command::Add(ItemCommand::new(
                "0",
                vec![
                    Item::target(uri.as_str())
                        .with_meta(Meta {
                            format: Some("node".into()),
                            ..Meta::default()
                        })
                        .with_data(""),
                ],
            )));
            for child in children {
                add_commands(&uri, child, out);
            }
        }
    }
}

/// `Replace` of `<uri>?prop=ACL`.
pub fn replace_acl(uri: &DmUri, acl: &Acl) -> Command {
    Command::Replace(ItemCommand::new(
        "0",
        vec![Item::target(format!("{uri}?prop=ACL")).with_data(acl.to_string())],
    ))
}

/// The ACLs the plan sets on the account: an explicit one on **every** node it adds (B.6: a client may
/// give a new node an ACL of its own choosing, `Get=*` included), deepest first, the account node last:
/// a leaf's ACL is changed through `Replace` on its parent, which the parent keeps until its own turn.
pub fn account_acls(req: &PlanRequest, account: &Node, account_uri: &DmUri) -> Vec<(DmUri, Acl)> {
    fn walk(
        node: &Node,
        uri: &DmUri,
        in_app_auth: bool,
        acls: &Acls<'_>,
        out: &mut Vec<(DmUri, Acl)>,
    ) {
        for child in node.children() {
            let Ok(child_uri) = uri.join(&child.name) else {
                continue;
            };
            let below_app_auth = in_app_auth || (child.name == "AppAuth" && uri == acls.account);
            walk(child, &child_uri, below_app_auth, acls, out);
            let acl = match &child.content {
                NodeContent::Value(_) if is_secret_leaf(&child.name) => {
                    secret_leaf_acl(acls.d1, acls.d2)
                }
                NodeContent::Value(_) if in_app_auth => credential_leaf_acl(acls.d1, acls.d2),
                _ => account_part_acl(acls.d1, acls.d2),
            };
            out.push((child_uri, acl));
        }
    }
    struct Acls<'a> {
        d1: &'a str,
        d2: &'a str,
        account: &'a DmUri,
    }
    let acls = Acls {
        d1: &req.delegating,
        d2: &req.delegated,
        account: account_uri,
    };
    let mut out = Vec::new();
    walk(account, account_uri, false, &acls, &mut out);
    out.sort_by_key(|(uri, _)| std::cmp::Reverse(uri.segments().count()));
    out.push((account_uri.clone(), account_acl(acls.d1, acls.d2)));
    out
}

/// The ACL changes of the scope in the order the plan makes them: deepest first, since D1 changes a
/// node's ACL through its `Replace` right on the parent (or on the node), which it gives up when that
/// ACL changes; so the scope roots go last. (Restore goes the other way.)
pub fn apply_order(changes: &[AclChange]) -> Vec<(DmUri, Acl)> {
    let mut ordered: Vec<(DmUri, Acl)> = changes
        .iter()
        .map(|c| (c.uri.clone(), c.after.clone()))
        .collect();
    ordered.sort_by_key(|(uri, _)| std::cmp::Reverse(uri.segments().count()));
    ordered
}

/// The commands of the plan, sent as one `Atomic`: add the account, set its ACLs, then move authority
/// (`scope`: the sequenced ACL changes of [`sequence_acls`]).
pub fn plan_commands(
    account: &Node,
    account_uri: &DmUri,
    account_acls: &[(DmUri, Acl)],
    scope: Vec<Command>,
) -> Vec<Command> {
    let mut out = Vec::new();
    if let Some(dmacc) = account_uri.parent() {
        add_commands(&dmacc, account, &mut out);
    }
    for (uri, acl) in account_acls {
        out.push(replace_acl(uri, acl));
    }
    out.extend(scope);
    out
}

/// Why the model refuses an ACL change, as a plan error (403: D1 lacks the right it needs).
fn refused(uri: &DmUri, why: impl std::fmt::Display) -> PlanError {
    PlanError::new(403, format!("the ACL of {uri} cannot be changed: {why}"))
}

/// Sets an ACL on the model, as the device will check it, and adds the command that does it.
fn set_acl(
    model: &mut DmTree,
    d1: &str,
    uri: &DmUri,
    acl: Acl,
    out: &mut Vec<Command>,
) -> Result<(), PlanError> {
    model
        .check_set_acl(d1, uri, &acl)
        .map_err(|d| refused(uri, d))?;
    model
        .set_acl(uri, acl.clone())
        .map_err(|e| refused(uri, e))?;
    out.push(replace_acl(uri, &acl));
    Ok(())
}

/// Makes sure `d1` may change the ACL of `uri` on the model: if not, it gives itself `Replace` on the
/// parent (on the parent's parent first if needed), noting in `lent` each ACL to put back.
fn lend_replace(
    model: &mut DmTree,
    d1: &str,
    uri: &DmUri,
    out: &mut Vec<Command>,
    lent: &mut Vec<(DmUri, Acl)>,
) -> Result<(), PlanError> {
    if !model.exists(uri) {
        return Err(PlanError::new(404, format!("{uri} is not on the device")));
    }
    if model.check_acl_change(d1, uri).is_ok() {
        return Ok(());
    }
    let Some(parent) = uri.parent() else {
        return Err(refused(
            uri,
            format!("{d1} has no Replace right on the root"),
        ));
    };
    lend_replace(model, d1, &parent, out, lent)?;
    let old = model.acl(&parent).map_err(|e| refused(&parent, e))?.clone();
    let mut lending = if old.is_empty() {
        model
            .effective_acl(&parent)
            .map_err(|e| refused(&parent, e))?
            .clone()
    } else {
        old.clone()
    };
    lending.grant(AclCommand::Replace, d1);
    set_acl(model, d1, &parent, lending, out)?;
    lent.push((parent, old));
    Ok(())
}

/// The `Replace` commands of `?prop=ACL` that give each target its ACL, in the order given, each allowed
/// to `d1` at its turn on `model` (B.3), which they update. Where `d1` may not change a target's ACL
/// (a leaf whose parent it may not replace, or a node whose ACL names it no more), it first gives itself
/// `Replace` on the parent, as whoever controls a parent may, and puts the parent's ACL back right after.
/// Returns the commands and every URI whose ACL they set, targets and lent parents (without repeats).
pub fn sequence_acls(
    model: &mut DmTree,
    d1: &str,
    targets: &[(DmUri, Acl)],
) -> Result<(Vec<Command>, Vec<DmUri>), PlanError> {
    let mut out = Vec::new();
    let mut touched: Vec<DmUri> = Vec::new();
    let mut touch = |uri: &DmUri| {
        if !touched.contains(uri) {
            touched.push(uri.clone());
        }
    };
    for (uri, acl) in targets {
        let mut lent = Vec::new();
        lend_replace(model, d1, uri, &mut out, &mut lent)?;
        set_acl(model, d1, uri, acl.clone(), &mut out)?;
        touch(uri);
        // Each lent parent holds Replace for d1 and is interior: it may always be put back.
        for (parent, old) in lent.into_iter().rev() {
            set_acl(model, d1, &parent, old, &mut out)?;
            touch(&parent);
        }
    }
    Ok((out, touched))
}

/// What restore still has to put back, top-down, given what the device holds `now`: every node below
/// the roots whose own ACL differs from the snapshot (a node created since had no ACL: empty), and
/// every such node that can no longer be read.
pub fn restore_targets(snapshot: &Snapshot, now: &Observed) -> Vec<(DmUri, Acl)> {
    let before = |uri: &DmUri| snapshot.before.acls.get(uri).cloned().unwrap_or_default();
    let mut out: Vec<(DmUri, Acl)> = now
        .acls
        .iter()
        .filter(|(uri, _)| snapshot.covers(uri))
        .filter(|(uri, acl)| !same_acl(acl, &before(uri)))
        .map(|(uri, _)| (uri.clone(), before(uri)))
        .chain(
            now.unreadable
                .iter()
                .filter(|uri| snapshot.covers(uri))
                .map(|uri| (uri.clone(), before(uri))),
        )
        .collect();
    out.sort_by_key(|(uri, _)| uri.segments().count());
    out
}

/// Whether the delegated server's account is still on the device.
pub fn account_present(snapshot: &Snapshot, now: &Observed) -> bool {
    let (Some(dmacc), Some(key)) = (snapshot.account_uri.parent(), snapshot.account_uri.name())
    else {
        return false;
    };
    now.children
        .get(&dmacc)
        .is_some_and(|names| names.iter().any(|n| n == key))
}

/// The commands that put the device back from what it holds `now` to the snapshot: the ACLs top-down
/// (each restored node gives D1 back the right to restore its children; where it does not, D1 lends
/// itself `Replace` on the parent for a while), then the account deleted. Empty when nothing differs.
/// Not atomic: what is put back stays put back.
pub fn restore_commands(snapshot: &Snapshot, now: &Observed) -> Result<Vec<Command>, PlanError> {
    let d1 = snapshot.delegating.as_str();
    let mut model = now.model();
    // A node D1 can no longer read: assume D1 holds nothing there.
    let mut nothing = Acl::empty();
    nothing.set(AclCommand::Exec, vec![d1.to_string()]);
    for uri in now.unreadable.iter().filter(|u| snapshot.covers(u)) {
        add_model_node(&mut model, uri, false);
        let _ = model.set_acl(uri, nothing.clone());
    }
    let (mut out, _) = sequence_acls(&mut model, d1, &restore_targets(snapshot, now))?;
    if account_present(snapshot, now) {
        out.push(Command::Delete(ItemCommand::new(
            "0",
            vec![Item::target(snapshot.account_uri.as_str())],
        )));
    }
    Ok(out)
}

/// The leaves of the account whose values the read-back compares: all but `AAuthSecret` and
/// `AAuthData`, which a device never gives out (B.2).
pub fn account_values(account: &Node, account_uri: &DmUri) -> Vec<(DmUri, String)> {
    fn walk(node: &Node, uri: &DmUri, out: &mut Vec<(DmUri, String)>) {
        match &node.content {
            NodeContent::Value(v) => {
                if !is_secret_leaf(&node.name) {
                    out.push((uri.clone(), v.clone()));
                }
            }
            NodeContent::Children(children) => {
                for child in children {
                    if let Ok(child_uri) = uri.join(&child.name) {
                        walk(child, &child_uri, out);
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(account, account_uri, &mut out);
    out
}

/// Two ACLs grant the same rights to the same servers (order of entries and servers aside).
pub fn same_acl(a: &Acl, b: &Acl) -> bool {
    AclCommand::ALL.into_iter().all(|c| {
        let mut x = a.servers(c);
        let mut y = b.servers(c);
        x.sort_unstable();
        y.sort_unstable();
        x == y
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::unreachable)]
mod tests {
    use super::*;

    fn uri(s: &str) -> DmUri {
        s.parse().unwrap()
    }

    fn account() -> DmAccount {
        let xml = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/start.xml"
        ))
        .unwrap();
        let m = dm_protocol::delegation::decode(&xml).unwrap();
        let dm_protocol::delegation::Body::Start(start) = m.body else {
            unreachable!("examples/start.xml is a DELEGATION_START")
        };
        DmAccount::from_tnds(&start.dm_acc).unwrap()
    }

    fn request(del_type: DelType, scope: &[&str]) -> PlanRequest {
        PlanRequest {
            account_key: "dms2".into(),
            account: account(),
            delegating: "dms1".into(),
            delegated: "dms2.enterprise.example".into(),
            del_type,
            scope: scope.iter().map(|s| uri(s)).collect(),
            not_after: None,
            temp_key_b64: Secret::new("a2V5"),
        }
    }

    fn observed() -> Observed {
        let mut o = Observed::default();
        o.acls
            .insert(DmUri::root(), acl_of("Add=*&Get=*&Replace=dms1"));
        o.acls
            .insert(uri("./DMAcc"), acl_of("Add=dms1&Get=dms1&Replace=dms1"));
        o.acls.insert(
            uri("./Vendor"),
            acl_of("Add=dms1&Delete=dms1&Get=dms1&Replace=dms1"),
        );
        o.acls.insert(uri("./Vendor/Acme"), Acl::empty());
        o.acls.insert(uri("./Vendor/Acme/Apps"), Acl::empty());
        o.acls.insert(
            uri("./Vendor/Acme/Apps/App1"),
            acl_of("Get=dms1+other&Replace=dms1"),
        );
        o.acls
            .insert(uri("./Vendor/Acme/Apps/App2"), acl_of("Get=other"));
        o.children.insert(
            DmUri::root(),
            vec!["DMAcc".into(), "DevInfo".into(), "Vendor".into()],
        );
        o.children.insert(uri("./DMAcc"), vec!["dms1".into()]);
        o
    }

    #[test]
    fn partial_hands_d1_rights_to_d2_and_keeps_d1_get() {
        let req = request(DelType::Partial, &["./Vendor/Acme/Apps"]);
        let changes = acl_changes(&req, &observed()).unwrap();
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert_eq!(changes[0].uri, uri("./Vendor/Acme/Apps"));
        assert!(changes[0].before.is_empty());
        let after = &changes[0].after;
        for c in [
            AclCommand::Add,
            AclCommand::Delete,
            AclCommand::Get,
            AclCommand::Replace,
        ] {
            assert!(after.allows(c, "dms2.enterprise.example"), "{c:?} {after}");
        }
        assert!(after.allows(AclCommand::Get, "dms1"));
        assert!(!after.allows(AclCommand::Replace, "dms1"));
        assert!(!after.allows(AclCommand::Exec, "dms1"));
        // Below the root: the explicit ACL naming D1 gets D2 in its place; the one not naming D1 stays.
        assert_eq!(changes[1].uri, uri("./Vendor/Acme/Apps/App1"));
        assert!(
            changes[1]
                .after
                .allows(AclCommand::Replace, "dms2.enterprise.example")
        );
        assert!(!changes[1].after.allows(AclCommand::Replace, "dms1"));
        assert!(changes[1].after.allows(AclCommand::Get, "other"));
    }

    #[test]
    fn refused_when_d1_could_not_revoke_or_the_slot_is_taken() {
        let mut o = observed();
        o.acls
            .insert(uri("./Vendor/Acme"), acl_of("Get=dms1&Replace=other"));
        let req = request(DelType::Partial, &["./Vendor/Acme/Apps"]);
        assert_eq!(acl_changes(&req, &o).unwrap_err().status, 403);
        let mut o = observed();
        o.children
            .insert(uri("./DMAcc"), vec!["dms1".into(), "dms2".into()]);
        assert_eq!(acl_changes(&req, &o).unwrap_err().status, 409);
        let missing = request(DelType::Partial, &["./Nowhere"]);
        assert_eq!(acl_changes(&missing, &observed()).unwrap_err().status, 404);
    }

    #[test]
    fn full_moves_every_top_level_node_but_dmacc_and_devinfo() {
        let req = request(DelType::Full, &["."]);
        let roots = scope_roots(&req, &observed());
        assert_eq!(roots, vec![uri("./Vendor")]);
        let changes = acl_changes(&req, &observed()).unwrap();
        assert_eq!(changes[0].uri, uri("./Vendor"));
    }

    #[test]
    fn the_account_carries_the_temp_key_nonce_and_record() {
        let mut req = request(DelType::Partial, &["./Vendor/Acme/Apps"]);
        // B.6: the server credential's AAuthName is the ServerID, whatever DELEGATION_START said.
        for a in &mut req.account.app_auths {
            a.name = Some("another-name".into());
        }
        let node = account_node(&req, "bm9uY2U=");
        let back = DmAccount::from_node(&node).unwrap();
        let srv = back.server_credential().unwrap();
        assert_eq!(srv.name.as_deref(), Some("dms2.enterprise.example"));
        assert_eq!(srv.secret.as_ref().unwrap().expose(), "a2V5");
        assert_eq!(srv.data.as_deref(), Some("bm9uY2U="));
        let record = node.find("Ext/Delegation").unwrap();
        assert_eq!(record.child("AutoConnect").unwrap().value(), Some("false"));
        assert_eq!(record.child("Type").unwrap().value(), Some("Partial"));
        assert!(!format!("{req:?}").contains("a2V5"));
    }

    #[test]
    fn every_added_node_gets_an_explicit_acl_children_first_and_no_server_reads_a_secret() {
        let req = request(DelType::Partial, &["./Vendor/Acme/Apps"]);
        let account_uri = uri("./DMAcc/dms2");
        let node = account_node(&req, "bm9uY2U=");
        let acls = account_acls(&req, &node, &account_uri);
        let mut commands = Vec::new();
        add_commands(&uri("./DMAcc"), &node, &mut commands);
        // One ACL per added node (B.6: a client's default ACL on a new node may be `Get=*`).
        assert_eq!(acls.len(), commands.len());
        for c in &commands {
            let target = c.items()[0].target.as_ref().unwrap().loc_uri.clone();
            assert!(acls.iter().any(|(u, _)| u.as_str() == target), "{target}");
        }
        // A leaf's ACL is changed through its parent's Replace: every child before its parent.
        for (i, (u, _)) in acls.iter().enumerate() {
            let parent_at = acls
                .iter()
                .position(|(p, _)| Some(p) == u.parent().as_ref());
            assert!(parent_at.is_none_or(|p| p > i), "{u} after its parent");
        }
        assert_eq!(acls.last().unwrap().0, account_uri);
        for (u, acl) in &acls {
            let name = u.as_str().rsplit('/').next().unwrap();
            let readers = acl.servers(AclCommand::Get);
            if is_secret_leaf(name) {
                assert!(readers.is_empty(), "{u}: {acl}");
            } else {
                assert_eq!(readers.len(), 2, "{u}: {acl}");
                assert!(!readers.contains(&"*"), "{u}: {acl}");
            }
        }
        // B.6: AAuthData goes as binary.
        let data = commands
            .iter()
            .find(|c| {
                c.items()[0]
                    .target
                    .as_ref()
                    .unwrap()
                    .loc_uri
                    .ends_with("srvcred/AAuthData")
            })
            .unwrap();
        let meta = data.items()[0].meta.as_ref().unwrap();
        assert_eq!(meta.format.as_deref(), Some("b64"));
    }

    /// What D1 reads of a device tree, as the session's discovery does: the ACL of every node it may
    /// `Get`, the children of those that are interior; below a node it may not read, nothing.
    fn observe(tree: &DmTree, d1: &str) -> Observed {
        fn walk(tree: &DmTree, d1: &str, uri: &DmUri, o: &mut Observed) {
            if tree.check(d1, AclCommand::Get, uri).is_err() {
                o.unreadable.insert(uri.clone());
                return;
            }
            o.acls.insert(uri.clone(), tree.acl(uri).unwrap().clone());
            let node = tree.get(uri).unwrap();
            if !node.is_leaf() {
                let names: Vec<String> = node
                    .children()
                    .iter()
                    .map(|c| c.name().to_string())
                    .collect();
                for name in &names {
                    walk(tree, d1, &uri.join(name).unwrap(), o);
                }
                o.children.insert(uri.clone(), names);
            }
        }
        let mut o = Observed::default();
        walk(tree, d1, &DmUri::root(), &mut o);
        o
    }

    /// Runs commands on the device tree as `server` (the simulated client's executor); all must be 200.
    fn run_all(tree: &mut DmTree, server: &str, commands: Vec<Command>) {
        let e = dm_client::execute(tree, server, "1", &commands, 1);
        let codes: Vec<u16> = e
            .responses
            .iter()
            .filter_map(|c| match c {
                Command::Status(s) => Some(s.data.code()),
                _ => None,
            })
            .collect();
        assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
    }

    /// The default simulated device of D1 `dms1`, with explicit ACLs naming D1 several levels below the
    /// scope root `./Vendor/Acme/Apps` (which inherits D1's full rights from `./Vendor`):
    /// - `App1` (interior) `Get=dms1`: D1 may not change its children's ACLs through it;
    /// - `App1/Version` (leaf) `Get=dms1&Replace=dms1`: its own Replace does not cover its ACL;
    /// - `App1/Cfg` (interior) `Get=dms1&Replace=dms1`, and `App1/Cfg/Mode` (leaf) `Get=dms1`.
    fn deep_device() -> DmTree {
        let account = dm_client::DefaultAccount {
            server_id: "dms1".into(),
            addr: "http://127.0.0.1:1/dm".into(),
            server_secret: "s".into(),
            server_nonce_b64: "bg==".into(),
            client_name: "c".into(),
            client_secret: "c".into(),
            client_nonce_b64: "bg==".into(),
        };
        let mut tree = dm_client::Device::with_default_tree("IMEI:1", &account)
            .unwrap()
            .tree()
            .clone();
        tree.add_interior(&uri("./Vendor/Acme/Apps/App1/Cfg"))
            .unwrap();
        tree.add_leaf(&uri("./Vendor/Acme/Apps/App1/Cfg/Mode"), "auto", None, None)
            .unwrap();
        for (at, acl) in [
            ("./Vendor/Acme/Apps/App1", "Get=dms1"),
            ("./Vendor/Acme/Apps/App1/Version", "Get=dms1&Replace=dms1"),
            ("./Vendor/Acme/Apps/App1/Cfg", "Get=dms1&Replace=dms1"),
            ("./Vendor/Acme/Apps/App1/Cfg/Mode", "Get=dms1"),
        ] {
            tree.set_acl(&uri(at), acl_of(acl)).unwrap();
        }
        tree
    }

    #[test]
    fn deep_explicit_acls_are_moved_and_put_back_as_the_device_allows() {
        // Deepest first, `Version` needed Replace on `App1`, which D1 lacks (a leaf's own Replace does
        // not cover its ACL): the plan failed with 425. Top-down, restoring `Cfg` needed Replace on
        // `App1` (put back to `Get=dms1`) or on `Cfg` (which names D2 by then): restore failed with 425.
        // D1 controls `Apps`, so it lends itself Replace on `App1` for those changes.
        let mut device = deep_device();
        let original = device.clone();
        let req = request(DelType::Partial, &["./Vendor/Acme/Apps"]);
        let observed = observe(&device, "dms1");
        let changes = acl_changes(&req, &observed).unwrap();
        let mut model = observed.model();
        let (commands, touched) =
            sequence_acls(&mut model, "dms1", &apply_order(&changes)).unwrap();
        run_all(
            &mut device,
            "dms1",
            vec![Command::Atomic(dm_protocol::syncml::Container::new(
                "1", commands,
            ))],
        );
        // The device holds what the model says, for every ACL touched (App1 lent and taken back).
        for uri in &touched {
            assert_eq!(device.acl(uri).unwrap(), model.acl(uri).unwrap(), "{uri}");
        }
        assert!(touched.contains(&uri("./Vendor/Acme/Apps/App1")));
        let d2 = "dms2.enterprise.example";
        for (at, acl) in [
            ("./Vendor/Acme/Apps/App1", format!("Get=dms1+{d2}")),
            (
                "./Vendor/Acme/Apps/App1/Version",
                format!("Get=dms1+{d2}&Replace={d2}"),
            ),
            (
                "./Vendor/Acme/Apps/App1/Cfg",
                format!("Get=dms1+{d2}&Replace={d2}"),
            ),
            ("./Vendor/Acme/Apps/App1/Cfg/Mode", format!("Get=dms1+{d2}")),
        ] {
            assert!(
                same_acl(device.acl(&uri(at)).unwrap(), &acl_of(&acl)),
                "{at}"
            );
        }
        // D1 can no longer change data in the scope; D2 can.
        for leaf in [
            "./Vendor/Acme/Apps/App1/Version",
            "./Vendor/Acme/Apps/App1/Cfg/Mode",
        ] {
            assert!(
                device
                    .check("dms1", AclCommand::Replace, &uri(leaf))
                    .is_err()
            );
        }
        assert!(
            device
                .check(
                    d2,
                    AclCommand::Replace,
                    &uri("./Vendor/Acme/Apps/App1/Version")
                )
                .is_ok()
        );

        // Restore from what the device holds now.
        let snapshot = Snapshot {
            account_uri: req.account_uri().unwrap(),
            acls: changes,
            server_nonce_b64: "bm9uY2U=".into(),
            delegating: "dms1".into(),
            roots: scope_roots(&req, &observed),
            before: observed,
        };
        let now = observe(&device, "dms1");
        let commands = restore_commands(&snapshot, &now).unwrap();
        run_all(&mut device, "dms1", commands);
        assert_eq!(device.first_difference(&original, &[]), None);
        assert!(
            restore_commands(&snapshot, &observe(&device, "dms1"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn restore_also_undoes_what_d2_did_to_acls_in_the_scope() {
        // While Active, D2 (Replace on the scope root) put an ACL naming only itself on an interior node
        // and created a node with its own ACL. Restore puts the first back, empties the second (a new
        // node had no ACL), and deletes the account when it is there.
        let mut device = deep_device();
        let original = device.clone();
        let req = request(DelType::Partial, &["./Vendor/Acme/Apps"]);
        let observed = observe(&device, "dms1");
        let changes = acl_changes(&req, &observed).unwrap();
        let mut model = observed.model();
        let (commands, _) = sequence_acls(&mut model, "dms1", &apply_order(&changes)).unwrap();
        run_all(&mut device, "dms1", commands);
        let d2 = "dms2.enterprise.example";
        run_all(
            &mut device,
            d2,
            vec![
                replace_acl(
                    &uri("./Vendor/Acme/Apps/App1/Cfg"),
                    &acl_of(&format!("Replace={d2}")),
                ),
                Command::Add(ItemCommand::new(
                    "0",
                    vec![Item::target("./Vendor/Acme/Apps/New").with_data("x")],
                )),
                replace_acl(
                    &uri("./Vendor/Acme/Apps/New"),
                    &acl_of(&format!("Get={d2}&Replace={d2}")),
                ),
            ],
        );
        let snapshot = Snapshot {
            account_uri: req.account_uri().unwrap(),
            acls: changes,
            server_nonce_b64: "bm9uY2U=".into(),
            delegating: "dms1".into(),
            roots: scope_roots(&req, &observed),
            before: observed,
        };
        // Cfg is no longer readable by D1: restore puts it back through its parent, then a second pass
        // (as the session does) finds nothing left.
        let now = observe(&device, "dms1");
        assert!(now.unreadable.contains(&uri("./Vendor/Acme/Apps/App1/Cfg")));
        run_all(
            &mut device,
            "dms1",
            restore_commands(&snapshot, &now).unwrap(),
        );
        let now = observe(&device, "dms1");
        run_all(
            &mut device,
            "dms1",
            restore_commands(&snapshot, &now).unwrap(),
        );
        assert!(
            restore_commands(&snapshot, &observe(&device, "dms1"))
                .unwrap()
                .is_empty()
        );
        assert!(
            device
                .acl(&uri("./Vendor/Acme/Apps/New"))
                .unwrap()
                .is_empty()
        );
        device.delete(&uri("./Vendor/Acme/Apps/New")).unwrap();
        assert_eq!(device.first_difference(&original, &[]), None);
        // The account, when present, is deleted last.
        let mut now = observe(&device, "dms1");
        now.children
            .insert(uri("./DMAcc"), vec!["dms1".into(), "dms2".into()]);
        let commands = restore_commands(&snapshot, &now).unwrap();
        assert_eq!(commands.len(), 1);
        assert!(matches!(&commands[0], Command::Delete(_)));
    }
}
