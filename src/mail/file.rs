//! The file transport of the embedded default: each message becomes
//! `STATE_DIR/mail/NNNNNNNN-KIND.eml`, written atomically (temporary file,
//! then rename). The name comes from the outbox row, so delivering the same
//! row twice overwrites rather than duplicates.

use std::path::PathBuf;

use async_trait::async_trait;

use super::{MailError, MailTransport, OutgoingMail};

pub struct FileTransport {
    dir: PathBuf,
}

impl FileTransport {
    pub fn new(dir: PathBuf) -> Self {
        FileTransport { dir }
    }

    pub fn path_for(&self, outbox_id: i64, kind: super::MailKind) -> PathBuf {
        self.dir
            .join(format!("{outbox_id:08}-{}.eml", kind.as_str()))
    }
}

#[async_trait]
impl MailTransport for FileTransport {
    async fn send(&self, mail: &OutgoingMail) -> Result<(), MailError> {
        let dir = self.dir.clone();
        let path = self.path_for(mail.outbox_id, mail.kind);
        let bytes = mail.message.formatted();
        // One trip to the blocking pool for the directory, the file and the
        // rename (three trips, each a wake-up of another thread, were a
        // good part of a message's cost: renewd bench, "time travel").
        tokio::task::spawn_blocking(move || {
            let transient =
                |e: std::io::Error| MailError::Transient(format!("{}: {e}", dir.display()));
            let tmp = path.with_extension("eml.tmp");
            // The directory is made when first missing, not checked before
            // every message (each check takes the state directory's lock).
            match std::fs::write(&tmp, &bytes) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir_all(&dir).map_err(transient)?;
                    std::fs::write(&tmp, &bytes).map_err(transient)?;
                }
                written => written.map_err(transient)?,
            }
            std::fs::rename(&tmp, &path).map_err(transient)
        })
        .await
        .map_err(|e| MailError::Transient(format!("the mail file writer stopped: {e}")))?
    }
}
