//! Logging: tracing to stderr (stdout belongs to command output), human
//! format on a terminal or JSON lines when configured.
//!
//! Under journald (stderr is the stream named by `JOURNAL_STREAM`) each
//! line starts with an sd-daemon priority prefix (`<3>` error, `<4>` warning,
//! `<6>` info, `<7>` debug) that journald turns into the entry's priority,
//! so `journalctl -p warning` works; the timestamp is left to the journal.
//! Events are written straight to stderr, one write per line, so nothing
//! waits in a buffer when the process exits.

use std::io::Write;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, JsonFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber; `filter` is a tracing filter string.
pub fn init(format: LogFormat, filter: &str) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info")));
    let journald = stderr_is_journal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match (format, journald) {
        (LogFormat::Json, false) => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        (LogFormat::Json, true) => builder
            .fmt_fields(JsonFields::new())
            .event_format(SdPriority(
                format::format()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .without_time(),
            ))
            .try_init(),
        (LogFormat::Pretty, true) => builder
            .with_ansi(false)
            .event_format(SdPriority(
                format::format()
                    .without_time()
                    .with_ansi(false)
                    .with_target(false),
            ))
            .try_init(),
        (LogFormat::Pretty, false) => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}

/// Flushes whatever the log writer holds (stderr is unbuffered, so this is
/// a formality kept for any writer that is not): called before exit.
pub fn flush() {
    let _ = std::io::stderr().flush();
}

/// Whether stderr is the journal stream systemd connected us to. Checking
/// the device and inode (not just that the variable is set) keeps a child
/// whose stderr was redirected from inheriting the journal format.
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream
        .to_str()
        .and_then(|s| s.split_once(':'))
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
    else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .map(|m| m.dev() == dev && m.ino() == ino)
        .unwrap_or(false)
}

/// The sd-daemon(3) priority of a level.
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Prefixes each line with its sd-daemon priority, `<N>`.
struct SdPriority<F>(F);

impl<S, N, F> FormatEvent<S, N> for SdPriority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_sd_daemon_priorities() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
        assert_eq!(priority(&Level::TRACE), 7);
    }
}
