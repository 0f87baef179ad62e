//! Fault proxy (filled by the brokers work).
