//! The library half of `dmd`: how the services of a deployment are started together (`deployment`), the
//! demo (`demo`), and its throw-away PKI (`pki`). The binary (`main.rs`) is a thin command line over it.

pub mod bench;
pub mod chaos;
pub mod config;
pub mod demo;
pub mod deployment;
pub mod inventory;
pub mod pki;
pub mod serve;
