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
        let transient =
            |e: std::io::Error| MailError::Transient(format!("{}: {e}", self.dir.display()));
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(transient)?;
        let path = self.path_for(mail.outbox_id, mail.kind);
        let tmp = path.with_extension("eml.tmp");
        tokio::fs::write(&tmp, mail.message.formatted())
            .await
            .map_err(transient)?;
        tokio::fs::rename(&tmp, &path).await.map_err(transient)?;
        Ok(())
    }
}
