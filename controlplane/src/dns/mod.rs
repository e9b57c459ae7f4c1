//! Authoritative DNS for the service domain (`hasp dns`), following membership (to come).
