//! Golden files: every shipped example and every valid variant decodes and survives a round trip;
//! every invalid file is refused with the expected status, field and reason.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use dm_protocol::delegation;

fn dir(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn files(rel: &str, ext: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir(rel))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    out.sort();
    out
}

fn is_delegation(bytes: &[u8]) -> bool {
    String::from_utf8_lossy(bytes).contains("DelegationMessage")
}

#[test]
fn shipped_delegation_examples_decode_and_round_trip() {
    let mut seen = std::collections::BTreeSet::new();
    let mut paths = files("../../examples", "xml");
    paths.extend(files("tests/golden/valid", "xml"));
    for path in paths {
        let bytes = std::fs::read(&path).unwrap();
        if !is_delegation(&bytes) {
            continue;
        }
        let message = delegation::decode(&bytes)
            .unwrap_or_else(|e| panic!("{} should be valid: {e}", path.display()));
        seen.insert(message.body.name());
        let again = delegation::encode(&message);
        assert_eq!(
            delegation::decode(again.as_bytes()).unwrap(),
            message,
            "{} does not survive encode/decode",
            path.display()
        );
    }
    assert_eq!(seen.len(), 8, "an example of every message kind: {seen:?}");
}

#[test]
fn error_answer_example_round_trips() {
    let bytes = std::fs::read(dir("../../examples/error.xml")).unwrap();
    let e = delegation::decode_error(&bytes).unwrap();
    assert_eq!(e.status_code, 409);
    assert_eq!(
        delegation::decode_error(delegation::encode_error(&e).as_bytes()).unwrap(),
        e
    );
}

#[test]
fn invalid_files_are_refused_with_the_expected_error() {
    let expected = std::fs::read_to_string(dir("tests/golden/invalid/expected.tsv")).unwrap();
    let mut checked = 0;
    let mut mismatches = Vec::new();
    for line in expected
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let cols: Vec<&str> = line.split('\t').collect();
        let [file, status, field, reason] = cols.as_slice() else {
            panic!("bad line in expected.tsv: {line}");
        };
        let bytes = std::fs::read(dir("tests/golden/invalid").join(file)).unwrap();
        checked += 1;
        match delegation::decode(&bytes) {
            Ok(m) => mismatches.push(format!("{file} was accepted: {m:?}")),
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
    // Every invalid file is listed: a file without an expectation would test nothing.
    assert_eq!(checked, files("tests/golden/invalid", "xml").len());
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
