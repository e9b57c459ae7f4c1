//! A conference room, sans IO: RTP in per participant, one tick every 20 ms out.
//!
//! Each tick every participant's jitter buffer yields a frame (or a concealed or silent
//! one); the loudest active talkers (at most `max_talkers`, with hysteresis) are summed
//! in 32 bits; each talker gets the sum minus its own voice, clipped and encoded with
//! its own encoder, and every other participant gets **one shared mix encoded once per
//! codec**, so the cost grows with talkers, not with participants.

use super::codec::{resample, Codec, Decoder, Encoder, FB_FRAME};
use super::jitter::{JitterBuffer, JitterStats, Pop};
use crate::rtp::RtpHeader;
use serde::Serialize;

/// RFC 6464 level (−dBov) at or below which a non-talker's Opus frame is not decoded.
const SILENT_DBOV: u8 = 50;

/// A participant's id within its room.
pub type ParticipantId = u32;

/// A participant in transit between rooms (opaque).
pub struct MovedParticipant(Box<Participant>);

impl std::fmt::Debug for MovedParticipant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MovedParticipant({})", self.0.id)
    }
}

impl MovedParticipant {
    /// Its id.
    pub fn id(&self) -> ParticipantId {
        self.0.id
    }
}

/// Room settings.
#[derive(Debug, Clone, Copy)]
pub struct RoomConfig {
    /// Talkers mixed at most.
    pub max_talkers: usize,
    /// Mean absolute sample value above which a participant is talking (16-bit linear).
    pub talk_threshold: u32,
    /// Ticks a talker stays a talker after falling below the threshold.
    pub hangover_ticks: u32,
    /// Opus encoder complexity (0–10). 1 by default: encoding is the mixer's main cost,
    /// and at 24 kbit/s voice the higher settings buy little.
    pub opus_complexity: i32,
    /// Initial jitter buffer depth in frames.
    pub jitter_depth: u8,
    /// Largest jitter buffer depth in frames.
    pub jitter_max: u8,
}

impl Default for RoomConfig {
    fn default() -> Self {
        Self {
            max_talkers: 3,
            talk_threshold: 160,
            hangover_ticks: 25,
            opus_complexity: 1,
            jitter_depth: 2,
            jitter_max: 8,
        }
    }
}

/// Why a participant's packet was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Not RTP.
    Malformed,
    /// Not the negotiated payload type.
    PayloadType,
    /// No such participant.
    Unknown,
}

struct Participant {
    id: ParticipantId,
    codec: Codec,
    payload_type: u8,
    ssrc: u32,
    jb: JitterBuffer,
    dec: Decoder,
    enc: Option<Encoder>,
    mute: bool,
    deaf: bool,
    frame: Vec<i16>,
    native: Vec<i16>,
    last_native: Vec<i16>,
    up_last: i16,
    down_last: i16,
    plc_run: u8,
    has_audio: bool,
    energy: u32,
    talk_until: u64,
    talker: bool,
    seq: u16,
    ts: u32,
    started: bool,
    packets_out: u64,
    octets_out: u64,
    malformed: u64,
    bad_pt: u64,
    decode_errors: u64,
}

/// Statistics of one participant.
#[derive(Debug, Clone, Serialize)]
pub struct ParticipantStats {
    /// Id.
    pub id: ParticipantId,
    /// Codec.
    pub codec: &'static str,
    /// Muted (not mixed).
    pub mute: bool,
    /// Deaf (sent nothing).
    pub deaf: bool,
    /// Currently mixed as a talker.
    pub talking: bool,
    /// Level of the last frame (mean absolute sample).
    pub level: u32,
    /// Packets received into the jitter buffer.
    pub packets_in: u64,
    /// Packets sent.
    pub packets_out: u64,
    /// Frames concealed (lost or late).
    pub concealed: u64,
    /// Packets too late to play.
    pub late: u64,
    /// Not RTP.
    pub malformed: u64,
    /// Wrong payload type.
    pub bad_payload_type: u64,
    /// Payloads the decoder rejected.
    pub decode_errors: u64,
    /// Jitter buffer depth (frames).
    pub jitter_depth: u8,
}

