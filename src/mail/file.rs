//! The file transport of the embedded default: each message becomes
//! `STATE_DIR/mail/NNNNNNNN-KIND.eml`, written atomically (temporary file,
//! then rename). The name comes from the outbox row, so delivering the same
//! row twice overwrites rather than duplicates.

use std::path::PathBuf;

use async_trait::async_trait;

use super::{BuildMail, MailError, MailKind, MailTransport, OutgoingMail};

#[derive(Debug, Clone)]
pub struct FileTransport {
    dir: PathBuf,
}

impl FileTransport {
    pub fn new(dir: PathBuf) -> Self {
        FileTransport { dir }
    }

    pub fn path_for(&self, outbox_id: i64, kind: MailKind) -> PathBuf {
        self.dir
            .join(format!("{outbox_id:08}-{}.eml", kind.as_str()))
    }
}

impl FileTransport {
    /// Writes the message's file: a temporary file, then a rename. The
    /// directory is made when first missing, not checked before every
    /// message (each check takes the state directory's lock).
    fn write(&self, outbox_id: i64, kind: MailKind, bytes: &[u8]) -> Result<(), MailError> {
        let transient =
            |e: std::io::Error| MailError::Transient(format!("{}: {e}", self.dir.display()));
        let path = self.path_for(outbox_id, kind);
        let tmp = path.with_extension("eml.tmp");
        match std::fs::write(&tmp, bytes) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&self.dir).map_err(transient)?;
                std::fs::write(&tmp, bytes).map_err(transient)?;
            }
            written => written.map_err(transient)?,
        }
        std::fs::rename(&tmp, &path).map_err(transient)
    }
}

#[async_trait]
impl MailTransport for FileTransport {
    async fn send(&self, mail: &OutgoingMail) -> Result<(), MailError> {
        let transport = self.clone();
        let (id, kind, bytes) = (mail.outbox_id, mail.kind, mail.message.formatted());
        tokio::task::spawn_blocking(move || transport.write(id, kind, &bytes))
            .await
            .map_err(|e| MailError::Transient(format!("the mail file writer stopped: {e}")))?
    }

    /// One trip to the blocking pool builds the message (templates, the
    /// invoice's documents, MIME encoding) and writes its file: each trip
    /// is a wake-up of another thread, and building on the thread polling
    /// the sweep held every other message and write behind it (renewd
    /// bench, "time travel").
    async fn build_and_send(&self, build: BuildMail) -> Result<(), MailError> {
        let transport = self.clone();
        tokio::task::spawn_blocking(move || {
            let mail = build()?;
            transport.write(mail.outbox_id, mail.kind, &mail.message.formatted())
        })
        .await
        .map_err(super::builder_stopped)?
    }
}
