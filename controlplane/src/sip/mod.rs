//! SIP: messages, transactions, the proxy and registrar (sans IO), and their driver.

pub mod digest;
pub mod message;
pub mod metrics;
pub mod proxy;
pub mod registrar;
pub mod server;
pub mod transaction;

pub use message::{Message, ParseError, StartLine};
