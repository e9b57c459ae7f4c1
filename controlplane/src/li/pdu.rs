//! ETSI TS 103 221-2 X2/X3 PDUs: a 40-byte big-endian header, conditional attribute
//! TLVs, then the payload. Sans-IO: encode into a buffer, decode from a slice.

use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

/// Protocol version written: 5.0 (major << 8 | minor).
pub const VERSION: u16 = 0x0500;
/// Fixed header length.
pub const HEADER_LEN: usize = 40;

/// PDU types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum PduType {
    /// Signalling (X2).
    X2 = 1,
    /// Content (X3).
    X3 = 2,
    /// Keep-alive.
    Keepalive = 3,
    /// Keep-alive acknowledgement.
    KeepaliveAck = 4,
}

/// Payload formats used here.
pub mod format {
    /// An RTP packet.
    pub const RTP: u16 = 8;
    /// A SIP message.
    pub const SIP: u16 = 9;
}

/// Directions.
pub mod direction {
    /// Unknown.
    pub const UNKNOWN: u16 = 1;
    /// Sent to the target.
    pub const TO_TARGET: u16 = 2;
    /// Sent by the target.
    pub const FROM_TARGET: u16 = 3;
}

/// Conditional attribute types used here.
pub mod attr {
    /// Sequence number (u32).
    pub const SEQUENCE: u16 = 8;
    /// Timestamp: seconds (u32) and nanoseconds (u32).
    pub const TIMESTAMP: u16 = 9;
    /// Source IPv4 address.
    pub const SRC_IPV4: u16 = 10;
    /// Destination IPv4 address.
    pub const DST_IPV4: u16 = 11;
    /// Source IPv6 address.
    pub const SRC_IPV6: u16 = 12;
    /// Destination IPv6 address.
    pub const DST_IPV6: u16 = 13;
    /// Source port (u16).
    pub const SRC_PORT: u16 = 14;
    /// Destination port (u16).
    pub const DST_PORT: u16 = 15;
    /// IP protocol (u8).
    pub const IP_PROTOCOL: u16 = 16;
}

/// The fields of one PDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    /// Type.
    pub pdu_type: u16,
    /// Payload format.
    pub payload_format: u16,
    /// Direction.
    pub direction: u16,
    /// Task id.
    pub xid: [u8; 16],
    /// Correlation id.
    pub correlation: u64,
    /// Conditional attributes, `(type, value)` in order.
    pub attrs: Vec<(u16, Vec<u8>)>,
    /// Payload.
    pub payload: Vec<u8>,
}

impl Pdu {
    /// The attribute of a type, if present.
    pub fn attr(&self, t: u16) -> Option<&[u8]> {
        self.attrs.iter().find(|(k, _)| *k == t).map(|(_, v)| v.as_slice())
    }

    /// The sequence-number attribute.
    pub fn sequence(&self) -> Option<u32> {
        self.attr(attr::SEQUENCE).and_then(|v| Some(u32::from_be_bytes(v.try_into().ok()?)))
    }
}

/// What an X2 or X3 PDU is about.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    /// X2 or X3.
    pub pdu_type: PduType,
    /// Payload format.
    pub payload_format: u16,
    /// Direction.
    pub direction: u16,
    /// Task id.
    pub xid: [u8; 16],
    /// Correlation id.
    pub correlation: u64,
    /// Per-task sequence number.
    pub sequence: u32,
    /// When the packet was seen.
    pub at: SystemTime,
    /// Its source.
    pub src: SocketAddr,
    /// Its destination.
    pub dst: SocketAddr,
    /// IP protocol (17 UDP, 6 TCP).
    pub ip_protocol: u8,
}

fn tlv(out: &mut Vec<u8>, t: u16, v: &[u8]) {
    out.extend_from_slice(&t.to_be_bytes());
    out.extend_from_slice(&(v.len() as u16).to_be_bytes());
    out.extend_from_slice(v);
}

/// Appends an X2/X3 PDU carrying `payload` to `out`.
pub fn encode(out: &mut Vec<u8>, m: &Meta, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&(m.pdu_type as u16).to_be_bytes());
    out.extend_from_slice(&[0; 8]); // lengths, filled below
    out.extend_from_slice(&m.payload_format.to_be_bytes());
    out.extend_from_slice(&m.direction.to_be_bytes());
    out.extend_from_slice(&m.xid);
    out.extend_from_slice(&m.correlation.to_be_bytes());
    tlv(out, attr::SEQUENCE, &m.sequence.to_be_bytes());
    let t = m.at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut ts = [0u8; 8];
    ts[..4].copy_from_slice(&(t.as_secs() as u32).to_be_bytes());
    ts[4..].copy_from_slice(&t.subsec_nanos().to_be_bytes());
    tlv(out, attr::TIMESTAMP, &ts);
    for (addr, v4, v6, port) in [
        (m.src, attr::SRC_IPV4, attr::SRC_IPV6, attr::SRC_PORT),
        (m.dst, attr::DST_IPV4, attr::DST_IPV6, attr::DST_PORT),
    ] {
        match addr.ip() {
            IpAddr::V4(a) => tlv(out, v4, &a.octets()),
            IpAddr::V6(a) => tlv(out, v6, &a.octets()),
        }
        tlv(out, port, &addr.port().to_be_bytes());
    }
    tlv(out, attr::IP_PROTOCOL, &[m.ip_protocol]);
    let header_len = (out.len() - start) as u32;
    out.extend_from_slice(payload);
    out[start + 4..start + 8].copy_from_slice(&header_len.to_be_bytes());
    out[start + 8..start + 12].copy_from_slice(&(payload.len() as u32).to_be_bytes());
}

