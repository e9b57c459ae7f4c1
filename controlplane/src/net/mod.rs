//! Listeners that survive abuse from the network.
//!
//! [`http`] serves the HTTP APIs (the relay's REST API, `hasp proxy`'s API, the LI API)
//! behind one guarded accept loop: a per-source-IP and a total connection cap, a header
//! read timeout against slowloris, an idle timeout, back-off instead of a busy loop when
//! the process runs out of descriptors, and graceful shutdown. SIP over TCP
//! (`proxy/driver.rs`) and NG over TCP (`control/ng/server.rs`) frame their own protocols
//! but take their connection caps and accept back-off from [`admission`].

pub mod admission;
pub mod http;
