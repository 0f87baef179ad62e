//! Names SNS and SQS accept, made from Tidemill's topics and groups, and the character
//! rules of message bodies and attributes.

/// SNS topic names: up to 256 characters (`.fifo` included).
pub(crate) const TOPIC_MAX: usize = 256;
/// SQS queue names: up to 80 characters (`.fifo` included).
pub(crate) const QUEUE_MAX: usize = 80;

/// `prefix` + `parts` joined with `-`, as a topic or queue name: characters other than
/// ASCII letters, digits, `-` and `_` become `_`, and when anything had to change (or the
/// name is too long) a hash of the original is appended, so two topics never share a name.
/// FIFO names end in `.fifo`.
pub(crate) fn resource(prefix: &str, parts: &[&str], fifo: bool, max: usize) -> String {
    let original: String = std::iter::once(prefix.to_owned())
        .chain(parts.iter().enumerate().map(|(i, p)| {
            if i == 0 {
                (*p).to_owned()
            } else {
                format!("-{p}")
            }
        }))
        .collect();
    let suffix = if fifo { ".fifo" } else { "" };
    let clean: String = original
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let limit = max - suffix.len();
    if clean == original && !clean.is_empty() && clean.len() <= limit {
        return format!("{clean}{suffix}");
    }
    let hash = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, original.as_bytes()).simple();
    let hash = &hash.to_string()[..12];
    let keep = limit - hash.len() - 1;
    let head: String = clean.chars().take(keep).collect();
    format!("{head}-{hash}{suffix}")
}

/// `url` without a password (`user:password@` becomes `user:***@`).
pub(crate) fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let host_end = rest.find('/').unwrap_or(rest.len());
    match rest[..host_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme_end + 3], &rest[at..])
        }
        None => url.to_owned(),
    }
}

/// Whether `c` may appear in an SQS message body or attribute value (the XML character
/// range SQS documents: tab, newline, carriage return, `#x20`–`#xD7FF`, `#xE000`–`#xFFFD`,
/// `#x10000`–`#x10FFFF`).
pub(crate) fn allowed_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// Whether `bytes` can travel as text (a body or String attribute) unchanged.
pub(crate) fn is_text(bytes: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(bytes).ok()?;
    s.chars().all(allowed_char).then_some(s)
}

/// Whether `name` is a valid message attribute name: 1–256 of ASCII letters, digits, `_`,
/// `-`, `.`; no leading, trailing or doubled `.`; not starting with `AWS.` or `Amazon.`.
pub(crate) fn attribute_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && !lower.starts_with("aws.")
        && !lower.starts_with("amazon.")
}

/// A FIFO message group or deduplication id for `value`: itself when it is 1–128 ASCII
/// letters, digits and punctuation, otherwise a hash of it (the same value always maps to
/// the same id).
pub(crate) fn fifo_id(value: &[u8]) -> String {
    if !value.is_empty()
        && value.len() <= 128
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b.is_ascii_punctuation())
    {
        return String::from_utf8_lossy(value).into_owned();
    }
    let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, value).simple();
    format!("h-{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_names_stay_as_they_are() {
        assert_eq!(resource("", &["orders"], false, TOPIC_MAX), "orders");
        assert_eq!(
            resource("app-", &["orders", "billing"], false, QUEUE_MAX),
            "app-orders-billing"
        );
        assert_eq!(resource("", &["orders"], true, QUEUE_MAX), "orders.fifo");
    }

    #[test]
    fn other_characters_are_replaced_and_the_name_hashed() {
        let a = resource("", &["orders.placed"], false, TOPIC_MAX);
        let b = resource("", &["orders_placed"], false, TOPIC_MAX);
        assert!(a.starts_with("orders_placed-"), "{a}");
        assert_ne!(a, b, "two topics must not share a name");
        assert_eq!(
            a,
            resource("", &["orders.placed"], false, TOPIC_MAX),
            "stable"
        );
    }

    #[test]
    fn long_names_are_cut_to_the_limit() {
        let topic = "t".repeat(200);
        let name = resource("", &[&topic, "group"], true, QUEUE_MAX);
        assert_eq!(name.len(), QUEUE_MAX);
        assert!(name.ends_with(".fifo"));
    }

    #[test]
    fn redact_hides_passwords() {
        assert_eq!(redact("http://u:secret@h:1/x"), "http://u:***@h:1/x");
        assert_eq!(redact("http://127.0.0.1:4566"), "http://127.0.0.1:4566");
    }

    #[test]
    fn attribute_names_follow_sqs_rules() {
        assert!(attribute_name("traceparent"));
        assert!(attribute_name("tidemill-key.b64"));
        assert!(!attribute_name("a b"));
        assert!(!attribute_name("AWS.x"));
        assert!(!attribute_name("a..b"));
        assert!(!attribute_name(""));
    }

    #[test]
    fn fifo_ids_are_kept_or_hashed() {
        assert_eq!(fifo_id(b"customer-7"), "customer-7");
        let hashed = fifo_id("ключ".as_bytes());
        assert!(hashed.starts_with("h-") && hashed.len() <= 128);
        assert_eq!(hashed, fifo_id("ключ".as_bytes()));
    }

    #[test]
    fn text_excludes_control_characters() {
        assert_eq!(is_text(b"hello\n"), Some("hello\n"));
        assert_eq!(is_text(b"\x00"), None);
        assert_eq!(is_text(&[0xff]), None);
    }
}
