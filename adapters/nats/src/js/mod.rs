//! JetStream: where a topic lives (stream and subject), publishing, pull subscriptions.

mod order;
pub(crate) mod publisher;
pub(crate) mod subscriber;

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::jetstream::context::{
    CreateStreamErrorKind, GetStreamByNameErrorKind, GetStreamErrorKind,
};
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::{Context, ContextBuilder};
use async_nats::{Client, Subject};
use parking_lot::RwLock;
use tidemill_core::{Error, Result};

use crate::config::{NatsConfig, Retention, Storage};
use crate::naming;
use crate::BROKER;

/// A JetStream context configured as the adapter needs it: `request_timeout` for API
/// calls and PubAcks, `max_ack_inflight` PubAcks without back-pressure (the publisher
/// bounds what it has in flight itself, so publishing never blocks on a permit held by an
/// un-awaited PubAck), and the configured domain.
pub(crate) fn context(client: &Client, config: &NatsConfig) -> Context {
    let builder = ContextBuilder::new()
        .timeout(config.request_timeout)
        .max_ack_inflight(config.jetstream.max_ack_inflight)
        .backpressure_on_inflight(false);
    match &config.jetstream.domain {
        Some(domain) => builder.domain(domain.as_str()).build(client.clone()),
        None => builder.build(client.clone()),
    }
}

/// Where a topic's messages go.
#[derive(Debug)]
pub(crate) struct Target {
    /// The topic as the application names it.
    pub topic: String,
    /// The stream holding its subject.
    pub stream: String,
    /// The subject its messages are published to.
    pub subject: Subject,
    /// Whether the stream was created by the adapter for this topic alone (consumer names
    /// then need not mention the topic).
    pub dedicated: bool,
}

/// Topic → stream resolution, created on demand and cached.
pub(crate) struct Streams {
    ctx: Context,
    config: Arc<NatsConfig>,
    known: RwLock<HashMap<String, Arc<Target>>>,
}

/// Whether a JetStream API failure is worth retrying (the API is briefly unavailable,
/// e.g. while the server restarts, or the request timed out).
fn api_error(topic: &str, context: &str, source: impl std::fmt::Display, retry: bool) -> Error {
    let source = source.to_string();
    if retry {
        Error::transient(BROKER, topic, context, source)
    } else {
        Error::permanent(BROKER, topic, context, source)
    }
}

fn is_retryable_api(err: &async_nats::jetstream::Error) -> bool {
    // 503: JetStream temporarily unavailable; 500 with "insufficient resources" etc. are
    // conditions that may clear.
    err.code() >= 500
}

impl Streams {
    pub(crate) fn new(ctx: Context, config: Arc<NatsConfig>) -> Self {
        Streams {
            ctx,
            config,
            known: RwLock::new(HashMap::new()),
        }
    }

    pub(crate) fn context(&self) -> &Context {
        &self.ctx
    }

    /// The stream and subject of `topic`, creating the stream when needed (and allowed).
    pub(crate) async fn target(&self, topic: &str) -> Result<Arc<Target>> {
        if let Some(t) = self.known.read().get(topic) {
            return Ok(t.clone());
        }
        let target = Arc::new(self.resolve(topic).await?);
        self.known.write().insert(topic.to_owned(), target.clone());
        Ok(target)
    }

    /// Forgets what is known about `topic` (its stream vanished); the next `target` call
    /// looks it up (and creates it) again.
    pub(crate) fn forget(&self, topic: &str) {
        self.known.write().remove(topic);
    }

    async fn resolve(&self, topic: &str) -> Result<Target> {
        let js = &self.config.jetstream;
        let subject = naming::subject_for(&self.config.subject_prefix, topic)?;
        if let Some(shared) = &js.stream {
            self.ensure_shared(topic, shared, &subject).await?;
            return Ok(Target {
                topic: topic.to_owned(),
                stream: shared.clone(),
                subject: subject.into(),
                dedicated: false,
            });
        }
        let own = format!("{}{}", js.stream_prefix, naming::derive_name(topic));
        for attempt in 0..2 {
            if let Some(stream) = self.stream_for(topic, &subject).await? {
                return Ok(Target {
                    topic: topic.to_owned(),
                    dedicated: stream == own,
                    stream,
                    subject: subject.into(),
                });
            }
            if !js.create_streams {
                return Err(Error::permanent(
                    BROKER,
                    topic,
                    "find the stream",
                    format!(
                        "no JetStream stream captures subject `{subject}` and \
                         `jetstream.create_streams` is off"
                    ),
                ));
            }
            match self
                .ctx
                .create_stream(self.stream_config(&own, &subject))
                .await
            {
                Ok(_) => {
                    tracing::debug!(broker = BROKER, topic, stream = %own, %subject, "created stream");
                    return Ok(Target {
                        topic: topic.to_owned(),
                        stream: own,
                        subject: subject.into(),
                        dedicated: true,
                    });
                }
                Err(e) => {
                    let conflict = matches!(e.kind(), CreateStreamErrorKind::JetStream(ref je)
                        if je.error_code() == ErrorCode::STREAM_NAME_EXIST
                            || je.error_code() == ErrorCode::STREAM_SUBJECT_OVERLAP);
                    if conflict && attempt == 0 {
                        // Someone created it (or an overlapping one) meanwhile: look again.
                        continue;
                    }
                    let retry = match e.kind() {
                        CreateStreamErrorKind::JetStream(je) => is_retryable_api(&je),
                        CreateStreamErrorKind::TimedOut
                        | CreateStreamErrorKind::Response
                        | CreateStreamErrorKind::JetStreamUnavailable => true,
                        _ => false,
                    };
                    let hint = if conflict {
                        format!(
                            " (a stream named `{own}` exists without capturing `{subject}`, or \
                             another stream's subjects overlap it; set `jetstream.stream_prefix` \
                             or create the stream yourself)"
                        )
                    } else {
                        String::new()
                    };
                    return Err(api_error(
                        topic,
                        &format!("create stream `{own}` for subject `{subject}`"),
                        format!("{e}{hint}"),
                        retry,
                    ));
                }
            }
        }
        Err(Error::permanent(
            BROKER,
            topic,
            "find the stream",
            format!("no stream for subject `{subject}`"),
        ))
    }

