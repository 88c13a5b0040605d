//! Golden files: every shipped example and every valid variant decodes and survives a round trip;
//! every invalid file is refused with the expected status, field and reason.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use dm_protocol::document::{self, Document, Kind};
use dm_protocol::{DecodeError, delegation, package0, syncml, tnds};

fn dir(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn files(rel: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir(rel))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "xml" || e == "bin"))
        .collect();
    out.sort();
    out
}

/// Re-encodes a decoded document and checks that it decodes to the same value.
fn assert_round_trip(path: &Path, doc: &Document) {
    let again = match doc {
        Document::DelegationMessage(m) => Document::DelegationMessage(
            delegation::decode(delegation::encode(m).as_bytes()).unwrap(),
        ),
        Document::DelegationError(e) => Document::DelegationError(
            delegation::decode_error(delegation::encode_error(e).as_bytes()).unwrap(),
        ),
        Document::Tnds(t) => Document::Tnds(tnds::decode(tnds::encode(t).as_bytes()).unwrap()),
        Document::SyncMl(s) => {
            Document::SyncMl(syncml::decode(syncml::encode(s).as_bytes()).unwrap())
        }
        // Encoding package #0 needs the server's credentials: covered by `package0_example_verifies`.
        Document::Package0(_) => return,
    };
    assert_eq!(
        &again,
        doc,
        "{} does not survive encode/decode",
        path.display()
    );
}

#[test]
fn every_shipped_example_and_valid_variant_decodes_and_round_trips() {
    let mut kinds = BTreeSet::new();
    let mut messages = BTreeSet::new();
    let mut paths = files("../../examples");
    paths.extend(files("tests/golden/valid"));
    for path in paths {
        let bytes = std::fs::read(&path).unwrap();
        let doc = document::inspect(&bytes)
            .unwrap_or_else(|e| panic!("{} should be valid: {}", path.display(), e.error));
        kinds.insert(format!("{:?}", doc.kind()));
        if let Document::DelegationMessage(m) = &doc {
            messages.insert(m.body.name());
        }
        assert_round_trip(&path, &doc);
    }
    assert_eq!(
        messages.len(),
        8,
        "an example of every delegation message: {messages:?}"
    );
    assert_eq!(
        kinds.len(),
        5,
        "an example of every document kind: {kinds:?}"
    );
}

/// The texts between `open` and `close` that follow each `after` in `text`.
fn texts_after(text: &str, after: &str, open: &str, close: &str) -> Vec<String> {
    text.match_indices(after)
        .filter_map(|(at, _)| {
            let rest = &text[at + after.len()..];
            let start = rest.find(open)? + open.len();
            let len = rest[start..].find(close)?;
            Some(rest[start..start + len].trim().to_string())
        })
        .filter(|secret| !secret.is_empty())
        .collect()
}

