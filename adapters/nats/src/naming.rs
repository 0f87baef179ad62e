//! Subjects, stream and consumer names.

use tidemill_core::headers::stable_uuid;
use tidemill_core::{Error, Result};

use crate::BROKER;

/// Longest stream or consumer name the adapter derives (the server stores them as file names).
const MAX_NAME: usize = 128;

/// One subject token: non-empty, no `.`, whitespace, control characters or wildcards.
pub(crate) fn is_subject_token(token: &str) -> bool {
    !token.is_empty()
        && !token
            .chars()
            .any(|c| c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control())
}

/// A publishable subject: tokens separated by `.`, none empty, no wildcards.
pub(crate) fn is_subject(subject: &str) -> bool {
    subject.split('.').all(is_subject_token)
}

/// The start of a subject: valid tokens, optionally ending with `.`.
pub(crate) fn is_subject_prefix(prefix: &str) -> bool {
    is_subject(prefix.strip_suffix('.').unwrap_or(prefix))
}

/// A JetStream stream or consumer name made of letters, digits, `-` and `_`.
pub(crate) fn is_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Checks that `topic` makes a valid subject with `prefix`, and returns the subject.
pub(crate) fn subject_for(prefix: &str, topic: &str) -> Result<String> {
    let subject = format!("{prefix}{topic}");
    if topic.is_empty() || !is_subject(&subject) {
        return Err(Error::permanent(
            BROKER,
            topic,
            "map the topic to a subject",
            format!(
                "`{subject}` is not a valid NATS subject (tokens separated by `.`, none empty, \
                 no spaces, control characters, `*` or `>`)"
            ),
        ));
    }
    Ok(subject)
}

/// A stream or consumer name derived from `raw`: characters other than letters, digits, `-`
/// and `_` become `_`, and when anything was replaced (or the name was cut) a short hash of
/// `raw` is appended, so different inputs never share a name.
pub(crate) fn derive_name(raw: &str) -> String {
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name != raw || name.len() > MAX_NAME || name.is_empty() {
        name.truncate(MAX_NAME - 9);
        let hash = stable_uuid(&[b"tidemill-nats-name", raw.as_bytes()]);
        name.push('_');
        name.push_str(&hash[..8]);
    }
    name
}

/// Whether the subject filter `pattern` (with `*` and `>` wildcards) matches `subject`.
pub(crate) fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects() {
        assert!(is_subject("orders"));
        assert!(is_subject("orders.eu-1.new"));
        assert!(is_subject("tm-publish-subscribe-0a1b2c"));
        for bad in ["", "a..b", ".a", "a.", "a b", "a.*", "a.>", "a\tb", "x*y"] {
            assert!(!is_subject(bad), "{bad:?}");
        }
        assert!(is_subject_prefix("app."));
        assert!(is_subject_prefix("app"));
        assert!(!is_subject_prefix("app.."));
        assert!(subject_for("", "").is_err());
        let err = subject_for("", "a b").unwrap_err();
        assert!(err.to_string().contains("`a b`"), "{err}");
        assert!(!err.is_transient());
        assert_eq!(subject_for("app.", "orders").unwrap(), "app.orders");
    }

    #[test]
    fn derived_names_are_valid_and_distinct() {
        assert_eq!(derive_name("orders"), "orders");
        assert_eq!(derive_name("tm-x_1"), "tm-x_1");
        let a = derive_name("orders.eu");
        let b = derive_name("orders_eu");
        assert_ne!(a, b);
        assert!(a.starts_with("orders_eu_"), "{a}");
        assert!(is_stream_name(&a));
        let long = derive_name(&"x".repeat(500));
        assert!(long.len() <= MAX_NAME && is_stream_name(&long), "{long}");
        assert!(is_stream_name(&derive_name("")));
        assert!(is_stream_name(&derive_name("héllo wörld")));
    }

    #[test]
    fn wildcard_matching() {
        assert!(subject_matches("orders.>", "orders.eu.new"));
        assert!(!subject_matches("orders.>", "orders"));
        assert!(subject_matches("orders.*", "orders.eu"));
        assert!(!subject_matches("orders.*", "orders.eu.new"));
        assert!(subject_matches("orders", "orders"));
        assert!(!subject_matches("orders", "orders.eu"));
        assert!(subject_matches(">", "anything.at.all"));
    }
}
