//! Steering: which of N core instances owns a message, read from the raw bytes without
//! a full parse (a receiver hands a message it does not own to its owner).
//!
//! A request belongs to the instance of its Call-ID (so a dialog's requests, its
//! CANCEL and its ACK meet the transactions they concern); a response to one of our
//! client transactions belongs to the instance named in the branch of the top Via,
//! which that instance wrote (`z9hG4bK-hasp-<instance>-…`).

/// The branch prefix of the transactions a hasp instance starts.
pub const BRANCH_PREFIX: &str = "z9hG4bK-hasp-";

/// The branch of a client transaction started by instance `shard` (`n` counts them).
pub fn branch(shard: usize, tag: &str, n: u64) -> String {
    format!("{BRANCH_PREFIX}{shard}-{tag}-{n}")
}

/// The instance that wrote `branch`, if one of ours did.
pub fn shard_of_branch(branch: &str) -> Option<usize> {
    let rest = branch.strip_prefix(BRANCH_PREFIX)?;
    let digits = rest.split('-').next()?;
    digits.parse().ok()
}

/// FNV-1a: a stable, cheap hash (the same in every process, unlike `DefaultHasher`'s
/// random keys, so every receiver of a cluster would steer alike).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The value of the first header named `long` or `short` (case-insensitive) in the
/// header section of `data`, read exactly as [`crate::Message::parse`] reads it (CRLF
/// lines, folded continuations joined by a space, values trimmed), so that both agree
/// on every message the parser accepts.
fn header(data: &[u8], long: &str, short: &str) -> Option<String> {
    let head_end = data.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(data.len());
    let head = std::str::from_utf8(&data[..head_end]).ok()?;
    let mut found: Option<String> = None;
    for line in head.split("\r\n").skip(1) {
        if line.starts_with([' ', '\t']) {
            if let Some(v) = found.as_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if found.is_some() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else { continue };
        let name = name.trim();
        if name.eq_ignore_ascii_case(long) || name.eq_ignore_ascii_case(short) {
            found = Some(value.trim().to_string());
        }
    }
    found
}

/// Which of `n` instances owns the message in `data`.
pub fn shard_of(data: &[u8], n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    if data.starts_with(b"SIP/") {
        let via = header(data, "via", "v").unwrap_or_default();
        // The branch parameter of the first Via value.
        let first = via.split(',').next().unwrap_or_default();
        let branch = first.split(';').skip(1).find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.trim().eq_ignore_ascii_case("branch").then(|| v.trim())
        });
        if let Some(s) = branch.and_then(shard_of_branch) {
            return s % n;
        }
    }
    let call_id = header(data, "call-id", "i").unwrap_or_default();
    (fnv1a(call_id.as_bytes()) % n as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_go_by_call_id_and_responses_by_our_branch() {
        let inv = |cid: &str| {
            format!("INVITE sip:b@x SIP/2.0\r\nVia: SIP/2.0/UDP 1.2.3.4;branch=z9hG4bKx\r\nCall-ID: {cid}\r\n\r\n")
        };
        let a = shard_of(inv("abc").as_bytes(), 4);
        assert_eq!(a, shard_of(inv("abc").replace("Call-ID", "i").as_bytes(), 4), "compact form");
        assert_eq!(a, shard_of(inv("abc").replace("Call-ID", "call-id").as_bytes(), 4), "any case");
        let spread: std::collections::HashSet<usize> =
            (0..64).map(|i| shard_of(inv(&format!("c{i}")).as_bytes(), 4)).collect();
        assert_eq!(spread.len(), 4, "Call-IDs spread over every instance");
        let resp = format!(
            "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch={};rport, SIP/2.0/UDP 1.2.3.4;branch=z9hG4bKx\r\nCall-ID: abc\r\n\r\n",
            branch(3, "1f", 7)
        );
        assert_eq!(shard_of(resp.as_bytes(), 4), 3);
        assert_eq!(shard_of(resp.as_bytes(), 1), 0);
        // A response whose top Via is not ours goes by Call-ID.
        let foreign = "SIP/2.0 200 OK\r\nv: SIP/2.0/UDP 1.2.3.4;branch=z9hG4bKzz\r\ni: abc\r\n\r\n";
        assert_eq!(shard_of(foreign.as_bytes(), 4), a);
        assert_eq!(shard_of(b"garbage", 4), shard_of(b"", 4), "no Call-ID: one fixed instance");
        // Read as the parser reads it: a folded Call-ID is one value.
        let folded = "INVITE sip:b@x SIP/2.0\r\nCall-ID: abc\r\n def\r\n\r\n";
        assert_eq!(shard_of(folded.as_bytes(), 4), (fnv1a(b"abc def") % 4) as usize);
    }

    #[test]
    fn branches_name_their_instance() {
        assert_eq!(shard_of_branch(&branch(12, "abc", 1)), Some(12));
        assert_eq!(shard_of_branch("z9hG4bK-hasp-sl-xyz"), None, "stateless branches name none");
        assert_eq!(shard_of_branch("z9hG4bKother"), None);
    }
}
