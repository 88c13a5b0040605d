//! One simulated device: its identity and its DM tree, and the DM Accounts read from that tree.
//!
//! Everything the device knows about a server lives in the tree (docs/device-side.md): the account
//! `./DMAcc/<x>` whose `ServerID` is the server's, its `AppAddr`, its `SRVCRED` and `CLCRED` `AppAuth`
//! entries and the delegation record `Ext/Delegation/AutoConnect`. The accessors here read them afresh at
//! every call, so a server that changes them through DM commands changes what the device does next.

use std::fmt;
use std::str::FromStr;

use dm_protocol::acl::Acl;
use dm_protocol::auth::{decode_nonce, encode_nonce};
use dm_protocol::dmacc::{APP_ID, AddrType, AppAddr, AppAuth, AuthLevel, DmAccount, Secret};
use dm_protocol::tnds::{Format, MgmtTree, Node};
use dm_protocol::tree::{DmTree, NONCE_NODE_NAME, TreeError};
use dm_protocol::types::DmUri;

/// `Man` of the default tree.
pub const DEFAULT_MAN: &str = "Acme";
/// `Mod` of the default tree.
pub const DEFAULT_MODEL: &str = "X100";
/// `DmV` reported when the tree has none.
pub const DEFAULT_DMV: &str = "1.2";
/// `Lang` reported when the tree has none.
pub const DEFAULT_LANG: &str = "en-US";
/// `AAuthType` of both credentials of the default account (`syncml:auth-md5`).
pub const DEFAULT_AUTH_TYPE: &str = "DIGEST";
/// The node names under `./DevInfo` that package #1 reports, in order.
pub const DEVINFO_NODES: [&str; 5] = ["DevId", "Man", "Mod", "DmV", "Lang"];

/// Parses a URI the code builds from constants or validated segments.
pub(crate) fn uri(text: &str) -> Option<DmUri> {
    DmUri::from_str(text).ok()
}

/// The parameters of the one DM Account of the default tree. `Debug` hides both secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct DefaultAccount {
    /// The server's `ServerID` (also its SRVCRED `AAuthName`, B.6).
    pub server_id: String,
    /// Where the device posts its DM messages (`AppAddr/<a>/Addr`, `AddrType` `URI`).
    pub addr: String,
    /// SRVCRED `AAuthSecret`: the server's password.
    pub server_secret: String,
    /// SRVCRED `AAuthData`: base64 of the nonce the server must use next.
    pub server_nonce_b64: String,
    /// CLCRED `AAuthName`: the device's name towards the server.
    pub client_name: String,
    /// CLCRED `AAuthSecret`: the device's password.
    pub client_secret: String,
    /// CLCRED `AAuthData`: base64 of the nonce the device must use next.
    pub client_nonce_b64: String,
}

impl fmt::Debug for DefaultAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DefaultAccount")
            .field("server_id", &self.server_id)
            .field("addr", &self.addr)
            .field("server_secret", &"<redacted>")
            .field("server_nonce_b64", &self.server_nonce_b64)
            .field("client_name", &self.client_name)
            .field("client_secret", &"<redacted>")
            .field("client_nonce_b64", &self.client_nonce_b64)
            .finish()
    }
}

impl DefaultAccount {
    /// The node name `<x>` of the account under `./DMAcc`: the ServerID with every character other than
    /// ASCII letters, digits, `-`, `_` and `.` replaced by `_` (and `_` for an empty or all-dot id).
    pub fn account_key(&self) -> String {
        let key: String = self
            .server_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if key.chars().all(|c| c == '.') {
            "_".to_string()
        } else {
            key
        }
    }

