//! Which service carries out which command of the saga: `cmd.<service>.<verb>`.

use dm_saga::pb::{Command, command};

/// The (service, verb) of a command; `None` for what the orchestrator keeps itself (timers, audit).
pub fn route(cmd: &Command) -> Option<(&'static str, &'static str)> {
    Some(match cmd.kind.as_ref()? {
        command::Kind::Send(_) => ("gateway", "send"),
        command::Kind::AskAcceptance(_) => ("notification", "ask"),
        command::Kind::VerifyPeer(_) => ("auth", "verify_peer"),
        command::Kind::CreateTempKey(_) => ("auth", "create_key"),
        command::Kind::ForgetTempKey(_) => ("auth", "forget_key"),
        command::Kind::Purge(_) => ("auth", "purge"),
        command::Kind::ApplyPlan(_) => ("provisioning", "apply"),
        command::Kind::RestoreDevice(_) => ("provisioning", "restore"),
        command::Kind::RunFirstSession(_) => ("provisioning", "first_session"),
        command::Kind::FinalizeDevice(_) => ("provisioning", "finalize"),
        command::Kind::ArmTimer(_) | command::Kind::CancelTimer(_) | command::Kind::Audit(_) => {
            return None;
        }
    })
}