/// A room.
pub struct Room {
    cfg: RoomConfig,
    participants: Vec<Participant>,
    tick: u64,
    total: Vec<i32>,
    mixed: Vec<i16>,
    native: Vec<i16>,
    shared: [Option<Encoder>; 3],
    shared_payload: [Vec<u8>; 3],
    shared_len: [usize; 3],
    shared_ready: [bool; 3],
    talkers: usize,
    talking: Vec<(u32, usize)>,
}

impl std::fmt::Debug for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Room").field("participants", &self.participants.len()).field("tick", &self.tick).finish()
    }
}

/// RTP payload offset after CSRCs and a header extension, and the payload end before
/// padding; also the RFC 6464 audio level if a one-byte extension carries it (id 1).
fn payload_bounds(pkt: &[u8]) -> Option<(usize, usize, Option<u8>)> {
    let cc = (pkt[0] & 0x0f) as usize;
    let mut off = 12 + 4 * cc;
    let mut level = None;
    if pkt[0] & 0x10 != 0 {
        let h = pkt.get(off..off + 4)?;
        let words = u16::from_be_bytes([h[2], h[3]]) as usize;
        let ext = pkt.get(off + 4..off + 4 + 4 * words)?;
        if h[0] == 0xbe && h[1] == 0xde {
            // One-byte header extensions: id(4) len-1(4) data.
            let mut i = 0;
            while i < ext.len() {
                let (id, len) = (ext[i] >> 4, (ext[i] & 0x0f) as usize + 1);
                if id == 0 {
                    i += 1;
                    continue;
                }
                if id == 1 && i + 1 < ext.len() {
                    level = Some(ext[i + 1] & 0x7f);
                }
                i += 1 + len;
            }
        }
        off += 4 + 4 * words;
    }
    let mut end = pkt.len();
    if pkt[0] & 0x20 != 0 {
        let pad = *pkt.last()? as usize;
        end = end.checked_sub(pad)?;
    }
    (off <= end).then_some((off, end, level))
}

impl Room {
    /// An empty room.
    pub fn new(cfg: RoomConfig) -> Self {
        Self {
            cfg,
            participants: Vec::new(),
            tick: 0,
            total: vec![0; FB_FRAME],
            mixed: vec![0; FB_FRAME],
            native: vec![0; FB_FRAME],
            shared: [None, None, None],
            shared_payload: [vec![0; 1500], vec![0; 1500], vec![0; 1500]],
            shared_len: [0; 3],
            shared_ready: [false; 3],
            talkers: 0,
            talking: Vec::with_capacity(64),
        }
    }

    /// Number of participants.
    pub fn len(&self) -> usize {
        self.participants.len()
    }

    /// True when nobody is in the room.
    pub fn is_empty(&self) -> bool {
        self.participants.is_empty()
    }

    /// Talkers mixed in the last tick.
    pub fn talkers(&self) -> usize {
        self.talkers
    }

    /// The mixing rate: 48 kHz once anyone speaks Opus, else 8 kHz.
    pub fn rate(&self) -> u32 {
        if self.participants.iter().any(|p| p.codec == Codec::Opus) {
            48000
        } else {
            8000
        }
    }

    /// Adds a participant.
    pub fn add(&mut self, id: ParticipantId, codec: Codec, payload_type: u8, ssrc: u32) -> Result<(), opus::Error> {
        self.remove(id);
        self.participants.push(Participant {
            id,
            codec,
            payload_type,
            ssrc,
            jb: JitterBuffer::new(self.cfg.jitter_depth, self.cfg.jitter_max),
            dec: Decoder::new(codec)?,
            enc: None,
            mute: false,
            deaf: false,
            frame: vec![0; FB_FRAME],
            native: vec![0; FB_FRAME],
            last_native: vec![0; FB_FRAME],
            up_last: 0,
            down_last: 0,
            plc_run: 0,
            has_audio: false,
            energy: 0,
            talk_until: 0,
            talker: false,
            seq: (ssrc >> 16) as u16,
            ts: ssrc.rotate_left(7),
            started: false,
            packets_out: 0,
            octets_out: 0,
            malformed: 0,
            bad_pt: 0,
            decode_errors: 0,
        });
        Ok(())
    }

    /// Takes a participant out with all its state (jitter buffer, codecs, outgoing
    /// sequence and timestamp), to [`Room::insert`] it into another room: the far end
    /// sees one continuous stream.
    pub fn take(&mut self, id: ParticipantId) -> Option<MovedParticipant> {
        let i = self.participants.iter().position(|p| p.id == id)?;
        Some(MovedParticipant(Box::new(self.participants.swap_remove(i))))
    }