    /// The account as a TNDS node named [`DefaultAccount::account_key`] (B.2): `AppID`, `ServerID`,
    /// `Name`, `AppAddr/1/{Addr, AddrType URI}`, `AppAuth/SRVCRED` and `AppAuth/CLCRED` with level, type
    /// `DIGEST`, name, secret and nonce.
    pub fn to_node(&self) -> Node {
        let auth = |key: &str, level, name: &str, secret: &str, nonce: &str| AppAuth {
            key: key.to_string(),
            level,
            auth_type: DEFAULT_AUTH_TYPE.to_string(),
            name: Some(name.to_string()),
            secret: Some(Secret::new(secret)),
            data: Some(nonce.to_string()),
        };
        DmAccount {
            app_id: APP_ID.to_string(),
            server_id: self.server_id.clone(),
            name: Some(self.server_id.clone()),
            pref_con_ref: None,
            app_addrs: vec![AppAddr {
                key: "1".to_string(),
                addr: self.addr.clone(),
                addr_type: AddrType::Uri,
                ports: Vec::new(),
            }],
            aauth_pref: None,
            app_auths: vec![
                auth(
                    "SRVCRED",
                    AuthLevel::Srvcred,
                    &self.server_id,
                    &self.server_secret,
                    &self.server_nonce_b64,
                ),
                auth(
                    "CLCRED",
                    AuthLevel::Clcred,
                    &self.client_name,
                    &self.client_secret,
                    &self.client_nonce_b64,
                ),
            ],
            ext: None,
        }
        .to_node(&self.account_key())
    }
}

/// Why a device could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The TNDS document does not describe a tree.
    #[error("the TNDS document is not a device tree: {0}")]
    Tree(#[from] TreeError),
    /// A server id that cannot be written into an ACL (B.3: no white space, none of `= & * +`).
    #[error("the ServerID cannot be used in an ACL: {0}")]
    ServerId(String),
}

/// A credential of an account (`AppAuth/<x>`): `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// The `AppAuth/<x>` node.
    pub uri: DmUri,
    /// `AAuthName` (empty when absent).
    pub name: String,
    secret: String,
    /// The nonce bytes of `AAuthData`: empty when absent; else its base64 decoding (`None` when it is
    /// not valid base64: then nothing verifies against this credential), or, read as the `text-nonce`
    /// quirk does for a leaf whose Format is not `b64`/`bin`, the UTF-8 bytes of its text.
    pub nonce: Option<Vec<u8>>,
}

impl Credential {
    /// `AAuthSecret` (empty when absent). Never log it.
    pub fn secret(&self) -> &str {
        &self.secret
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("uri", &self.uri)
            .field("name", &self.name)
            .field("secret", &"<redacted>")
            .field("nonce", &self.nonce.as_deref().map(encode_nonce))
            .finish()
    }
}

/// A simulated DM 1.2 device. `Debug` hides `AAuthSecret` values (the tree's own `Debug` does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    dev_id: String,
    man: String,
    model: String,
    tree: DmTree,
}

impl Device {
    /// A device holding the whole tree a TNDS document describes ([`DmTree::from_tnds`]).
    ///
    /// `Man` and `Mod` are read from `./DevInfo/{Man, Mod}`, else from the document's `Man`/`Mod`,
    /// else the defaults. A leaf `./DevInfo/DevId` is set to `dev_id`, so that one document can serve a
    /// whole fleet.
    pub fn from_tnds(dev_id: impl Into<String>, doc: &MgmtTree) -> Result<Device, DeviceError> {
        let dev_id = dev_id.into();
        let mut tree = DmTree::from_tnds(doc)?;
        if let Some(devid) = uri("./DevInfo/DevId")
            && tree.get(&devid).is_ok_and(|n| n.is_leaf())
        {
            tree.replace_value(&devid, dev_id.as_str())?;
        }
        let read = |path: &str| uri(path).and_then(|u| tree.value(&u).ok().map(String::from));
        let man = read("./DevInfo/Man")
            .or_else(|| doc.man.clone())
            .unwrap_or_else(|| DEFAULT_MAN.to_string());
        let model = read("./DevInfo/Mod")
            .or_else(|| doc.model.clone())
            .unwrap_or_else(|| DEFAULT_MODEL.to_string());
        Ok(Device {
            dev_id,
            man,
            model,
            tree,
        })
    }

