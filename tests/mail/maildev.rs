//! A real SMTP server for the tests: MailDev (npm), started on free ports on
//! 127.0.0.1 and read back through its REST API (`/api/email`).
//!
//! MailDev is installed by `.ci/run` into `tests/mail/node_modules`
//! (`npm install --prefix tests/mail`), or found at `$MAILDEV_BIN`. When it
//! is missing, the tests that need it fail under CI (`CI` set) and are
//! skipped with a note elsewhere, so a laptop without node can still run
//! the rest of the suite.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct MailDev {
    child: Option<Child>,
    pub smtp_port: u16,
    pub web_port: u16,
    dir: tempfile::TempDir,
}

fn binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("MAILDEV_BIN") {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/mail/node_modules/.bin/maildev");
    p.exists().then_some(p)
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// Whether a missing MailDev fails the test (under CI) or skips it.
fn required() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

impl MailDev {
    /// Starts MailDev on free ports; `None` (with a note on stderr) when it
    /// is not installed and this is not CI.
    pub fn start() -> Option<MailDev> {
        Self::start_on(free_port())
    }

    /// Starts MailDev with its SMTP server on `smtp_port`.
    pub fn start_on(smtp_port: u16) -> Option<MailDev> {
        let Some(bin) = binary() else {
            let msg = "MailDev is not installed: run `npm install --prefix tests/mail --no-package-lock` (or set MAILDEV_BIN)";
            if required() {
                panic!("{msg}; the mail tests cannot run under CI without it");
            }
            eprintln!("SKIPPED: {msg}");
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir for MailDev");
        let web_port = free_port();
        let log = std::fs::File::create(dir.path().join("maildev.log")).expect("log file");
        let child = Command::new(&bin)
            .args([
                "--ip",
                "127.0.0.1",
                "--web-ip",
                "127.0.0.1",
                "--smtp",
                &smtp_port.to_string(),
                "--web",
                &web_port.to_string(),
                "--mail-directory",
            ])
            .arg(dir.path().join("mail"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start MailDev at {}: {e}", bin.display()));
        let mut md = MailDev {
            child: Some(child),
            smtp_port,
            web_port,
            dir,
        };
        md.wait_ready();
        Some(md)
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let web = http_get(self.web_port, "/api/healthz").is_ok();
            let smtp = TcpStream::connect(("127.0.0.1", self.smtp_port)).is_ok();
            if web && smtp {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "MailDev exited with {status} before it was ready:\n{}",
                        self.log()
                    );
                }
            }
            if Instant::now() > deadline {
                panic!("MailDev did not become ready within 30s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maildev.log")).unwrap_or_default()
    }

    /// Every message received so far, oldest first.
    pub fn emails(&self) -> Vec<Value> {
        let body = http_get(self.web_port, "/api/email").expect("MailDev /api/email");
        let v: Value = serde_json::from_slice(&body).expect("MailDev returns JSON");
        let mut all = v.as_array().cloned().unwrap_or_default();
        all.sort_by(|a, b| a["time"].as_str().cmp(&b["time"].as_str()));
        all
    }

    /// The bytes of one attachment of a received message.
    pub fn attachment(&self, email_id: &str, filename: &str) -> Vec<u8> {
        http_get(
            self.web_port,
            &format!("/api/email/{email_id}/attachment/{filename}"),
        )
        .expect("MailDev attachment")
    }

    /// Stops the server (its SMTP port then refuses connections).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Wait until the port is really closed.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.smtp_port)).is_ok() && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for MailDev {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A plain HTTP/1.0 GET on 127.0.0.1 (no chunked bodies in 1.0); the body.
pub fn http_get(port: u16, path: &str) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(std::io::Error::other(format!("GET {path}: {head}")));
    }
    Ok(raw[split + 4..].to_vec())
}
