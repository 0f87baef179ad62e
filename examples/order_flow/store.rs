//! The state store: what the handlers know about each order, the stock, and what landed
//! on the poison topic. In a real service this is a database; here a mutex-guarded map.
//!
//! Every update is idempotent: delivery is at-least-once, so a handler may see a message
//! twice (after a redelivery or a consumer-group rebalance) and must not count it twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::domain::{Line, INITIAL_STOCK};

/// What the store knows about one order.
#[derive(Clone, Debug, Default)]
pub struct OrderRecord {
    pub customer: String,
    pub total_cents: u64,
    pub placed: bool,
    /// Stock held for this order (released again if the order fails).
    pub reserved: Option<Vec<Line>>,
    /// The payment id, once charged.
    pub payment: Option<String>,
    pub notified: bool,
    /// Why the order failed (from the poison topic).
    pub failed: Option<String>,
}

impl OrderRecord {
    /// Done: nothing left to do for this order.
    pub fn is_completed(&self) -> bool {
        self.failed.is_none()
            && self.placed
            && self.reserved.is_some()
            && self.payment.is_some()
            && self.notified
    }

    /// The answer to a status query.
    pub fn status(&self, order_id: &str) -> OrderStatus {
        let (state, detail) = if let Some(reason) = &self.failed {
            ("failed", reason.clone())
        } else if self.is_completed() {
            (
                "completed",
                format!(
                    "{} paid ({}), stock reserved, customer notified",
                    cents(self.total_cents),
                    self.payment.as_deref().unwrap_or("?")
                ),
            )
        } else {
            let mut waiting = Vec::new();
            if self.reserved.is_none() {
                waiting.push("stock");
            }
            if self.payment.is_none() {
                waiting.push("payment");
            }
            if !self.notified {
                waiting.push("notification");
            }
            ("in-progress", format!("waiting for {}", waiting.join(", ")))
        };
        OrderStatus {
            order_id: order_id.to_owned(),
            state: state.to_owned(),
            detail,
        }
    }
}

/// A status reply (JSON on the wire).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OrderStatus {
    pub order_id: String,
    /// `completed`, `in-progress` or `failed`.
    pub state: String,
    pub detail: String,
}

/// A message read back from the poison topic.
#[derive(Clone, Debug)]
pub struct PoisonRecord {
    /// The order it belongs to, when the payload says (a garbled one does not).
    pub order_id: Option<String>,
    pub handler: String,
    pub topic: String,
    pub reason: String,
}

#[derive(Default)]
struct State {
    orders: BTreeMap<String, OrderRecord>,
    stock: HashMap<String, i64>,
    /// By message uuid: a poisoned message read twice is recorded once.
    poison: BTreeMap<String, PoisonRecord>,
    /// In-process retries, per order and handler.
    retries: BTreeMap<(String, String), u32>,
}

/// Shared by every handler (wrap it in an `Arc`).
pub struct Store {
    state: Mutex<State>,
}

impl Store {
    pub fn new() -> Self {
        let stock = INITIAL_STOCK
            .iter()
            .map(|(sku, n)| ((*sku).to_owned(), *n))
            .collect();
        Store {
            state: Mutex::new(State {
                stock,
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A handler that panicked while holding the lock left consistent data behind
        // (every update is a single insert), so carry on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn place(&self, order_id: &str, customer: &str, total_cents: u64) {
        let mut s = self.lock();
        let rec = s.orders.entry(order_id.to_owned()).or_default();
        rec.customer = customer.to_owned();
        rec.total_cents = total_cents;
        rec.placed = true;
    }

    /// Takes the lines out of stock once per order. Returns false (and holds nothing) when
    /// the order has failed meanwhile, or when stock is short.
    pub fn reserve(&self, order_id: &str, lines: &[Line]) -> Result<bool, String> {
        let mut s = self.lock();
        let s = &mut *s;
        let rec = s.orders.entry(order_id.to_owned()).or_default();
        if rec.reserved.is_some() {
            return Ok(true); // a redelivery: already done
        }
        if rec.failed.is_some() {
            return Ok(false);
        }
        for line in lines {
            let have = s.stock.get(&line.sku).copied().unwrap_or(0);
            if have < i64::from(line.qty) {
                return Err(format!(
                    "out of stock: {} × {} wanted, {have} left",
                    line.qty, line.sku
                ));
            }
        }
        for line in lines {
            *s.stock.entry(line.sku.clone()).or_default() -= i64::from(line.qty);
        }
        rec.reserved = Some(lines.to_vec());
        Ok(true)
    }

    pub fn paid(&self, order_id: &str, payment_id: &str) {
        self.lock()
            .orders
            .entry(order_id.to_owned())
            .or_default()
            .payment = Some(payment_id.to_owned());
    }

    pub fn notified(&self, order_id: &str) {
        self.lock()
            .orders
            .entry(order_id.to_owned())
            .or_default()
            .notified = true;
    }

    /// Records a poisoned message (once per uuid); when it names an order, the order fails
    /// and its stock goes back on the shelf.
    pub fn poisoned(&self, uuid: &str, record: PoisonRecord) -> bool {
        let mut s = self.lock();
        let s = &mut *s;
        if s.poison.contains_key(uuid) {
            return false;
        }
        if let Some(order_id) = &record.order_id {
            let rec = s.orders.entry(order_id.clone()).or_default();
            if rec.failed.is_none() {
                rec.failed = Some(format!("{}: {}", record.handler, record.reason));
            }
            if let Some(lines) = rec.reserved.take() {
                for line in lines {
                    *s.stock.entry(line.sku).or_default() += i64::from(line.qty);
                }
            }
        }
        s.poison.insert(uuid.to_owned(), record);
        true
    }

    pub fn retried(&self, order_id: &str, handler: &str) {
        *self
            .lock()
            .retries
            .entry((order_id.to_owned(), handler.to_owned()))
            .or_default() += 1;
    }

    pub fn status(&self, order_id: &str) -> Option<OrderStatus> {
        self.lock().orders.get(order_id).map(|r| r.status(order_id))
    }

    pub fn orders(&self) -> BTreeMap<String, OrderRecord> {
        self.lock().orders.clone()
    }

    pub fn poison(&self) -> Vec<PoisonRecord> {
        self.lock().poison.values().cloned().collect()
    }

    pub fn retries(&self, order_id: &str) -> u32 {
        self.lock()
            .retries
            .iter()
            .filter(|((o, _), _)| o == order_id)
            .map(|(_, n)| *n)
            .sum()
    }

    pub fn stock(&self, sku: &str) -> i64 {
        self.lock().stock.get(sku).copied().unwrap_or(0)
    }

    /// (completed orders, poisoned messages).
    pub fn progress(&self) -> (usize, usize) {
        let s = self.lock();
        (
            s.orders.values().filter(|r| r.is_completed()).count(),
            s.poison.len(),
        )
    }
}

/// `1234` → `12.34 €`.
pub fn cents(c: u64) -> String {
    format!("{}.{:02} €", c / 100, c % 100)
}
