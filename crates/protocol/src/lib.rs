//! The protocol core of the delegation system: pure codecs and rules, no IO and no async.
//!
//! - [`delegation`]: the server-to-server delegation messages (PROTOCOL.md Part A);
//! - [`tnds`] and [`dmacc`]: TNDS documents and the DM Account they carry (B.2, B.5);
//! - [`acl`] and [`tree`]: the ACL grammar and access decisions on a DM tree (B.3);
//! - [`syncml`], [`auth`] and [`package0`]: SyncML DM 1.2 session messages, their authentication and
//!   the package #0 notification (B.1, B.4).
//!
//! Every decoder returns a [`DecodeError`] naming the field, the reason and the status code to answer.

pub mod acl;
pub mod auth;
pub mod codes;
pub mod delegation;
pub mod dmacc;
pub mod document;
pub mod error;
pub mod package0;
pub mod syncml;
pub mod tnds;
pub mod tree;
pub mod types;
pub(crate) mod xml;

pub use error::{DecodeError, ErrorKind};
