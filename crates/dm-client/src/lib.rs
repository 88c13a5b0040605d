//! A simulated OMA DM 1.2 client fleet: many devices in one process, each with its own DM tree, that
//! speak SyncML DM 1.2 over real HTTP (PROTOCOL.md Part B, docs/device-side.md).
//!
//! - [`device`]: a [`Device`] (id, manufacturer, model, [`DmTree`](dm_protocol::tree::DmTree)), the
//!   default tree, and the DM Accounts read from the tree;
//! - [`executor`]: the pure command executor (ACLs per server, `Atomic`, `?prop=ACL`, …);
//! - [`session`]: one DM session over HTTP (package #1, credentials and nonces, the exchange);
//! - [`fleet`]: the [`Fleet`] of devices with its HTTP interface (package #0, connect, inspection);
//! - [`quirks`]: the field quirks of PROTOCOL.md B.6 a device can reproduce ([`Quirks`]).

pub mod device;
pub mod executor;
pub mod fleet;
pub mod quirks;
pub mod session;

pub use device::{Credential, DefaultAccount, Device, DeviceError};
pub use executor::{ExecOptions, Execution, execute, execute_with_options};
pub use fleet::{Accepted, ConnectError, Fleet, Package0Error, Timeout};
pub use quirks::{Quirks, UnknownQuirk};
pub use session::{AuthSide, Outcome, SessionConfig, SessionRecord, Trigger};