/// Appends a keep-alive (or its acknowledgement) PDU.
pub fn encode_keepalive(out: &mut Vec<u8>, ack: bool) {
    let t = if ack { PduType::KeepaliveAck } else { PduType::Keepalive };
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&(t as u16).to_be_bytes());
    out.extend_from_slice(&(HEADER_LEN as u32).to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&direction::UNKNOWN.to_be_bytes());
    out.extend_from_slice(&[0; 24]);
}

/// Decodes one PDU from the start of `buf`: `Ok(None)` if more bytes are needed, else
/// the PDU and its length.
pub fn decode(buf: &[u8]) -> Result<Option<(Pdu, usize)>, String> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let u16_at = |i: usize| u16::from_be_bytes([buf[i], buf[i + 1]]);
    let u32_at = |i: usize| u32::from_be_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    if u16_at(0) >> 8 == 0 {
        return Err(format!("bad version {:#06x}", u16_at(0)));
    }
    let header_len = u32_at(4) as usize;
    let payload_len = u32_at(8) as usize;
    if !(HEADER_LEN..=65536).contains(&header_len) || payload_len > 1 << 20 {
        return Err(format!("bad lengths {header_len}/{payload_len}"));
    }
    let total = header_len + payload_len;
    if buf.len() < total {
        return Ok(None);
    }
    let mut xid = [0u8; 16];
    xid.copy_from_slice(&buf[16..32]);
    let correlation = u64::from_be_bytes(buf[32..40].try_into().expect("8 bytes"));
    let mut attrs = Vec::new();
    let mut i = HEADER_LEN;
    while i < header_len {
        if i + 4 > header_len {
            return Err("truncated attribute".into());
        }
        let (t, l) = (u16_at(i), u16_at(i + 2) as usize);
        if i + 4 + l > header_len {
            return Err("attribute overruns the header".into());
        }
        attrs.push((t, buf[i + 4..i + 4 + l].to_vec()));
        i += 4 + l;
    }
    let pdu = Pdu {
        pdu_type: u16_at(2),
        payload_format: u16_at(12),
        direction: u16_at(14),
        xid,
        correlation,
        attrs,
        payload: buf[header_len..total].to_vec(),
    };
    Ok(Some((pdu, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_an_x3_pdu() {
        let m = Meta {
            pdu_type: PduType::X3,
            payload_format: format::RTP,
            direction: direction::FROM_TARGET,
            xid: [7; 16],
            correlation: 0x0102_0304_0506_0708,
            sequence: 42,
            at: UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 5),
            src: "192.0.2.1:4000".parse().unwrap(),
            dst: "[2001:db8::1]:30000".parse().unwrap(),
            ip_protocol: 17,
        };
        let mut out = Vec::new();
        encode(&mut out, &m, b"rtp!");
        assert_eq!(&out[0..4], &[0x05, 0x00, 0x00, 0x02]);
        assert_eq!(u32::from_be_bytes(out[8..12].try_into().unwrap()), 4);
        let (p, n) = decode(&out).unwrap().unwrap();
        assert_eq!(n, out.len());
        assert_eq!(p.payload, b"rtp!");
        assert_eq!(p.sequence(), Some(42));
        assert_eq!(p.direction, 3);
        assert_eq!(p.correlation, m.correlation);
        assert_eq!(p.attr(attr::SRC_IPV4), Some(&[192, 0, 2, 1][..]));
        assert_eq!(p.attr(attr::DST_PORT), Some(&30000u16.to_be_bytes()[..]));
        assert_eq!(p.attr(attr::TIMESTAMP).unwrap()[4..], 5u32.to_be_bytes());
        assert_eq!(decode(&out[..out.len() - 1]).unwrap(), None);
        let mut ka = Vec::new();
        encode_keepalive(&mut ka, false);
        assert_eq!(decode(&ka).unwrap().unwrap().0.pdu_type, 3);
        assert!(decode(&[0u8; 40]).is_err());
    }
}
