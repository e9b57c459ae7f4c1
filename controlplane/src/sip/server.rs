//! The SIP driver: a UDP socket, the clock and the proxy core, on one thread.

use super::proxy::Proxy;
use std::net::UdpSocket;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Serves SIP over UDP on `sock` until the process ends.
pub fn spawn(sock: UdpSocket, proxy: Arc<Mutex<Proxy>>) -> std::io::Result<()> {
    sock.set_read_timeout(Some(Duration::from_millis(20)))?;
    std::thread::Builder::new().name("hasp-sip".into()).spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut last_tick = Instant::now();
        loop {
            let got = sock.recv_from(&mut buf);
            let now = Instant::now();
            let out = {
                let mut p = proxy.lock().unwrap_or_else(|e| e.into_inner());
                if let Ok((n, src)) = got {
                    p.on_datagram(now, src, &buf[..n]);
                }
                if now.duration_since(last_tick) >= Duration::from_millis(20) {
                    p.on_tick(now);
                    last_tick = now;
                }
                p.drain()
            };
            for (dst, bytes) in out {
                // Linux reports an earlier ICMP "port unreachable" on the next call on an
                // unconnected UDP socket, which then sends nothing: try once more.
                if sock.send_to(&bytes, dst).is_err() {
                    let _ = sock.send_to(&bytes, dst);
                }
            }
        }
    })?;
    Ok(())
}
