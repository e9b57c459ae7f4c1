//! Errors of the LI function. Each has a stable code: the API answers with it and the
//! audit log records it as the outcome.

/// What went wrong with an LI action.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request was understood but its content is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The task exists already.
    #[error("{0}")]
    Conflict(String),
    /// No such task.
    #[error("{0}")]
    NotFound(String),
    /// A bound on tasks, targets or destinations would be exceeded.
    #[error("{0}")]
    Limit(String),
    /// The audit record of the action could not be written: nothing was done.
    #[error("the LI audit log cannot be written ({0}): nothing was changed")]
    Audit(std::io::Error),
    /// The action took effect (its intent is in the audit log) but its outcome record
    /// could not be written.
    #[error("the action took effect, but its outcome could not be written to the LI audit log ({0})")]
    AuditIncomplete(std::io::Error),
    /// The task state file could not be written: nothing was changed.
    #[error("the LI task state cannot be saved ({0}): nothing was changed")]
    State(std::io::Error),
    /// The task state file exists but cannot be read back (at start-up).
    #[error("LI task state {path}: {reason}")]
    StateUnreadable {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Starting a thread or opening a file at start-up failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The stable code of this error (API `code`, audit `outcome`).
    pub fn code(&self) -> &'static str {
        match self {
            Error::Invalid(_) => "invalid_request",
            Error::Conflict(_) => "conflict",
            Error::NotFound(_) => "not_found",
            Error::Limit(_) => "limit_exceeded",
            Error::Audit(_) => "audit_unavailable",
            Error::AuditIncomplete(_) => "audit_incomplete",
            Error::State(_) => "state_unavailable",
            Error::StateUnreadable { .. } | Error::Io(_) => "internal",
        }
    }
}
