//! Where a command or event carries its type name.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use tidemill_core::Message;

use crate::NAME_KEY;

type Read = Arc<dyn for<'a> Fn(&'a Message) -> Option<Cow<'a, str>> + Send + Sync>;
type Write = Arc<dyn Fn(&mut Message, &str) + Send + Sync>;

/// Where commands and events carry their type name, so Tidemill services exchange them
/// with Watermill services and plain clients: a metadata entry (default [`NAME_KEY`],
/// `cqrs-name`; Watermill's CQRS component uses `name`), or any place a pair of functions
/// reads and writes (e.g. RabbitMQ's `type` property through the AMQP adapter's native
/// record). Buses write it; processors read it to dispatch.
///
/// ```
/// use tidemill_core::Message;
/// use tidemill_cqrs::TypeHeader;
///
/// let watermill = TypeHeader::watermill();
/// let mut msg = Message::new("{}");
/// watermill.write(&mut msg, "BookRoom");
/// assert_eq!(msg.metadata().get("name"), Some("BookRoom"));
/// assert_eq!(watermill.read(&msg).as_deref(), Some("BookRoom"));
/// assert_eq!(TypeHeader::default().read(&msg), None); // `cqrs-name` is absent
/// ```
#[derive(Clone)]
pub struct TypeHeader {
    read: Read,
    write: Write,
    describe: Arc<str>,
}

impl Default for TypeHeader {
    /// The metadata entry [`NAME_KEY`] (`cqrs-name`).
    fn default() -> Self {
        TypeHeader::metadata(NAME_KEY)
    }
}

impl TypeHeader {
    /// The metadata entry `key`.
    pub fn metadata(key: impl Into<String>) -> Self {
        let key: Arc<str> = Arc::from(key.into());
        let read_key = key.clone();
        let write_key = key.clone();
        TypeHeader {
            read: Arc::new(move |msg: &Message| msg.metadata().get(&read_key).map(Cow::Borrowed)),
            write: Arc::new(move |msg: &mut Message, name: &str| {
                msg.metadata_mut().set(&*write_key, name)
            }),
            describe: Arc::from(format!("`{key}` metadata").as_str()),
        }
    }

    /// Watermill's CQRS convention: the metadata entry `name`.
    pub fn watermill() -> Self {
        TypeHeader::metadata("name")
    }

    /// Read and written by functions; `describe` names the place in errors (e.g. "the AMQP
    /// `type` property").
    pub fn custom(
        describe: impl Into<String>,
        read: impl for<'a> Fn(&'a Message) -> Option<Cow<'a, str>> + Send + Sync + 'static,
        write: impl Fn(&mut Message, &str) + Send + Sync + 'static,
    ) -> Self {
        TypeHeader {
            read: Arc::new(read),
            write: Arc::new(write),
            describe: Arc::from(describe.into().as_str()),
        }
    }

    /// The type name `msg` carries, if any.
    pub fn read<'a>(&self, msg: &'a Message) -> Option<Cow<'a, str>> {
        (self.read)(msg)
    }

    /// Tags `msg` with the type name `name`.
    pub fn write(&self, msg: &mut Message, name: &str) {
        (self.write)(msg, name)
    }

    /// Where the name is carried, for messages and errors.
    pub fn describe(&self) -> &str {
        &self.describe
    }
}

impl fmt::Debug for TypeHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TypeHeader").field(&self.describe).finish()
    }
}
