//! Input the user can correct, typed so that the command's exit status says it (cli/exit.rs)
//! and callers decide on it without reading text. The failures of one layer are typed there:
//! `lab::CannotBuild`, `lab::Busy`, `kernel::MissingHook`.

/// A flag, a name or a file that is not what it must be: the command exits with 2, as for the
/// refusals of the command-line parser.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// A [`BadInput`] error saying `what`.
pub fn bad_input(what: impl Into<String>) -> anyhow::Error {
    BadInput(what.into()).into()
}
