//! The PDF invoice: one A4 page drawn with the standard Helvetica fonts.
//!
//! Latin text uses the standard Helvetica fonts (WinAnsi). A line with
//! characters outside WinAnsi (a Japanese name or address, say) is set in
//! Adobe's Japanese CID font `KozMinPr6N-Regular` through the predefined
//! `UniJIS-UCS2-H` encoding, without embedding it: PDF viewers substitute a
//! Japanese font they have, which keeps the binary small. Labels are
//! English; the HTML document is fully localised.
//! The content stream is left uncompressed so the invoice number and total
//! can be found in the file by any tool.

use pdf_writer::types::{CidFontType, FontFlags, SystemInfo};
use pdf_writer::{Content, Finish, Name, Pdf, Rect, Ref, Str, TextStr};

use super::{prepare, DocumentError};
use crate::store::Invoice;

const WIDTH: f32 = 595.0;
const HEIGHT: f32 = 842.0;
const LEFT: f32 = 50.0;
const RIGHT: f32 = WIDTH - 50.0;

/// Whether every character of `s` exists in WinAnsi.
fn is_win_ansi(s: &str) -> bool {
    s.chars()
        .all(|c| matches!(c, ' '..='~' | '\u{a0}'..='\u{ff}' | '€' | '‘' | '’' | '“' | '”' | '•' | '–' | '—'))
}

/// Text as big-endian UCS-2 for the `UniJIS-UCS2-H` encoding; characters
/// beyond the Basic Multilingual Plane become `?`.
fn ucs2(s: &str) -> Vec<u8> {
    s.chars()
        .flat_map(|c| {
            u16::try_from(u32::from(c))
                .unwrap_or(u16::from(b'?'))
                .to_be_bytes()
        })
        .collect()
}

/// Text in the WinAnsi encoding of the standard fonts.
fn win_ansi(s: &str) -> Vec<u8> {
    s.chars()
        .map(|c| match c {
            ' '..='~' => c as u8,
            '\u{a0}'..='\u{ff}' => c as u32 as u8,
            '€' => 0x80,
            '‘' => 0x91,
            '’' => 0x92,
            '“' => 0x93,
            '”' => 0x94,
            '•' => 0x95,
            '–' => 0x96,
            '—' => 0x97,
            _ => b'?',
        })
        .collect()
}

/// Approximate advance width, for right-aligned columns.
fn text_width(s: &str, size: f32) -> f32 {
    if !is_win_ansi(s) {
        // The CID font: half-width Latin, full-width everything else.
        let units: u32 = s
            .chars()
            .map(|c| if c.is_ascii() { 500 } else { 1000 })
            .sum();
        return units as f32 * size / 1000.0;
    }
    let units: u32 = s
        .chars()
        .map(|c| match c {
            ' ' | ',' | '.' | ':' | ';' | 'i' | 'j' | 'l' | '!' | '|' | '\'' => 278,
            'f' | 't' | 'I' | '/' | '(' | ')' | '-' => 333,
            'r' => 333,
            'm' | 'M' | 'W' => 833,
            'w' => 722,
            '%' => 889,
            'A'..='Z' => 667,
            _ => 556,
        })
        .sum();
    units as f32 * size / 1000.0
}

struct Page {
    content: Content,
}

impl Page {
    fn text(&mut self, x: f32, y: f32, size: f32, bold: bool, s: &str) {
        let (font, bytes) = if is_win_ansi(s) {
            (Name(if bold { b"F2" } else { b"F1" }), win_ansi(s))
        } else {
            (Name(b"F3"), ucs2(s))
        };
        self.content
            .begin_text()
            .set_font(font, size)
            .set_text_matrix([1.0, 0.0, 0.0, 1.0, x, y])
            .show(Str(&bytes))
            .end_text();
    }

    fn right(&mut self, x: f32, y: f32, size: f32, bold: bool, s: &str) {
        self.text(x - text_width(s, size), y, size, bold, s);
    }

