//! Dialogs (RFC 3261 §12), sans IO: the state a user agent keeps once an INVITE is
//! answered, and the in-dialog requests (ACK, BYE, re-INVITE) built from it — for the
//! smart client, the load balancer's probes and the tests.

use crate::message::{param, uri_of, Message, StartLine};

/// A dialog as the side that sent the INVITE (the UAC) sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dialog {
    /// Call-ID.
    pub call_id: String,
    /// Our From header (with our tag).
    pub local: String,
    /// Their To header (with their tag).
    pub remote: String,
    /// Their tag.
    pub remote_tag: String,
    /// Where in-dialog requests go: the Contact of the 2xx.
    pub remote_target: String,
    /// The route set: the 2xx's Record-Route, reversed (RFC 3261 §12.1.2).
    pub route_set: Vec<String>,
    /// Our CSeq number last used.
    pub local_seq: u32,
}

/// Why a response cannot make a dialog.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialogError {
    /// Only a 2xx (or a 1xx with a To tag, not kept here) to an INVITE makes a dialog.
    #[error("not a 2xx response to INVITE")]
    NotEstablishing,
    /// A header the dialog needs is missing.
    #[error("missing {0}")]
    Missing(&'static str),
}

impl Dialog {
    /// The dialog a 2xx to our INVITE establishes (RFC 3261 §12.1.2).
    pub fn from_2xx(resp: &Message) -> Result<Self, DialogError> {
        let ok = matches!(resp.start, StartLine::Response { code, .. } if (200..300).contains(&code));
        if !ok || resp.method() != "INVITE" {
            return Err(DialogError::NotEstablishing);
        }
        let remote = resp.header("To").ok_or(DialogError::Missing("To"))?.to_string();
        let remote_tag = param(&remote, "tag").ok_or(DialogError::Missing("To tag"))?.to_string();
        let local = resp.header("From").ok_or(DialogError::Missing("From"))?.to_string();
        let remote_target = resp.header("Contact").map(uri_of).ok_or(DialogError::Missing("Contact"))?.to_string();
        let mut route_set: Vec<String> = resp.header_values("Record-Route").map(str::to_string).collect();
        route_set.reverse();
        let local_seq = resp.cseq().map(|c| c.0).ok_or(DialogError::Missing("CSeq"))?;
        let call_id = resp.call_id().to_string();
        if call_id.is_empty() {
            return Err(DialogError::Missing("Call-ID"));
        }
        Ok(Self { call_id, local, remote, remote_tag, remote_target, route_set, local_seq })
    }

    /// An in-dialog request (RFC 3261 §12.2.1.1) with our `via` (`SIP/2.0/UDP host:port`
    /// without a branch) and `branch`. ACK reuses the INVITE's CSeq number; any other
    /// method takes the next one. With loose routing (every route has `;lr`, as every
    /// proxy written since RFC 3261 does), the Request-URI is the remote target and the
    /// route set goes into Route headers.
    pub fn request(&mut self, method: &str, via: &str, branch: &str) -> Message {
        let seq = if method == "ACK" {
            self.local_seq
        } else {
            self.local_seq += 1;
            self.local_seq
        };
        let mut headers = vec![
            ("Via".to_string(), format!("{via};branch={branch}")),
            ("Max-Forwards".to_string(), "70".to_string()),
            ("From".to_string(), self.local.clone()),
            ("To".to_string(), self.remote.clone()),
            ("Call-ID".to_string(), self.call_id.clone()),
            ("CSeq".to_string(), format!("{seq} {method}")),
        ];
        headers.extend(self.route_set.iter().map(|r| ("Route".to_string(), r.clone())));
        Message {
            start: StartLine::Request { method: method.to_string(), uri: self.remote_target.clone() },
            headers,
            body: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bKa\r\n\
        Record-Route: <sip:p2.example;lr>\r\nRecord-Route: <sip:p1.example;lr>\r\n\
        From: <sip:alice@example>;tag=a1\r\nTo: <sip:bob@example>;tag=b1\r\nCall-ID: c1\r\n\
        CSeq: 7 INVITE\r\nContact: <sip:bob@192.0.2.2:5080>\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn a_2xx_makes_a_dialog_whose_requests_follow_the_route_set() {
        let (m, _) = Message::parse(OK.as_bytes(), false).unwrap();
        let mut d = Dialog::from_2xx(&m).unwrap();
        assert_eq!((d.remote_tag.as_str(), d.remote_target.as_str()), ("b1", "sip:bob@192.0.2.2:5080"));
        assert_eq!(d.route_set, ["<sip:p1.example;lr>", "<sip:p2.example;lr>"], "reversed");
        let ack = d.request("ACK", "SIP/2.0/UDP 192.0.2.1:5070", "z9hG4bKack");
        assert_eq!(ack.cseq(), Some((7, "ACK".into())), "ACK keeps the INVITE's number");
        let bye = d.request("BYE", "SIP/2.0/UDP 192.0.2.1:5070", "z9hG4bKbye");
        assert_eq!(bye.cseq(), Some((8, "BYE".into())));
        assert!(matches!(&bye.start, StartLine::Request { uri, .. } if uri == "sip:bob@192.0.2.2:5080"));
        assert_eq!(bye.header_values("Route").collect::<Vec<_>>(), ["<sip:p1.example;lr>", "<sip:p2.example;lr>"]);
        assert_eq!((bye.from_tag(), bye.to_tag()), (Some("a1"), Some("b1")));
        // What it builds parses back the same.
        let again = Message::parse(&bye.to_bytes(), false).unwrap().0;
        assert_eq!(again.header("Call-ID"), Some("c1"));
    }

    #[test]
    fn only_a_2xx_to_invite_with_its_headers_makes_one() {
        let (m, _) = Message::parse(OK.replace("200 OK", "486 Busy Here").as_bytes(), false).unwrap();
        assert_eq!(Dialog::from_2xx(&m), Err(DialogError::NotEstablishing));
        let (m, _) = Message::parse(OK.replace("CSeq: 7 INVITE", "CSeq: 7 OPTIONS").as_bytes(), false).unwrap();
        assert_eq!(Dialog::from_2xx(&m), Err(DialogError::NotEstablishing));
        let (m, _) = Message::parse(OK.replace(";tag=b1", "").as_bytes(), false).unwrap();
        assert_eq!(Dialog::from_2xx(&m), Err(DialogError::Missing("To tag")));
        let (m, _) = Message::parse(OK.replace("Contact: <sip:bob@192.0.2.2:5080>\r\n", "").as_bytes(), false).unwrap();
        assert_eq!(Dialog::from_2xx(&m), Err(DialogError::Missing("Contact")));
    }
}