#[test]
fn no_secret_of_a_valid_document_shows_in_debug_json_or_summary() {
    let mut paths = files("../../examples");
    paths.extend(files("tests/golden/valid"));
    let mut checked = 0;
    for path in paths {
        let bytes = std::fs::read(&path).unwrap();
        let Ok(text) = std::str::from_utf8(&bytes) else {
            continue;
        };
        let mut secrets = texts_after(
            text,
            "<NodeName>AAuthSecret</NodeName>",
            "<Value>",
            "</Value>",
        );
        secrets.extend(texts_after(text, "<Cred>", "<Data>", "</Data>"));
        secrets.extend(texts_after(
            text,
            "<DELEGATION_PREPARED>",
            "<TEMP_DELEGATION_KEY>",
            "</TEMP_DELEGATION_KEY>",
        ));
        let doc = document::inspect(&bytes).unwrap();
        let shown = format!(
            "{doc:?} {doc:#?} {} {}",
            serde_json::to_string(&doc).unwrap(),
            doc.summary()
        );
        for secret in &secrets {
            assert!(
                !shown.contains(secret.as_str()),
                "{}: a secret shows",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 5,
        "the examples carry secrets to check: {checked}"
    );
}

#[test]
fn package0_example_verifies_with_the_server_credential_of_the_example_account() {
    // examples/package0.bin was computed outside this code base (Python hashlib) from the SRVCRED of
    // examples/dmacc.tnds.xml: AAuthName, AAuthSecret and the base64-decoded AAuthData.
    let bytes = std::fs::read(dir("../../examples/package0.bin")).unwrap();
    let nonce = b"nonce-server-00";
    let n = package0::verify(
        &bytes,
        "dms1.operator.example",
        "server-secret-of-dms1",
        nonce,
    )
    .unwrap();
    assert_eq!(n.server_id, "dms1.operator.example");
    assert_eq!(n.session_id, 0x04d2);
    let err = package0::verify(&bytes, "dms1.operator.example", "wrong", nonce).unwrap_err();
    assert_eq!(err.status(), 401);
}

/// Reads `tests/golden/invalid/<kind>/expected.tsv` and checks every file it lists with `decode`.
fn check_invalid(kind: &str, decode: impl Fn(&[u8]) -> Result<String, DecodeError>) {
    let folder = format!("tests/golden/invalid/{kind}");
    let expected = std::fs::read_to_string(dir(&folder).join("expected.tsv")).unwrap();
    let mut listed = BTreeSet::new();
    let mut mismatches = Vec::new();
    for line in expected
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let cols: Vec<&str> = line.split('\t').collect();
        let [file, status, field, reason] = cols.as_slice() else {
            panic!("bad line in {folder}/expected.tsv: {line}");
        };
        let path = dir(&folder).join(file);
        listed.insert(path.canonicalize().unwrap());
        let bytes = std::fs::read(&path).unwrap();
        match decode(&bytes) {
            Ok(summary) => mismatches.push(format!("{file} was accepted: {summary}")),
            Err(e) if e.status().to_string() != *status || e.field != *field => mismatches.push(
                format!("{file}: got field '{}' status {}: {e}", e.field, e.status()),
            ),
            Err(e) if !e.reason.contains(reason) => {
                mismatches.push(format!("{file}: reason '{}' lacks '{reason}'", e.reason))
            }
            Err(_) => {}
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    // Every file of the folder is listed: a file without an expectation would test nothing.
    for path in files(&folder) {
        assert!(
            listed.contains(&path.canonicalize().unwrap()),
            "{} has no line in expected.tsv",
            path.display()
        );
    }
}

#[test]
fn invalid_delegation_messages_are_refused_with_the_expected_error() {
    check_invalid("delegation", |b| {
        delegation::decode(b).map(|m| format!("{m:?}"))
    });
}

#[test]
fn invalid_tnds_documents_are_refused_with_the_expected_error() {
    check_invalid("tnds", |b| tnds::decode(b).map(|t| format!("{t:?}")));
}

#[test]
fn invalid_syncml_messages_are_refused_with_the_expected_error() {
    check_invalid("syncml", |b| syncml::decode(b).map(|s| format!("{s:?}")));
}

#[test]
fn invalid_package0_notifications_are_refused_with_the_expected_error() {
    check_invalid("package0", |b| {
        package0::decode(b).map(|(_, n)| format!("{n:?}"))
    });
}

#[test]
fn kind_detection_names_what_was_found() {
    let notif = std::fs::read(dir("../../examples/notif.xml")).unwrap();
    assert_eq!(document::sniff(&notif), Some(Kind::DelegationMessage));
    let rejected = document::inspect(b"<html><body/></html>").unwrap_err();
    assert_eq!(rejected.kind, None);
    assert_eq!(rejected.status, 400);
}

#[test]
fn error_answer_carries_the_status_of_the_rejection() {
    let bytes = std::fs::read(dir("tests/golden/invalid/delegation/scope-dmacc.xml")).unwrap();
    let err = delegation::decode(&bytes).unwrap_err();
    let answer = delegation::DelegationError::from_decode_error(&err);
    assert_eq!(answer.status_code, 400);
    let xml = delegation::encode_error(&answer);
    assert_eq!(delegation::decode_error(xml.as_bytes()).unwrap(), answer);
}

#[test]
fn oversized_body_is_413() {
    let mut body = std::fs::read(dir("../../examples/notif.xml")).unwrap();
    let pad = format!("<!--{}-->", "x".repeat(64 * 1024));
    body.extend_from_slice(pad.as_bytes());
    let err = delegation::decode(&body).unwrap_err();
    assert_eq!(err.status(), 413, "{err}");
    let limits = delegation::Limits {
        max_bytes: 200 * 1024,
        ..Default::default()
    };
    assert!(delegation::decode_with_limits(&body, &limits).is_ok());
}
