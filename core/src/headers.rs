//! Conventions every adapter follows when mapping messages to broker headers, so a message
//! looks the same whichever broker carried it.
//!
//! - The uuid travels in the [`UUID_HEADER`] header; the key, on brokers without a native
//!   key, in [`KEY_HEADER`]. Both are removed from the metadata on the way back.
//! - A message written by another client has no uuid header: adapters derive a stable one
//!   from its broker coordinates with [`stable_uuid`] (the same message always gets the
//!   same uuid, so deduplication and logs work).
//! - Metadata is string→string, but brokers allow header values that are not UTF-8. Such a
//!   value is kept, not dropped: [`insert_header_bytes`] stores it base64-encoded under the
//!   key with [`BINARY_SUFFIX`] appended (`trace` → `trace.b64`).

use std::sync::Arc;

use base64::Engine;

use crate::Metadata;

/// Header carrying the message uuid.
pub const UUID_HEADER: &str = "tidemill-uuid";

/// Header carrying the message key on brokers without a native key.
pub const KEY_HEADER: &str = "tidemill-key";

/// Suffix of metadata keys holding base64 of a non-UTF-8 header value.
pub const BINARY_SUFFIX: &str = ".b64";

/// Tidemill's UUIDv5 namespace for derived message ids.
const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x5f1d_2c8e_9a47_4d0b_b3e6_7c21_0e9f_4a12);

/// A uuid derived from `parts` (e.g. broker, topic, partition, offset): always the same for
/// the same parts. Used for messages published by clients that set no uuid header.
///
/// ```
/// use tidemill_core::headers::stable_uuid;
/// let a = stable_uuid(&[b"kafka", b"orders", b"0", b"42"]);
/// assert_eq!(a, stable_uuid(&[b"kafka", b"orders", b"0", b"42"]));
/// assert_ne!(a, stable_uuid(&[b"kafka", b"orders", b"0", b"43"]));
/// ```
pub fn stable_uuid(parts: &[&[u8]]) -> Arc<str> {
    use sha1::Digest;
    // UUIDv5 (SHA-1 of the namespace and the name), hashed without building the name.
    let mut hash = sha1::Sha1::new();
    hash.update(NAMESPACE.as_bytes());
    for part in parts {
        // Length-prefixed, so ("ab","c") and ("a","bc") differ.
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    let id = uuid::Builder::from_sha1_bytes(bytes).into_uuid();
    Arc::from(
        &*id.hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer()),
    )
}

/// Stores a received header: as is when `value` is UTF-8, otherwise base64-encoded under
/// `key` + [`BINARY_SUFFIX`].
///
/// ```
/// use tidemill_core::{headers::insert_header_bytes, Metadata};
/// let mut md = Metadata::new();
/// insert_header_bytes(&mut md, "text", b"plain");
/// insert_header_bytes(&mut md, "trace", &[0xff, 0x00]);
/// assert_eq!(md.get("text"), Some("plain"));
/// assert_eq!(md.get("trace.b64"), Some("/wA="));
/// ```
pub fn insert_header_bytes(metadata: &mut Metadata, key: &str, value: &[u8]) {
    match std::str::from_utf8(value) {
        Ok(text) => metadata.set(key, text),
        Err(_) => metadata.set(
            format!("{key}{BINARY_SUFFIX}"),
            base64::engine::general_purpose::STANDARD.encode(value),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_uuids_are_uuid_v5_of_the_length_prefixed_parts() {
        let parts: [&[u8]; 4] = [
            b"kafka",
            b"orders",
            &7i32.to_be_bytes(),
            &42i64.to_be_bytes(),
        ];
        let mut name = Vec::new();
        for part in parts {
            name.extend_from_slice(&(part.len() as u64).to_be_bytes());
            name.extend_from_slice(part);
        }
        let want = uuid::Uuid::new_v5(&NAMESPACE, &name)
            .hyphenated()
            .to_string();
        assert_eq!(&*stable_uuid(&parts), want.as_str());
        assert_eq!(stable_uuid(&[]).len(), 36);
    }
}
