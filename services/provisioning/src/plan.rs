//! The delegation plan of PROTOCOL.md A.6 as pure functions: from what was read on the device, which ACLs
//! change and how, the DM Account of the delegated server to add, and the commands that do it; and the
//! snapshot that puts it all back. No IO here: the session module reads the device and sends the commands.

use std::collections::{BTreeMap, BTreeSet};

use dm_protocol::acl::{Acl, AclCommand};
use dm_protocol::delegation::DelType;
use dm_protocol::dmacc::{AppAuth, AuthLevel, DmAccount, Secret};
use dm_protocol::syncml::{Command, Item, ItemCommand, Meta};
use dm_protocol::tnds::{Node, NodeContent};
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Own ACLs (empty: inherited) of the nodes read.
    pub acls: BTreeMap<DmUri, Acl>,
    /// Children of the interior nodes read.
    pub children: BTreeMap<DmUri, Vec<String>>,
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

/// One ACL the plan changes: its own ACL before (empty when inherited) and after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclChange {
    pub uri: DmUri,
    pub before: Acl,
    pub after: Acl,
}

/// What restore needs: the account added and every ACL changed, with its value before, top-down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub account_uri: DmUri,
    pub acls: Vec<AclChange>,
    /// The nonce given to the delegated server's credential: a repeated apply must reuse it, since
    /// DELEGATION_PREPARED may already carry it.
    pub server_nonce_b64: String,
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

/// The ACL of the account's `AppAuth` leaves: D2 may rotate its credentials.
pub fn credential_leaf_acl(d1: &str, d2: &str) -> Acl {
    acl_of(&format!("Get={d1}+{d2}&Replace={d1}+{d2}"))
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
    if srv.name.is_none() {
        srv.name = Some(req.delegated.clone());
    }
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
/// (B.6: a real client crashes on an Add without Data).
fn add_commands(parent: &DmUri, node: &Node, out: &mut Vec<Command>) {
    let Ok(uri) = parent.join(&node.name) else {
        return;
    };
    match &node.content {
        NodeContent::Value(v) => out.push(Command::Add(ItemCommand::new(
            "0",
            vec![
                Item::target(uri.as_str())
                    .with_meta(Meta {
                        format: Some("chr".into()),
                        ..Meta::default()
                    })
                    .with_data(v.clone()),
            ],
        ))),
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

/// The ACLs the plan sets on the account and its credential leaves.
pub fn account_acls(req: &PlanRequest, account: &Node, account_uri: &DmUri) -> Vec<(DmUri, Acl)> {
    let (d1, d2) = (req.delegating.as_str(), req.delegated.as_str());
    let mut out = Vec::new();
    if let Some(app_auth) = account.child("AppAuth") {
        for cred in app_auth.children() {
            for leaf in cred.children() {
                if let Ok(uri) = account_uri
                    .join("AppAuth")
                    .and_then(|u| u.join(&cred.name))
                    .and_then(|u| u.join(&leaf.name))
                {
                    out.push((uri, credential_leaf_acl(d1, d2)));
                }
            }
        }
    }
    out.push((account_uri.clone(), account_acl(d1, d2)));
    out
}

/// The commands of the plan, sent as one `Atomic`: add the account, set its ACLs, then move authority.
pub fn plan_commands(
    account: &Node,
    account_uri: &DmUri,
    account_acls: &[(DmUri, Acl)],
    changes: &[AclChange],
) -> Vec<Command> {
    let mut out = Vec::new();
    if let Some(dmacc) = account_uri.parent() {
        add_commands(&dmacc, account, &mut out);
    }
    for (uri, acl) in account_acls {
        out.push(replace_acl(uri, acl));
    }
    // Deepest first: D1 changes a node's ACL through its Replace right on the parent, which it gives up
    // when the scope root's own ACL changes; so the root goes last. (Restore goes the other way.)
    let mut ordered: Vec<&AclChange> = changes.iter().collect();
    ordered.sort_by_key(|c| std::cmp::Reverse(c.uri.segments().count()));
    for change in ordered {
        out.push(replace_acl(&change.uri, &change.after));
    }
    out
}

/// The commands that undo a plan: ACLs back top-down (each restored node gives D1 back the right to
/// restore its children), then the account deleted. Not atomic: a step that finds nothing to undo (404)
/// must not stop the others.
pub fn restore_commands(snapshot: &Snapshot) -> Vec<Command> {
    let mut out: Vec<Command> = snapshot
        .acls
        .iter()
        .map(|c| replace_acl(&c.uri, &c.before))
        .collect();
    out.push(Command::Delete(ItemCommand::new(
        "0",
        vec![Item::target(snapshot.account_uri.as_str())],
    )));
    out
}

/// The URIs whose ACL the read-back checks, with the ACL expected.
pub fn expected_after(account_acls: &[(DmUri, Acl)], changes: &[AclChange]) -> Vec<(DmUri, Acl)> {
    let mut seen = BTreeSet::new();
    account_acls
        .iter()
        .cloned()
        .chain(changes.iter().map(|c| (c.uri.clone(), c.after.clone())))
        .filter(|(uri, _)| seen.insert(uri.clone()))
        .collect()
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
        let req = request(DelType::Partial, &["./Vendor/Acme/Apps"]);
        let node = account_node(&req, "bm9uY2U=");
        let back = DmAccount::from_node(&node).unwrap();
        let srv = back.server_credential().unwrap();
        assert_eq!(srv.secret.as_ref().unwrap().expose(), "a2V5");
        assert_eq!(srv.data.as_deref(), Some("bm9uY2U="));
        let record = node.find("Ext/Delegation").unwrap();
        assert_eq!(record.child("AutoConnect").unwrap().value(), Some("false"));
        assert_eq!(record.child("Type").unwrap().value(), Some("Partial"));
        assert!(!format!("{req:?}").contains("a2V5"));
    }

    #[test]
    fn restore_undoes_top_down_then_deletes_the_account() {
        let req = request(DelType::Partial, &["./Vendor/Acme/Apps"]);
        let changes = acl_changes(&req, &observed()).unwrap();
        let snapshot = Snapshot {
            account_uri: req.account_uri().unwrap(),
            acls: changes,
            server_nonce_b64: "bm9uY2U=".into(),
        };
        let cmds = restore_commands(&snapshot);
        assert_eq!(cmds.len(), 3);
        assert!(matches!(&cmds[2], Command::Delete(_)));
        let first = cmds[0].items()[0].target.as_ref().unwrap().loc_uri.clone();
        assert_eq!(first, "./Vendor/Acme/Apps?prop=ACL");
    }
}