    /// Puts a participant taken from another room into this one.
    pub fn insert(&mut self, p: MovedParticipant) {
        let mut p = *p.0;
        // The new room's rate may differ: resampling state starts over.
        p.up_last = 0;
        p.down_last = 0;
        p.talk_until = 0;
        p.talker = false;
        self.remove(p.id);
        self.participants.push(p);
    }

    /// Removes a participant; false if absent.
    pub fn remove(&mut self, id: ParticipantId) -> bool {
        let n = self.participants.len();
        self.participants.retain(|p| p.id != id);
        n != self.participants.len()
    }

    /// Sets mute and/or deaf.
    pub fn set_flags(&mut self, id: ParticipantId, mute: Option<bool>, deaf: Option<bool>) -> bool {
        let Some(p) = self.participants.iter_mut().find(|p| p.id == id) else { return false };
        if let Some(m) = mute {
            p.mute = m;
        }
        if let Some(d) = deaf {
            p.deaf = d;
        }
        true
    }

    /// Takes an RTP packet from a participant.
    pub fn on_rtp(&mut self, id: ParticipantId, pkt: &[u8]) -> Result<(), RejectReason> {
        let p = self.participants.iter_mut().find(|p| p.id == id).ok_or(RejectReason::Unknown)?;
        let Some(h) = RtpHeader::parse(pkt) else {
            p.malformed += 1;
            return Err(RejectReason::Malformed);
        };
        if h.payload_type != p.payload_type {
            p.bad_pt += 1;
            return Err(RejectReason::PayloadType);
        }
        let Some((off, end, level)) = payload_bounds(pkt) else {
            p.malformed += 1;
            return Err(RejectReason::Malformed);
        };
        p.jb.push(h.sequence, &pkt[off..end], level);
        Ok(())
    }

