//! Audio codecs of conference participants and the conversions between their rates
//! and the room's mixing rate.

use super::g711;

/// A participant's codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Codec {
    /// G.711 μ-law, 8 kHz.
    #[serde(rename = "PCMU")]
    Pcmu,
    /// G.711 A-law, 8 kHz.
    #[serde(rename = "PCMA")]
    Pcma,
    /// Opus, 48 kHz mono, 20 ms frames.
    #[serde(rename = "opus")]
    Opus,
}

/// Samples in a 20 ms frame at 8 kHz.
pub const NB_FRAME: usize = 160;
/// Samples in a 20 ms frame at 48 kHz.
pub const FB_FRAME: usize = 960;

impl Codec {
    /// Its native sample rate (and RTP clock rate).
    pub fn rate(self) -> u32 {
        match self {
            Codec::Pcmu | Codec::Pcma => 8000,
            Codec::Opus => 48000,
        }
    }

    /// Samples per 20 ms frame.
    pub fn frame(self) -> usize {
        self.rate() as usize / 50
    }

    /// The payload type used unless signalling says otherwise.
    pub fn default_payload_type(self) -> u8 {
        match self {
            Codec::Pcmu => 0,
            Codec::Pcma => 8,
            Codec::Opus => 111,
        }
    }

    /// Index for per-codec arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Name as in SDP and the API.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Pcmu => "PCMU",
            Codec::Pcma => "PCMA",
            Codec::Opus => "opus",
        }
    }
}

/// A decoder: G.711 by table, Opus by libopus.
pub enum Decoder {
    /// μ-law.
    Pcmu,
    /// A-law.
    Pcma,
    /// Opus.
    Opus(Box<opus::Decoder>),
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decoder::Pcmu => "Pcmu",
            Decoder::Pcma => "Pcma",
            Decoder::Opus(_) => "Opus",
        })
    }
}

impl Decoder {
    /// A decoder for `codec`.
    pub fn new(codec: Codec) -> Result<Self, opus::Error> {
        Ok(match codec {
            Codec::Pcmu => Decoder::Pcmu,
            Codec::Pcma => Decoder::Pcma,
            Codec::Opus => Decoder::Opus(Box::new(opus::Decoder::new(48000, opus::Channels::Mono)?)),
        })
    }

    /// Decodes one frame into `out` (its native frame size); `None` for garbage.
    pub fn decode(&mut self, payload: &[u8], out: &mut [i16]) -> Option<usize> {
        match self {
            Decoder::Pcmu | Decoder::Pcma if payload.len() > out.len() => None,
            Decoder::Pcmu => {
                for (o, b) in out.iter_mut().zip(payload) {
                    *o = g711::ulaw_decode(*b);
                }
                Some(payload.len())
            }
            Decoder::Pcma => {
                for (o, b) in out.iter_mut().zip(payload) {
                    *o = g711::alaw_decode(*b);
                }
                Some(payload.len())
            }
            Decoder::Opus(d) => d.decode(payload, out, false).ok(),
        }
    }

    /// Conceals a lost frame: Opus's own PLC; for G.711 the caller repeats and fades.
    pub fn conceal(&mut self, out: &mut [i16]) -> Option<usize> {
        match self {
            Decoder::Opus(d) => d.decode(&[], out, false).ok(),
            _ => None,
        }
    }
}

/// An encoder.
pub enum Encoder {
    /// μ-law.
    Pcmu,
    /// A-law.
    Pcma,
    /// Opus.
    Opus(Box<opus::Encoder>),
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Encoder::Pcmu => "Pcmu",
            Encoder::Pcma => "Pcma",
            Encoder::Opus(_) => "Opus",
        })
    }
}

impl Encoder {
    /// An encoder for `codec`; Opus at 24 kbit/s, VoIP mode, wideband, the given
    /// complexity.
    pub fn new(codec: Codec, opus_complexity: i32) -> Result<Self, opus::Error> {
        Ok(match codec {
            Codec::Pcmu => Encoder::Pcmu,
            Codec::Pcma => Encoder::Pcma,
            Codec::Opus => {
                let mut e = opus::Encoder::new(48000, opus::Channels::Mono, opus::Application::Voip)?;
                e.set_bitrate(opus::Bitrate::Bits(24000))?;
                e.set_complexity(opus_complexity)?;
                // Wideband (7 kHz audio) is what 24 kbit/s voice carries anyway; capping it
                // keeps the encoder in SILK mode, which costs a fraction of CELT/hybrid.
                e.set_max_bandwidth(opus::Bandwidth::Wideband)?;
                Encoder::Opus(Box::new(e))
            }
        })
    }

    /// Encodes one native frame into `out`; returns the payload length.
    pub fn encode(&mut self, pcm: &[i16], out: &mut [u8]) -> usize {
        match self {
            Encoder::Pcmu => {
                for (o, s) in out.iter_mut().zip(pcm) {
                    *o = g711::ulaw_encode(*s);
                }
                pcm.len().min(out.len())
            }
            Encoder::Pcma => {
                for (o, s) in out.iter_mut().zip(pcm) {
                    *o = g711::alaw_encode(*s);
                }
                pcm.len().min(out.len())
            }
            Encoder::Opus(e) => e.encode(pcm, out).unwrap_or(0),
        }
    }
}

/// Converts a frame between 8 and 48 kHz (or copies at equal rates). Upsampling
/// interpolates linearly from the previous frame's last sample (`last`), downsampling
/// averages each group of six (a boxcar low-pass before decimation).
pub fn resample(input: &[i16], in_rate: u32, out: &mut [i16], out_rate: u32, last: &mut i16) -> usize {
    match (in_rate, out_rate) {
        (a, b) if a == b => {
            let n = input.len().min(out.len());
            out[..n].copy_from_slice(&input[..n]);
            n
        }
        (8000, 48000) => {
            let mut prev = *last as i32;
            let mut n = 0;
            for &s in input {
                let s = s as i32;
                for k in 1..=6 {
                    if n < out.len() {
                        out[n] = (prev + (s - prev) * k / 6) as i16;
                        n += 1;
                    }
                }
                prev = s;
            }
            *last = prev as i16;
            n
        }
        (48000, 8000) => {
            let mut n = 0;
            for chunk in input.chunks(6) {
                if n < out.len() {
                    out[n] = (chunk.iter().map(|&s| s as i32).sum::<i32>() / chunk.len() as i32) as i16;
                    n += 1;
                }
            }
            n
        }
        _ => 0,
    }
}
