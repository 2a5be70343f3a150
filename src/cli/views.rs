//! The JSON shapes of the CLI contract. Field names are part of the
//! contract; more fields may be added, none renamed.

use serde::Serialize;
use serde_json::{json, Value};

use crate::engine::render_mail;
use crate::store::{Customer, Invoice, Mail, PaymentMethod, Subscription};

pub fn customer(c: &Customer) -> Value {
    json!({
        "id": c.id, "name": c.name, "email": c.email, "timezone": c.timezone, "locale": c.locale,
        "country": c.country, "currency": c.currency, "created_at": c.created_at.to_string(),
    })
}

pub fn subscription(s: &Subscription) -> Value {
    // The card token is a credential at the processor: show brand, last
    // four and expiry only.
    let payment = match &s.payment {
        PaymentMethod::Card {
            brand,
            last4,
            expiry,
            ..
        } => {
            json!({"kind": "card", "brand": brand, "last4": last4, "expiry": expiry})
        }
        PaymentMethod::BankTransfer {
            contact_name,
            contact_phone,
            contact_email,
        } => json!({
            "kind": "bank_transfer", "contact_name": contact_name, "contact_phone": contact_phone, "contact_email": contact_email,
        }),
    };
    json!({
        "id": s.id,
        "customer_id": s.customer_id,
        "plan": s.plan,
        "status": s.status.as_str(),
        "auto_renew": s.auto_renew.on,
        "auto_renew_can_enable": s.auto_renew.can_enable,
        "anchor_date": s.anchor_date.map(|d| d.to_string()),
        "term": s.term,
        "current_period_start": s.current_period_start.map(|t| t.to_string()),
        "current_period_end": s.current_period_end.map(|t| t.to_string()),
        "payment_method": payment,
        "cancel_at_period_end": s.cancel_at_period_end,
        "created_at": s.created_at.to_string(),
    })
}

pub fn invoice(i: &Invoice, with_document: bool) -> Value {
    let mut v = json!({
        "number": i.number,
        "subscription_id": i.subscription_id,
        "customer_id": i.customer_id,
        "status": i.status,
        "currency": i.currency,
        "subtotal_minor": i.subtotal_minor,
        "tax_minor": i.tax_minor,
        "total_minor": i.total_minor,
        "issued_at": i.issued_at.to_string(),
        "due_at": i.due_at.map(|t| t.to_string()),
        "paid_at": i.paid_at.map(|t| t.to_string()),
        "period_start": i.period_start.to_string(),
        "period_end": i.period_end.to_string(),
        "payment_kind": i.payment_kind,
        "payment_reference": i.payment_reference,
    });
    if with_document {
        v["document"] = i.document.clone();
    }
    v
}

pub fn mail(m: &Mail) -> Value {
    let subject = render_mail(m).map(|r| r.subject).unwrap_or_default();
    json!({
        "id": m.id,
        "kind": m.kind.as_str(),
        "subscription_id": m.subscription_id,
        "customer_id": m.customer_id,
        "status": m.status,
        "subject": subject,
        "recipient": m.recipient,
        "locale": m.locale,
        "invoice_number": m.invoice_number,
        "offset_days": m.offset_key,
        "attempts": m.attempts,
        "last_error": m.last_error,
        "created_at": m.created_at.to_string(),
        "sent_at": m.sent_at.map(|t| t.to_string()),
    })
}

pub fn list<T, F: Fn(&T) -> Value>(items: &[T], f: F) -> Vec<Value> {
    items.iter().map(f).collect()
}

#[derive(Serialize)]
pub struct Terms {
    pub current: String,
    pub versions: Vec<String>,
    pub accepted: Vec<Value>,
}
