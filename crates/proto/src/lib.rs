//! The protobuf types of the delegation system, generated at build time from `proto/` by prost and
//! protox. One module per versioned package; types are never changed once released, only extended.

/// `dmd.saga.v1`: the durable state of a delegation, the events that drive it, the commands it produces.
pub mod saga {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_debug_implementations)]
        include!(concat!(env!("OUT_DIR"), "/dmd.saga.v1.rs"));
    }
}

/// `dmd.bus.v1`: what the services of a deployment say to each other on the bus.
pub mod bus {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_debug_implementations)]
        include!(concat!(env!("OUT_DIR"), "/dmd.bus.v1.rs"));
    }
}

/// `dmd.admin.v1`: the operator API (gRPC).
pub mod admin {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_debug_implementations)]
        include!(concat!(env!("OUT_DIR"), "/dmd.admin.v1.rs"));
    }
}