    fn rule(&mut self, y: f32, width: f32) {
        self.content
            .set_line_width(width)
            .move_to(LEFT, y)
            .line_to(RIGHT, y)
            .stroke();
    }
}

/// Renders the invoice as a one-page PDF.
pub fn render_pdf(inv: &Invoice) -> Result<Vec<u8>, DocumentError> {
    let p = prepare(inv, Some("en"))?;
    let doc = &inv.document;
    let s = |v: &serde_json::Value, k: &str| {
        v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string()
    };
    let seller = doc.get("seller").cloned().unwrap_or_default();
    let buyer = doc.get("buyer").cloned().unwrap_or_default();

    let mut page = Page {
        content: Content::new(),
    };
    let mut y = HEIGHT - 70.0;
    page.text(LEFT, y, 22.0, true, &format!("Invoice {}", inv.number));
    page.right(RIGHT, y, 12.0, true, &inv.status.to_uppercase());
    y -= 20.0;
    let mut dates = format!("Issued {}", p.issued);
    if let Some(d) = &p.due {
        dates.push_str(&format!("   Due {d}"));
    }
    if let Some(d) = &p.paid {
        dates.push_str(&format!("   Paid {d}"));
    }
    page.text(LEFT, y, 10.0, false, &dates);

    y -= 40.0;
    page.text(LEFT, y, 10.0, true, "From");
    page.text(320.0, y, 10.0, true, "Bill to");
    let mut from = vec![s(&seller, "name")];
    from.extend(
        seller
            .get("address")
            .and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|l| l.as_str().map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default(),
    );
    from.push(s(&seller, "email"));
    if !s(&seller, "tax_id").is_empty() {
        from.push(format!("Tax ID {}", s(&seller, "tax_id")));
    }
    let to = [
        s(&buyer, "name"),
        s(&buyer, "email"),
        s(&buyer, "country"),
        format!(
            "Customer #{} / Subscription #{}",
            inv.customer_id, inv.subscription_id
        ),
    ];
    let block_top = y - 14.0;
    for (i, line) in from.iter().enumerate() {
        page.text(LEFT, block_top - 13.0 * i as f32, 10.0, false, line);
    }
    for (i, line) in to.iter().enumerate() {
        page.text(320.0, block_top - 13.0 * i as f32, 10.0, false, line);
    }
    y = block_top - 13.0 * from.len().max(to.len()) as f32 - 30.0;

    let cols = [LEFT, 70.0, 250.0, 390.0, 450.0, 500.0];
    page.text(cols[0], y, 9.0, true, "#");
    page.text(cols[1], y, 9.0, true, "Description");
    page.text(cols[2], y, 9.0, true, "Period");
    page.right(cols[4] - 5.0, y, 9.0, true, "Unit price");
    page.right(cols[5] - 5.0, y, 9.0, true, "Tax");
    page.right(RIGHT, y, 9.0, true, "Amount");
    y -= 6.0;
    page.rule(y, 0.5);
    for line in &p.lines {
        y -= 16.0;
        page.text(cols[0], y, 9.0, false, &line.number.to_string());
        let desc = if line.quantity == 1 {
            line.description.clone()
        } else {
            format!("{} x{}", line.description, line.quantity)
        };
        page.text(cols[1], y, 9.0, false, &desc);
        page.text(cols[2], y, 9.0, false, &p.period);
        page.right(cols[4] - 5.0, y, 9.0, false, &line.unit);
        page.right(cols[5] - 5.0, y, 9.0, false, &line.rate);
        page.right(RIGHT, y, 9.0, false, &line.amount);
    }
    y -= 8.0;
    page.rule(y, 0.5);
    y -= 18.0;
    page.right(450.0, y, 10.0, false, "Subtotal");
    page.right(RIGHT, y, 10.0, false, &p.subtotal);
    for t in &p.taxes {
        y -= 15.0;
        page.right(
            450.0,
            y,
            10.0,
            false,
            &format!("Tax {} on {}", t.rate, t.taxable),
        );
        page.right(RIGHT, y, 10.0, false, &t.tax);
    }
    y -= 10.0;
    page.content
        .set_line_width(1.0)
        .move_to(330.0, y)
        .line_to(RIGHT, y)
        .stroke();
    y -= 18.0;
    page.right(450.0, y, 13.0, true, &format!("Total ({})", inv.currency));
    page.right(RIGHT, y, 13.0, true, &p.total);
    y -= 40.0;
    page.text(LEFT, y, 10.0, true, "Payment");
    page.text(LEFT + 55.0, y, 10.0, false, &p.payment);

    let catalog = Ref::new(1);
    let tree = Ref::new(2);
    let page_id = Ref::new(3);
    let regular = Ref::new(4);
    let bold = Ref::new(5);
    let content_id = Ref::new(6);
    let info = Ref::new(7);
    let japanese = Ref::new(8);
    let japanese_cid = Ref::new(9);
    let japanese_descriptor = Ref::new(10);
    let mut pdf = Pdf::new();
    pdf.catalog(catalog).pages(tree);
    pdf.pages(tree).kids([page_id]).count(1);
    let mut pg = pdf.page(page_id);
    pg.media_box(Rect::new(0.0, 0.0, WIDTH, HEIGHT));
    pg.parent(tree);
    pg.contents(content_id);
    pg.resources()
        .fonts()
        .pair(Name(b"F1"), regular)
        .pair(Name(b"F2"), bold)
        .pair(Name(b"F3"), japanese);
    pg.finish();
    pdf.type1_font(regular)
        .base_font(Name(b"Helvetica"))
        .encoding_predefined(Name(b"WinAnsiEncoding"));
    pdf.type1_font(bold)
        .base_font(Name(b"Helvetica-Bold"))
        .encoding_predefined(Name(b"WinAnsiEncoding"));
    pdf.type0_font(japanese)
        .base_font(Name(b"KozMinPr6N-Regular-UniJIS-UCS2-H"))
        .encoding_predefined(Name(b"UniJIS-UCS2-H"))
        .descendant_font(japanese_cid);
    let mut cid = pdf.cid_font(japanese_cid);
    cid.subtype(CidFontType::Type0)
        .base_font(Name(b"KozMinPr6N-Regular"))
        .system_info(SystemInfo {
            registry: Str(b"Adobe"),
            ordering: Str(b"Japan1"),
            supplement: 6,
        })
        .font_descriptor(japanese_descriptor)
        .default_width(1000.0);
    // UniJIS-UCS2-H maps printable ASCII to CIDs 1 to 95: half width.
    cid.widths().same(1, 95, 500.0);
    cid.finish();
    pdf.font_descriptor(japanese_descriptor)
        .name(Name(b"KozMinPr6N-Regular"))
        .flags(FontFlags::SERIF | FontFlags::SYMBOLIC)
        .bbox(Rect::new(-437.0, -340.0, 1147.0, 1317.0))
        .italic_angle(0.0)
        .ascent(1137.0)
        .descent(-349.0)
        .cap_height(742.0)
        .stem_v(80.0);
    let stream = page.content.finish();
    pdf.stream(content_id, stream.as_slice());
    pdf.document_info(info)
        .title(TextStr(&format!("Invoice {}", inv.number)))
        .producer(TextStr("renewd"));
    Ok(pdf.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn japanese_text_is_set_in_the_japanese_cid_font() {
        assert!(is_win_ansi("Hanako Yamada ¥53,000 – €1"));
        assert!(!is_win_ansi("山田花子"));
        assert_eq!(ucs2("山A"), vec![0x5C, 0x71, 0x00, 0x41]);
        assert_eq!(text_width("山A", 10.0), 15.0);
    }

    #[test]
    fn win_ansi_keeps_latin_and_currency_signs() {
        assert_eq!(
            win_ansi("¥53,000"),
            vec![0xA5, b'5', b'3', b',', b'0', b'0', b'0']
        );
        assert_eq!(win_ansi("€1"), vec![0x80, b'1']);
        assert_eq!(win_ansi("山"), vec![b'?']);
    }
}
