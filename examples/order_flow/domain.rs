//! The shop's vocabulary: the command and events, the catalogue, and the scenario this
//! example plays (which orders it places and what must become of each).

use serde::{Deserialize, Serialize};
use tidemill::cqrs::{Command, Event};

/// One line of an order: a product and how many.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// Catalogue SKU.
    pub sku: String,
    /// How many.
    pub qty: u32,
}

/// A customer wants to buy something (handled by exactly one command handler).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlaceOrder {
    pub order_id: String,
    pub customer: String,
    pub email: String,
    pub lines: Vec<Line>,
    /// The card to charge (test card numbers, as payment providers use them).
    pub card: String,
}
impl Command for PlaceOrder {}

/// An order passed validation and was priced; every interested handler gets it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: String,
    pub customer: String,
    pub email: String,
    pub lines: Vec<Line>,
    pub total_cents: u64,
    pub card: String,
}
impl Event for OrderPlaced {}

/// Unit price in cents and display name of a SKU.
pub fn catalogue(sku: &str) -> Option<(u64, &'static str)> {
    Some(match sku {
        "tea" => (350, "green tea"),
        "coffee" => (420, "coffee beans"),
        "cocoa" => (390, "cocoa"),
        "mate" => (480, "yerba mate"),
        "mug" => (900, "mug"),
        "teapot" => (2_400, "teapot"),
        _ => return None,
    })
}

/// Stock at opening time.
pub const INITIAL_STOCK: [(&str, i64); 6] = [
    ("tea", 100),
    ("coffee", 100),
    ("cocoa", 100),
    ("mate", 100),
    ("mug", 20),
    ("teapot", 5),
];

/// Cards the fake payment gateway knows (the usual test numbers).
pub const CARD_OK: &str = "4242 4242 4242 4242";
pub const CARD_OK_2: &str = "5555 5555 5555 4444";
/// Processing error: the gateway times out on the first two calls, then succeeds.
pub const CARD_FLAKY: &str = "4000 0000 0000 0119";
/// Declined by the issuer, every time.
pub const CARD_DECLINED: &str = "4000 0000 0000 0002";

/// What must become of an order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Stock reserved, paid, customer notified.
    Completed,
    /// Paid only after in-process retries (the gateway failed transiently first).
    CompletedAfterRetries,
    /// Poisoned by `handler`, the poison reason containing `reason`; status `failed`.
    Poisoned {
        handler: &'static str,
        reason: &'static str,
    },
}

/// One order of the scenario.
pub struct Scenario {
    pub command: PlaceOrder,
    pub expect: Expect,
}

fn order(id: &str, customer: &str, lines: &[(&str, u32)], card: &str, expect: Expect) -> Scenario {
    Scenario {
        command: PlaceOrder {
            order_id: id.to_owned(),
            customer: customer.to_owned(),
            email: format!("{}@example.com", customer.to_lowercase()),
            lines: lines
                .iter()
                .map(|(sku, qty)| Line {
                    sku: (*sku).to_owned(),
                    qty: *qty,
                })
                .collect(),
            card: card.to_owned(),
        },
        expect,
    }
}

/// The router handler name the command processor gives the PlaceOrder handler.
pub const PLACE_ORDER_HANDLER: &str = "PlaceOrder-handler";
/// Event handlers of OrderPlaced (each its own consumer group).
pub const RESERVE_STOCK: &str = "reserve-stock";
pub const CHARGE_PAYMENT: &str = "charge-payment";
pub const NOTIFY_CUSTOMER: &str = "notify-customer";

/// The orders this run places.
pub fn scenario() -> Vec<Scenario> {
    use Expect::*;
    vec![
        order(
            "ord-001",
            "Alice",
            &[("tea", 2), ("mug", 1)],
            CARD_OK,
            Completed,
        ),
        order("ord-002", "Bob", &[("coffee", 1)], CARD_OK, Completed),
        order("ord-003", "Carol", &[("cocoa", 3)], CARD_OK_2, Completed),
        order(
            "ord-004",
            "Dave",
            &[("tea", 5)],
            CARD_FLAKY,
            CompletedAfterRetries,
        ),
        order(
            "ord-005",
            "Erin",
            &[("mate", 1), ("mug", 2)],
            CARD_OK,
            Completed,
        ),
        order(
            "ord-006",
            "Frank",
            &[("coffee", 2)],
            CARD_DECLINED,
            Poisoned {
                handler: CHARGE_PAYMENT,
                reason: "declined",
            },
        ),
        order("ord-007", "Grace", &[("teapot", 1)], CARD_OK_2, Completed),
        order(
            "ord-008",
            "Heidi",
            &[("cocoa", 1), ("tea", 1)],
            CARD_FLAKY,
            CompletedAfterRetries,
        ),
        order(
            "ord-009",
            "Ivan",
            &[("kombucha", 1)],
            CARD_OK,
            Poisoned {
                handler: PLACE_ORDER_HANDLER,
                reason: "unknown SKU `kombucha`",
            },
        ),
    ]
}

/// A PlaceOrder command that is not valid JSON: the command processor cannot decode it
/// and fails it permanently, so it goes to the poison topic.
pub const GARBLED_COMMAND: &str =
    r#"{"order_id": "ord-010", "customer": "Mallory", "lines": [{"sku": "tea""#;
/// What its poison reason must contain.
pub const GARBLED_REASON: &str = "cannot decode command `PlaceOrder`";
