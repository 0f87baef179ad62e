//! Connections, errors and the parsing of stream replies.

use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, RedisError, Value};
use tidemill_core::{ConnectionState, Error, Result};

use crate::codec::Fields;
use crate::config::RedisConfig;
use crate::BROKER;

/// A client for `config.url`; fails naming the URL (password hidden).
pub(crate) fn client(config: &RedisConfig) -> Result<Client> {
    config.validate()?;
    if config.url.starts_with("rediss://") {
        // redis-rs builds its TLS configuration with the process's default rustls crypto
        // provider; when the application installed none, use ring's.
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
    }
    if let Some(path) = &config.tls_ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| Error::config(BROKER, format!("tls_ca_file `{}`: {e}", path.display())))?;
        let certificates = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        };
        return Client::build_with_tls(config.url.as_str(), certificates).map_err(|e| {
            Error::config(
                BROKER,
                format!(
                    "url `{}` with tls_ca_file `{}`: {}",
                    config.address(),
                    path.display(),
                    strip(&e, config)
                ),
            )
        });
    }
    Client::open(config.url.as_str()).map_err(|e| {
        Error::config(
            BROKER,
            format!("url `{}`: {}", config.address(), strip(&e, config)),
        )
    })
}

/// The connection commands go through: multiplexed (concurrent commands share it) and
/// reconnecting by itself after a failure.
pub(crate) async fn manager(client: &Client, config: &RedisConfig) -> Result<ConnectionManager> {
    let cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.command_timeout))
        .set_number_of_retries(3)
        .set_max_delay(Duration::from_secs(2));
    within_connect_timeout(
        config,
        ConnectionManager::new_with_config(client.clone(), cfg),
    )
    .await
}

/// A connection of its own for a subscription's blocking reads (a blocked `XREADGROUP`
/// holds up every command behind it on its connection).
pub(crate) async fn reading(
    client: &Client,
    config: &RedisConfig,
) -> Result<MultiplexedConnection> {
    let cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.block + config.command_timeout));
    within_connect_timeout(
        config,
        client.get_multiplexed_async_connection_with_config(&cfg),
    )
    .await
}

/// `connect`'s connection, or an error naming the address, within `connect_timeout`.
async fn within_connect_timeout<C>(
    config: &RedisConfig,
    connect: impl std::future::Future<Output = Result<C, RedisError>>,
) -> Result<C> {
    match tokio::time::timeout(config.connect_timeout, connect).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(connect_error(config, strip(&e, config))),
        Err(_) => Err(connect_error(
            config,
            format!("no connection within {:?}", config.connect_timeout),
        )),
    }
}

fn connect_error(config: &RedisConfig, cause: String) -> Error {
    Error::Connect {
        broker: BROKER,
        address: config.address(),
        source: cause.into(),
    }
}

/// The error's text, with the URL's password removed should the client quote it.
pub(crate) fn strip(e: &RedisError, config: &RedisConfig) -> String {
    let text = e.to_string();
    match password(&config.url) {
        Some(p) if !p.is_empty() && text.contains(p) => text.replace(p, "***"),
        _ => text,
    }
}

fn password(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let query = rest.find(['?', '#']).unwrap_or(rest.len());
    let userinfo = &rest[..rest[..query].rfind('@')?];
    userinfo.split_once(':').map(|(_, p)| p)
}

/// Whether retrying may help: connection trouble, timeouts, a server loading its data.
pub(crate) fn is_transient(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.code(),
            Some("LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN")
        )
}

/// A failed command as Tidemill's error.
pub(crate) fn error(e: RedisError, config: &RedisConfig, topic: &str, context: &str) -> Error {
    let text = strip(&e, config);
    let source = format!("{text} (server {})", config.address());
    if is_transient(&e) {
        Error::transient(BROKER, topic, context, source)
    } else {
        Error::permanent(BROKER, topic, context, source)
    }
}

