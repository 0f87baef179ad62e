//! # tidemill-cqrs
//!
//! Typed commands and events over any Tidemill broker, in the spirit of Watermill's
//! `components/cqrs`:
//!
//! - [`CommandBus::send`] / [`EventBus::publish`] marshal a value (JSON by default, Protobuf
//!   with the `protobuf` feature), tag the message with the type's name (metadata
//!   [`NAME_KEY`] by default; [`TypeHeader`] picks another place, e.g. Watermill's `name`)
//!   and publish it to the topic the name maps to (`commands.<Name>` /
//!   `events.<Name>` by default, replaceable with [`TopicNaming`]).
//! - [`CommandProcessor`] runs exactly one handler per command type; [`EventProcessor`] runs
//!   any number of handlers per event type, each with its own consumer group, and event
//!   groups whose handlers share one subscription (and keep their relative order). Both run
//!   on the [`Router`](tidemill_core::Router), so router layers (retry, poison queue, ...)
//!   apply.
//! - [`CommandClient::send_and_wait`] sends a command and awaits its handler's verdict (its
//!   error comes back as [`CqrsError::CommandFailed`] with kind and message), over
//!   [request-reply](tidemill_middleware::request_reply); a processor set up
//!   [`with_replies`](CommandProcessor::with_replies) answers such commands, and handles
//!   plainly sent ones as before; handlers registered with
//!   [`handle_with_result`](CommandProcessor::handle_with_result) send back a typed result
//!   ([`CommandClient::send_and_wait_for`]). [`CommandProcessor::layer`] adds tower layers (e.g.
//!   `Retry`) around each handler, inside the reply.
//! - A message that does not decode (or carries no type name) fails with a permanent
//!   [`DecodeError`], so poison-queue middleware routes it to the poison topic with the
//!   error as the reason; it never panics and is never silently dropped. Types no handler
//!   knows follow an explicit [`UnknownTypePolicy`].
#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod bus;
mod error;
mod marshal;
mod name;
mod processor;
mod type_header;

pub use bus::{CommandBus, CommandClient, EventBus};
pub use error::{CqrsError, DecodeError};
#[cfg(feature = "protobuf")]
pub use marshal::Protobuf;
pub use marshal::{Json, Marshal, CONTENT_TYPE_KEY};
pub use name::{short_type_name, Command, Event, TopicNaming};
pub use processor::{CommandProcessor, Context, EventGroup, EventProcessor, UnknownTypePolicy};
pub use type_header::TypeHeader;

/// Metadata key holding the command or event name (the default [`TypeHeader`]).
pub const NAME_KEY: &str = "cqrs-name";
