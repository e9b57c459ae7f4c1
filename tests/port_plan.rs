//! The fixed-port plan (tests/common/mod.rs) checked: every RTP range a test passes
//! (`"LOW-HIGH"`) and every etcd cluster base (ports base+1..base+23) belongs to one
//! test file, so tests running in parallel never share a port. A range may repeat in
//! its own file (a test restarting a relay on the same ports).

use std::collections::BTreeMap;

fn ranges_in(text: &str) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i + 13 <= b.len() {
        // "NNNNN-NNNNN"
        let s = &b[i..i + 13];
        if s[0] == b'"' && s[12] == b'"' && s[6] == b'-' && s[1..6].iter().chain(&s[7..12]).all(u8::is_ascii_digit) {
            let lo: u32 = std::str::from_utf8(&s[1..6]).unwrap().parse().unwrap();
            let hi: u32 = std::str::from_utf8(&s[7..12]).unwrap().parse().unwrap();
            if (20000..48000).contains(&lo) && lo <= hi {
                out.push((lo, hi));
            }
            i += 13;
            continue;
        }
        i += 1;
    }
    // etcd clusters: `Cluster::start(BASE)`, `Etcd::start(BASE)`, `ETCD_BASE: u16 = BASE`.
    for pat in ["Cluster::start(", "Etcd::start(", "ETCD_BASE: u16 = "] {
        for (at, _) in text.match_indices(pat) {
            let digits: String = text[at + pat.len()..].chars().take_while(char::is_ascii_digit).collect();
            if let Ok(base) = digits.parse::<u32>() {
                out.push((base + 1, base + 23));
            }
        }
    }
    out
}

#[test]
fn no_two_test_files_share_a_fixed_port() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut owners: BTreeMap<(u32, u32), String> = BTreeMap::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(Result::ok).map(|e| e.path()).collect();
    files.sort();
    let mut clashes = Vec::new();
    for f in files.iter().filter(|p| p.extension().is_some_and(|e| e == "rs")) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if name == "port_plan.rs" {
            continue;
        }
        for r in ranges_in(&std::fs::read_to_string(f).unwrap()) {
            for (o, owner) in &owners {
                let overlap = r.0 <= o.1 && o.0 <= r.1;
                if overlap && (owner != &name || *o != r) {
                    clashes.push(format!("{name} {r:?} overlaps {owner} {o:?}"));
                }
            }
            owners.entry(r).or_insert_with(|| name.clone());
        }
    }
    assert!(clashes.is_empty(), "fixed ports shared between tests:\n{}", clashes.join("\n"));
    assert!(owners.len() > 20, "the scan found the plan: {owners:?}");
}