    /// The name of the stream capturing `subject`, if any.
    async fn stream_for(&self, topic: &str, subject: &str) -> Result<Option<String>> {
        match self.ctx.stream_by_subject(subject).await {
            Ok(name) => Ok(Some(name)),
            Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => Ok(None),
            Err(e) => {
                let retry = !matches!(e.kind(), GetStreamByNameErrorKind::InvalidSubject);
                Err(api_error(
                    topic,
                    &format!("look up the stream of subject `{subject}`"),
                    e,
                    retry,
                ))
            }
        }
    }

    /// Makes sure the configured shared stream exists and captures `subject`.
    async fn ensure_shared(&self, topic: &str, name: &str, subject: &str) -> Result<()> {
        let js = &self.config.jetstream;
        let info = match self.ctx.get_stream(name).await {
            Ok(mut s) => s
                .info()
                .await
                .map_err(|e| api_error(topic, &format!("read stream `{name}`"), e, true))?
                .clone(),
            Err(e) => {
                let missing = matches!(e.kind(), GetStreamErrorKind::JetStream(ref je)
                    if je.error_code() == ErrorCode::STREAM_NOT_FOUND);
                if !missing {
                    let retry = match e.kind() {
                        GetStreamErrorKind::JetStream(je) => is_retryable_api(&je),
                        GetStreamErrorKind::Request => true,
                        _ => false,
                    };
                    return Err(api_error(topic, &format!("read stream `{name}`"), e, retry));
                }
                if !js.create_streams {
                    return Err(Error::permanent(
                        BROKER,
                        topic,
                        "find the stream",
                        format!(
                            "stream `{name}` (`jetstream.stream`) does not exist and \
                             `jetstream.create_streams` is off"
                        ),
                    ));
                }
                let subjects = format!("{}>", self.config.subject_prefix);
                let created = self
                    .ctx
                    .get_or_create_stream(self.stream_config(name, &subjects))
                    .await
                    .map_err(|e| {
                        api_error(
                            topic,
                            &format!("create stream `{name}` for subjects `{subjects}`"),
                            e,
                            true,
                        )
                    })?;
                created.cached_info().clone()
            }
        };
        if info
            .config
            .subjects
            .iter()
            .any(|pattern| naming::subject_matches(pattern, subject))
        {
            Ok(())
        } else {
            Err(Error::permanent(
                BROKER,
                topic,
                "find the stream",
                format!(
                    "stream `{name}` (`jetstream.stream`) does not capture subject `{subject}` \
                     (its subjects: {:?})",
                    info.config.subjects
                ),
            ))
        }
    }

    fn stream_config(&self, name: &str, subject: &str) -> stream::Config {
        let js = &self.config.jetstream;
        stream::Config {
            name: name.to_owned(),
            subjects: vec![subject.to_owned()],
            storage: match js.storage {
                Storage::File => StorageType::File,
                Storage::Memory => StorageType::Memory,
            },
            retention: match js.retention {
                Retention::Limits => RetentionPolicy::Limits,
                Retention::Interest => RetentionPolicy::Interest,
                Retention::WorkQueue => RetentionPolicy::WorkQueue,
            },
            num_replicas: js.replicas,
            max_age: js.max_age.unwrap_or_default(),
            max_messages: js.max_messages.unwrap_or(-1),
            max_bytes: js.max_bytes.unwrap_or(-1),
            duplicate_window: js.duplicate_window,
            description: Some("created by tidemill-nats".to_owned()),
            ..Default::default()
        }
    }
}