/// Runs `cmd` on `conn`, trying again after connection trouble (the connection manager
/// reconnects meanwhile) until `command_timeout` is over. Only for commands that may run
/// twice without harm.
pub(crate) async fn query_retrying(
    conn: &ConnectionManager,
    cmd: &redis::Cmd,
    config: &RedisConfig,
    state: &StateCell,
) -> Result<Value, RedisError> {
    let deadline = tokio::time::Instant::now() + config.command_timeout;
    let mut pause = Duration::from_millis(50);
    loop {
        let mut conn = conn.clone();
        let result = cmd.query_async(&mut conn).await;
        saw(state, &result);
        match result {
            Err(e) if is_transient(&e) && tokio::time::Instant::now() + pause < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// Whether the error says the consumer group (or its stream) does not exist.
pub(crate) fn is_nogroup(e: &RedisError) -> bool {
    e.code() == Some("NOGROUP")
}

/// A connection's state as commands found it, for health checks.
pub(crate) type StateCell = tidemill_core::ConnectionStateCell;

/// Notes what a command's result says about the connection.
pub(crate) fn saw<T>(state: &StateCell, result: &Result<T, RedisError>) {
    match result {
        Ok(_) => state.set(ConnectionState::Connected),
        Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() => {
            state.set(ConnectionState::Disconnected)
        }
        Err(_) => {}
    }
}

/// One stream entry: id and fields (`None` for an entry trimmed away while pending).
pub(crate) type RawEntry = (String, Option<Fields>);

fn bytes(v: Value) -> Option<Bytes> {
    match v {
        Value::BulkString(b) => Some(Bytes::from(b)),
        Value::SimpleString(s) => Some(Bytes::from(s)),
        Value::Int(i) => Some(Bytes::from(i.to_string())),
        _ => None,
    }
}

pub(crate) fn string(v: Value) -> Option<String> {
    bytes(v).and_then(|b| String::from_utf8(b.to_vec()).ok())
}

fn array(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) | Value::Set(items) => items,
        Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    }
}

/// `[id, [field, value, …]]` entries.
pub(crate) fn entries(v: Value) -> Vec<RawEntry> {
    array(v)
        .into_iter()
        .filter_map(|entry| {
            let mut parts = array(entry).into_iter();
            let id = string(parts.next()?)?;
            let fields = match parts.next() {
                Some(Value::Nil) | None => None,
                Some(list) => {
                    let mut flat = array(list).into_iter();
                    let mut fields = Vec::new();
                    while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                        fields.push((bytes(k).unwrap_or_default(), bytes(v).unwrap_or_default()));
                    }
                    Some(fields)
                }
            };
            Some((id, fields))
        })
        .collect()
}

/// The entries of an `XREADGROUP` reply for one stream (nil: none arrived in time).
pub(crate) fn read_reply(v: Value) -> Vec<RawEntry> {
    array(v)
        .into_iter()
        .flat_map(|stream| {
            let mut parts = array(stream).into_iter();
            let _name = parts.next();
            parts.next().map(entries).unwrap_or_default()
        })
        .collect()
}

/// An `XAUTOCLAIM` reply: the cursor to continue from and the entries taken.
pub(crate) fn autoclaim_reply(v: Value) -> (String, Vec<RawEntry>) {
    let mut parts = array(v).into_iter();
    let cursor = parts
        .next()
        .and_then(string)
        .unwrap_or_else(|| "0-0".into());
    let taken = parts.next().map(entries).unwrap_or_default();
    (cursor, taken)
}

/// An extended `XPENDING` reply: (id, consumer, idle ms, delivery count) per entry.
pub(crate) fn pending_reply(v: Value) -> Vec<(String, String, u64, u64)> {
    array(v)
        .into_iter()
        .filter_map(|row| {
            let mut p = array(row).into_iter();
            let id = string(p.next()?)?;
            let consumer = string(p.next()?)?;
            let idle = int(p.next()?)?;
            let count = int(p.next()?)?;
            Some((id, consumer, idle, count))
        })
        .collect()
}

pub(crate) fn int(v: Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(i).ok(),
        other => string(other)?.parse().ok(),
    }
}

/// `XINFO CONSUMERS`: (name, pending, idle ms) per consumer.
pub(crate) fn consumers_reply(v: Value) -> Vec<(String, u64, u64)> {
    array(v)
        .into_iter()
        .filter_map(|c| {
            let mut flat = array(c).into_iter();
            let (mut name, mut pending, mut idle) = (None, None, None);
            while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                match string(k).as_deref() {
                    Some("name") => name = string(v),
                    Some("pending") => pending = int(v),
                    Some("idle") => idle = int(v),
                    _ => {}
                }
            }
            Some((name?, pending?, idle?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn parses_read_replies() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("orders"),
            Value::Array(vec![
                Value::Array(vec![bulk("1-0"), Value::Array(vec![bulk("a"), bulk("1")])]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let got = read_reply(reply);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "1-0");
        assert_eq!(
            got[0].1.as_ref().unwrap()[0],
            (Bytes::from("a"), Bytes::from("1"))
        );
        assert!(got[1].1.is_none());
        assert!(read_reply(Value::Nil).is_empty());
    }

    #[test]
    fn hides_the_password_in_errors() {
        assert_eq!(password("redis://u:hunter2@h:1/0"), Some("hunter2"));
        assert_eq!(password("redis://:p@h"), Some("p"));
        assert_eq!(password("redis://h:1/0"), None);
    }
}
