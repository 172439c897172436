//! Where log lines go: a buffer that a thread of its own writes out in
//! batches.
//!
//! A runtime worker must never block on stderr (a pipe to a stalled or busy
//! collector), so lines are handed to a writer thread. Handing each line
//! over on its own, as a channel does, wakes that thread once per line: at
//! 10,000 stream opens a second (one log line each) that thread was 6 % of
//! the server's profile samples, mostly context switches (measured side by
//! side, this writer saved 2 % of the CPU per open; BENCHMARKS.md,
//! scenario 6). Here a line is appended to a shared buffer under a short
//! lock; only the first line into an empty buffer wakes the thread, which
//! then waits [`LogWriter::spawn`]'s `linger` for more before it writes them
//! all at once. A burst of any size costs one wake-up and one `write`.
//!
//! Lines beyond the buffer's bound are dropped rather than waited for, and
//! counted: the next batch says how many were lost. Dropping the
//! [`FlushOnDrop`] guard writes what is pending and stops the thread,
//! waiting a second at most.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

/// The handle the log subscriber writes through (cheap to clone).
#[derive(Clone)]
pub struct LogWriter(Arc<Shared>);

/// Stops the writer thread once everything pending is written, waiting
/// at most [`FLUSH_WAIT`] for it: a stalled stderr must not keep the
/// process from exiting.
#[must_use = "dropping the guard stops the log writer"]
pub struct FlushOnDrop {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    finished: mpsc::Receiver<()>,
}

/// How long dropping [`FlushOnDrop`] waits for the last lines to be written.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Bytes held before new lines are dropped.
    max_pending: usize,
    /// Bytes at which the thread is woken before its linger is over.
    wake_at: usize,
}

#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    /// Lines dropped since the last batch.
    dropped: u64,
    /// The thread has been woken because the batch grew large.
    hurried: bool,
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl LogWriter {
    /// Starts the thread that writes to `out`, at most `max_pending` bytes
    /// behind. A batch goes out `linger` after its first line, or as soon
    /// as a quarter of `max_pending` is waiting.
    pub fn spawn<W: Write + Send + 'static>(
        out: W,
        linger: Duration,
        max_pending: usize,
    ) -> io::Result<(Self, FlushOnDrop)> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            max_pending,
            wake_at: max_pending / 4,
        });
        let worker = shared.clone();
        let (done, finished) = mpsc::channel();
        let thread = std::thread::Builder::new().name("tokengate-log".into()).spawn(move || {
            write_batches(&worker, out, linger);
            let _ = done.send(());
        })?;
        Ok((Self(shared.clone()), FlushOnDrop { shared, thread: Some(thread), finished }))
    }

    /// Queues one line (the subscriber writes each formatted line in one
    /// call).
    fn push(&self, line: &[u8]) {
        let shared = &*self.0;
        let mut pending = shared.lock();
        if pending.closed || pending.lines.len() + line.len() > shared.max_pending {
            pending.dropped += 1;
            return;
        }
        pending.lines.extend_from_slice(line);
        // The first line of a batch starts the thread's linger; a batch
        // that grows large cuts it short (once).
        let first = pending.lines.len() == line.len();
        let hurry = !first && !pending.hurried && pending.lines.len() >= shared.wake_at;
        pending.hurried |= hurry;
        drop(pending);
        if first || hurry {
            shared.wake.notify_one();
        }
    }
}

/// The writer thread: sleeps until a batch starts, lingers for the rest of
/// it (unless it grows large or the guard is dropped), then writes it.
fn write_batches<W: Write>(shared: &Shared, mut out: W, linger: Duration) {
    let mut batch = Vec::new();
    loop {
        let mut pending = shared.lock();
        while pending.lines.is_empty() && pending.dropped == 0 && !pending.closed {
            pending = shared.wake.wait(pending).unwrap_or_else(PoisonError::into_inner);
        }
        let deadline = Instant::now() + linger;
        while !pending.closed && pending.lines.len() < shared.wake_at {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            pending = shared.wake.wait_timeout(pending, left).unwrap_or_else(PoisonError::into_inner).0;
        }
        std::mem::swap(&mut batch, &mut pending.lines);
        let (dropped, closed) = (std::mem::take(&mut pending.dropped), pending.closed);
        pending.hurried = false;
        drop(pending);
        if dropped > 0 {
            let _ = writeln!(batch, "tokengate: {dropped} log line(s) dropped: the log output did not keep up");
        }
        // A failed write loses this batch; later ones are still tried.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        // Keep the buffer's allocation, but not a burst's worth for ever.
        batch.shrink_to(shared.wake_at.min(64 * 1024));
        if closed && shared.lock().lines.is_empty() {
            return;
        }
    }
}

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        // A thread blocked in a write to a stalled stderr is left behind
        // (the process is exiting); one that finished is joined.
        if self.finished.recv_timeout(FLUSH_WAIT).is_ok()
            && let Some(thread) = self.thread.take()
        {
            let _ = thread.join();
        }
    }
}

