//! Keeping credentials out of error messages and `Debug` output.
//!
//! Everything the facade prints about a configuration goes through these functions: a URL's
//! userinfo (`user:password@`, or a bare token in the user position as NATS has it) becomes
//! `***@`, and the values of options whose names say they hold a secret (`password`, `token`,
//! `sasl.password`, `…secret…`, …) become `***`.

use std::borrow::Cow;

/// What replaces a hidden value.
pub(crate) const HIDDEN: &str = "***";

/// `url` with its credentials hidden: the userinfo (everything before the host's `@`)
/// becomes `***`, and so do the values of query parameters whose names look secret
/// (`password`, `token`, `sasl.password`, …). Works on URLs without a scheme too, and on
/// malformed ones: when in doubt it hides more, never less.
///
/// ```
/// use tidemill::broker::redact_url;
///
/// assert_eq!(
///     redact_url("amqp://app:hunter2@rabbit:5672/%2f?prefetch=5"),
///     "amqp://***@rabbit:5672/%2f?prefetch=5"
/// );
/// assert_eq!(redact_url("nats://127.0.0.1:4222?token=s3cr3t"), "nats://127.0.0.1:4222?token=***");
/// assert_eq!(redact_url("user:hunter2@somehost:1234/x"), "***@somehost:1234/x");
/// assert_eq!(redact_url("memory://?capacity=5"), "memory://?capacity=5");
/// ```
pub fn redact_url(url: &str) -> Cow<'_, str> {
    let parts = UrlParts::of(url);
    let query = redact_query(parts.after);
    if parts.userinfo.is_none() && matches!(query, Cow::Borrowed(_)) {
        return Cow::Borrowed(url);
    }
    let userinfo = if parts.userinfo.is_some() { "***@" } else { "" };
    Cow::Owned(format!("{}{userinfo}{query}", parts.scheme))
}

/// A URL cut around its userinfo.
struct UrlParts<'a> {
    /// `amqp://`, or empty.
    scheme: &'a str,
    /// What comes before the host's `@`.
    userinfo: Option<&'a str>,
    /// The host and everything after it.
    after: &'a str,
}

impl<'a> UrlParts<'a> {
    fn of(url: &'a str) -> Self {
        let (scheme, rest) = match url.find("://") {
            Some(i) if is_scheme(&url[..i]) => url.split_at(i + 3),
            _ => ("", url),
        };
        let query_at = rest.find(['?', '#']).unwrap_or(rest.len());
        let credentials_end = rest[..query_at].rfind('@').or_else(|| {
            // A `?` or `#` inside a password: the `@` comes after it, before any `key=value`.
            let tail = &rest[query_at..];
            let pairs_at = tail.find('=').unwrap_or(tail.len());
            tail[..pairs_at].rfind('@').map(|at| query_at + at)
        });
        match credentials_end {
            Some(at) => UrlParts {
                scheme,
                userinfo: Some(&rest[..at]),
                after: &rest[at + 1..],
            },
            None => UrlParts {
                scheme,
                userinfo: None,
                after: rest,
            },
        }
    }
}

/// Whether `s` is a URL scheme: a letter, then letters, digits, `+`, `-` or `.`.
pub(crate) fn is_scheme(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Hides the values of secret-looking parameters in the query part of `rest`
/// (`host/path?a=1&password=x`).
fn redact_query(rest: &str) -> Cow<'_, str> {
    let Some(q) = rest.find('?') else {
        return Cow::Borrowed(rest);
    };
    let (head, query) = rest.split_at(q + 1);
    let (query, fragment) = match query.find('#') {
        Some(h) => query.split_at(h),
        None => (query, ""),
    };
    let mut changed = false;
    let pairs: Vec<Cow<'_, str>> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if is_secret_name(key) => {
                changed = true;
                Cow::Owned(format!("{key}={HIDDEN}"))
            }
            // A URL as a value (`endpoint=http://user:pass@host`, perhaps percent-encoded):
            // its own userinfo is hidden too (shown decoded when it had to change).
            Some((key, value))
                if value.contains("://") || value.to_ascii_uppercase().contains("%3A%2F%2F") =>
            {
                let decoded = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
                match redact_url(&decoded) {
                    Cow::Owned(hidden) => {
                        changed = true;
                        Cow::Owned(format!("{key}={hidden}"))
                    }
                    Cow::Borrowed(_) => Cow::Borrowed(pair),
                }
            }
            _ => Cow::Borrowed(pair),
        })
        .collect();
    if !changed {
        return Cow::Borrowed(rest);
    }
    Cow::Owned(format!("{head}{}{fragment}", pairs.join("&")))
}

