//! Names of commands and events, and the topics derived from them.

use std::borrow::Cow;
use std::sync::Arc;

/// A command: a request for something to be done, handled by exactly one handler.
///
/// Any `Send + Sync + 'static` type can be a command; the marshaler decides how it is
/// encoded (serde for [`Json`](crate::Json), prost for `Protobuf`). The name picks the topic
/// and tags each message; it defaults to the type's name without its module path.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use tidemill_cqrs::Command;
///
/// #[derive(Serialize, Deserialize)]
/// struct BookRoom { room: u32 }
/// impl Command for BookRoom {}
///
/// #[derive(Serialize, Deserialize)]
/// struct CancelBooking { id: String }
/// impl Command for CancelBooking {
///     fn name() -> std::borrow::Cow<'static, str> { "booking.cancel".into() }
/// }
/// assert_eq!(BookRoom::name(), "BookRoom");
/// assert_eq!(CancelBooking::name(), "booking.cancel");
/// ```
pub trait Command: Send + Sync + 'static {
    /// The command's name (default: the type name without module path).
    fn name() -> Cow<'static, str> {
        Cow::Owned(short_type_name::<Self>())
    }
}

/// An event: a fact that happened, delivered to every interested handler.
///
/// Like [`Command`], any `Send + Sync + 'static` type; the name defaults to the type name.
pub trait Event: Send + Sync + 'static {
    /// The event's name (default: the type name without module path).
    fn name() -> Cow<'static, str> {
        Cow::Owned(short_type_name::<Self>())
    }
}

pub use tidemill_core::marshal::short_type_name;

/// Maps a command or event name to a topic. Replaceable on buses and processors.
#[derive(Clone)]
pub struct TopicNaming(Arc<dyn Fn(&str) -> String + Send + Sync>);

impl TopicNaming {
    /// A naming function.
    pub fn new(f: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        TopicNaming(Arc::new(f))
    }

    /// `commands.<Name>`.
    pub fn commands() -> Self {
        Self::new(|name| format!("commands.{name}"))
    }

    /// `events.<Name>`.
    pub fn events() -> Self {
        Self::new(|name| format!("events.{name}"))
    }

    /// The topic for `name`.
    pub fn topic(&self, name: &str) -> String {
        (self.0)(name)
    }
}

impl std::fmt::Debug for TopicNaming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TopicNaming(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_topics() {
        assert_eq!(
            TopicNaming::commands().topic("BookRoom"),
            "commands.BookRoom"
        );
        assert_eq!(
            TopicNaming::events().topic("RoomBooked"),
            "events.RoomBooked"
        );
    }
}
