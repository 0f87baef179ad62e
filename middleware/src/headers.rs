//! The metadata keys the layers read and write. Every key is a plain string, so it
//! survives every broker (Kafka/AMQP/NATS headers, Pub/Sub attributes).

/// Default key of the correlation id ([`CorrelationId`](crate::CorrelationId)).
pub const CORRELATION_ID: &str = "correlation-id";

/// Poison queue: why the message was poisoned (the handler's error, with its sources).
pub const POISON_REASON: &str = "tidemill-poison-reason";
/// Poison queue: the handler that failed.
pub const POISON_HANDLER: &str = "tidemill-poison-handler";
/// Poison queue: the topic the message was consumed from.
pub const POISON_TOPIC: &str = "tidemill-poison-topic";
/// Poison queue: the consumer group, when the handler had one.
pub const POISON_GROUP: &str = "tidemill-poison-group";
/// Poison queue: when it was poisoned (RFC 3339, UTC).
pub const POISON_TIME: &str = "tidemill-poison-time";

/// Dead letter: the last error (with its sources).
pub const DEAD_LETTER_REASON: &str = "tidemill-dead-letter-reason";
/// Dead letter: the handler that gave up.
pub const DEAD_LETTER_HANDLER: &str = "tidemill-dead-letter-handler";
/// Dead letter: the topic the message was consumed from.
pub const DEAD_LETTER_TOPIC: &str = "tidemill-dead-letter-topic";
/// Dead letter: the consumer group, when the handler had one.
pub const DEAD_LETTER_GROUP: &str = "tidemill-dead-letter-group";
/// Dead letter: when it was dead-lettered (RFC 3339, UTC).
pub const DEAD_LETTER_TIME: &str = "tidemill-dead-letter-time";
/// Dead letter: how many deliveries failed.
pub const DEAD_LETTER_DELIVERIES: &str = "tidemill-dead-letter-deliveries";
/// Dead letter: how the deliveries were counted: `broker` or `republish`.
pub const DEAD_LETTER_COUNTING: &str = "tidemill-dead-letter-counting";
/// Dead letter history: `tidemill-dead-letter-error-N` holds `TIME ERROR` of the N-th
/// failed delivery (as far as known).
pub const DEAD_LETTER_ERROR_PREFIX: &str = "tidemill-dead-letter-error-";

/// Durable counting: how many deliveries of this message failed so far (carried by the
/// copy the dead-letter layer republishes when the broker reports no delivery attempt).
pub const FAILURES: &str = "tidemill-failures";
/// Durable counting: the handler the count belongs to.
pub const FAILURES_HANDLER: &str = "tidemill-failures-handler";
/// Durable counting: the topic the copy was republished to (counts apply only there).
pub const FAILURES_TOPIC: &str = "tidemill-failures-topic";
/// Durable counting: the consumer group the count belongs to (absent without a group).
pub const FAILURES_GROUP: &str = "tidemill-failures-group";
/// Durable counting: the copy is not to be handled before this time (milliseconds since the
/// Unix epoch); the delay a delayed-redelivery layer asked for.
pub const NOT_BEFORE: &str = "tidemill-not-before";
/// Durable counting history: `tidemill-failure-N` holds `TIME ERROR` of the N-th failure.
pub const FAILURE_PREFIX: &str = "tidemill-failure-";

/// Request-reply: the topic the reply goes to.
pub const REPLY_TO: &str = "tidemill-reply-to";
/// Request-reply: the request's correlation id, copied into every reply.
pub const REQUEST_ID: &str = "tidemill-request-id";
/// Request-reply: `ok` or `error`.
pub const REPLY_STATUS: &str = "tidemill-reply-status";
/// Request-reply: the kind of a handler error (`permanent`, `timeout`, `error`).
pub const REPLY_ERROR_KIND: &str = "tidemill-reply-error-kind";
/// Request-reply: the handler error's message (with its sources).
pub const REPLY_ERROR: &str = "tidemill-reply-error";
/// Request-reply: this reply's number, from 1.
pub const REPLY_SEQ: &str = "tidemill-reply-seq";
/// Request-reply: how many replies the request gets.
pub const REPLY_COUNT: &str = "tidemill-reply-count";
