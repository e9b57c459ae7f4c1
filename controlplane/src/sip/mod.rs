//! SIP: messages, transactions (sans IO), and later the proxy and registrar.

pub mod digest;
pub mod message;
pub mod proxy;
pub mod registrar;
pub mod server;
pub mod transaction;

pub use message::{Message, ParseError, StartLine};
