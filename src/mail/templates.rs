//! Mail templates in English and Japanese, rendered with minijinja from the
//! context snapshot stored on the outbox row.
//!
//! Each kind has a subject and a plain-text body per locale; the HTML part
//! is the same text laid out in a simple, accessible HTML shell.

use std::sync::OnceLock;

use minijinja::{context, Environment};

use super::MailKind;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: String,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot render {kind} mail: {message}")]
pub struct RenderError {
    pub kind: MailKind,
    pub message: String,
}

/// (subject, body) templates for a kind in a locale.
fn source(kind: MailKind, locale: &str) -> (&'static str, &'static str) {
    use MailKind::*;
    match (kind, locale) {
        (OrderConfirmation, "ja") => (
            "ご注文を承りました: {{ plan_name }}",
            "{{ customer_name }} 様\n\n{{ plan_name }} をご購入いただきありがとうございます。\n\nお支払い金額: {{ amount }}\nご利用期間: {{ period_end_date }} まで\n請求書番号: {{ invoice_number }}\n\nサブスクリプションは毎年この日に自動更新されます。自動更新はいつでもオフにできますが、オフにすると次に手動で更新するまで再びオンにすることはできません。",
        ),
        (OrderConfirmation, _) => (
            "Your order is confirmed: {{ plan_name }}",
            "Dear {{ customer_name }},\n\nThank you for purchasing {{ plan_name }}.\n\nAmount charged: {{ amount }}\nYour subscription runs until: {{ period_end_date }}\nInvoice: {{ invoice_number }}\n\nYour subscription renews automatically each year on this date. You can turn automatic renewal off at any time; once off, it cannot be turned back on until you renew the subscription again.",
        ),
        (Receipt, "ja") => (
            "{{ plan_name }} 更新の領収書 ({{ invoice_number }})",
            "{{ customer_name }} 様\n\n{{ plan_name }} のサブスクリプションを更新しました。\n\nお支払い金額: {{ amount }}（{{ card }}）\n新しいご利用期間: {{ new_period_end_date }} まで\n請求書番号: {{ invoice_number }}\n\n引き続きご利用いただきありがとうございます。",
        ),
        (Receipt, _) => (
            "Receipt for your {{ plan_name }} renewal ({{ invoice_number }})",
            "Dear {{ customer_name }},\n\nYour {{ plan_name }} subscription has been renewed.\n\nAmount charged: {{ amount }} ({{ card }})\nYour subscription now runs until: {{ new_period_end_date }}\nInvoice: {{ invoice_number }}\n\nThank you for staying with us.",
        ),
        (RenewalReminder, "ja") => (
            "{{ plan_name }} は {{ period_end_date }} に終了します",
            "{{ customer_name }} 様\n\n自動更新がオフになっているため、{{ plan_name }} のサブスクリプションは {{ period_end_date }}（あと {{ days_left }} 日）に終了します。\n\n引き続きご利用になるには、終了日までに更新してください:\n\n    {{ renew_command }}\n\n更新すると自動更新は再びオンになります。",
        ),
        (RenewalReminder, _) => (
            "Your {{ plan_name }} subscription ends on {{ period_end_date }}",
            "Dear {{ customer_name }},\n\nAutomatic renewal is off, so your {{ plan_name }} subscription ends on {{ period_end_date }} ({{ days_left }} days from now).\n\nTo keep it, renew before it ends:\n\n    {{ renew_command }}\n\nRenewing turns automatic renewal back on.",
        ),
        (UpcomingRenewal, "ja") => (
            "{{ plan_name }} は {{ period_end_date }} に自動更新されます",
            "{{ customer_name }} 様\n\n{{ plan_name }} のサブスクリプションは {{ period_end_date }} に自動更新され、登録済みのカード（{{ card }}）に {{ amount }} が請求されます。\n\n更新を希望されない場合は、それまでに自動更新をオフにしてください。",
        ),
        (UpcomingRenewal, _) => (
            "Your {{ plan_name }} subscription renews on {{ period_end_date }}",
            "Dear {{ customer_name }},\n\nYour {{ plan_name }} subscription renews automatically on {{ period_end_date }}, and {{ amount }} will be charged to your card ({{ card }}).\n\nIf you do not want to renew, turn automatic renewal off before then.",
        ),
        (CardExpiring, "ja") => (
            "ご登録のカード（{{ card }}）は更新日より前に有効期限が切れます",
            "{{ customer_name }} 様\n\nご登録のカード（{{ card }}）の有効期限は {{ card_expiry }} で、{{ plan_name }} の更新日 {{ period_end_date }} より前に切れます。\n\n更新が滞らないよう、新しいカードを登録してください。",
        ),
        (CardExpiring, _) => (
            "Your card {{ card }} expires before your renewal",
            "Dear {{ customer_name }},\n\nYour card ({{ card }}) expires in {{ card_expiry }}, before your {{ plan_name }} subscription renews on {{ period_end_date }}.\n\nPlease add a new card so the renewal goes through.",
        ),
        (PaymentFailed, "ja") => (
            "{{ plan_name }} の更新のお支払いができませんでした",
            "{{ customer_name }} 様\n\n{{ plan_name }} の更新のため {{ amount }} をカード（{{ card }}）に請求しましたが、承認されませんでした（{{ decline_reason }}）。\n\n{% if next_retry_date %}{{ next_retry_date }} に再度請求します。{% else %}自動での再請求は行いません。{% endif %}カード情報を更新してください。{{ grace_end_date }} までにお支払いが確認できない場合、サブスクリプションは終了します。",
        ),
        (PaymentFailed, _) => (
            "We couldn't renew your {{ plan_name }} subscription",
            "Dear {{ customer_name }},\n\nWe tried to charge {{ amount }} to your card ({{ card }}) to renew {{ plan_name }}, but the payment was declined ({{ decline_reason }}).\n\n{% if next_retry_date %}We will try again on {{ next_retry_date }}. {% else %}We will not retry this card. {% endif %}Please update your card. If no payment succeeds by {{ grace_end_date }}, your subscription will expire.",
        ),
        (InvoiceIssued, "ja") => (
            "請求書 {{ invoice_number }}（{{ plan_name }}）",
            "{{ customer_name }} 様\n\n{{ plan_name }} の請求書 {{ invoice_number }} を発行しました。\n\nご請求金額: {{ amount }}\nお支払い期限: {{ due_date }}\n\nお振込みの際は請求書番号をご記入ください。",
        ),
        (InvoiceIssued, _) => (
            "Invoice {{ invoice_number }} for {{ plan_name }}",
            "Dear {{ customer_name }},\n\nWe have issued invoice {{ invoice_number }} for {{ plan_name }}.\n\nAmount due: {{ amount }}\nDue date: {{ due_date }}\n\nPlease quote the invoice number with your bank transfer.",
        ),
        (Expired, "ja") => (
            "{{ plan_name }} のサブスクリプションは終了しました",
            "{{ customer_name }} 様\n\n{{ plan_name }} のサブスクリプションは {{ period_end_date }} に終了しました。\n\n再開するには、いつでも更新できます:\n\n    {{ renew_command }}",
        ),
        (Expired, _) => (
            "Your {{ plan_name }} subscription has expired",
            "Dear {{ customer_name }},\n\nYour {{ plan_name }} subscription ended on {{ period_end_date }}.\n\nYou can renew at any time to start a new year:\n\n    {{ renew_command }}",
        ),
        (Cancelled, "ja") => (
            "{{ plan_name }} のサブスクリプションを解約しました",
            "{{ customer_name }} 様\n\n{{ plan_name }} のサブスクリプションを解約しました（{{ cancelled_date }}）。今後の請求はありません。",
        ),
        (Cancelled, _) => (
            "Your {{ plan_name }} subscription is cancelled",
            "Dear {{ customer_name }},\n\nYour {{ plan_name }} subscription was cancelled on {{ cancelled_date }}. You will not be charged again.",
        ),
    }
}

