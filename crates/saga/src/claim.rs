//! What a delegation holds on its device, for the store to enforce across delegations (ARCHITECTURE.md
//! rule 9): one delegation in progress per device, and an Active delegation's scope cannot overlap a new
//! one's. The decider sees one delegation at a time; the store sees all of a device's and asks here.

use dm_protocol::types::DmUri;

use crate::pb::{DelegationState, Phase};

/// A delegation's hold on its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Ended: holds nothing.
    None,
    /// In progress (or restoring): no other delegation of this device may start.
    Exclusive { device: String },
    /// Active: the scope belongs to the delegation; other scopes of the device are free.
    Scope { device: String, scope: Vec<String> },
}

/// The claim a stored delegation holds.
pub fn claim_of(state: &DelegationState) -> Claim {
    let device = state
        .device
        .as_ref()
        .map(|d| d.dev_id.clone())
        .unwrap_or_default();
    match state.phase() {
        Phase::Declined
        | Phase::Failed
        | Phase::Revoked
        | Phase::Expired
        | Phase::Released
        | Phase::Unspecified => Claim::None,
        Phase::Active | Phase::Finalizing | Phase::Releasing => Claim::Scope {
            device,
            scope: state.scope.clone(),
        },
        _ => Claim::Exclusive { device },
    }
}

fn overlaps(a: &[String], b: &[String]) -> bool {
    let parse = |s: &String| s.parse::<DmUri>().ok();
    a.iter().filter_map(parse).any(|x| {
        b.iter()
            .filter_map(parse)
            .any(|y| x.contains(&y) || y.contains(&x))
    })
}

/// Would a new delegation of `device` over `scope` conflict with the existing claims? (409 when it does.)
pub fn start_conflicts<'a>(
    existing: impl IntoIterator<Item = &'a Claim>,
    device: &str,
    scope: &[String],
) -> bool {
    existing.into_iter().any(|claim| match claim {
        Claim::None => false,
        Claim::Exclusive { device: d } => d == device,
        Claim::Scope {
            device: d,
            scope: held,
        } => d == device && overlaps(held, scope),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::Device;

    fn state(phase: Phase, scope: &[&str]) -> DelegationState {
        let mut s = DelegationState {
            device: Some(Device {
                dev_id: "IMEI:1".into(),
                ..Default::default()
            }),
            scope: scope.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        s.set_phase(phase);
        s
    }

    #[test]
    fn in_progress_delegations_hold_the_whole_device() {
        let claims = [claim_of(&state(Phase::Applying, &["./A"]))];
        assert!(start_conflicts(&claims, "IMEI:1", &["./B".into()]));
        assert!(!start_conflicts(&claims, "IMEI:2", &["./A".into()]));
    }

    #[test]
    fn active_delegations_hold_their_scope_only() {
        let claims = [claim_of(&state(Phase::Active, &["./A/B"]))];
        assert!(start_conflicts(&claims, "IMEI:1", &["./A".into()]));
        assert!(start_conflicts(&claims, "IMEI:1", &["./A/B/C".into()]));
        assert!(start_conflicts(&claims, "IMEI:1", &[".".into()]));
        assert!(!start_conflicts(
            &claims,
            "IMEI:1",
            &["./A/C".into(), "./AB".into()]
        ));
    }

    #[test]
    fn ended_delegations_hold_nothing() {
        for phase in [
            Phase::Failed,
            Phase::Revoked,
            Phase::Expired,
            Phase::Released,
            Phase::Declined,
        ] {
            let claims = [claim_of(&state(phase, &["."]))];
            assert!(!start_conflicts(
                &claims,
                "IMEI:1",
                &["."].map(String::from)
            ));
        }
    }
}
