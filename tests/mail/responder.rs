//! A tiny SMTP server in the test process, for the answers MailDev cannot
//! give: it rejects chosen recipients with a chosen reply (550 for "no such
//! user", 451 for "try later") and accepts everything else. It speaks just
//! enough SMTP for lettre: EHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct Received {
    pub rcpt: Vec<String>,
    pub data: String,
}

#[derive(Clone, Default)]
struct Shared {
    received: Arc<Mutex<Vec<Received>>>,
    rules: Arc<Mutex<HashMap<String, String>>>,
}

pub struct Responder {
    pub port: u16,
    shared: Shared,
}

impl Responder {
    pub fn start() -> Responder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind responder");
        let port = listener.local_addr().expect("addr").port();
        let shared = Shared::default();
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &s);
                });
            }
        });
        Responder { port, shared }
    }

    /// Answers `RCPT TO:<address>` with `reply` (e.g. "550 5.1.1 ...").
    pub fn reply_to_rcpt(&self, address: &str, reply: &str) {
        self.shared
            .rules
            .lock()
            .unwrap()
            .insert(address.to_ascii_lowercase(), reply.to_string());
    }

    /// Accepts `address` again.
    pub fn accept(&self, address: &str) {
        self.shared
            .rules
            .lock()
            .unwrap()
            .remove(&address.to_ascii_lowercase());
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }
}

fn serve(conn: TcpStream, s: &Shared) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    let mut input = BufReader::new(conn);
    let mut reply = |line: &str| -> std::io::Result<()> {
        out.write_all(line.as_bytes())?;
        out.write_all(b"\r\n")?;
        out.flush()
    };
    reply("220 responder.test ESMTP ready")?;
    let mut rcpt: Vec<String> = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if input.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_string();
        let upper = cmd.to_ascii_uppercase();
        if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            reply("250-responder.test")?;
            reply("250-8BITMIME")?;
            reply("250-SMTPUTF8")?;
            reply("250 PIPELINING")?;
        } else if upper.starts_with("MAIL FROM") {
            rcpt.clear();
            reply("250 2.1.0 OK")?;
        } else if upper.starts_with("RCPT TO") {
            let addr = cmd
                .split_once('<')
                .and_then(|(_, r)| r.split_once('>'))
                .map(|(a, _)| a.to_ascii_lowercase())
                .unwrap_or_default();
            let rule = s.rules.lock().unwrap().get(&addr).cloned();
            match rule {
                Some(r) => reply(&r)?,
                None => {
                    rcpt.push(addr);
                    reply("250 2.1.5 OK")?;
                }
            }
        } else if upper == "DATA" {
            if rcpt.is_empty() {
                reply("554 5.5.1 no valid recipients")?;
                continue;
            }
            reply("354 end data with <CR><LF>.<CR><LF>")?;
            let mut data = String::new();
            loop {
                line.clear();
                if input.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                if line == ".\r\n" || line == ".\n" {
                    break;
                }
                data.push_str(&line);
            }
            s.received.lock().unwrap().push(Received {
                rcpt: std::mem::take(&mut rcpt),
                data,
            });
            reply("250 2.0.0 OK queued")?;
        } else if upper == "RSET" || upper == "NOOP" {
            rcpt.clear();
            reply("250 2.0.0 OK")?;
        } else if upper == "QUIT" {
            reply("221 2.0.0 bye")?;
            return Ok(());
        } else {
            reply("502 5.5.2 command not implemented")?;
        }
    }
}
