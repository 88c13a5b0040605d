//! Whatever the bytes, every decoder answers with a value or an error, never a panic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use dm_protocol::document;
use dm_protocol::tnds;
use proptest::prelude::*;

fn examples() -> Vec<Vec<u8>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        // examples/config/ holds configuration files, not documents.
        .filter(|p| p.is_file())
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    out.push(
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/tnds/PerProviderSubscription.xml"
        ))
        .unwrap(),
    );
    out
}

#[test]
fn every_prefix_of_every_document_is_handled() {
    for bytes in examples() {
        // Every cut of the small documents; a few thousand evenly spread cuts of the large one.
        let step = (bytes.len() / 3000).max(1);
        for cut in (0..bytes.len()).step_by(step) {
            let _ = document::inspect(&bytes[..cut]);
            let _ = tnds::decode(&bytes[..cut]);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = document::inspect(&bytes);
        let _ = tnds::decode(&bytes);
    }

    #[test]
    fn mutated_documents_never_panic(
        which in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let docs = examples();
        let mut bytes = docs[which.index(docs.len())].clone();
        for (at, b) in flips {
            let len = bytes.len();
            bytes[at.index(len)] = b;
        }
        let _ = document::inspect(&bytes);
    }

    #[test]
    fn xml_like_noise_never_panics(s in "(<[A-Za-z:]{1,8}( [a-z:]{1,5}=\"[^\"<]{0,5}\")?/?>|</[A-Za-z:]{1,8}>|&[a-z#0-9]{0,5};|[^<&]{0,6}|<!DOCTYPE[^>]{0,10}>|<!\\[CDATA\\[[^\\]]{0,5}\\]\\]>){0,40}") {
        for wrapped in [
            format!("<DelegationMessage xmlns=\"urn:oma:xml:dm:delegation:1.0\" Version=\"1.0\">{s}</DelegationMessage>"),
            format!("<MgmtTree xmlns=\"syncml:dmddf1.2\">{s}</MgmtTree>"),
            format!("<SyncML xmlns=\"SYNCML:SYNCML1.2\">{s}</SyncML>"),
        ] {
            let _ = document::inspect(wrapped.as_bytes());
        }
    }
}
