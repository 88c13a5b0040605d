//! How `dmdctl` shows things: aligned tables for people, JSON for programs, and the step view of one
//! delegation (redrawn in place on a terminal while it moves).

use dm_proto::admin::v1::DeviceInfo;
use dm_proto::saga::v1::{DelegationState, Phase, Role};
use serde_json::{Value, json};

/// Columns padded to their widest cell; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// A proto enum's name without its prefix, as operators read it: `PHASE_PREPARED_SENT` → `PREPARED_SENT`.
fn short(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_string()
}

pub fn phase_name(s: &DelegationState) -> String {
    short(s.phase().as_str_name(), "PHASE_")
}

fn fault_text(s: &DelegationState) -> String {
    s.fault
        .as_ref()
        .map(|f| {
            format!(
                "{} at step {}{}: {}",
                f.status_code,
                f.step,
                if f.from_peer { " (peer)" } else { "" },
                f.reason
            )
        })
        .unwrap_or_default()
}

const DELEGATION_HEADER: [&str; 8] = [
    "PEER", "SESSION", "ROLE", "TYPE", "PHASE", "DEVICE", "SCOPE", "FAULT",
];

fn delegation_row(s: &DelegationState) -> Vec<String> {
    vec![
        s.peer_server_id.clone(),
        s.session_id.clone(),
        short(s.role().as_str_name(), "ROLE_"),
        short(s.del_type().as_str_name(), "DEL_TYPE_"),
        phase_name(s),
        s.device
            .as_ref()
            .map(|d| d.dev_id.clone())
            .unwrap_or_default(),
        s.scope.join(","),
        fault_text(s),
    ]
}

pub fn delegations_table(states: &[DelegationState]) -> String {
    let rows: Vec<Vec<String>> = states.iter().map(delegation_row).collect();
    table(&DELEGATION_HEADER, &rows)
}

/// A delegation as JSON (a stored state holds no secret; the seen MsgIDs and timers are left out).
pub fn delegation_json(s: &DelegationState) -> Value {
    json!({
        "peer_server_id": s.peer_server_id,
        "session_id": s.session_id,
        "role": short(s.role().as_str_name(), "ROLE_"),
        "initiator": s.initiator,
        "type": short(s.del_type().as_str_name(), "DEL_TYPE_"),
        "phase": phase_name(s),
        "device": s.device.as_ref().map(|d| d.dev_id.clone()),
        "scope": s.scope,
        "not_after_ms": s.not_after_ms,
        "fault": s.fault.as_ref().map(|f| json!({
            "status_code": f.status_code,
            "step": f.step,
            "reason": f.reason,
            "from_peer": f.from_peer,
        })),
        "ending": short(s.ending().as_str_name(), "END_REASON_"),
        "created_ms": s.created_ms,
        "updated_ms": s.updated_ms,
        "trace_id": s.trace_id,
    })
}

pub fn devices_table(devices: &[DeviceInfo]) -> String {
    let yes = |b: bool| if b { "yes" } else { "-" }.to_string();
    let rows: Vec<Vec<String>> = devices
        .iter()
        .map(|d| {
            vec![
                d.dev_id.clone(),
                if d.unreadable {
                    "<unreadable: another master key?>".into()
                } else {
                    d.client_name.clone()
                },
                yes(d.session_pending),
                yes(d.secret_pending),
            ]
        })
        .collect();
    table(
        &["DEVICE", "CLIENT NAME", "SESSION", "SECRET PENDING"],
        &rows,
    )
}

pub fn device_json(d: &DeviceInfo) -> Value {
    json!({
        "dev_id": d.dev_id,
        "client_name": d.client_name,
        "session_pending": d.session_pending,
        "secret_pending": d.secret_pending,
        "unreadable": d.unreadable,
    })
}

