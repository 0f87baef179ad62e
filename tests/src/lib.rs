//! testkit
pub mod fault_proxy;