    /// One 20 ms tick: mixes and emits one RTP packet per listening participant through
    /// `emit(participant, packet)`.
    pub fn tick(&mut self, emit: &mut dyn FnMut(ParticipantId, &[u8])) {
        self.tick += 1;
        let rate = self.rate();
        let n = rate as usize / 50;
        // 1. A frame from everyone.
        for p in &mut self.participants {
            let native_n = p.codec.frame();
            let got = match p.jb.pop() {
                // RFC 6464 says this frame is near silence (quieter than −50 dBov) and
                // the participant is not talking: skip decoding it. Opus decoding is the
                // mixer's largest cost after encoding, and most participants are silent.
                Pop::Frame(_, Some(level)) if level >= SILENT_DBOV && !p.talker && p.codec == Codec::Opus => false,
                Pop::Frame(payload, _level) => match p.dec.decode(payload, &mut p.native[..native_n]) {
                    Some(k) if k == native_n => {
                        p.plc_run = 0;
                        p.last_native[..native_n].copy_from_slice(&p.native[..native_n]);
                        true
                    }
                    _ => {
                        p.decode_errors += 1;
                        conceal(p, native_n)
                    }
                },
                Pop::Lost => conceal(p, native_n),
                Pop::Idle => false,
            };
            p.has_audio = got;
            if got {
                resample(&p.native[..native_n], p.codec.rate(), &mut p.frame[..n], rate, &mut p.up_last);
                p.energy = (p.frame[..n].iter().map(|&s| (s as i32).unsigned_abs()).sum::<u32>()) / n as u32;
            } else {
                p.frame[..n].fill(0);
                p.energy = 0;
            }
            if !p.mute && p.has_audio && p.energy > self.cfg.talk_threshold {
                p.talk_until = self.tick + self.cfg.hangover_ticks as u64;
            }
            p.talker = !p.mute && p.has_audio && self.tick <= p.talk_until;
        }
        // 2. At most K talkers: the loudest of those talking.
        let mut talking = std::mem::take(&mut self.talking);
        talking.clear();
        talking.extend(self.participants.iter().enumerate().filter(|(_, p)| p.talker).map(|(i, p)| (p.energy, i)));
        if talking.len() > self.cfg.max_talkers {
            talking.sort_unstable_by_key(|t| std::cmp::Reverse(t.0));
            for &(_, i) in &talking[self.cfg.max_talkers..] {
                self.participants[i].talker = false;
            }
            talking.truncate(self.cfg.max_talkers);
        }
        self.talkers = talking.len();
        // 3. The sum, in 32 bits.
        self.total[..n].fill(0);
        for &(_, i) in &talking {
            for (t, &s) in self.total[..n].iter_mut().zip(&self.participants[i].frame[..n]) {
                *t += s as i32;
            }
        }
        self.talking = talking;
        // 4. Out: N−1 for talkers, the shared mix (encoded once per codec) for the rest.
        self.shared_ready = [false; 3];
        let mut pkt = [0u8; 1500];
        for idx in 0..self.participants.len() {
            if self.participants[idx].deaf {
                continue;
            }
            let codec = self.participants[idx].codec;
            let native_n = codec.frame();
            let payload_len;
            if self.participants[idx].talker {
                let p = &mut self.participants[idx];
                for ((m, &t), &own) in self.mixed[..n].iter_mut().zip(&self.total[..n]).zip(&p.frame[..n]) {
                    *m = (t - own as i32).clamp(i16::MIN as i32, i16::MAX as i32) as i16;
                }
                resample(&self.mixed[..n], rate, &mut self.native[..native_n], codec.rate(), &mut p.down_last);
                if p.enc.is_none() {
                    p.enc = Encoder::new(codec, self.cfg.opus_complexity).ok();
                }
                let Some(enc) = p.enc.as_mut() else { continue };
                payload_len = enc.encode(&self.native[..native_n], &mut pkt[12..]);
            } else {
                let c = codec.index();
                if !self.shared_ready[c] {
                    for (m, &t) in self.mixed[..n].iter_mut().zip(&self.total[..n]) {
                        *m = t.clamp(i16::MIN as i32, i16::MAX as i32) as i16;
                    }
                    let mut last = 0;
                    resample(&self.mixed[..n], rate, &mut self.native[..native_n], codec.rate(), &mut last);
                    if self.shared[c].is_none() {
                        self.shared[c] = Encoder::new(codec, self.cfg.opus_complexity).ok();
                    }
                    let Some(enc) = self.shared[c].as_mut() else { continue };
                    self.shared_len[c] = enc.encode(&self.native[..native_n], &mut self.shared_payload[c][..1400]);
                    self.shared_ready[c] = true;
                }
                let len = self.shared_len[c];
                pkt[12..12 + len].copy_from_slice(&self.shared_payload[c][..len]);
                payload_len = len;
            }
            if payload_len == 0 {
                continue;
            }
            let p = &mut self.participants[idx];
            let h = RtpHeader {
                payload_type: p.payload_type,
                marker: !p.started,
                sequence: p.seq,
                timestamp: p.ts,
                ssrc: p.ssrc,
            };
            h.write_to(&mut pkt);
            p.started = true;
            p.seq = p.seq.wrapping_add(1);
            p.ts = p.ts.wrapping_add(native_n as u32);
            p.packets_out += 1;
            p.octets_out += payload_len as u64;
            emit(p.id, &pkt[..12 + payload_len]);
        }
    }

    /// An RTCP sender report for a participant (RFC 3550 §6.4.1), written into `out`.
    pub fn sender_report(&self, id: ParticipantId, ntp: u64, out: &mut [u8; 28]) -> bool {
        let Some(p) = self.participants.iter().find(|p| p.id == id) else { return false };
        if !p.started {
            return false;
        }
        out[0] = 0x80;
        out[1] = 200;
        out[2..4].copy_from_slice(&6u16.to_be_bytes());
        out[4..8].copy_from_slice(&p.ssrc.to_be_bytes());
        out[8..16].copy_from_slice(&ntp.to_be_bytes());
        out[16..20].copy_from_slice(&p.ts.to_be_bytes());
        out[20..24].copy_from_slice(&(p.packets_out as u32).to_be_bytes());
        out[24..28].copy_from_slice(&(p.octets_out as u32).to_be_bytes());
        true
    }

