//! The edges: packet buffers, io_uring buffer rings and socket addresses.

pub mod addr;
pub mod bufs;

use serde::{Deserialize, Serialize};

/// How a worker receives packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum IoMode {
    /// Probe the kernel at start and use `multishot` where it works, else `oneshot`.
    #[default]
    Auto,
    /// One multishot recvmsg per socket, buffers from a kernel-shared buffer ring
    /// (Linux 6.0+): a packet costs no submission at all.
    Multishot,
    /// One single-shot recvmsg per socket, re-armed after every packet, buffers from a
    /// userspace pool: the fallback for kernels without multishot or buffer rings.
    Oneshot,
}

impl IoMode {
    /// Stable name, as in configuration and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            IoMode::Auto => "auto",
            IoMode::Multishot => "multishot",
            IoMode::Oneshot => "oneshot",
        }
    }
}

impl std::str::FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "multishot" => Ok(IoMode::Multishot),
            "oneshot" => Ok(IoMode::Oneshot),
            _ => Err(format!("unknown io mode {s:?} (auto, multishot, oneshot)")),
        }
    }
}
