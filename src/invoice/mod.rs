//! Invoice numbering and documents.
//!
//! Numbers read `PREFIX-YEAR-NNNNNN`: one gap-free series per calendar year
//! of issue (in the seller's configured zone). The store takes the next
//! number from the series' counter row inside the transaction that records
//! the payment. Documents are rendered from the snapshot stored on the
//! invoice, so a document always shows what was issued, whatever the
//! config says today.

use std::path::{Path, PathBuf};

use jiff::Timestamp;
use minijinja::{context, Environment};

use crate::domain::invoice::format_rate;
use crate::domain::values::Zone;
use crate::domain::{Currency, Money};
use crate::store::Invoice;

mod pdf;
pub use pdf::render_pdf;

/// The series an invoice issued at `at` belongs to, e.g. `INV-2027`.
pub fn series(prefix: &str, at: Timestamp, zone: &Zone) -> String {
    format!("{prefix}-{}", at.to_zoned(zone.tz().clone()).year())
}

#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("cannot render invoice {0}: {1}")]
    Render(String, String),
    #[error("cannot write invoice document {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

const TEMPLATE: &str = r#"<!DOCTYPE html>
<html lang="{{ locale }}">
<head><meta charset="utf-8"><title>{{ t.invoice }} {{ inv.number }}</title>
<style>
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,'Hiragino Sans','Noto Sans JP',sans-serif;color:#1f2328;max-width:800px;margin:40px auto;padding:0 24px}
h1{font-size:28px;margin:0}.muted{color:#656d76}.status{display:inline-block;padding:2px 10px;border-radius:12px;font-size:13px;text-transform:uppercase;letter-spacing:.05em}
.paid{background:#dafbe1;color:#1a7f37}.open{background:#fff8c5;color:#9a6700}.void{background:#eaeef2;color:#57606a}
table{width:100%;border-collapse:collapse;margin-top:24px}th,td{padding:8px;border-bottom:1px solid #d0d7de;text-align:left}td.num,th.num{text-align:right}
.parties{display:flex;justify-content:space-between;gap:24px;margin-top:24px}.totals td{border:none}.totals tr.total td{font-weight:bold;font-size:18px;border-top:2px solid #1f2328}
</style></head>
<body>
<header><h1>{{ t.invoice }} {{ inv.number }} <span class="status {{ inv.status }}">{{ t[inv.status] }}</span></h1>
<p class="muted">{{ t.issued }} {{ issued }}{% if due %} · {{ t.due }} {{ due }}{% endif %}{% if paid %} · {{ t.paid_on }} {{ paid }}{% endif %}</p></header>
<div class="parties">
<div><strong>{{ t.from }}</strong><br>{{ doc.seller.name }}<br>{% for l in doc.seller.address %}{{ l }}<br>{% endfor %}{{ doc.seller.email }}{% if doc.seller.tax_id %}<br>{{ t.tax_id }} {{ doc.seller.tax_id }}{% endif %}</div>
<div><strong>{{ t.bill_to }}</strong><br>{{ doc.buyer.name }}<br>{{ doc.buyer.email }}<br>{{ doc.buyer.country }}<br>{{ t.customer }} #{{ inv.customer_id }} · {{ t.subscription }} #{{ inv.subscription_id }}</div>
</div>
<table>
<thead><tr><th>#</th><th>{{ t.description }}</th><th>{{ t.period }}</th><th class="num">{{ t.qty }}</th><th class="num">{{ t.unit }}</th><th class="num">{{ t.tax }}</th><th class="num">{{ t.amount }}</th></tr></thead>
<tbody>{% for l in lines %}<tr><td>{{ l.number }}</td><td>{{ l.description }}</td><td>{{ period }}</td><td class="num">{{ l.quantity }}</td><td class="num">{{ l.unit }}</td><td class="num">{{ l.rate }}</td><td class="num">{{ l.amount }}</td></tr>{% endfor %}</tbody>
</table>
<table class="totals">
<tr><td></td><td class="num">{{ t.subtotal }}</td><td class="num">{{ subtotal }}</td></tr>
{% for tx in taxes %}<tr><td></td><td class="num">{{ t.tax }} {{ tx.rate }} ({{ t.on }} {{ tx.taxable }})</td><td class="num">{{ tx.tax }}</td></tr>{% endfor %}
<tr class="total"><td></td><td class="num">{{ t.total }} ({{ inv.currency }})</td><td class="num">{{ total }}</td></tr>
</table>
<p><strong>{{ t.payment }}</strong>: {{ payment }}</p>
</body></html>
"#;

fn labels(locale: &str) -> serde_json::Value {
    if locale == "ja" {
        serde_json::json!({
            "invoice": "請求書", "issued": "発行日", "due": "支払期限", "paid_on": "支払日", "from": "発行者",
            "bill_to": "請求先", "customer": "顧客", "subscription": "契約", "description": "品目", "period": "期間",
            "qty": "数量", "unit": "単価", "tax": "消費税", "amount": "金額", "subtotal": "小計", "on": "対象",
            "total": "合計", "payment": "お支払い方法", "tax_id": "登録番号",
            "paid": "支払済", "open": "未払い", "void": "無効",
            "card": "クレジットカード", "bank_transfer": "銀行振込", "reference": "振込参照番号"
        })
    } else {
        serde_json::json!({
            "invoice": "Invoice", "issued": "Issued", "due": "Due", "paid_on": "Paid", "from": "From",
            "bill_to": "Bill to", "customer": "Customer", "subscription": "Subscription", "description": "Description",
            "period": "Period", "qty": "Qty", "unit": "Unit price", "tax": "Tax", "amount": "Amount",
            "subtotal": "Subtotal", "on": "on", "total": "Total", "payment": "Payment", "tax_id": "Tax ID",
            "paid": "paid", "open": "open", "void": "void",
            "card": "Card", "bank_transfer": "Bank transfer", "reference": "reference"
        })
    }
}

/// An invoice line as shown on a document.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Row {
    pub number: i64,
    pub description: String,
    pub quantity: i64,
    pub unit: String,
    pub amount: String,
    pub rate: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct TaxRow {
    pub rate: String,
    pub taxable: String,
    pub tax: String,
}

/// Everything a document shows, formatted: shared by the HTML and PDF
/// renderers so both always say the same thing.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub locale: String,
    pub labels: serde_json::Value,
    pub issued: String,
    pub due: Option<String>,
    pub paid: Option<String>,
    pub period: String,
    pub lines: Vec<Row>,
    pub taxes: Vec<TaxRow>,
    pub subtotal: String,
    pub total: String,
    pub payment: String,
}

pub(crate) fn prepare(
    inv: &Invoice,
    locale_override: Option<&str>,
) -> Result<Prepared, DocumentError> {
    let fail = |e: String| DocumentError::Render(inv.number.clone(), e);
    let currency = Currency::parse(&inv.currency).map_err(|e| fail(e.to_string()))?;
    let money = |minor: i64| Money::new(minor, currency).display();
    let doc = &inv.document;
    let locale = locale_override
        .or_else(|| doc.get("locale").and_then(|v| v.as_str()))
        .unwrap_or("en")
        .to_string();
    let tz = doc
        .get("timezone")
        .and_then(|v| v.as_str())
        .and_then(|z| Zone::parse(z).ok())
        .map(|z| z.tz().clone())
        .unwrap_or(jiff::tz::TimeZone::UTC);
    let date = |t: Timestamp| t.to_zoned(tz.clone()).date().to_string();
    let t = labels(&locale);
    let int = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_i64()).unwrap_or(0);
    let rate = |bp: i64| format_rate(u32::try_from(bp).unwrap_or(0));
    let array = |k: &str| {
        doc.get(k)
            .and_then(|v| v.as_array())
            .cloned()
            .unwrap_or_default()
    };
    let lines = array("lines")
        .iter()
        .map(|l| Row {
            number: int(l, "number"),
            description: l
                .get("description")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string(),
            quantity: int(l, "quantity"),
            unit: money(int(l, "unit_amount_minor")),
            amount: money(int(l, "amount_minor")),
            rate: rate(int(l, "tax_rate_bp")),
        })
        .collect();
    let taxes = array("taxes")
        .iter()
        .map(|x| TaxRow {
            rate: rate(int(x, "rate_bp")),
            taxable: money(int(x, "taxable_minor")),
            tax: money(int(x, "tax_minor")),
        })
        .collect();
    let payment = describe_payment(doc.get("payment"), &t, inv.payment_reference.as_deref());
    Ok(Prepared {
        issued: date(inv.issued_at),
        due: inv.due_at.map(date),
        paid: inv.paid_at.map(date),
        period: format!("{} – {}", date(inv.period_start), date(inv.period_end)),
        lines,
        taxes,
        subtotal: money(inv.subtotal_minor),
        total: money(inv.total_minor),
        payment,
        locale,
        labels: t,
    })
}

/// The invoice template, compiled once per process (compiling it for every
/// document was a visible share of a mail batch: renewd bench, "time travel").
fn html_environment() -> Result<&'static Environment<'static>, &'static minijinja::Error> {
    static ENV: std::sync::OnceLock<Result<Environment<'static>, minijinja::Error>> =
        std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
        env.add_template("invoice.html", TEMPLATE)?;
        Ok(env)
    })
    .as_ref()
}