const HTML_SHELL: &str = r#"<!DOCTYPE html>
<html lang="{{ locale }}">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width"><title>{{ subject }}</title></head>
<body style="margin:0;padding:24px;background:#f4f5f7;font-family:-apple-system,'Segoe UI',Helvetica,Arial,'Hiragino Sans','Noto Sans JP',sans-serif;color:#1f2328">
<div style="max-width:560px;margin:0 auto;background:#fff;border-radius:8px;padding:32px">
<h1 style="font-size:20px;margin:0 0 16px">{{ subject }}</h1>
{% for para in paragraphs %}{% if para.code %}<pre style="background:#f4f5f7;padding:12px;border-radius:4px;white-space:pre-wrap">{{ para.text }}</pre>{% else %}<p style="line-height:1.6;margin:0 0 12px">{% for line in para.lines %}{{ line }}{% if not loop.last %}<br>{% endif %}{% endfor %}</p>{% endif %}
{% endfor %}<p style="color:#656d76;font-size:12px;margin-top:24px">{{ seller_name }}</p>
</div></body></html>"#;

fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Lenient);
        env
    })
}

/// Renders one message. `ctx` is the outbox row's context object.
pub fn render(
    kind: MailKind,
    locale: &str,
    ctx: &serde_json::Value,
) -> Result<Rendered, RenderError> {
    let err = |e: minijinja::Error| RenderError {
        kind,
        message: e.to_string(),
    };
    let (subject_src, body_src) = source(kind, locale);
    let env = env();
    let subject = env.render_str(subject_src, ctx).map_err(err)?;
    let text = env.render_str(body_src, ctx).map_err(err)?;
    let paragraphs: Vec<minijinja::Value> = text
        .split("\n\n")
        .map(|p| {
            if p.starts_with("    ") {
                minijinja::Value::from_serialize(
                    serde_json::json!({"code": true, "text": p.trim()}),
                )
            } else {
                minijinja::Value::from_serialize(
                    serde_json::json!({"code": false, "lines": p.lines().collect::<Vec<_>>()}),
                )
            }
        })
        .collect();
    let mut html_env = Environment::new();
    html_env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
    html_env
        .add_template("shell.html", HTML_SHELL)
        .map_err(err)?;
    let html = html_env
        .get_template("shell.html")
        .and_then(|t| {
            t.render(context! {
                locale => locale,
                subject => &subject,
                paragraphs => paragraphs,
                seller_name => ctx.get("seller_name").and_then(|v| v.as_str()).unwrap_or(""),
            })
        })
        .map_err(err)?;
    Ok(Rendered {
        subject,
        text,
        html,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> serde_json::Value {
        serde_json::json!({
            "customer_name": "Hanako <script>",
            "plan_name": "Action Pack",
            "amount": "¥58,300",
            "period_end_date": "2028-03-01",
            "new_period_end_date": "2029-03-01",
            "days_left": 7,
            "renew_command": "renewd subscription renew 1 --accept-terms 2026-04 --card pm_card_visa",
            "card": "visa •••• 4242",
            "card_expiry": "2027-12",
            "decline_reason": "insufficient funds",
            "next_retry_date": "2028-03-04",
            "grace_end_date": "2028-03-15",
            "invoice_number": "INV-2028-000001",
            "due_date": "2028-03-31",
            "cancelled_date": "2028-01-01",
            "seller_name": "Renewd Example K.K.",
        })
    }

    #[test]
    fn every_kind_renders_in_both_languages_with_no_blank_fields() {
        for kind in MailKind::ALL {
            for locale in ["en", "ja"] {
                let r = render(kind, locale, &ctx()).unwrap();
                assert!(!r.subject.is_empty(), "{kind} {locale}");
                assert!(r.text.contains("Hanako"), "{kind} {locale}");
                assert!(!r.text.contains("{{"), "{kind} {locale}: {}", r.text);
                assert!(r.html.contains("<html"), "{kind} {locale}");
                if locale == "ja" {
                    assert!(r.text.contains("様"), "{kind} is not Japanese");
                }
            }
        }
    }

    #[test]
    fn html_escapes_customer_data() {
        let r = render(MailKind::Receipt, "en", &ctx()).unwrap();
        assert!(r.html.contains("Hanako &lt;script&gt;"));
        assert!(!r.html.contains("<script>"));
    }

    #[test]
    fn the_reminder_says_when_it_ends_and_how_to_renew() {
        let r = render(MailKind::RenewalReminder, "en", &ctx()).unwrap();
        assert!(r.subject.contains("2028-03-01"));
        assert!(r.text.contains("renewd subscription renew 1"));
    }
}
