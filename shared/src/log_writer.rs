//! The log writer: lines go into a shared buffer and a thread of its own
//! writes them out, many per write(2), at most an interval
//! (`telemetry.access_log_flush_ms`) after they were logged (nginx's
//! `access_log ... buffer= flush=`).
//!
//! Why not a channel to the thread (`tracing_appender::non_blocking`): the
//! thread then woke for every line — a futex wake on the worker serving the
//! call, and on the thread's side a spin with `sched_yield` before it parked
//! again, ~5 syscalls per call at 1,000 calls/s. Here a caller appends under
//! a mutex held for one copy, and only the line that finds the buffer empty
//! wakes the thread; the thread then waits out the interval, so a steady
//! stream of calls costs it one wake and one write per interval.
//!
//! Only the access log waits out the interval: other lines (warnings, state
//! changes) are rare, and someone may be watching for them, so such a line
//! wakes the thread at once and goes out with whatever is buffered.
//!
//! Lossless: past [`MAX_BUFFERED`] bytes not yet written, callers wait for the
//! thread. A sink that fails (stdout closed) loses what it failed to take and
//! the thread goes on.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Buffered bytes that wake the thread before the interval is out.
const HIGH_WATER: usize = 64 * 1024;
/// Buffered bytes past which callers wait for the thread.
pub const MAX_BUFFERED: usize = 16 * 1024 * 1024;

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    /// A line that should not wait is buffered.
    urgent: bool,
    closing: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer thread.
    work: Condvar,
    /// Wakes callers waiting for room.
    room: Condvar,
    max_buffered: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves bytes, not broken invariants.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A handle that appends to the log; cheap to clone, one per caller. Each
/// `write` is kept whole: give it whole lines (`write!` would split one).
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
    /// This handle's lines are written at once, not after the interval.
    urgent: bool,
}

/// Owns the writer thread: dropping it writes out every buffered line and
/// stops the thread.
pub struct LogWriterGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl LogWriter {
    /// Starts the writer thread `name` over `sink`; a line waits at most
    /// `interval` for others to join its write.
    pub fn start<W: Write + Send + 'static>(
        sink: W,
        name: &str,
        interval: Duration,
    ) -> std::io::Result<(Self, LogWriterGuard)> {
        Self::start_with(sink, name, interval, MAX_BUFFERED)
    }

    fn start_with<W: Write + Send + 'static>(
        mut sink: W,
        name: &str,
        interval: Duration,
        max_buffered: usize,
    ) -> std::io::Result<(Self, LogWriterGuard)> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            room: Condvar::new(),
            max_buffered,
        });
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || write_loop(&shared, &mut sink, interval))?
        };
        Ok((
            Self {
                shared: Arc::clone(&shared),
                urgent: false,
            },
            LogWriterGuard {
                shared,
                thread: Some(thread),
            },
        ))
    }

    /// A handle to the same log whose lines are written at once.
    pub fn urgent(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            urgent: true,
        }
    }

    /// Appends `bytes` (whole lines) to the buffer.
    pub fn append(&self, bytes: &[u8]) {
        let shared = &*self.shared;
        let mut st = shared.lock();
        while st.buf.len() >= shared.max_buffered && !st.closing {
            st = shared.room.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let was = st.buf.len();
        st.buf.extend_from_slice(bytes);
        // The first line after a write starts the thread's interval; crossing
        // the high-water mark cuts the interval short.
        let wake = was == 0
            || (was < HIGH_WATER && st.buf.len() >= HIGH_WATER)
            || (self.urgent && !st.urgent);
        st.urgent |= self.urgent;
        drop(st);
        if wake {
            shared.work.notify_one();
        }
    }
}