/// Whether an option named `name` (a field, a map key or a dotted path) holds a secret.
/// Paths to files (`credentials_file`, `ssl.key.location`) are not secrets; their content is.
pub(crate) fn is_secret_name(name: &str) -> bool {
    const SECRET: &[&str] = &[
        "password",
        "passwd",
        "passphrase",
        "secret",
        "token",
        "credential",
        "apikey",
        "api_key",
        "api-key",
        "private_key",
        "private-key",
        "privatekey",
        "key.pem",
        "jaas",
        "oauthbearer.config",
        "authorization",
        "userinfo",
    ];
    let name = name.to_ascii_lowercase();
    let name = name.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    if ["file", "path", "location"]
        .iter()
        .any(|end| name.ends_with(end))
    {
        return false;
    }
    SECRET.iter().any(|word| name.contains(word))
}

/// Free text (an error message from elsewhere, a `Debug` rendering) with every
/// `scheme://…` URL in it passed through [`redact_url`]. A URL ends at whitespace or a
/// quote; inside a Debug string literal (`"amqp://…"`) it runs to the closing quote, and
/// several URLs in one literal (`"nats://a:1,nats://b:2"`) are redacted one by one.
pub(crate) fn redact_text(text: &str) -> Cow<'_, str> {
    let urls = urls_in(text);
    if urls.is_empty() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut done = 0;
    for (start, end) in urls {
        out.push_str(&text[done..start]);
        out.push_str(&redact_url(&text[start..end]));
        done = end;
    }
    out.push_str(&text[done..]);
    Cow::Owned(out)
}

/// Where the `scheme://…` URLs in `text` start and end (see [`redact_text`]).
fn urls_in(text: &str) -> Vec<(usize, usize)> {
    let mut urls = Vec::new();
    let mut search = 0;
    while let Some(found) = text[search..].find("://") {
        let sep = search + found;
        let start = sep
            - text[..sep]
                .chars()
                .rev()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
                .map(char::len_utf8)
                .sum::<usize>();
        if start == sep || urls.last().is_some_and(|&(_, end)| start < end) {
            search = sep + 3;
            continue;
        }
        let end = if text[..start].ends_with('"') {
            literal_end(text, start - 1).saturating_sub(1).max(sep + 3)
        } else {
            text[sep + 3..]
                .find(|c: char| c.is_whitespace() || matches!(c, '`' | '"' | '\'' | '<' | '>'))
                .map_or(text.len(), |e| sep + 3 + e)
        };
        // Several URLs in one token: each ends where `,scheme://` starts the next.
        let end = next_url_in(text, sep + 3, end).unwrap_or(end);
        urls.push((start, end));
        search = end.max(sep + 3);
    }
    urls
}

