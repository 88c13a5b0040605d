//! `dmd validate` as a user runs it: the real binary, real files, exit codes and output.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn dmd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmd"))
        .args(args)
        .output()
        .expect("run dmd")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

#[test]
fn every_example_is_valid_with_a_one_line_summary() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo("examples")).unwrap() {
        let path = entry.unwrap().path();
        // examples/config/ holds configuration files, checked by `dmd config check`.
        if path.is_dir() {
            continue;
        }
        let out = dmd(&["validate", path.to_str().unwrap()]);
        assert!(out.status.success(), "{}: {}", path.display(), stderr(&out));
        let text = stdout(&out);
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.starts_with("valid "), "{text}");
        checked += 1;
    }
    assert!(checked >= 14);
}

#[test]
fn the_summary_names_the_key_fields() {
    let out = dmd(&["validate", repo("examples/notif.xml").to_str().unwrap()]);
    let text = stdout(&out);
    for needle in [
        "DELEGATION_NOTIF",
        "dms1.operator.example",
        "9d2f0f7e-2b8a-4d6e-8a51-2a7e6b0c4d11",
        "Partial",
        "IMEI:490154203237518",
        "./Vendor/Acme/Apps",
    ] {
        assert!(text.contains(needle), "{needle} missing from: {text}");
    }
}

#[test]
fn an_invalid_file_says_where_why_and_the_status_and_exits_1() {
    let file = repo("crates/protocol/tests/golden/invalid/delegation/scope-dmacc.xml");
    let out = dmd(&["validate", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("DelegationMessage/DELEGATION_NOTIF/Del_Info/Scope"),
        "{err}"
    );
    assert!(err.contains("./DMAcc"), "{err}");
    assert!(err.contains("status 400"), "{err}");

    let tnds = repo("crates/protocol/tests/data/tnds/PerProviderSubscription_InvalidNode.xml");
    let out = dmd(&["validate", tnds.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("invalid TNDS document"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn json_prints_the_decoded_structure_without_secrets() {
    let out = dmd(&[
        "validate",
        "--json",
        repo("examples/prepared.xml").to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["kind"], "delegation_message");
    assert_eq!(v["document"]["body"]["message"], "DELEGATION_PREPARED");
    assert_eq!(v["document"]["body"]["temp_delegation_key"], "<redacted>");
    // Secrets of the examples never reach the output.
    for (file, secret) in [
        (
            "examples/prepared.xml",
            "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=",
        ),
        ("examples/start.xml", "c2VjcmV0LWNsaWVudC1wYXNzd29yZA=="),
        ("examples/dmacc.tnds.xml", "server-secret-of-dms1"),
        (
            "examples/package1.syncml.xml",
            "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg=",
        ),
    ] {
        let out = dmd(&["validate", "--json", repo(file).to_str().unwrap()]);
        assert!(out.status.success(), "{file}");
        assert!(!stdout(&out).contains(secret), "{file} printed a secret");
    }
}

#[test]
fn an_unreadable_file_exits_2() {
    let out = dmd(&["validate", "/nonexistent/file.xml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("cannot read"));
}