fn write_loop(shared: &Shared, sink: &mut dyn Write, interval: Duration) {
    let mut out = Vec::new();
    loop {
        let mut st = shared.lock();
        while st.buf.is_empty() && !st.closing {
            st = shared.work.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if !st.closing && !st.urgent && st.buf.len() < HIGH_WATER {
            // Let the lines of the next moments join this write.
            st = shared
                .work
                .wait_timeout_while(st, interval, |s| {
                    s.buf.len() < HIGH_WATER && !s.closing && !s.urgent
                })
                .map(|(st, _)| st)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        std::mem::swap(&mut st.buf, &mut out);
        st.urgent = false;
        let closing = st.closing;
        drop(st);
        shared.room.notify_all();
        if !out.is_empty() {
            // Nowhere to report a failing log sink but the log itself.
            let _ = sink.write_all(&out).and_then(|()| sink.flush());
            out.clear();
            // Do not keep a burst's buffer for good.
            out.shrink_to(HIGH_WATER * 2);
        }
        if closing && shared.lock().buf.is_empty() {
            return;
        }
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.append(buf);
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.append(buf);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for LogWriterGuard {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.work.notify_one();
        self.shared.room.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A sink that sends each write(2) it gets to the test.
    struct Chunks(mpsc::Sender<Vec<u8>>);

    impl Write for Chunks {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.send(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_and_in_order_per_thread() {
        let (tx, rx) = mpsc::channel();
        let (w, guard) =
            LogWriter::start(Chunks(tx), "test-log", Duration::from_millis(25)).unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let mut w = w.clone();
                s.spawn(move || {
                    for i in 0..5_000 {
                        // As the fmt layer does: one write per formatted line.
                        w.write_all(format!("{{\"t\":{t},\"i\":{i}}}\n").as_bytes())
                            .unwrap();
                    }
                });
            }
        });
        drop(guard);
        let all: Vec<u8> = rx.try_iter().flatten().collect();
        let text = String::from_utf8(all).unwrap();
        let mut next = [0; 4];
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let t = v["t"].as_u64().unwrap() as usize;
            assert_eq!(v["i"], next[t], "thread {t}'s lines out of order");
            next[t] += 1;
        }
        assert_eq!(next, [5_000; 4]);
    }

    #[test]
    fn a_lone_line_is_written_within_the_interval_without_more_traffic() {
        let (tx, rx) = mpsc::channel();
        let (w, _guard) =
            LogWriter::start(Chunks(tx), "test-log", Duration::from_millis(25)).unwrap();
        w.append(b"one\n");
        let got = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(got, b"one\n");
    }

    #[test]
    fn lines_logged_close_together_share_one_write() {
        let (tx, rx) = mpsc::channel();
        // An interval far longer than the appends take.
        let (w, guard) =
            LogWriter::start_with(Chunks(tx), "test-log", Duration::from_secs(2), MAX_BUFFERED)
                .unwrap();
        for i in 0..100 {
            w.append(format!("{i}\n").as_bytes());
        }
        let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        drop(guard);
        assert_eq!(first.iter().filter(|&&b| b == b'\n').count(), 100);
    }

    #[test]
    fn an_urgent_line_cuts_the_interval_short_and_takes_the_buffer_along() {
        let (tx, rx) = mpsc::channel();
        let (w, _guard) = LogWriter::start_with(
            Chunks(tx),
            "test-log",
            Duration::from_secs(600),
            MAX_BUFFERED,
        )
        .unwrap();
        w.append(b"access\n");
        w.urgent().append(b"warning\n");
        // Without the urgent line this would wait ten minutes.
        let mut got = Vec::new();
        while got != b"access\nwarning\n" {
            got.extend(rx.recv_timeout(Duration::from_secs(10)).unwrap());
        }
    }

    /// A sink that takes nothing until the test lets it.
    struct Gate(Arc<(Mutex<bool>, Condvar)>, mpsc::Sender<usize>);

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (open, cv) = &*self.0;
            let mut o = open.lock().unwrap();
            while !*o {
                o = cv.wait(o).unwrap();
            }
            let _ = self.1.send(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_sink_makes_callers_wait_and_loses_nothing() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (tx, rx) = mpsc::channel();
        let (w, guard) = LogWriter::start_with(
            Gate(Arc::clone(&gate), tx),
            "test-log",
            Duration::from_millis(1),
            1_000,
        )
        .unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        let writer = {
            let w = w.clone();
            std::thread::spawn(move || {
                for _ in 0..100 {
                    w.append(&[b'x'; 99]);
                    w.append(b"\n");
                }
                done_tx.send(()).unwrap();
            })
        };
        // 10,000 bytes against a 1,000-byte cap and a sink that takes nothing.
        assert!(done_rx.recv_timeout(Duration::from_millis(300)).is_err());
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        writer.join().unwrap();
        drop(guard);
        assert_eq!(rx.try_iter().sum::<usize>(), 10_000);
    }
}
