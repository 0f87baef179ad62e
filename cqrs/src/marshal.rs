//! Marshalers: how typed commands and events become message payloads and back. They live
//! in [`tidemill_core::marshal`], shared with the router's typed extractors
//! ([`tidemill_core::extract::Json`]); re-exported here.

#[cfg(feature = "protobuf")]
pub use tidemill_core::marshal::Protobuf;
pub use tidemill_core::marshal::{Json, Marshal, CONTENT_TYPE_KEY};
