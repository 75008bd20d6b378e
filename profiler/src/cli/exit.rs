//! The command's exit status by what failed, so that scripts and tests decide on the kind of
//! failure, not on its text (docs/commands.md lists them).

use crate::{error::BadInput, kernel::MissingHook, lab};

/// A flag, name or file to correct (also the command-line parser's refusals).
pub const BAD_INPUT: u8 = 2;
/// `run`: the kernel lost hop events (without --allow-loss).
pub const LOST_EVENTS: u8 = 3;
/// The lab cannot be built on this machine, or not as asked (its placement).
pub const CANNOT_BUILD: u8 = 4;
/// The lab is in use by another command, or already up (`lab up`).
pub const BUSY: u8 = 5;
/// A hook the command was asked for cannot attach on this kernel.
pub const MISSING_HOOK: u8 = 6;

/// The exit status for `e`, by the first typed error of its chain (1: any other failure).
pub fn of(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if cause.is::<BadInput>() {
            return BAD_INPUT;
        }
        if cause.is::<lab::CannotBuild>() {
            return CANNOT_BUILD;
        }
        if cause.is::<lab::Busy>() || cause.is::<lab::AlreadyUp>() {
            return BUSY;
        }
        if cause.is::<MissingHook>() {
            return MISSING_HOOK;
        }
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    #[test]
    fn each_kind_of_failure_has_its_status_at_any_layer() {
        let bad = crate::error::bad_input("--to takes NETNS:IP");
        assert_eq!(of(&bad), BAD_INPUT);
        let placement: anyhow::Error = lab::CannotBuild::Placement("veth".into()).into();
        assert_eq!(of(&placement.context("run --lab veth")), CANNOT_BUILD);
        let busy: anyhow::Error = lab::Busy {
            lab: "bridge".into(),
            holder: "pid 7".into(),
        }
        .into();
        assert_eq!(of(&busy), BUSY);
        let up: anyhow::Error = lab::AlreadyUp {
            lab: "bridge".into(),
        }
        .into();
        assert_eq!(of(&up.context("lab up bridge")), BUSY);
        let missing: anyhow::Error = MissingHook("--uprobe /bin/true:nosuch".into()).into();
        assert_eq!(of(&missing.context("run")), MISSING_HOOK);
        let other = Err::<(), _>(std::io::Error::other("netlink")).context("lab up");
        assert_eq!(of(&other.unwrap_err()), 1);
    }
}
