//! Batch event handlers: projections that take many events at once.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tidemill_core::router::{BatchResult, BoxHandler, IntoBatchResult, Router};
use tidemill_core::{permanent, Message, Subscriber};

use super::{topic_of, Context, EventProcessor, UnknownTypePolicy, WrapHandler};
use crate::{CqrsError, DecodeError, Event, Marshal, TypeHeader};

/// The erased batch function: messages of the batch in, its result out.
type BatchCall = Arc<dyn Fn(Vec<Message>) -> BoxFuture<'static, BatchResult> + Send + Sync>;

/// A batch handler registration of an [`EventProcessor`].
pub(super) struct BatchSpec {
    pub(super) name: String,
    pub(super) type_name: String,
    max_messages: usize,
    max_wait: Duration,
    /// Builds the batch function once the processor's other types are known.
    make: Box<dyn Fn(Sorting) -> BatchCall + Send + Sync>,
}

/// How a batch handler sorts the messages that are not its event type.
#[derive(Clone)]
pub(super) struct Sorting {
    pub(super) siblings: Arc<HashSet<String>>,
    pub(super) policy: UnknownTypePolicy,
    pub(super) unknown: Arc<AtomicU64>,
    pub(super) type_header: TypeHeader,
}

impl<M: Clone + Send + Sync + 'static, S: Clone + Send + Sync + 'static> EventProcessor<M, S> {
    /// Adds batch handler `name` for event `E` with its own subscription, e.g. a
    /// projection that writes many events in one statement: `f` gets up to `max_messages`
    /// decoded events (or what arrived within `max_wait` of the first) with their
    /// [`Context`]s, and returns a [`BatchResult`] whose indices are positions in that
    /// `Vec` (or `()` / an `Err` for all of them). Each event is settled on its own (see
    /// [`HandlerBuilder::batch`](tidemill_core::router::HandlerBuilder::batch)); the
    /// processor's layers apply per event. An event that does not decode fails permanently
    /// on its own and never reaches `f`; other event types on the topic are acked (or
    /// handled by the [`UnknownTypePolicy`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use serde::{Deserialize, Serialize};
    /// use tidemill_core::{router::Router, MemoryBroker};
    /// use tidemill_cqrs::{Context, Event, EventProcessor};
    ///
    /// #[derive(Serialize, Deserialize)]
    /// struct RoomBooked { room: u32 }
    /// impl Event for RoomBooked {}
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tidemill_cqrs::CqrsError> {
    /// let broker = MemoryBroker::new();
    /// let router = Router::new();
    /// let mut events = EventProcessor::new(broker.subscriber());
    /// events.handle_batch(
    ///     "occupancy",
    ///     500,
    ///     Duration::from_millis(100),
    ///     |batch: Vec<(RoomBooked, Context)>| async move {
    ///         let rooms: Vec<u32> = batch.iter().map(|(e, _)| e.room).collect();
    ///         // ... one insert for all rooms ...
    ///         # let _ = rooms;
    ///         Ok::<_, tidemill_core::BoxError>(())
    ///     },
    /// )?;
    /// events.add_to(&router).await?;
    /// # Ok(()) }
    /// ```
    pub fn handle_batch<E, F, Fut>(
        &mut self,
        name: impl Into<String>,
        max_messages: usize,
        max_wait: Duration,
        f: F,
    ) -> Result<&mut Self, CqrsError>
    where
        E: Event,
        M: Marshal<E>,
        F: Fn(Vec<(E, Context<S>)>) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: IntoBatchResult,
    {
        let name = name.into();
        self.check_name(&name)?;
        let type_name = E::name().into_owned();
        let f = Arc::new(f);
        let (marshaler, state, ty) = (
            self.marshaler.clone(),
            self.state.clone(),
            type_name.clone(),
        );
        let make = move |sorting: Sorting| -> BatchCall {
            let (f, marshaler, state, ty) =
                (f.clone(), marshaler.clone(), state.clone(), ty.clone());
            Arc::new(move |msgs: Vec<Message>| {
                let mut result = BatchResult::ok();
                let mut events = Vec::with_capacity(msgs.len());
                let mut positions = Vec::with_capacity(msgs.len());
                for (i, message) in msgs.into_iter().enumerate() {
                    match sort(&sorting, &ty, &message) {
                        Sorted::Mine => match marshaler.unmarshal(message.payload()) {
                            Ok(event) => {
                                events.push((
                                    event,
                                    Context {
                                        message,
                                        state: state.clone(),
                                    },
                                ));
                                positions.push(i);
                            }
                            Err(source) => {
                                let err = DecodeError::Payload {
                                    kind: "event",
                                    name: ty.clone(),
                                    uuid: message.uuid().to_owned(),
                                    topic: topic_of(&message),
                                    source,
                                };
                                result.fail(i, permanent(err));
                            }
                        },
                        Sorted::Ack => {}
                        Sorted::Fail(error) => {
                            result.fail(i, error);
                        }
                    }
                }
                if events.is_empty() {
                    return Box::pin(std::future::ready(result));
                }
                let handled = f(events);
                Box::pin(async move {
                    match handled.await.into_batch_result() {
                        Ok(part) => result.extend_from_part(part, &positions),
                        Err(error) => result.fail_each(positions.iter().copied(), error),
                    };
                    result
                })
            })
        };
        self.batches.push(BatchSpec {
            name,
            type_name,
            max_messages,
            max_wait,
            make: Box::new(make),
        });
        Ok(self)
    }
}

enum Sorted {
    /// The handler's type: decode and hand over.
    Mine,
    /// Someone else's (or unknown under `AckAndCount`): ack.
    Ack,
    /// Fails on its own.
    Fail(tidemill_core::BoxError),
}

fn sort(sorting: &Sorting, ty: &str, message: &Message) -> Sorted {
    let Some(name) = sorting.type_header.read(message) else {
        return Sorted::Fail(permanent(DecodeError::MissingName {
            kind: "event",
            uuid: message.uuid().to_owned(),
            topic: topic_of(message),
            key: sorting.type_header.describe().to_owned(),
        }));
    };
    if name == ty {
        return Sorted::Mine;
    }
    if sorting.siblings.contains(name.as_ref()) {
        return Sorted::Ack;
    }
    match sorting.policy {
        UnknownTypePolicy::AckAndCount => {
            sorting.unknown.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                kind = "event",
                name = %name,
                uuid = message.uuid(),
                "no handler for this type; acking it (UnknownTypePolicy::AckAndCount)"
            );
            Sorted::Ack
        }
        UnknownTypePolicy::Reject => Sorted::Fail(permanent(DecodeError::UnknownType {
            kind: "event",
            name: name.into_owned(),
            uuid: message.uuid().to_owned(),
            topic: topic_of(message),
        })),
    }
}