    /// Every participant's statistics.
    pub fn stats(&self) -> Vec<ParticipantStats> {
        self.participants
            .iter()
            .map(|p| {
                let j: JitterStats = p.jb.stats();
                ParticipantStats {
                    id: p.id,
                    codec: p.codec.name(),
                    mute: p.mute,
                    deaf: p.deaf,
                    talking: p.talker,
                    level: p.energy,
                    packets_in: j.received,
                    packets_out: p.packets_out,
                    concealed: j.concealed,
                    late: j.late,
                    malformed: p.malformed,
                    bad_payload_type: p.bad_pt,
                    decode_errors: p.decode_errors,
                    jitter_depth: j.depth,
                }
            })
            .collect()
    }
}

/// Conceals a missing frame: Opus's PLC, or for G.711 the last frame again, halved in
/// level each time, silent after three.
fn conceal(p: &mut Participant, native_n: usize) -> bool {
    if let Some(k) = p.dec.conceal(&mut p.native[..native_n]) {
        return k == native_n;
    }
    p.plc_run = p.plc_run.saturating_add(1);
    if p.plc_run > 3 {
        return false;
    }
    let shift = p.plc_run as u32;
    for (o, &s) in p.native[..native_n].iter_mut().zip(&p.last_native[..native_n]) {
        *o = s >> shift;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mixer::g711;

    const TONES: [f64; 3] = [400.0, 700.0, 1100.0];

    fn tone(freq: f64, rate: u32, frame: u64, n: usize, amp: f64) -> Vec<i16> {
        (0..n)
            .map(|i| {
                let t = (frame * n as u64 + i as u64) as f64 / rate as f64;
                (amp * (2.0 * std::f64::consts::PI * freq * t).sin()) as i16
            })
            .collect()
    }

    /// Goertzel power of `freq` in `x`, normalised by length.
    pub(crate) fn goertzel(x: &[f64], freq: f64, rate: f64) -> f64 {
        let k = 2.0 * (2.0 * std::f64::consts::PI * freq / rate).cos();
        let (mut s1, mut s2) = (0.0, 0.0);
        for &v in x {
            let s0 = v + k * s1 - s2;
            s2 = s1;
            s1 = s0;
        }
        (s1 * s1 + s2 * s2 - k * s1 * s2) / (x.len() as f64 * x.len() as f64)
    }

    fn packet(codec: Codec, pt: u8, seq: u16, pcm: &[i16], enc: &mut Encoder) -> Vec<u8> {
        let mut p = vec![0u8; 1500];
        RtpHeader {
            payload_type: pt,
            marker: false,
            sequence: seq,
            timestamp: seq as u32 * codec.frame() as u32,
            ssrc: 1,
        }
        .write_to(&mut p);
        let n = enc.encode(pcm, &mut p[12..]);
        p.truncate(12 + n);
        p
    }

    /// Three participants each send a tone; each hears the other two and not its own.
    fn three_tones(codec: Codec) {
        let pt = codec.default_payload_type();
        let mut room = Room::new(RoomConfig::default());
        let mut encs: Vec<Encoder> = (0..3).map(|_| Encoder::new(codec, 5).unwrap()).collect();
        let mut decs: Vec<Decoder> = (0..3).map(|_| Decoder::new(codec).unwrap()).collect();
        for id in 0..3 {
            room.add(id, codec, pt, 100 + id).unwrap();
        }
        let mut heard: Vec<Vec<f64>> = vec![Vec::new(); 3];
        let mut out = vec![0i16; FB_FRAME];
        for f in 0..60u64 {
            for id in 0..3u32 {
                let pcm = tone(TONES[id as usize], codec.rate(), f, codec.frame(), 6000.0);
                let p = packet(codec, pt, f as u16, &pcm, &mut encs[id as usize]);
                room.on_rtp(id, &p).unwrap();
            }
            room.tick(&mut |id, pkt| {
                let k = decs[id as usize].decode(&pkt[12..], &mut out).unwrap();
                if f >= 20 {
                    heard[id as usize].extend(out[..k].iter().map(|&s| s as f64));
                }
            });
        }
        for id in 0..3 {
            let x = &heard[id];
            assert!(x.len() > 1000, "participant {id} heard {} samples", x.len());
            let p: Vec<f64> = TONES.iter().map(|&f| goertzel(x, f, codec.rate() as f64)).collect();
            let own = p[id];
            for (j, &q) in p.iter().enumerate() {
                if j != id {
                    assert!(
                        q > 50.0 * own.max(1e-3),
                        "{codec:?}: {id} hears tone {j} ({q:.1}) over its own ({own:.3})"
                    );
                }
            }
        }
    }

    #[test]
    fn each_hears_the_others_not_itself_pcmu() {
        three_tones(Codec::Pcmu);
    }

    #[test]
    fn each_hears_the_others_not_itself_opus() {
        three_tones(Codec::Opus);
    }

    #[test]
    fn loss_and_reordering_keep_a_steady_cadence() {
        let mut room = Room::new(RoomConfig::default());
        let mut enc = Encoder::new(Codec::Pcmu, 0).unwrap();
        room.add(1, Codec::Pcmu, 0, 11).unwrap();
        room.add(2, Codec::Pcmu, 0, 22).unwrap();
        let mut seen: Vec<(u16, u32)> = Vec::new();
        // Participant 1 talks; every 7th packet lost, pairs swapped every 5.
        let mut order: Vec<u16> = (0..100).filter(|s| s % 7 != 3).collect();
        for c in order.chunks_mut(5) {
            if c.len() > 1 {
                c.swap(0, 1);
            }
        }
        let mut i = 0;
        for f in 0..100u16 {
            while i < order.len() && order[i] <= f + 1 {
                let pcm = tone(500.0, 8000, order[i] as u64, 160, 8000.0);
                room.on_rtp(1, &packet(Codec::Pcmu, 0, order[i], &pcm, &mut enc)).unwrap();
                i += 1;
            }
            room.tick(&mut |id, pkt| {
                if id == 2 {
                    let h = RtpHeader::parse(pkt).unwrap();
                    seen.push((h.sequence, h.timestamp));
                }
            });
        }
        assert_eq!(seen.len(), 100, "one packet per tick");
        for w in seen.windows(2) {
            assert_eq!(w[1].0, w[0].0.wrapping_add(1), "continuous sequence numbers");
            assert_eq!(w[1].1, w[0].1.wrapping_add(160), "no timestamp jumps");
        }
        let st = room.stats();
        assert!(st[0].concealed >= 10, "{:?}", st[0]);
    }

    #[test]
    fn many_loud_talkers_clip_and_never_wrap() {
        let cfg = RoomConfig { max_talkers: 10, ..RoomConfig::default() };
        let mut room = Room::new(cfg);
        let mut enc = Encoder::new(Codec::Pcmu, 0).unwrap();
        for id in 0..11 {
            room.add(id, Codec::Pcmu, 0, id).unwrap();
        }
        let mut min_seen = i16::MAX;
        for f in 0..10u16 {
            // Ten talkers at full positive scale; participant 10 listens.
            for id in 0..10 {
                room.on_rtp(id, &packet(Codec::Pcmu, 0, f, &[30000; 160], &mut enc)).unwrap();
            }
            room.tick(&mut |id, pkt| {
                if id == 10 && f >= 3 {
                    for &b in &pkt[12..] {
                        min_seen = min_seen.min(g711::ulaw_decode(b));
                    }
                }
            });
        }
        assert!(min_seen > 30000, "a saturated positive mix stays positive and at full scale: {min_seen}");
        assert_eq!(room.talkers(), 10);
    }

    #[test]
    fn bad_rtp_is_counted_and_the_room_keeps_running() {
        let mut room = Room::new(RoomConfig::default());
        room.add(1, Codec::Opus, 111, 1).unwrap();
        room.add(2, Codec::Opus, 111, 2).unwrap();
        assert_eq!(room.on_rtp(1, &[1, 2, 3]), Err(RejectReason::Malformed));
        let mut p = vec![0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 9, 9];
        assert_eq!(room.on_rtp(1, &p), Err(RejectReason::PayloadType));
        p[1] = 111;
        for seq in 0..10u16 {
            p[2..4].copy_from_slice(&seq.to_be_bytes());
            // Garbage Opus: a TOC byte announcing a frame the packet does not hold.
            p.truncate(12);
            p.extend_from_slice(&[0xff, 0xff, 0x00]);
            room.on_rtp(1, &p).unwrap();
            let mut out = 0;
            room.tick(&mut |_, _| out += 1);
            assert_eq!(out, 2, "both still get a packet every tick");
        }
        let st = &room.stats()[0];
        assert_eq!((st.malformed, st.bad_payload_type), (1, 1));
        assert!(st.decode_errors > 0, "{st:?}");
        assert_eq!(room.on_rtp(9, &p), Err(RejectReason::Unknown));
    }
}
