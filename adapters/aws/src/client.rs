//! The SDK clients, calls with a deadline, and errors that name what failed.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use tidemill_core::{ConnectionState, Error, Result};

use crate::config::AwsConfig;
use crate::BROKER;

/// The SNS and SQS clients of one publisher or subscriber.
#[derive(Clone, Debug)]
pub(crate) struct Clients {
    pub(crate) sqs: aws_sdk_sqs::Client,
    pub(crate) sns: aws_sdk_sns::Client,
}

impl Clients {
    /// Loads the SDK configuration (region, credentials chain, endpoint, timeouts) and
    /// checks the endpoint answers within `connect_timeout`.
    pub(crate) async fn connect(config: &AwsConfig) -> Result<Clients> {
        config.validate()?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(config.connect_timeout)
                .build(),
        );
        if let Some(region) = &config.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &config.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(profile) = &config.profile {
            loader = loader.profile_name(profile);
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(Error::config(
                BROKER,
                "no AWS region: set `region` (or AWS_REGION, or a profile's region)",
            ));
        }
        let clients = Clients {
            sqs: aws_sdk_sqs::Client::new(&sdk),
            sns: aws_sdk_sns::Client::new(&sdk),
        };
        // One cheap call, so a wrong endpoint or missing or invalid credentials fail here
        // and now. An identity that may not list queues (`AccessDenied`) still connects:
        // it needs only the calls it makes.
        let probe = clients.sqs.list_queues().max_results(1).send();
        match tokio::time::timeout(config.connect_timeout, probe).await {
            Ok(Ok(_)) => Ok(clients),
            Ok(Err(e))
                if matches!(e, SdkError::ServiceError(_))
                    && matches!(e.code(), Some("AccessDenied" | "AccessDeniedException")) =>
            {
                tracing::debug!(address = %config.address(), "connected; the identity may not list queues");
                Ok(clients)
            }
            Ok(Err(e)) => {
                let text = chain(&e);
                let source = if text.contains("loading credentials") {
                    format!(
                        "no usable AWS credentials (the SDK's chain looks at AWS_ACCESS_KEY_ID / \
                         AWS_SECRET_ACCESS_KEY, the shared config and credentials files, SSO, web \
                         identity, container and instance roles): {text}"
                    )
                } else {
                    text
                };
                Err(Error::Connect {
                    broker: BROKER,
                    address: config.address(),
                    source: source.into(),
                })
            }
            Err(_) => Err(Error::Connect {
                broker: BROKER,
                address: config.address(),
                source: format!("no answer within {:?}", config.connect_timeout).into(),
            }),
        }
    }
}

/// What kind of failure an SDK error is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The endpoint could not be reached or did not answer in time: retry.
    Unreachable,
    /// The service is busy or failed internally: retry.
    Busy,
    /// The queue, topic or subscription does not exist (deleted, or an emulator restarted).
    Missing,
    /// Anything else (access denied, invalid request): retrying will not help.
    Other,
}

/// A classified SDK error with its full text (SDK errors' `Display` alone is terse).
#[derive(Debug)]
pub(crate) struct CallError {
    pub(crate) failure: Failure,
    text: String,
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl StdError for CallError {}

impl CallError {
    pub(crate) fn new<E, R>(e: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
        R: fmt::Debug + Send + Sync + 'static,
    {
        let failure = match &e {
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => Failure::Unreachable,
            SdkError::ResponseError(_) => Failure::Busy,
            SdkError::ServiceError(_) => classify(e.code()),
            _ => Failure::Other,
        };
        CallError {
            failure,
            text: chain(&e),
        }
    }

    /// A deadline that passed.
    pub(crate) fn timeout(after: Duration) -> Self {
        CallError {
            failure: Failure::Unreachable,
            text: format!("no answer within {after:?}"),
        }
    }

    /// Whether retrying may succeed.
    pub(crate) fn transient(&self) -> bool {
        matches!(self.failure, Failure::Unreachable | Failure::Busy)
    }

    /// Into Tidemill's error, naming the topic and what was being done.
    pub(crate) fn into_error(self, topic: &str, context: impl Into<String>) -> Error {
        if self.transient() {
            Error::transient(BROKER, topic, context, self)
        } else {
            Error::permanent(BROKER, topic, context, self)
        }
    }
}

/// An error and its sources, each by its `Display`, joined with `: ` (the SDK's own
/// `DisplayErrorContext` appends a `Debug` dump of the response, headers included).
/// Service errors also name their code.
fn chain<E, R>(e: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    R: fmt::Debug + Send + Sync + 'static,
{
    let mut text = match (e, e.code()) {
        (SdkError::ServiceError(_), Some(code)) => match e.message() {
            Some(message) => format!("service error {code}: {message}"),
            None => format!("service error {code}"),
        },
        _ => e.to_string(),
    };
    let mut source = StdError::source(e);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

fn classify(code: Option<&str>) -> Failure {
    match code.unwrap_or("") {
        "AWS.SimpleQueueService.NonExistentQueue"
        | "QueueDoesNotExist"
        | "NotFound"
        | "NotFoundException"
        | "ResourceNotFoundException" => Failure::Missing,
        "ThrottlingException"
        | "Throttling"
        | "RequestThrottled"
        | "ServiceUnavailable"
        | "InternalError"
        | "InternalFailure"
        | "InternalErrorException"
        | "KMSThrottlingException"
        | "RequestTimeout" => Failure::Busy,
        _ => Failure::Other,
    }
}

/// Runs `call` (an SDK request), retrying transient failures with a growing pause until
/// `deadline` passes; records what it saw in `state`.
pub(crate) async fn call<T, E, R, F, Fut>(
    state: &StateCell,
    deadline: Duration,
    mut call: F,
) -> std::result::Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, SdkError<E, R>>>,
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    R: fmt::Debug + Send + Sync + 'static,
{
    let until = tokio::time::Instant::now() + deadline;
    let mut pause = Duration::from_millis(50);
    loop {
        let attempt = tokio::time::timeout_at(until, call()).await;
        let err = match attempt {
            Ok(Ok(out)) => {
                state.set(ConnectionState::Connected);
                return Ok(out);
            }
            Ok(Err(e)) => CallError::new(e),
            Err(_) => CallError::timeout(deadline),
        };
        if err.failure == Failure::Unreachable {
            state.set(ConnectionState::Disconnected);
        }
        if !err.transient() || tokio::time::Instant::now() + pause >= until {
            return Err(err);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// A connection's state as calls found it, for health checks.
pub(crate) type StateCell = tidemill_core::ConnectionStateCell;