    /// A device with the default tree:
    ///
    /// - `./DevInfo/{DevId, Man "Acme", Mod "X100", DmV "1.2", Lang "en-US"}`;
    /// - `./DMAcc/<key>`: the account of [`DefaultAccount::to_node`];
    /// - `./Vendor/Acme/Apps/App1/{Version, Enabled}`, `./Vendor/Acme/Settings/{Volume, Brightness}`,
    ///   `./Vendor/Other/Info`.
    ///
    /// ACLs (S = the account's ServerID): root `Add=*&Get=*&Replace=S`; `./DMAcc` `Add=S&Get=S&Replace=S`;
    /// `./Vendor` `Add=S&Delete=S&Exec=S&Get=S&Replace=S`; every other node inherits.
    pub fn with_default_tree(
        dev_id: impl Into<String>,
        account: &DefaultAccount,
    ) -> Result<Device, DeviceError> {
        let dev_id = dev_id.into();
        let server = account.server_id.as_str();
        let acl = |text: String| {
            Acl::from_str(&text).map_err(|_| DeviceError::ServerId(server.to_string()))
        };
        let root_acl = acl(format!("Add=*&Get=*&Replace={server}"))?;
        let dmacc_acl = acl(format!("Add={server}&Get={server}&Replace={server}"))?;
        let vendor_acl = acl(format!(
            "Add={server}&Delete={server}&Exec={server}&Get={server}&Replace={server}"
        ))?;
        let doc = MgmtTree {
            ver_dtd: "1.2".to_string(),
            man: None,
            model: None,
            nodes: vec![
                Node::interior(
                    "DevInfo",
                    vec![
                        Node::leaf("DevId", dev_id.as_str()),
                        Node::leaf("Man", DEFAULT_MAN),
                        Node::leaf("Mod", DEFAULT_MODEL),
                        Node::leaf("DmV", DEFAULT_DMV),
                        Node::leaf("Lang", DEFAULT_LANG),
                    ],
                ),
                Node::interior("DMAcc", vec![account.to_node()]),
                Node::interior(
                    "Vendor",
                    vec![
                        Node::interior(
                            "Acme",
                            vec![
                                Node::interior(
                                    "Apps",
                                    vec![Node::interior(
                                        "App1",
                                        vec![
                                            Node::leaf("Version", "1.0.0"),
                                            Node::leaf("Enabled", "true"),
                                        ],
                                    )],
                                ),
                                Node::interior(
                                    "Settings",
                                    vec![Node::leaf("Volume", "5"), Node::leaf("Brightness", "80")],
                                ),
                            ],
                        ),
                        Node::interior("Other", vec![Node::leaf("Info", "other vendor data")]),
                    ],
                ),
            ],
        };
        let mut tree = DmTree::from_tnds(&doc)?;
        let set = |tree: &mut DmTree, path: &str, acl: Acl| match uri(path) {
            Some(u) => tree.set_acl(&u, acl),
            None => Ok(()),
        };
        set(&mut tree, ".", root_acl)?;
        set(&mut tree, "./DMAcc", dmacc_acl)?;
        set(&mut tree, "./Vendor", vendor_acl)?;
        // The device wrote these nonces itself: bytes, kept as base64 (read so even by `text-nonce`).
        for cred in ["SRVCRED", "CLCRED"] {
            if let Some(data) = uri(&format!(
                "./DMAcc/{}/AppAuth/{cred}/{NONCE_NODE_NAME}",
                account.account_key()
            )) {
                tree.set_format(&data, Some(Format::B64))?;
            }
        }
        Ok(Device {
            dev_id,
            man: DEFAULT_MAN.to_string(),
            model: DEFAULT_MODEL.to_string(),
            // A clone allocates every vector at its exact length: the idle tree stays small.
            tree: tree.clone(),
        })
    }

    /// The same device under another id (its `./DevInfo/DevId` leaf, if any, set to the new id).
    pub fn clone_with_id(&self, dev_id: impl Into<String>) -> Device {
        let dev_id = dev_id.into();
        let mut tree = self.tree.clone();
        if let Some(devid) = uri("./DevInfo/DevId")
            && tree.get(&devid).is_ok_and(|n| n.is_leaf())
        {
            // Cannot fail: the leaf was just found.
            let _ = tree.replace_value(&devid, dev_id.as_str());
        }
        Device {
            dev_id,
            man: self.man.clone(),
            model: self.model.clone(),
            tree,
        }
    }

    pub fn dev_id(&self) -> &str {
        &self.dev_id
    }