/// The credentials in a `Debug` rendering: URL passwords (or tokens in the user position),
/// secret query parameters, and the string values of secret-looking fields, each as written
/// and percent-decoded. Shorter than 3 characters they are left out: hiding them would
/// mangle every message.
pub(crate) fn secrets_in_debug(text: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for (start, end) in urls_in(text) {
        let parts = UrlParts::of(&text[start..end]);
        if let Some(userinfo) = parts.userinfo {
            found.push(userinfo.to_owned());
            let password = userinfo.split_once(':').map_or(userinfo, |(_, p)| p);
            found.push(password.to_owned());
        }
        if let Some((_, query)) = parts.after.split_once('?') {
            for pair in query.split(['&', '#']) {
                if let Some((key, value)) = pair.split_once('=') {
                    if is_secret_name(key) {
                        found.push(value.to_owned());
                    }
                }
            }
        }
    }
    let mut search = 0;
    while let Some(at) = text[search..].find(": ") {
        let colon = search + at;
        search = colon + 2;
        if !key_before(&text[..colon]).is_some_and(is_secret_name) {
            continue;
        }
        let literal = colon
            + 2
            + if text[colon + 2..].starts_with("Some(") {
                5
            } else {
                0
            };
        if text[literal..].starts_with('"') {
            let end = literal_end(text, literal);
            let inner = &text[literal + 1..end.saturating_sub(1).max(literal + 1)];
            found.push(inner.replace("\\\"", "\"").replace("\\\\", "\\"));
            search = end;
        }
    }
    let decoded: Vec<String> = found
        .iter()
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    found.extend(decoded);
    found.retain(|s| s.chars().count() >= 3 && s != HIDDEN);
    // Longest first, so a secret containing another is hidden whole.
    found.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    found.dedup();
    found
}

/// Where, within `text[from..end]`, a `,scheme://` begins (the position of the comma).
fn next_url_in(text: &str, from: usize, end: usize) -> Option<usize> {
    let token = &text[from..end];
    let mut at = 0;
    while let Some(comma) = token[at..].find(',') {
        let comma = at + comma;
        let next = &token[comma + 1..];
        let scheme_len = next
            .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .unwrap_or(next.len());
        if scheme_len > 0 && next[scheme_len..].starts_with("://") {
            return Some(from + comma);
        }
        at = comma + 1;
    }
    None
}

/// The index just past the string literal opening at `text[open]` (a `"`), honouring
/// backslash escapes; `text.len()` when it never closes.
fn literal_end(text: &str, open: usize) -> usize {
    let mut escaped = false;
    for (i, c) in text[open + 1..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return open + 1 + i + 1,
            _ => {}
        }
    }
    text.len()
}

/// A `Debug` rendering with credentials hidden: URLs through [`redact_text`], and the
/// string value of every field or map key whose name looks secret (`password: Some("…")`,
/// `"sasl.password": "…"`) replaced by `"***"`.
pub(crate) fn redact_debug(text: &str) -> String {
    let text = redact_text(text);
    let mut out = String::with_capacity(text.len());
    let mut done = 0;
    let mut search = 0;
    while let Some(found) = text[search..].find(": ") {
        let colon = search + found;
        let value_at = colon + 2;
        search = value_at;
        if !key_before(&text[..colon]).is_some_and(is_secret_name) {
            continue;
        }
        let mut literal = value_at;
        if text[literal..].starts_with("Some(") {
            literal += "Some(".len();
        }
        if !text[literal..].starts_with('"') {
            continue;
        }
        let end = literal_end(&text, literal);
        out.push_str(&text[done..literal]);
        out.push('"');
        out.push_str(HIDDEN);
        out.push('"');
        done = end;
        search = end;
    }
    out.push_str(&text[done..]);
    out
}