impl BatchSpec {
    /// Adds the batch handler to `router`, its layers around each message (without layers,
    /// batches come straight from the subscription).
    pub(super) async fn add_to(
        &self,
        router: &Router,
        subscriber: Arc<dyn Subscriber>,
        topic: String,
        group: String,
        layers: &[WrapHandler],
        sorting: Sorting,
    ) -> Result<(), CqrsError> {
        let call = (self.make)(sorting);
        let handler = router
            .add_handler(self.name.clone())
            .subscribe(subscriber, topic)
            .group(group);
        if layers.is_empty() {
            // No layers: batches come straight from the subscription.
            handler
                .batch(self.max_messages, self.max_wait)
                .handler(move |msgs: Vec<Message>| call(msgs))
                .await?;
            return Ok(());
        }
        let layers: Vec<WrapHandler> = layers.to_vec();
        let wrap = tower::layer::layer_fn(move |inner: tidemill_core::router::BatchService| {
            let mut service = BoxHandler::new(inner);
            for wrap in layers.iter().rev() {
                service = wrap(service);
            }
            service
        });
        handler
            .layer(wrap)
            .batch(self.max_messages, self.max_wait)
            .handler(move |msgs: Vec<Message>| call(msgs))
            .await?;
        Ok(())
    }
}