/// The steps a delegation goes through on one side, each with the phases that wait in it.
fn steps(role: Role) -> Vec<(&'static str, &'static [Phase])> {
    match role {
        Role::Delegated => vec![
            (
                "1   proposal (NOTIF, RES)",
                &[Phase::NotifSent, Phase::Deciding],
            ),
            ("2   mutual authentication", &[Phase::Verifying]),
            (
                "3-6 START sent, device provisioned by the peer",
                &[Phase::StartSent],
            ),
            (
                "7-8 first DM session, credentials rotated",
                &[Phase::Sessioning],
            ),
            ("9   CONFIRM: active", &[Phase::Active]),
        ],
        _ => vec![
            (
                "1   proposal (NOTIF, RES)",
                &[Phase::NotifSent, Phase::Deciding],
            ),
            ("2   mutual authentication", &[Phase::Verifying]),
            ("3   peer's DM account (START)", &[Phase::AwaitStart]),
            ("4   temporary delegation key", &[Phase::KeyPending]),
            ("4-5 device plan (Atomic, read back)", &[Phase::Applying]),
            (
                "6-9 PREPARED, peer's first session, CONFIRM",
                &[Phase::PreparedSent, Phase::Finalizing],
            ),
            ("    active", &[Phase::Active]),
        ],
    }
}

/// The step view: a header line, one line per step (done, current, failed or to come), and how it
/// ended when it did.
pub fn step_view(s: &DelegationState, elapsed_ms: i64) -> String {
    let steps = steps(s.role());
    let phase = s.phase();
    let current = steps.iter().position(|(_, ps)| ps.contains(&phase));
    // Where a fault happened: the step named by its code's step number, else the last one reached.
    let failed_at = s.fault.as_ref().map(|f| {
        steps
            .iter()
            .position(|(label, _)| {
                label
                    .split_whitespace()
                    .next()
                    .is_some_and(|n| n.split('-').any(|x| x == f.step.to_string()))
            })
            .unwrap_or(0)
    });
    let after_active = matches!(
        phase,
        Phase::Revoking | Phase::Releasing | Phase::Revoked | Phase::Released | Phase::Expired
    );
    let mut out = format!(
        "{} {} {} {} device {} scope {}  [{} after {:.1}s]\n",
        s.peer_server_id,
        s.session_id,
        short(s.role().as_str_name(), "ROLE_"),
        short(s.del_type().as_str_name(), "DEL_TYPE_"),
        s.device.as_ref().map(|d| d.dev_id.as_str()).unwrap_or("-"),
        s.scope.join(","),
        phase_name(s),
        elapsed_ms.max(0) as f64 / 1000.0,
    );
    for (i, (label, _)) in steps.iter().enumerate() {
        let mark = match (current, failed_at) {
            _ if after_active => "done",
            (Some(c), _) if i < c => "done",
            (Some(c), _) if i == c && phase == Phase::Active => "done",
            (Some(c), _) if i == c => "now ",
            (None, Some(f)) if i < f => "done",
            (None, Some(f)) if i == f => "FAIL",
            _ => "    ",
        };
        out.push_str(&format!("  [{mark}] {label}\n"));
    }
    if let Some(fault) = s.fault.as_ref().filter(|_| current.is_none()) {
        out.push_str(&format!(
            "  {}: {} {}{}\n",
            phase_name(s),
            fault.status_code,
            fault.reason,
            if fault.from_peer {
                " (from the peer)"
            } else {
                ""
            }
        ));
    } else if current.is_none() {
        out.push_str(&format!("  {}\n", phase_name(s)));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use dm_proto::saga::v1::Fault;

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["A", "BB"],
            &[
                vec!["xxx".into(), "1".into()],
                vec!["y".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    BB\nxxx  1\ny    22\n");
    }

    #[test]
    fn the_step_view_marks_done_current_and_failed_steps() {
        let mut s = DelegationState::default();
        s.set_role(Role::Delegating);
        s.set_phase(Phase::Applying);
        let v = step_view(&s, 1500);
        assert!(v.contains("[done] 3   peer's"), "{v}");
        assert!(v.contains("[now ] 4-5 device plan"), "{v}");
        assert!(v.contains("[    ]     active"), "{v}");
        s.set_phase(Phase::Declined);
        s.fault = Some(Fault {
            status_code: 404,
            step: 1,
            reason: "device IMEI:1 is not managed by this server".into(),
            from_peer: false,
        });
        let v = step_view(&s, 0);
        assert!(v.contains("[FAIL] 1   proposal"), "{v}");
        assert!(v.contains("DECLINED: 404 device IMEI:1"), "{v}");
    }
}
