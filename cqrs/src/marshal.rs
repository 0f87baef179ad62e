//! Marshalers: how typed commands and events become message payloads and back.

use bytes::Bytes;
use tidemill_core::BoxError;

/// Encodes and decodes values of type `T`. Implemented by [`Json`] for serde types and by
/// `Protobuf` (feature `protobuf`) for prost messages.
pub trait Marshal<T>: Send + Sync + 'static {
    /// Encodes `value`.
    fn marshal(&self, value: &T) -> Result<Bytes, BoxError>;
    /// Decodes a payload.
    fn unmarshal(&self, payload: &[u8]) -> Result<T, BoxError>;
    /// The payload's content type, recorded in the `content-type` metadata.
    fn content_type(&self) -> &'static str;
}

/// JSON via serde (the default marshaler).
#[derive(Clone, Copy, Debug, Default)]
pub struct Json;

impl<T> Marshal<T> for Json
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    fn marshal(&self, value: &T) -> Result<Bytes, BoxError> {
        Ok(Bytes::from(serde_json::to_vec(value)?))
    }

    fn unmarshal(&self, payload: &[u8]) -> Result<T, BoxError> {
        Ok(serde_json::from_slice(payload)?)
    }

    fn content_type(&self) -> &'static str {
        "application/json"
    }
}

/// Protocol Buffers via prost (feature `protobuf`).
#[cfg(feature = "protobuf")]
#[derive(Clone, Copy, Debug, Default)]
pub struct Protobuf;

#[cfg(feature = "protobuf")]
impl<T> Marshal<T> for Protobuf
where
    T: prost::Message + Default,
{
    fn marshal(&self, value: &T) -> Result<Bytes, BoxError> {
        Ok(Bytes::from(value.encode_to_vec()))
    }

    fn unmarshal(&self, payload: &[u8]) -> Result<T, BoxError> {
        Ok(T::decode(payload)?)
    }

    fn content_type(&self) -> &'static str {
        "application/x-protobuf"
    }
}