/// One line's writer, as the subscriber asks for it.
pub struct LineSink<'a>(&'a LogWriter);

impl Write for LineSink<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.0.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LineSink<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineSink(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that records each `write` call it gets.
    #[derive(Clone, Default)]
    struct Calls(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Calls {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap_or_else(PoisonError::into_inner).push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Calls {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap_or_else(PoisonError::into_inner).concat()).unwrap_or_default()
        }
        fn writes(&self) -> usize {
            self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
        }
    }

    fn line(writer: &LogWriter, text: &str) {
        let _ = writer.make_writer().write_all(text.as_bytes());
    }

    #[test]
    fn a_burst_of_lines_goes_out_in_one_write_in_order() {
        let calls = Calls::default();
        let (writer, guard) =
            LogWriter::spawn(calls.clone(), Duration::from_secs(3600), 1 << 20).unwrap_or_else(|e| panic!("{e}"));
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        for i in 0..1000 {
            line(&writer, &format!("line {i}\n"));
        }
        assert_eq!(calls.writes(), 0, "nothing is written while the batch lingers");
        drop(guard);
        assert_eq!(calls.text(), expected, "every line, in order, on drop");
        assert_eq!(calls.writes(), 1, "one write for the burst");
    }

    #[test]
    fn a_batch_goes_out_once_its_linger_is_over() {
        let calls = Calls::default();
        let (writer, _guard) =
            LogWriter::spawn(calls.clone(), Duration::from_millis(20), 1 << 20).unwrap_or_else(|e| panic!("{e}"));
        line(&writer, "first\n");
        line(&writer, "second\n");
        for _ in 0..500 {
            if calls.text() == "first\nsecond\n" {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(calls.text(), "first\nsecond\n");
        assert_eq!(calls.writes(), 1);
    }

    #[test]
    fn a_large_batch_goes_out_before_its_linger_is_over() {
        let calls = Calls::default();
        let (writer, _guard) =
            LogWriter::spawn(calls.clone(), Duration::from_secs(3600), 4096).unwrap_or_else(|e| panic!("{e}"));
        let long = format!("{}\n", "x".repeat(1100));
        line(&writer, "short\n");
        line(&writer, &long);
        for _ in 0..500 {
            if calls.writes() > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(calls.text(), format!("short\n{long}"), "a quarter of the bound cuts the linger short");
    }

    /// A sink whose writes never return, like a pipe nobody reads.
    struct Stalled(mpsc::Receiver<()>);

    impl Write for Stalled {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            let _ = self.0.recv();
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_output_does_not_hold_up_the_guard() {
        let (release, stalled) = mpsc::channel();
        let (writer, guard) =
            LogWriter::spawn(Stalled(stalled), Duration::ZERO, 1 << 20).unwrap_or_else(|e| panic!("{e}"));
        line(&writer, "stuck\n");
        let (dropped_tx, dropped) = mpsc::channel();
        std::thread::spawn(move || {
            drop(guard);
            let _ = dropped_tx.send(());
        });
        let returned = dropped.recv_timeout(Duration::from_secs(30));
        let _ = release.send(());
        assert!(returned.is_ok(), "dropping the guard waited on a stalled write");
    }

    #[test]
    fn lines_beyond_the_bound_are_dropped_and_counted() {
        let calls = Calls::default();
        let (writer, guard) =
            LogWriter::spawn(calls.clone(), Duration::from_secs(3600), 64).unwrap_or_else(|e| panic!("{e}"));
        line(&writer, &format!("{}\n", "a".repeat(59)));
        line(&writer, "bb\n");
        line(&writer, "this one does not fit\n");
        line(&writer, "nor this one\n");
        drop(guard);
        let text = calls.text();
        assert!(text.starts_with(&format!("{}\nbb\n", "a".repeat(59))), "{text}");
        assert!(!text.contains("fit") && !text.contains("nor"), "{text}");
        assert!(text.ends_with("tokengate: 2 log line(s) dropped: the log output did not keep up\n"), "{text}");
    }
}
