//! The conference engine: audio mixing on the data plane's workers.
//!
//! [`room::Room`] is the sans-IO mixer; the worker feeds it RTP and drives its 20 ms
//! tick from the ring's wait deadline.

pub mod codec;
pub mod g711;
pub mod jitter;
pub mod room;

pub use codec::Codec;
pub use room::{MovedParticipant, ParticipantId, ParticipantStats, Room, RoomConfig};
