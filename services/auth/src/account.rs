//! This server's DM Account as it travels in DELEGATION_START (PROTOCOL.md A.4, B.2), built once per
//! delegation and kept encrypted: the delegated side's provisioning reads its client credential back for
//! the first session (steps 7-8).
//!
//! - `ServerID` and `Name`: this server's ServerID; `AppAddr/1`: its DM endpoint for devices (`URI`).
//! - `AppAuth/srv` (`SRVCRED`, `DIGEST`, `AAuthName` = the ServerID): no secret and no nonce. DMS-1 puts the
//!   TEMP_DELEGATION_KEY and a fresh nonce there (A.6), so nothing of ours would be used.
//! - `AppAuth/cli` (`CLCRED`, `DIGEST`, `AAuthName` = the device id): a fresh random secret and nonce per
//!   delegation, what the device will authenticate to this server with until the first session replaces it.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use dm_protocol::dmacc::{APP_ID, AddrType, AppAddr, AppAuth, AuthLevel, DmAccount, Secret};
use dm_protocol::tnds;

/// The `AppAuth/<x>` names of the two credentials.
pub const SERVER_CRED_KEY: &str = "srv";
pub const CLIENT_CRED_KEY: &str = "cli";

/// The account's TNDS document for the delegation with the device `dev_id`.
pub(crate) fn own_account_tnds(server_id: &str, dm_address: &str, dev_id: &str) -> Vec<u8> {
    let account = DmAccount {
        app_id: APP_ID.into(),
        server_id: server_id.into(),
        name: Some(server_id.into()),
        pref_con_ref: None,
        app_addrs: vec![AppAddr {
            key: "1".into(),
            addr: dm_address.into(),
            addr_type: AddrType::Uri,
            ports: Vec::new(),
        }],
        aauth_pref: None,
        app_auths: vec![
            AppAuth {
                key: SERVER_CRED_KEY.into(),
                level: AuthLevel::Srvcred,
                auth_type: "DIGEST".into(),
                name: Some(server_id.into()),
                secret: None,
                data: None,
            },
            AppAuth {
                key: CLIENT_CRED_KEY.into(),
                level: AuthLevel::Clcred,
                auth_type: "DIGEST".into(),
                name: Some(dev_id.into()),
                secret: Some(Secret::new(B64.encode(rand::random::<[u8; 24]>()))),
                data: Some(B64.encode(rand::random::<[u8; 16]>())),
            },
        ],
        ext: None,
    };
    tnds::encode(&account.to_tnds(&node_name(server_id))).into_bytes()
}

/// The account's node name: the ServerID with anything but `[A-Za-z0-9._-]` replaced by `_`.
fn node_name(server_id: &str) -> String {
    server_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_account_reads_back_with_fresh_client_credentials() {
        let a = own_account_tnds("dms2.example", "http://dm.dms2.example/dm", "IMEI:1");
        let b = own_account_tnds("dms2.example", "http://dm.dms2.example/dm", "IMEI:1");
        let account = DmAccount::from_tnds(&tnds::decode(&a).unwrap()).unwrap();
        assert_eq!(account.server_id, "dms2.example");
        assert_eq!(account.address(), Some("http://dm.dms2.example/dm"));
        let srv = account.server_credential().unwrap();
        assert_eq!(srv.name.as_deref(), Some("dms2.example"));
        assert!(srv.secret.is_none() && srv.data.is_none());
        let cli = account.client_credential().unwrap();
        assert_eq!(cli.name.as_deref(), Some("IMEI:1"));
        assert_eq!(
            B64.decode(cli.secret.as_ref().unwrap().expose())
                .unwrap()
                .len(),
            24
        );
        assert_eq!(B64.decode(cli.data.as_ref().unwrap()).unwrap().len(), 16);
        let other = DmAccount::from_tnds(&tnds::decode(&b).unwrap()).unwrap();
        assert_ne!(
            other.client_credential().unwrap().secret,
            cli.secret,
            "every delegation gets its own client secret"
        );
        assert_eq!(node_name("a b/c"), "a_b_c");
    }
}
