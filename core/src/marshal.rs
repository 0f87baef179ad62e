//! Marshalers: how typed values become message payloads and back.
//!
//! One implementation serves every typed API: the router's [`Json`](crate::extract::Json)
//! and `Protobuf` extractors and outputs decode and encode with these, and so do
//! tidemill-cqrs' buses and processors (which re-export them).

use bytes::Bytes;

use crate::BoxError;

/// Metadata key holding a payload's content type ([`Marshal::content_type`]), set on
/// messages a marshaler encoded.
pub const CONTENT_TYPE_KEY: &str = "content-type";

/// Encodes and decodes values of type `T`. Implemented by [`Json`] for serde types and by
/// `Protobuf` (feature `protobuf`) for prost messages; implement it for another format
/// and use it wherever a marshaler is taken.
pub trait Marshal<T>: Send + Sync + 'static {
    /// Encodes `value`.
    fn marshal(&self, value: &T) -> Result<Bytes, BoxError>;
    /// Decodes a payload.
    fn unmarshal(&self, payload: &[u8]) -> Result<T, BoxError>;
    /// The payload's content type, recorded in the [`CONTENT_TYPE_KEY`] metadata.
    fn content_type(&self) -> &'static str;
}

/// JSON via serde (the default marshaler).
///
/// ```
/// use tidemill_core::marshal::{Json, Marshal};
///
/// let bytes = Json.marshal(&vec![1, 2]).unwrap();
/// assert_eq!(&bytes[..], b"[1,2]");
/// let back: Vec<u32> = Json.unmarshal(&bytes).unwrap();
/// assert_eq!(back, [1, 2]);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Json;

impl Json {
    /// The content type of JSON payloads.
    pub const CONTENT_TYPE: &'static str = "application/json";

    /// Encodes `value` (what [`Marshal::marshal`] does; needs only `Serialize`).
    pub fn encode<T: serde::Serialize + ?Sized>(value: &T) -> Result<Bytes, BoxError> {
        Ok(Bytes::from(serde_json::to_vec(value)?))
    }

    /// Decodes `payload` (what [`Marshal::unmarshal`] does; needs only `Deserialize`).
    pub fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, BoxError> {
        Ok(serde_json::from_slice(payload)?)
    }
}

impl<T> Marshal<T> for Json
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    fn marshal(&self, value: &T) -> Result<Bytes, BoxError> {
        Json::encode(value)
    }

    fn unmarshal(&self, payload: &[u8]) -> Result<T, BoxError> {
        Json::decode(payload)
    }

    fn content_type(&self) -> &'static str {
        Json::CONTENT_TYPE
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

/// `std::any::type_name` without module paths: `app::booking::BookRoom` → `BookRoom`,
/// `app::Envelope<app::Order>` → `Envelope<Order>` (for messages and errors).
pub fn short_type_name<T: ?Sized>() -> String {
    let full = std::any::type_name::<T>();
    let mut out = String::with_capacity(full.len());
    let mut path_start = 0;
    let mut rest = full;
    while let Some(c) = rest.chars().next() {
        if rest.starts_with("::") {
            out.truncate(path_start);
            rest = &rest[2..];
            continue;
        }
        out.push(c);
        // `{{closure}}` and `{{constant}}` are path segments too (types declared in a fn body).
        if !(c.is_alphanumeric() || matches!(c, '_' | '{' | '}')) {
            path_start = out.len();
        }
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Plain;
    struct Generic<T>(T);

    #[test]
    fn short_names_drop_module_paths() {
        assert_eq!(short_type_name::<Plain>(), "Plain");
        assert_eq!(short_type_name::<Generic<Plain>>(), "Generic<Plain>");
        assert_eq!(short_type_name::<Vec<String>>(), "Vec<String>");
    }

    #[tokio::test]
    async fn types_declared_in_async_fns_get_their_plain_name() {
        struct Local;
        let name = async { short_type_name::<Local>() }.await;
        assert_eq!(name, "Local");
        fn in_fn() -> String {
            struct Inner;
            short_type_name::<Option<Inner>>()
        }
        assert_eq!(in_fn(), "Option<Inner>");
    }
}
