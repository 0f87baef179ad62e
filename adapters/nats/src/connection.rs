//! Connecting to NATS: options from the config, a time limit, and reconnect notifications.

use std::sync::Arc;

use async_nats::{Client, ConnectOptions, Event};
use tidemill_core::{Error, Result};
use tokio::sync::watch;

use crate::config::{NatsConfig, NatsMode};
use crate::wire::Wire;
use crate::BROKER;

/// A client connection plus a counter bumped on every (re)connect.
pub(crate) struct Connection {
    pub client: Client,
    pub reconnects: watch::Receiver<u64>,
}

fn connect_error(config: &NatsConfig, source: impl Into<tidemill_core::BoxError>) -> Error {
    Error::Connect {
        broker: BROKER,
        address: crate::config::redact_urls(&config.url),
        source: source.into(),
    }
}

/// Opens the delivery connection (see [`crate::wire`]), failing like [`connect`].
pub(crate) async fn connect_wire(config: &Arc<NatsConfig>) -> Result<Wire> {
    Wire::connect(config.clone())
        .await
        .map_err(|e| connect_error(config, crate::config::redact_text(&e.to_string(), config)))
}

/// Connects as `config` says, failing with [`Error::Connect`] naming the address once
/// every server was tried (each within `connect_timeout`). In JetStream mode, also checks that the server has JetStream.
pub(crate) async fn connect(config: &NatsConfig) -> Result<Connection> {
    config.validate()?;
    // Credentials in the URLs go to the options, not with the addresses: async-nats logs
    // the addresses it connects to.
    let mut url_user: Option<(String, Option<String>)> = None;
    let mut addrs = Vec::new();
    for addr in config.server_addrs()? {
        if url_user.is_none() {
            if let Some(user) = addr.username() {
                url_user = Some((user.to_owned(), addr.password().map(str::to_owned)));
            }
        }
        let mut url = addr.into_inner();
        let _ = url.set_username("");
        let _ = url.set_password(None);
        addrs.push(
            async_nats::ServerAddr::from_url(url)
                .map_err(|e| Error::config(BROKER, format!("`url`: {e}")))?,
        );
    }
    let (tx, rx) = watch::channel(0u64);
    let tx = Arc::new(tx);
    let url = crate::config::redact_urls(&config.url);
    let mut options = ConnectOptions::new()
        .connection_timeout(config.connect_timeout)
        .request_timeout(Some(config.request_timeout))
        .ping_interval(config.ping_interval)
        .max_reconnects(config.max_reconnects)
        .event_callback(move |event| {
            let (tx, url) = (tx.clone(), url.clone());
            async move {
                match event {
                    Event::Connected => {
                        tracing::debug!(broker = BROKER, address = %url, "connected");
                        tx.send_modify(|n| *n += 1);
                    }
                    Event::Disconnected => {
                        tracing::warn!(broker = BROKER, address = %url, "connection lost; reconnecting")
                    }
                    Event::Closed => tracing::debug!(broker = BROKER, address = %url, "connection closed"),
                    // `close` drains the client: nothing an operator needs to hear about.
                    Event::Draining => tracing::debug!(broker = BROKER, address = %url, "draining"),
                    other => tracing::warn!(broker = BROKER, address = %url, event = %other, "client event"),
                }
            }
        });
    if let Some(name) = &config.connection_name {
        options = options.name(name);
    }
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if config.user.is_none() && config.token.is_none() {
        match url_user {
            Some((user, Some(password))) => options = options.user_and_password(user, password),
            Some((token, None)) => options = options.token(token),
            None => {}
        }
    }
    if let Some(path) = &config.credentials_file {
        options = options.credentials_file(path).await.map_err(|e| {
            // The error names the file, never its content.
            Error::config(
                BROKER,
                format!("`credentials_file` {}: {}", path.display(), e.kind()),
            )
        })?;
    }
    if config.tls_required {
        options = options.require_tls(true);
    }
    if let Some(path) = &config.root_certificates {
        options = options.add_root_certificates(path.clone());
    }
    if config.ignore_discovered_servers {
        options = options.ignore_discovered_servers();
    }
    // async-nats tries each server once, each within `connect_timeout`: a first server
    // that hangs must not use up the time of the others.
    let servers = u32::try_from(addrs.len()).unwrap_or(u32::MAX).max(1);
    let limit = config.connect_timeout.saturating_mul(servers);
    let client = tokio::time::timeout(limit, options.connect(addrs))
        .await
        .map_err(|_| {
            connect_error(
                config,
                format!(
                    "no connection within {limit:?} (`connect_timeout` {:?} per server, {servers} servers)",
                    config.connect_timeout
                ),
            )
        })?
        .map_err(|e| connect_error(config, crate::config::redact_text(&e.to_string(), config)))?;
    if config.mode == NatsMode::JetStream {
        let js = crate::js::context(&client, config);
        tokio::time::timeout(config.connect_timeout, js.query_account())
            .await
            .map_err(|_| {
                connect_error(
                    config,
                    format!(
                        "JetStream did not answer within {:?} (`connect_timeout`); is JetStream enabled?",
                        config.connect_timeout
                    ),
                )
            })?
            .map_err(|e| {
                connect_error(
                    config,
                    format!("JetStream is not available (`mode` is `jet_stream`): {e}"),
                )
            })?;
    }
    Ok(Connection {
        client,
        reconnects: rx,
    })
}
