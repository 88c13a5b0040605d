//! `dmdctl` as an operator runs it (the real binary) against two deployments over a real nats-server with
//! a simulated fleet: the device inventory (import with a summary, list without secrets, add, remove
//! refused while a delegation holds the device), a device added at runtime delegated with `--watch`, the
//! exit codes by outcome, a NOTIF for a device the delegating server does not manage refused at step 1
//! with 404, and shell completions.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Output;

use dm_bus::Bus;
use dm_bus::testing::NatsServer;
use dm_client::{DefaultAccount, Device};
use dm_protocol::auth;
use dmd::demo::{D1, D2, World};

const TOKEN: &str = "dmdctl-test-token";

async fn dmdctl(url: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_dmdctl"))
        .args(args)
        .env("DMD_ADMIN_URL", url)
        .env("DMD_ADMIN_TOKEN", TOKEN)
        .env_remove("DMD_DEVICE_SERVER_SECRET")
        .env_remove("DMD_DEVICE_CLIENT_SECRET")
        .output()
        .await
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The last JSON document a followed delegation printed.
fn last_json(o: &Output) -> serde_json::Value {
    let out = stdout(o);
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

/// A device of the fleet that DMS-1 may manage, with these credentials.
fn fleet_device(w: &World, dev_id: &str, n: usize) -> (Device, [String; 5]) {
    let creds = [
        format!("srv-secret-{n}-xyzzy"),
        auth::encode_nonce(format!("sn-{n}").as_bytes()),
        dev_id.to_string(),
        format!("cli-secret-{n}-plugh"),
        auth::encode_nonce(format!("cn-{n}").as_bytes()),
    ];
    let account = DefaultAccount {
        server_id: D1.into(),
        addr: w.device_endpoint(D1),
        server_secret: creds[0].clone(),
        server_nonce_b64: creds[1].clone(),
        client_name: creds[2].clone(),
        client_secret: creds[3].clone(),
        client_nonce_b64: creds[4].clone(),
    };
    (Device::with_default_tree(dev_id, &account).unwrap(), creds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_watch_and_exit_codes_against_two_deployments() {
    let server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::connect(server.url()).await.unwrap();
    // DMS-1 starts with no device at all: everything comes through the admin API.
    let w = World::start(dir.path(), bus, 0).await.unwrap();
    let url1 = w.serve_admin(D1, TOKEN).await.unwrap();
    let url2 = w.serve_admin(D2, TOKEN).await.unwrap();

    // Import: two good devices, one with a bad nonce, one twice in the file.
    let (dev_a, dev_b) = ("IMEI:490000000000001", "IMEI:490000000000002");
    let (device_a, a) = fleet_device(&w, dev_a, 1);
    let (device_b, b) = fleet_device(&w, dev_b, 2);
    assert!(w.fleet.insert(device_a));
    assert!(w.fleet.insert(device_b));
    let row =
        |id: &str, c: &[String; 5]| format!("{id},{},{},{},{},{}", c[0], c[1], c[2], c[3], c[4]);
    let csv = format!(
        "dev_id,server_secret,server_nonce_b64,client_name,client_secret,client_nonce_b64\n{}\n{}\nIMEI:3,s,not*base64,n,c,bg==\n{}\n",
        row(dev_a, &a),
        row(dev_b, &b),
        row(dev_a, &a),
    );
    let file = dir.path().join("devices.csv");
    std::fs::write(&file, csv).unwrap();
    let o = dmdctl(&url1, &["devices", "import", file.to_str().unwrap()]).await;
    assert_eq!(
        o.status.code(),
        Some(5),
        "some devices left out: {}",
        text(&o)
    );
    let out = stdout(&o);
    assert!(
        out.contains("4 devices: 2 added, 0 replaced, 0 already there, 2 invalid"),
        "{}",
        text(&o)
    );
    assert!(
        out.contains("line 4") && out.contains("server_nonce_b64 is not base64"),
        "{out}"
    );
    assert!(out.contains("line 5") && out.contains("twice"), "{out}");
    // The same file again: nothing overwritten.
    let o = dmdctl(
        &url1,
        &["--json", "devices", "import", file.to_str().unwrap()],
    )
    .await;
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let summary: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(summary["exists"], 2, "{summary}");
    assert_eq!(summary["added"], 0, "{summary}");

    // List: the devices, never a secret; the table by default, JSON on request.
    let o = dmdctl(&url1, &["devices", "list"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = stdout(&o);
    assert!(out.starts_with("DEVICE"), "{out}");
    assert!(out.contains(dev_a) && out.contains(dev_b), "{out}");
    let o = dmdctl(&url1, &["devices", "list", "--json"]).await;
    let listed: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    for secret in [&a[0], &a[3], &b[0], &b[3]] {
        assert!(!stdout(&o).contains(secret.as_str()), "a secret listed");
    }
    // Add of a device that is there: refused (3), and nothing printed of its secrets.
    let o = tokio::process::Command::new(env!("CARGO_BIN_EXE_dmdctl"))
        .args([
            "devices",
            "add",
            dev_a,
            "--server-nonce-b64",
            "bg==",
            "--client-nonce-b64",
            "bg==",
        ])
        .env("DMD_ADMIN_URL", &url1)
        .env("DMD_ADMIN_TOKEN", TOKEN)
        .env("DMD_DEVICE_SERVER_SECRET", "new-secret-s")
        .env("DMD_DEVICE_CLIENT_SECRET", "new-secret-c")
        .output()
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(stdout(&o).contains("exists"), "{}", text(&o));
    assert!(!text(&o).contains("new-secret"), "{}", text(&o));

    // A device added at runtime is delegated: provisioning picks it up when the job arrives.
    let o = dmdctl(
        &url1,
        &[
            "--json",
            "start",
            "--role",
            "delegating",
            "--peer",
            D2,
            "--device",
            dev_a,
            "--type",
            "partial",
            "--scope",
            "./Vendor/Acme",
            "--watch",
            "--timeout",
            "120",
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "Active: {}", text(&o));
    let active = last_json(&o);
    assert_eq!(active["phase"], "ACTIVE", "{active}");
    // Every change was shown on the way.
    assert!(stdout(&o).lines().count() >= 3, "{}", text(&o));
    let session = active["session_id"].as_str().unwrap().to_string();

    // The table of delegations.
    let o = dmdctl(&url1, &["list", "--device", dev_a]).await;
    let out = stdout(&o);
    assert!(out.starts_with("PEER") && out.contains("ACTIVE"), "{out}");

    // Removing a device a delegation holds is refused.
    let o = dmdctl(&url1, &["devices", "remove", dev_a]).await;
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("hold"), "{}", text(&o));

    // Revoked as asked: 0; watching it afterwards tells how it ended: 12.
    let o = dmdctl(
        &url1,
        &["revoke", D2, &session, "--watch", "--timeout", "120"],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "Revoked: {}", text(&o));
    let o = dmdctl(&url1, &["watch", D2, &session]).await;
    assert_eq!(o.status.code(), Some(12), "{}", text(&o));

    // Now it may go.
    let o = dmdctl(&url1, &["devices", "remove", dev_a]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = dmdctl(&url1, &["devices", "remove", dev_a]).await;
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));

    // DMS-2 asks to be delegated a device DMS-1 does not manage (any more): declined at step 1, 404.
    let o = dmdctl(
        &url2,
        &[
            "--json",
            "start",
            "--role",
            "delegated",
            "--peer",
            D1,
            "--device",
            dev_a,
            "--type",
            "partial",
            "--scope",
            "./Vendor/Acme",
            "--watch",
            "--timeout",
            "120",
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(10), "declined: {}", text(&o));
    let declined = last_json(&o);
    assert_eq!(declined["phase"], "DECLINED", "{declined}");
    assert_eq!(declined["fault"]["status_code"], 404, "{declined}");
    assert_eq!(declined["fault"]["step"], 1, "{declined}");
    // And one it manages is delegated.
    let o = dmdctl(
        &url2,
        &[
            "start",
            "--role",
            "delegated",
            "--peer",
            D1,
            "--device",
            dev_b,
            "--type",
            "partial",
            "--scope",
            "./Vendor/Acme",
            "--watch",
            "--timeout",
            "120",
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "Active: {}", text(&o));

    // A wrong token: 4; an unreachable API: 1; a usage error: 2.
    let o = tokio::process::Command::new(env!("CARGO_BIN_EXE_dmdctl"))
        .args(["--token", "wrong", "devices", "list"])
        .env("DMD_ADMIN_URL", &url1)
        .output()
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let o = dmdctl("http://127.0.0.1:9", &["list"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let o = dmdctl(&url1, &["start", "--role", "sideways"]).await;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    w.stop().await.unwrap();
}

#[tokio::test]
async fn completions_for_each_shell_need_no_api() {
    for shell in ["bash", "zsh", "fish"] {
        let o = tokio::process::Command::new(env!("CARGO_BIN_EXE_dmdctl"))
            .args(["completions", shell])
            .env_remove("DMD_ADMIN_TOKEN")
            .env("DMD_ADMIN_URL", "http://127.0.0.1:9")
            .output()
            .await
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{shell}: {}", text(&o));
        let out = stdout(&o);
        assert!(
            out.contains("dmdctl") && out.contains("import"),
            "{shell}: {out}"
        );
    }
}
