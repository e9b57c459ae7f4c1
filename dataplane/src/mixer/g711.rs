//! G.711 μ-law and A-law (ITU-T G.711), sample by sample.

const BIAS: i32 = 0x84;
const CLIP: i32 = 32635;

/// Linear 16-bit to μ-law.
#[inline]
pub fn ulaw_encode(s: i16) -> u8 {
    let mut x = s as i32;
    let sign = if x < 0 {
        x = -x;
        0x80
    } else {
        0
    };
    x = x.min(CLIP) + BIAS;
    let exp = (31 - (x as u32).leading_zeros() as i32 - 7).clamp(0, 7);
    let mant = (x >> (exp + 3)) & 0x0f;
    !(sign | (exp << 4) as u8 | mant as u8)
}

/// μ-law to linear 16-bit.
#[inline]
pub fn ulaw_decode(u: u8) -> i16 {
    let u = !u;
    let sign = u & 0x80;
    let exp = ((u >> 4) & 0x07) as i32;
    let mant = (u & 0x0f) as i32;
    let x = (((mant << 3) + BIAS) << exp) - BIAS;
    (if sign != 0 { -x } else { x }) as i16
}

/// Linear 16-bit to A-law.
#[inline]
pub fn alaw_encode(s: i16) -> u8 {
    let mut x = s as i32;
    let sign = if x >= 0 { 0xd5 } else { 0x55 };
    if x < 0 {
        x = -x - 1;
    }
    x = x.min(32767);
    let v = if x < 256 {
        (x >> 4) as u8
    } else {
        let exp = (31 - (x as u32).leading_zeros() as i32 - 7).clamp(1, 7);
        ((exp << 4) as u8) | (((x >> (exp + 3)) & 0x0f) as u8)
    };
    v ^ sign
}

/// A-law to linear 16-bit.
#[inline]
pub fn alaw_decode(a: u8) -> i16 {
    let a = a ^ 0x55;
    let sign = a & 0x80;
    let exp = ((a >> 4) & 0x07) as i32;
    let mant = (a & 0x0f) as i32;
    let x = if exp == 0 { (mant << 4) + 8 } else { ((mant << 4) + 0x108) << (exp - 1) };
    (if sign != 0 { x } else { -x }) as i16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_within_quantisation() {
        for s in (-32768i32..32768).step_by(7) {
            let s = s as i16;
            let (u, a) = (ulaw_decode(ulaw_encode(s)), alaw_decode(alaw_encode(s)));
            let tol = (s as i32).abs() / 16 + 16;
            assert!(((u as i32) - s as i32).abs() <= tol.max(33), "μ-law {s} → {u}");
            assert!(((a as i32) - s as i32).abs() <= tol.max(33), "A-law {s} → {a}");
        }
        // Silence codes.
        assert_eq!(ulaw_encode(0), 0xff);
        assert_eq!(alaw_encode(0), 0xd5);
        for b in 0..=255u8 {
            assert_eq!(ulaw_encode(ulaw_decode(b)), if b == 0x7f { 0xff } else { b });
        }
    }
}