/// The field name or quoted map key that ends `text` (just before a `: `).
fn key_before(text: &str) -> Option<&str> {
    if let Some(inner) = text.strip_suffix('"') {
        // A quoted key: back to its unescaped opening quote.
        let bytes = inner.as_bytes();
        let mut i = inner.len();
        while i > 0 {
            i -= 1;
            if bytes[i] == b'"' && (i == 0 || bytes[i - 1] != b'\\') {
                return Some(&inner[i + 1..]);
            }
        }
        return None;
    }
    let len = text
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .count();
    (len > 0).then(|| &text[text.len() - len..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_userinfo_and_secret_parameters() {
        let cases = [
            ("memory://", "memory://"),
            ("kafka://h1:9092,h2:9092", "kafka://h1:9092,h2:9092"),
            (
                "amqp://guest:hunter2@127.0.0.1:5672/%2f",
                "amqp://***@127.0.0.1:5672/%2f",
            ),
            ("nats://hunter2@127.0.0.1:4222", "nats://***@127.0.0.1:4222"),
            (
                "memory://user:hunter2@somehost:1234/x",
                "memory://***@somehost:1234/x",
            ),
            ("user:hunter2@somehost:1234", "***@somehost:1234"),
            ("user:hunter2@host/x://y", "***@host/x://y"),
            // Unencoded `/`, `@`, `?` in a password: hide more rather than less.
            ("amqp://u:hun/ter2@h:1/v", "amqp://***@h:1/v"),
            ("amqp://u:hun@ter2@h:1/v", "amqp://***@h:1/v"),
            ("amqp://u:hun?ter2@h:1/v", "amqp://***@h:1/v"),
            (
                "nats://h:1?password=hunter2&x=1&sasl.password=hunter2",
                "nats://h:1?password=***&x=1&sasl.password=***",
            ),
            ("kafka://h:1?client_id=a@b", "kafka://h:1?client_id=a@b"),
            // URLs in values lose their userinfo too.
            (
                "sqs://r?endpoint=http://u:hunter2@h:1&fifo=true",
                "sqs://r?endpoint=http://***@h:1&fifo=true",
            ),
            (
                "sqs://r?endpoint=http%3A%2F%2Fu%3Ahunter2%40h%3A1",
                "sqs://r?endpoint=http://***@h:1",
            ),
            (
                "sqs://r?endpoint=http://127.0.0.1:4566",
                "sqs://r?endpoint=http://127.0.0.1:4566",
            ),
        ];
        for (url, want) in cases {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    #[test]
    fn secret_names() {
        for name in [
            "password",
            "sasl.password",
            "ssl.key.password",
            "token",
            "api_key",
            "client_secret",
            "sasl.jaas.config",
            "credentials_json",
        ] {
            assert!(is_secret_name(name), "{name}");
        }
        for name in [
            "capacity",
            "url",
            "user",
            "credentials_file",
            "ssl.key.location",
            "binding_key",
        ] {
            assert!(!is_secret_name(name), "{name}");
        }
    }

    #[test]
    fn free_text_urls_are_redacted() {
        assert_eq!(
            redact_text("cannot connect to amqp://u:hunter2@h:1/%2f: refused"),
            "cannot connect to amqp://***@h:1/%2f: refused"
        );
        assert_eq!(
            redact_text(r#"url: "nats://a:hunter2@h1:1,nats://b:hunter2@h2:2", x"#),
            r#"url: "nats://***@h1:1,nats://***@h2:2", x"#
        );
        assert_eq!(
            redact_text(r#"url: "amqp://u:hun ter\"2@h:1", x"#),
            r#"url: "amqp://***@h:1", x"#
        );
        assert_eq!(redact_text("no urls here"), "no urls here");
    }

    #[test]
    fn debug_text_hides_secret_fields() {
        let text = r#"C { user: Some("app"), password: Some("hunter2"), token: None, properties: {"sasl.password": "hunter2", "linger.ms": "5"}, url: "nats://x:hunter2@h:1" }"#;
        let redacted = redact_debug(text);
        assert!(!redacted.contains("hunter2"), "{redacted}");
        assert!(redacted.contains(r#"user: Some("app")"#), "{redacted}");
        assert!(redacted.contains(r#""linger.ms": "5""#), "{redacted}");
        assert!(redacted.contains(r#"password: Some("***")"#), "{redacted}");
    }
}
