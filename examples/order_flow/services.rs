//! Outside services the handlers call: a payment gateway (that sometimes times out and
//! sometimes declines) and a mailer. Both are in-process fakes; the broker traffic around
//! them is real.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use crate::domain::{CARD_DECLINED, CARD_FLAKY};

/// How the gateway answered a charge.
#[derive(Debug)]
pub enum GatewayError {
    /// Try again later (a transient failure: retried).
    Timeout { order_id: String, call: u32 },
    /// The issuer said no (permanent: retrying cannot help).
    Declined { order_id: String, last4: String },
}

impl fmt::Display for GatewayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GatewayError::Timeout { order_id, call } => write!(
                f,
                "payment gateway timed out charging {order_id} (call {call}, processing error)"
            ),
            GatewayError::Declined { order_id, last4 } => write!(
                f,
                "card ending {last4} declined by the issuer for {order_id}: insufficient funds"
            ),
        }
    }
}

impl std::error::Error for GatewayError {}

#[derive(Default)]
struct Ledger {
    /// Calls per order (every attempt, failed or not).
    calls: HashMap<String, u32>,
    /// Successful charges, by order id (the idempotency key).
    charges: HashMap<String, String>,
}

/// A fake card gateway, idempotent per order id like real ones (a second charge of an
/// order returns the first payment).
#[derive(Default)]
pub struct PaymentGateway {
    ledger: Mutex<Ledger>,
}

impl PaymentGateway {
    pub fn charge(&self, order_id: &str, card: &str, cents: u64) -> Result<String, GatewayError> {
        let mut ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        let call = {
            let n = ledger.calls.entry(order_id.to_owned()).or_default();
            *n += 1;
            *n
        };
        if let Some(payment) = ledger.charges.get(order_id) {
            return Ok(payment.clone());
        }
        if card == CARD_DECLINED {
            return Err(GatewayError::Declined {
                order_id: order_id.to_owned(),
                last4: card[card.len().saturating_sub(4)..].to_owned(),
            });
        }
        if card == CARD_FLAKY && call <= 2 {
            return Err(GatewayError::Timeout {
                order_id: order_id.to_owned(),
                call,
            });
        }
        let payment = format!("pay-{}-{cents}", order_id.trim_start_matches("ord-"));
        ledger.charges.insert(order_id.to_owned(), payment.clone());
        Ok(payment)
    }

    /// How often `order_id` was charged (attempts, including failed ones).
    pub fn calls(&self, order_id: &str) -> u32 {
        let ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        ledger.calls.get(order_id).copied().unwrap_or(0)
    }
}

/// Sends (here: records) customer e-mails, once per order.
#[derive(Default)]
pub struct Mailer {
    sent: Mutex<HashMap<String, String>>,
}

impl Mailer {
    /// Returns false if this order's mail went out before (a redelivery).
    pub fn send(&self, order_id: &str, to: &str, text: String) -> bool {
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        if sent.contains_key(order_id) {
            return false;
        }
        tracing::debug!(order_id, to, %text, "mail sent");
        sent.insert(order_id.to_owned(), format!("{to}: {text}"));
        true
    }

    pub fn sent(&self) -> usize {
        self.sent.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}