/// Renders the invoice as a standalone HTML document.
pub fn render_html(inv: &Invoice) -> Result<String, DocumentError> {
    let fail = |e: String| DocumentError::Render(inv.number.clone(), e);
    let p = prepare(inv, None)?;
    html_environment()
        .map_err(|e| fail(e.to_string()))?
        .get_template("invoice.html")
        .and_then(|tpl| {
            tpl.render(context! {
                locale => p.locale,
                t => p.labels,
                inv => inv,
                doc => &inv.document,
                issued => p.issued,
                due => p.due,
                paid => p.paid,
                period => p.period,
                lines => p.lines,
                taxes => p.taxes,
                subtotal => p.subtotal,
                total => p.total,
                payment => p.payment,
            })
        })
        .map_err(|e| fail(e.to_string()))
}

fn describe_payment(
    p: Option<&serde_json::Value>,
    t: &serde_json::Value,
    reference: Option<&str>,
) -> String {
    let s = |v: Option<&serde_json::Value>, k: &str| {
        v.and_then(|v| v.get(k))
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let label = |k: &str| t.get(k).and_then(|v| v.as_str()).unwrap_or(k).to_string();
    match s(p, "kind").as_str() {
        "card" => format!("{} {} •••• {}", label("card"), s(p, "brand"), s(p, "last4")),
        "bank_transfer" => match reference {
            Some(r) => format!("{} ({} {r})", label("bank_transfer"), label("reference")),
            None => label("bank_transfer"),
        },
        other => other.to_string(),
    }
}

/// The path of an invoice's document of `ext` under `dir`.
pub fn document_path(dir: &Path, number: &str, ext: &str) -> PathBuf {
    dir.join(format!("{number}.{ext}"))
}

/// Writes the HTML and PDF documents under `dir`, atomically.
pub fn write_documents(dir: &Path, inv: &Invoice) -> Result<(), DocumentError> {
    keep(dir, &inv.number, &render_html(inv)?, &render_pdf(inv)?)
}

/// Writes rendered documents under `dir`, one writer at a time in this
/// process: writers creating files in the same directory at once spent
/// their time spinning on the directory's lock in the kernel (renewd bench).
/// The directory is made when first found missing, not before every
/// document (each `mkdir` takes the state directory's lock as well).
fn keep(dir: &Path, number: &str, html: &str, pdf: &[u8]) -> Result<(), DocumentError> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let html_path = document_path(dir, number, "html");
    match write_atomically(&html_path, html.as_bytes()) {
        Err(DocumentError::Io(_, e)) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| DocumentError::Io(dir.to_path_buf(), e))?;
            write_atomically(&html_path, html.as_bytes())?;
        }
        written => written?,
    }
    write_atomically(&document_path(dir, number, "pdf"), pdf)
}

/// The PDF of an invoice being mailed; a copy of both documents, as sent,
/// is kept under `dir`. Failing to keep the copy is logged and does not
/// stop the mail: the invoice is in the database and `renewd invoice
/// download` renders it again. Blocking: the mail's builder calls it on
/// the blocking pool.
pub fn render_for_mail(dir: &Path, inv: &Invoice) -> Result<Vec<u8>, DocumentError> {
    let pdf = render_pdf(inv)?;
    let kept = render_html(inv).and_then(|html| keep(dir, &inv.number, &html, &pdf));
    if let Err(e) = kept {
        tracing::error!(invoice_number = %inv.number, error = %e, "cannot write invoice document");
    }
    Ok(pdf)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// reader never sees half a document.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), DocumentError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| DocumentError::Io(tmp.clone(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| DocumentError::Io(path.to_path_buf(), e))
}