    pub fn man(&self) -> &str {
        &self.man
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn tree(&self) -> &DmTree {
        &self.tree
    }

    pub fn tree_mut(&mut self) -> &mut DmTree {
        &mut self.tree
    }

    /// The TNDS export of the whole tree, with ACLs and every value (secrets included).
    pub fn export(&self) -> MgmtTree {
        self.tree.to_tnds()
    }

    /// The values package #1 reports, `(name, value)` for `./DevInfo/{DevId, Man, Mod, DmV, Lang}`:
    /// `DevId` is the device id, `Man` and `Mod` the device's; `DmV` and `Lang` come from the tree
    /// (defaults `1.2` and `en-US`).
    pub fn dev_info(&self) -> [(&'static str, String); 5] {
        let read = |name: &str, default: &str| {
            uri(&format!("./DevInfo/{name}"))
                .and_then(|u| self.tree.value(&u).ok().map(String::from))
                .unwrap_or_else(|| default.to_string())
        };
        [
            ("DevId", self.dev_id.clone()),
            ("Man", self.man.clone()),
            ("Mod", self.model.clone()),
            ("DmV", read("DmV", DEFAULT_DMV)),
            ("Lang", read("Lang", DEFAULT_LANG)),
        ]
    }

    /// The account node `./DMAcc/<x>` whose `ServerID` value is `server_id` (the first in name order).
    pub fn account_uri(&self, server_id: &str) -> Option<DmUri> {
        let dmacc = uri("./DMAcc")?;
        let keys = self.tree.children(&dmacc).ok()?;
        keys.into_iter()
            .filter_map(|key| dmacc.join(key).ok())
            .find(|account| {
                account
                    .join("ServerID")
                    .ok()
                    .and_then(|u| self.tree.value(&u).ok())
                    == Some(server_id)
            })
    }

    /// The ServerIDs of all accounts under `./DMAcc`.
    pub fn server_ids(&self) -> Vec<String> {
        let Some(dmacc) = uri("./DMAcc") else {
            return Vec::new();
        };
        let Ok(keys) = self.tree.children(&dmacc) else {
            return Vec::new();
        };
        keys.into_iter()
            .filter_map(|key| dmacc.join(key).ok()?.join("ServerID").ok())
            .filter_map(|u| self.tree.value(&u).ok().map(String::from))
            .collect()
    }

    fn leaf(&self, parent: &DmUri, name: &str) -> Option<&str> {
        self.tree.value(&parent.join(name).ok()?).ok()
    }

    /// The server's address: the `Addr` of the first `AppAddr/<a>` (in name order) whose `AddrType` is
    /// `URI` or absent.
    pub fn address(&self, server_id: &str) -> Option<String> {
        let appaddr = self.account_uri(server_id)?.join("AppAddr").ok()?;
        let keys = self.tree.children(&appaddr).ok()?;
        keys.into_iter()
            .filter_map(|key| appaddr.join(key).ok())
            .find_map(|a| {
                let addr_type = self.leaf(&a, "AddrType");
                let is_uri = addr_type.is_none_or(|t| t.trim().eq_ignore_ascii_case("URI"));
                is_uri
                    .then(|| self.leaf(&a, "Addr").map(String::from))
                    .flatten()
            })
    }

    /// The first `AppAuth/<x>` (in name order) of the account whose `AAuthLevel` is `level`, its
    /// `AAuthData` read as base64.
    pub fn credential(&self, server_id: &str, level: AuthLevel) -> Option<Credential> {
        self.credential_with(server_id, level, false)
    }

    /// [`Device::credential`]; with `text_nonce` (the quirk), an `AAuthData` whose Format is not `b64`
    /// or `bin` (`chr` or none) is the nonce as text: its UTF-8 bytes, not its base64 decoding.
    pub fn credential_with(
        &self,
        server_id: &str,
        level: AuthLevel,
        text_nonce: bool,
    ) -> Option<Credential> {
        let appauth = self.account_uri(server_id)?.join("AppAuth").ok()?;
        let keys = self.tree.children(&appauth).ok()?;
        let at = keys
            .into_iter()
            .filter_map(|key| appauth.join(key).ok())
            .find(|a| {
                self.leaf(a, "AAuthLevel")
                    .is_some_and(|l| l.trim() == level.as_str())
            })?;
        let data = at.join(NONCE_NODE_NAME).ok();
        let node = data.as_ref().and_then(|u| self.tree.get(u).ok());
        let nonce = match node.and_then(|n| n.value().map(|v| (v, n.format()))) {
            None => Some(Vec::new()),
            Some((text, Some(Format::B64 | Format::Bin))) => decode_nonce(text).ok(),
            Some((text, _)) if text_nonce => Some(text.as_bytes().to_vec()),
            Some((text, _)) => decode_nonce(text).ok(),
        };
        Some(Credential {
            name: self.leaf(&at, "AAuthName").unwrap_or_default().to_string(),
            secret: self
                .leaf(&at, "AAuthSecret")
                .unwrap_or_default()
                .to_string(),
            nonce,
            uri: at,
        })
    }

    /// The server's credential (`SRVCRED`): what the device checks the server's `Cred` and package #0
    /// against.
    pub fn server_credential(&self, server_id: &str) -> Option<Credential> {
        self.credential(server_id, AuthLevel::Srvcred)
    }

    /// [`Device::server_credential`], with the `text-nonce` quirk when `text_nonce`.
    pub fn server_credential_with(&self, server_id: &str, text_nonce: bool) -> Option<Credential> {
        self.credential_with(server_id, AuthLevel::Srvcred, text_nonce)
    }

    /// The device's credential (`CLCRED`): what the device presents in package #1.
    pub fn client_credential(&self, server_id: &str) -> Option<Credential> {
        self.credential(server_id, AuthLevel::Clcred)
    }

    /// [`Device::client_credential`], with the `text-nonce` quirk when `text_nonce`.
    pub fn client_credential_with(&self, server_id: &str, text_nonce: bool) -> Option<Credential> {
        self.credential_with(server_id, AuthLevel::Clcred, text_nonce)
    }

    /// Whether the account's delegation record says `Ext/Delegation/AutoConnect` = `false` (A.6): the
    /// device then never opens a session to that server by itself.
    pub fn auto_connect_disabled(&self, server_id: &str) -> bool {
        self.account_uri(server_id)
            .and_then(|a| uri(&format!("{a}/Ext/Delegation/AutoConnect")))
            .and_then(|u| self.tree.value(&u).ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"))
    }

    /// Stores a nonce as the `AAuthData` of the credential at `credential` (an `AppAuth/<x>` node),
    /// creating the leaf when absent: base64 text, Format `b64` (bytes, whatever the quirks).
    pub fn store_nonce(&mut self, credential: &DmUri, nonce: &[u8]) -> Result<(), TreeError> {
        let data = credential
            .join(NONCE_NODE_NAME)
            .map_err(|_| TreeError::NotFound(credential.clone()))?;
        let text = encode_nonce(nonce);
        if self.tree.exists(&data) {
            self.tree.replace_value(&data, text)?;
            self.tree.set_format(&data, Some(Format::B64))
        } else {
            self.tree.add_leaf(&data, text, Some(Format::B64), None)
        }
    }

    /// Stores the nonce the server must use next (SRVCRED `AAuthData`).
    pub fn store_server_nonce(&mut self, server_id: &str, nonce: &[u8]) -> Result<(), TreeError> {
        let at = self
            .server_credential(server_id)
            .map(|c| c.uri)
            .ok_or_else(|| TreeError::NotFound(DmUri::root()))?;
        self.store_nonce(&at, nonce)
    }

    /// Stores the nonce the device must use next (CLCRED `AAuthData`).
    pub fn store_client_nonce(&mut self, server_id: &str, nonce: &[u8]) -> Result<(), TreeError> {
        let at = self
            .client_credential(server_id)
            .map(|c| c.uri)
            .ok_or_else(|| TreeError::NotFound(DmUri::root()))?;
        self.store_nonce(&at, nonce)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use dm_protocol::acl::AclCommand;

    pub(crate) fn account() -> DefaultAccount {
        DefaultAccount {
            server_id: "dms1.example".into(),
            addr: "http://127.0.0.1:1/dm".into(),
            server_secret: "srv-secret".into(),
            server_nonce_b64: encode_nonce(b"srv-nonce"),
            client_name: "client-a".into(),
            client_secret: "cli-secret".into(),
            client_nonce_b64: encode_nonce(b"cli-nonce"),
        }
    }

    fn u(s: &str) -> DmUri {
        s.parse().unwrap()
    }

    #[test]
    fn default_tree_shape_and_acls() {
        let d = Device::with_default_tree("IMEI:1", &account()).unwrap();
        let t = d.tree();
        assert_eq!(t.value(&u("./DevInfo/DevId")).unwrap(), "IMEI:1");
        assert_eq!(t.value(&u("./DevInfo/Man")).unwrap(), "Acme");
        assert_eq!(t.value(&u("./DevInfo/Mod")).unwrap(), "X100");
        assert_eq!(t.value(&u("./DevInfo/DmV")).unwrap(), "1.2");
        assert_eq!(t.value(&u("./DevInfo/Lang")).unwrap(), "en-US");
        for leaf in [
            "./Vendor/Acme/Apps/App1/Version",
            "./Vendor/Acme/Apps/App1/Enabled",
            "./Vendor/Acme/Settings/Volume",
            "./Vendor/Acme/Settings/Brightness",
            "./Vendor/Other/Info",
            "./DMAcc/dms1.example/AppID",
            "./DMAcc/dms1.example/AppAddr/1/AddrType",
        ] {
            assert!(t.get(&u(leaf)).unwrap().is_leaf(), "{leaf}");
        }
        assert_eq!(
            t.acl(&DmUri::root()).unwrap().to_string(),
            "Add=*&Get=*&Replace=dms1.example"
        );
        assert_eq!(
            t.acl(&u("./DMAcc")).unwrap().to_string(),
            "Add=dms1.example&Get=dms1.example&Replace=dms1.example"
        );
        assert_eq!(
            t.acl(&u("./Vendor")).unwrap().to_string(),
            "Add=dms1.example&Delete=dms1.example&Exec=dms1.example&Get=dms1.example&Replace=dms1.example"
        );
        assert!(t.acl(&u("./DevInfo")).unwrap().is_empty());
        assert!(t.acl(&u("./Vendor/Acme")).unwrap().is_empty());
        // The account reads back as a valid B.2 DM Account.
        let node = t.get(&u("./DMAcc/dms1.example")).unwrap().to_tnds();
        let acc = DmAccount::from_node(&node).unwrap();
        assert_eq!(acc.server_id, "dms1.example");
        assert!(
            t.check("other", AclCommand::Get, &u("./DevInfo/Man"))
                .is_ok()
        );
        assert!(t.check("other", AclCommand::Get, &u("./Vendor")).is_err());
    }

    #[test]
    fn account_accessors_read_the_tree() {
        let mut d = Device::with_default_tree("IMEI:1", &account()).unwrap();
        assert_eq!(
            d.account_uri("dms1.example").unwrap().as_str(),
            "./DMAcc/dms1.example"
        );
        assert!(d.account_uri("nobody").is_none());
        assert_eq!(d.address("dms1.example").unwrap(), "http://127.0.0.1:1/dm");
        let srv = d.server_credential("dms1.example").unwrap();
        assert_eq!(srv.name, "dms1.example");
        assert_eq!(srv.secret(), "srv-secret");
        assert_eq!(srv.nonce.as_deref(), Some(&b"srv-nonce"[..]));
        let cli = d.client_credential("dms1.example").unwrap();
        assert_eq!(cli.name, "client-a");
        assert_eq!(cli.secret(), "cli-secret");
        assert!(!format!("{cli:?}").contains("cli-secret"));
        assert!(!format!("{d:?}").contains("srv-secret"));
        assert!(!format!("{:?}", account()).contains("srv-secret"));
        assert!(!d.auto_connect_disabled("dms1.example"));
        let ext = u("./DMAcc/dms1.example/Ext");
        d.tree_mut().add_interior(&ext).unwrap();
        d.tree_mut()
            .add_interior(&u("./DMAcc/dms1.example/Ext/Delegation"))
            .unwrap();
        d.tree_mut()
            .add_leaf(
                &u("./DMAcc/dms1.example/Ext/Delegation/AutoConnect"),
                "false",
                None,
                None,
            )
            .unwrap();
        assert!(d.auto_connect_disabled("dms1.example"));
        d.store_server_nonce("dms1.example", b"next").unwrap();
        assert_eq!(
            d.server_credential("dms1.example").unwrap().nonce.unwrap(),
            b"next"
        );
        assert_eq!(d.server_ids(), vec!["dms1.example".to_string()]);
    }

    #[test]
    fn from_tnds_sets_devid_and_clone_with_id() {
        let d = Device::with_default_tree("IMEI:1", &account()).unwrap();
        let e = Device::from_tnds("IMEI:2", &d.export()).unwrap();
        assert_eq!(e.tree().value(&u("./DevInfo/DevId")).unwrap(), "IMEI:2");
        assert_eq!(e.man(), "Acme");
        let f = e.clone_with_id("IMEI:3");
        assert_eq!(f.dev_id(), "IMEI:3");
        assert_eq!(f.tree().value(&u("./DevInfo/DevId")).unwrap(), "IMEI:3");
        assert_eq!(f.dev_info()[0].1, "IMEI:3");
    }

    #[test]
    fn bad_server_id_is_an_error() {
        let mut a = account();
        a.server_id = "has space".into();
        assert!(matches!(
            Device::with_default_tree("x", &a),
            Err(DeviceError::ServerId(_))
        ));
    }

    #[test]
    fn default_tree_is_small() {
        let d = Device::with_default_tree("IMEI:350000000000000", &account()).unwrap();
        let bytes = d.tree().approx_heap_bytes();
        assert!(bytes < 12 * 1024, "{bytes} bytes");
    }

    #[test]
    fn nonces_are_bytes_unless_text_nonce_reads_a_text_leaf() {
        let mut d = Device::with_default_tree("IMEI:1", &account()).unwrap();
        let data = u("./DMAcc/dms1.example/AppAuth/SRVCRED/AAuthData");
        let nonce = |d: &Device, text: bool| {
            d.server_credential_with("dms1.example", text)
                .unwrap()
                .nonce
        };
        // The device's own nonces are marked b64: bytes, quirk or not.
        assert_eq!(d.tree().get(&data).unwrap().format(), Some(Format::B64));
        assert_eq!(nonce(&d, false).as_deref(), Some(&b"srv-nonce"[..]));
        assert_eq!(nonce(&d, true).as_deref(), Some(&b"srv-nonce"[..]));
        // A text leaf ("abcd" is also valid base64): decoded normally, verbatim with the quirk.
        for format in [None, Some(Format::Chr)] {
            d.tree_mut().replace_value(&data, "abcd").unwrap();
            d.tree_mut().set_format(&data, format).unwrap();
            assert_eq!(nonce(&d, false), Some(decode_nonce("abcd").unwrap()));
            assert_eq!(nonce(&d, true).as_deref(), Some(&b"abcd"[..]));
        }
        // Text that is not base64 is no nonce at all without the quirk.
        d.tree_mut().replace_value(&data, "not base64!").unwrap();
        assert_eq!(nonce(&d, false), None);
        assert_eq!(nonce(&d, true).as_deref(), Some(&b"not base64!"[..]));
        // b64 and bin: base64 of the bytes.
        for format in [Format::B64, Format::Bin] {
            d.tree_mut().replace_value(&data, "YWJjZA==").unwrap();
            d.tree_mut().set_format(&data, Some(format)).unwrap();
            assert_eq!(nonce(&d, true).as_deref(), Some(&b"abcd"[..]));
            assert_eq!(nonce(&d, false).as_deref(), Some(&b"abcd"[..]));
        }
        // A nonce the device stores is marked b64 again.
        d.tree_mut().set_format(&data, None).unwrap();
        d.store_server_nonce("dms1.example", b"\x00\xffraw")
            .unwrap();
        assert_eq!(d.tree().get(&data).unwrap().format(), Some(Format::B64));
        assert_eq!(nonce(&d, true).as_deref(), Some(&b"\x00\xffraw"[..]));
        // Also when the device creates the leaf.
        d.tree_mut().delete(&data).unwrap();
        d.store_server_nonce("dms1.example", b"new").unwrap();
        assert_eq!(d.tree().get(&data).unwrap().format(), Some(Format::B64));
        assert_eq!(nonce(&d, true).as_deref(), Some(&b"new"[..]));
    }
}
