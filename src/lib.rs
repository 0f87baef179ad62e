//! facade
pub use tidemill_core::*;
