//! The router's own copy of the input, for layers' error paths.
//!
//! A layer that may need the input after the handler failed (retry calls the handler again,
//! dead letter publishes the input, correlation id reads it when there are outputs) would
//! otherwise keep a copy of every message on its success path too: a few atomic reference
//! counts per layer and message. Instead, a layer asks, when it is built into a handler
//! ([`keep_input`] from its `Layer::layer`), that the router keep one copy of each input;
//! while the router calls or polls the handler's service, that copy is reachable here.
//! A layer checks at call time that the message it got is that very copy
//! ([`input_token`]: same shared block, so no outer layer changed it) and, if so, keeps
//! only the token and fetches the copy ([`input`]) when it needs it. Otherwise (an outer
//! layer modified the message, the service runs outside a router, ...) it keeps its own
//! clone as before.

use std::cell::Cell;
use std::marker::PhantomData;
use std::ptr::NonNull;

use super::Settlement;
use crate::Message;

thread_local! {
    /// The router's copy of the input it is calling or polling on this thread: set only
    /// by a [`Current`] guard, which borrows the copy for as long as it is set and puts the
    /// previous value back when dropped (also on unwinding). A plain pointer, so entering
    /// and leaving cost no more than two thread-local writes.
    static CURRENT: Cell<Option<(NonNull<Message>, NonNull<Settlement>)>> =
        const { Cell::new(None) };
    /// Set by [`keep_input`] while the router builds a handler's service.
    static WANTED: Cell<bool> = const { Cell::new(false) };
}

/// Asks the router building the handler this layer wraps to keep a copy of each input and
/// make it reachable through [`input`] while it calls and polls the handler's service.
///
/// Call it from `Layer::layer`. Outside a router's handler construction it does nothing
/// harmful: the router building the next handler on this thread may keep inputs it need
/// not, nothing else.
pub fn keep_input() {
    WANTED.with(|w| w.set(true));
}

/// Runs `build` (the making of a handler's service from its layers) and tells whether a
/// layer asked for [`keep_input`] meanwhile.
pub(crate) fn building<T>(build: impl FnOnce() -> T) -> (T, bool) {
    let before = WANTED.with(|w| w.replace(false));
    let built = build();
    let wanted = WANTED.with(|w| w.replace(before));
    (built, wanted)
}

/// Identifies the router's copy of the current input without holding a reference to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputToken((usize, usize));

/// If `msg` is the router's copy of the input it is handling (same shared block and
/// context: no layer outside the caller changed it), a token to fetch that copy later with
/// [`input`]; otherwise `None` (keep your own clone then).
#[inline]
pub fn input_token(msg: &Message) -> Option<InputToken> {
    with_current(|current| match current {
        Some((detached, settlement)) if msg.is_input(detached, settlement) => {
            Some(InputToken(msg.identity()))
        }
        _ => None,
    })
}

/// Runs `f` on the current input (the message without its context, and the settlement
/// whose block is its context), if any.
#[inline]
fn with_current<R>(f: impl FnOnce(Option<(&Message, &Settlement)>) -> R) -> R {
    let current = CURRENT.with(Cell::get);
    // SAFETY: the pointers are set only by a `Current` guard, which holds shared borrows of
    // the message and the settlement for its whole life and clears or restores the pointers
    // when dropped, so pointers read here point to a live message and settlement that
    // nobody can modify meanwhile. The references do not outlive `f`, which runs before
    // this call returns, inside the guard's scope (the guard is entered around the very
    // call or poll that leads here).
    f(current.map(|(m, s)| unsafe { (m.as_ref(), s.as_ref()) }))
}

/// A clone of the router's copy of the input the token was taken from, if the router is
/// calling or polling the service of that same input on this thread now (otherwise
/// `None`).
pub fn input(token: InputToken) -> Option<Message> {
    with_current(|current| match current {
        Some((detached, settlement)) if detached.identity_with(settlement) == token.0 => {
            Some(detached.with_context_of(settlement))
        }
        _ => None,
    })
}

/// Runs `f` on the router's copy of the input the token was taken from, if it is current
/// (see [`input`]), without cloning it. The message `f` sees has no receive context (use
/// [`input`] for that). `f` must not call or poll a router's handler.
pub fn with_input<R>(token: InputToken, f: impl FnOnce(&Message) -> R) -> Option<R> {
    with_current(|current| match current {
        // Without its context: `f` reads the message itself (payload, metadata, uuid).
        Some((detached, settlement)) if detached.identity_with(settlement) == token.0 => {
            Some(f(detached))
        }
        _ => None,
    })
}

/// Makes a message the current input while the guard lives (the previous one comes back
/// on drop).
pub(crate) struct Current<'a> {
    previous: Option<(NonNull<Message>, NonNull<Settlement>)>,
    _input: PhantomData<(&'a Message, &'a Settlement)>,
}

impl<'a> Current<'a> {
    /// Makes the input current until the guard is dropped: `detached` is the message
    /// without its context (the router's copy, one reference count), `settlement` the
    /// router's settlement, whose block is the message's context.
    #[inline]
    pub(crate) fn enter(detached: &'a Message, settlement: &'a Settlement) -> Self {
        let input = (NonNull::from(detached), NonNull::from(settlement));
        let previous = CURRENT.with(|c| c.replace(Some(input)));
        Current {
            previous,
            _input: PhantomData,
        }
    }
}

impl Drop for Current<'_> {
    #[inline]
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.previous));
    }
}
