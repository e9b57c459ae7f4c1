//! The control plane's error type.

/// Errors of the control plane. The API maps each to an HTTP status and a stable code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No free port pair is left in the configured range.
    #[error("no free RTP ports: all {0} port pairs of the configured range are in use")]
    PortsExhausted(usize),
    /// A worker's command queue is full: the data plane is overloaded.
    #[error("data plane busy: {0}")]
    Busy(String),
    /// No such session.
    #[error("no session with id {0:?}")]
    NotFound(String),
    /// The thing to create exists already.
    #[error("{0}")]
    Conflict(String),
    /// The request was understood but its content is invalid.
    #[error("{0}")]
    Invalid(String),
    /// A remote the relay must not send media to (its own listeners or media ports, or
    /// a denied network): refused so the relay never acts as a confused deputy.
    #[error("remote address denied: {0}")]
    RemoteDenied(String),
    /// A conference room holds as many participants as it may.
    #[error("{0}")]
    RoomFull(String),
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The store (credentials, registrations) failed or is unreachable.
    #[error("store unavailable: {0}")]
    Store(String),
    /// The data plane failed.
    #[error(transparent)]
    Dataplane(#[from] dataplane::Error),
    /// An I/O error (binding the API listener, reading the config).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
