//! Just enough RTP/RTCP header parsing for relaying and statistics.
//!
//! Written by hand rather than taken from the `rtp` crate because the relay must look
//! at a header without copying the packet into a `Bytes` or allocating: it reads four
//! fields in place from a borrowed buffer.

/// The fixed RTP header fields the relay uses (RFC 3550 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpHeader {
    /// Payload type (7 bits).
    pub payload_type: u8,
    /// Marker bit.
    pub marker: bool,
    /// Sequence number.
    pub sequence: u16,
    /// RTP timestamp.
    pub timestamp: u32,
    /// Synchronisation source.
    pub ssrc: u32,
}

/// Minimum size of an RTP packet: the fixed 12-byte header.
pub const RTP_HEADER_LEN: usize = 12;
/// Minimum size of an RTCP packet: the 8-byte common header plus SSRC.
pub const RTCP_HEADER_LEN: usize = 8;

impl RtpHeader {
    /// Parses the fixed header; `None` if the packet is too short or not RTP version 2.
    #[inline]
    pub fn parse(pkt: &[u8]) -> Option<Self> {
        if pkt.len() < RTP_HEADER_LEN || pkt[0] >> 6 != 2 {
            return None;
        }
        Some(Self {
            payload_type: pkt[1] & 0x7f,
            marker: pkt[1] & 0x80 != 0,
            sequence: u16::from_be_bytes([pkt[2], pkt[3]]),
            timestamp: u32::from_be_bytes([pkt[4], pkt[5], pkt[6], pkt[7]]),
            ssrc: u32::from_be_bytes([pkt[8], pkt[9], pkt[10], pkt[11]]),
        })
    }

    /// Writes the fixed header into `out[..12]` (version 2, no padding, extension or
    /// CSRCs); returns the number of bytes written, 0 if `out` is too short.
    pub fn write_to(&self, out: &mut [u8]) -> usize {
        if out.len() < RTP_HEADER_LEN {
            return 0;
        }
        out[0] = 0x80;
        out[1] = (self.payload_type & 0x7f) | if self.marker { 0x80 } else { 0 };
        out[2..4].copy_from_slice(&self.sequence.to_be_bytes());
        out[4..8].copy_from_slice(&self.timestamp.to_be_bytes());
        out[8..12].copy_from_slice(&self.ssrc.to_be_bytes());
        RTP_HEADER_LEN
    }
}

/// Checks an RTCP compound packet's first header (version 2, length at least 8); returns
/// the sender SSRC.
#[inline]
pub fn rtcp_sender_ssrc(pkt: &[u8]) -> Option<u32> {
    if pkt.len() < RTCP_HEADER_LEN || pkt[0] >> 6 != 2 {
        return None;
    }
    Some(u32::from_be_bytes([pkt[4], pkt[5], pkt[6], pkt[7]]))
}

/// RTP clock rate of a static payload type (RFC 3551 table 4/5); `None` for dynamic
/// types, whose rate only the SDP knows.
pub fn static_clock_rate(payload_type: u8) -> Option<u32> {
    match payload_type {
        0..=8 | 12 | 13 | 15 | 18 => Some(8000),
        9 => Some(8000), // G.722's RTP clock is 8000 by RFC 3551's historical error.
        10 | 11 => Some(44100),
        14 | 25 | 26 | 28 | 31..=34 => Some(90000),
        16 => Some(11025),
        17 => Some(22050),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_writes_round_trip() {
        let h = RtpHeader { payload_type: 8, marker: true, sequence: 65535, timestamp: 0xdead_beef, ssrc: 42 };
        let mut buf = [0u8; 12];
        assert_eq!(h.write_to(&mut buf), 12);
        assert_eq!(RtpHeader::parse(&buf), Some(h));
    }

    #[test]
    fn rejects_short_and_wrong_version() {
        assert_eq!(RtpHeader::parse(&[0x80; 11]), None);
        assert_eq!(RtpHeader::parse(&[0x40; 12]), None);
        assert_eq!(rtcp_sender_ssrc(&[0x80, 200, 0, 1]), None);
        assert_eq!(rtcp_sender_ssrc(&[0x81, 200, 0, 1, 0, 0, 0, 7]), Some(7));
    }
}
