//! Events that could not be published yet, on disk, replayed and removed
//! once the bus has acknowledged every one of them.
//!
//! Each record is framed so that damage stays local: a sync marker, the
//! payload length and its CRC-32 (both little-endian `u32`), then the
//! protobuf payload. A reader that meets a damaged record counts it, logs
//! its position and looks for the next marker, so the records after it
//! survive. A torn tail (a crash or a full disk mid-append) is cut off
//! before anything is appended after it.

use super::UsageEvent;
use prost::Message;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Starts every record; chosen to be unlikely in protobuf text.
const MARKER: [u8; 4] = [0xA1, b'G', b'W', 0x5E];
const HEADER: usize = MARKER.len() + 8;
/// Largest payload a reader accepts: a usage event is a few hundred bytes,
/// so a larger length is damage, not data.
pub const MAX_RECORD: usize = 1 << 20;

pub struct Spool {
    path: PathBuf,
    /// The file's length after this process's last good append: while the
    /// file still has that length, its end is known intact without a scan.
    good_end: std::sync::Mutex<Option<u64>>,
    /// Seen empty (or cleared) since this process last appended: the
    /// publisher asks before every batch, and a `stat` per batch was a
    /// syscall per call at low rates. Only this process writes the file.
    known_empty: AtomicBool,
}

/// What a read of the spool found.
#[derive(Debug, Default)]
pub struct SpoolRead {
    pub events: Vec<UsageEvent>,
    /// Damaged stretches skipped (each logged with its byte offset).
    pub damaged: usize,
}

impl Spool {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            good_end: std::sync::Mutex::new(None),
            known_empty: AtomicBool::new(false),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends and fsyncs: spooled events survive a crash of the node. A torn
    /// tail left by an earlier crash is cut off first, and a failed write is
    /// rolled back, so a record never lands after a broken one.
    pub fn append(&self, events: &[UsageEvent]) -> std::io::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        self.known_empty.store(false, Ordering::Relaxed);
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut buf = Vec::new();
        for e in events {
            frame(e, &mut buf);
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&self.path)?;
        let len = f.metadata()?.len();
        let end = self.valid_end(&mut f, len)?;
        if end < len {
            tracing::warn!(path = %self.path.display(), offset = end, bytes = len - end,
                "cutting a torn record off the end of the usage spool");
            f.set_len(end)?;
        }
        f.seek(std::io::SeekFrom::Start(end))?;
        let mut good_end = self.good_end.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(&buf).and_then(|()| f.sync_data()) {
            // Best effort: leave no half record for the next append to follow.
            let _ = f.set_len(end);
            *good_end = None;
            return Err(e);
        }
        *good_end = Some(end + buf.len() as u64);
        Ok(())
    }

    /// Where the file's good content ends: just past its last intact record.
    /// Read back only for the first append of this process (or when the file
    /// changed underneath), not for every batch of an outage.
    fn valid_end(&self, f: &mut std::fs::File, len: u64) -> std::io::Result<u64> {
        let known = *self.good_end.lock().unwrap_or_else(|p| p.into_inner());
        if len == 0 || known == Some(len) {
            return Ok(len);
        }
        let mut bytes = Vec::new();
        f.seek(std::io::SeekFrom::Start(0))?;
        f.read_to_end(&mut bytes)?;
        Ok(scan(&bytes, |_, _| {}).end as u64)
    }

    /// Every intact spooled event, in order; damaged records are skipped,
    /// counted and logged with their offset.
    pub fn read_all(&self) -> std::io::Result<SpoolRead> {
        let mut bytes = Vec::new();
        match std::fs::File::open(&self.path) {
            Ok(mut f) => f.read_to_end(&mut bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SpoolRead::default()),
            Err(e) => return Err(e),
        };
        let mut read = SpoolRead::default();
        let scanned = scan(&bytes, |offset, len| {
            tracing::warn!(path = %self.path.display(), offset, bytes = len,
                "skipping a damaged record in the usage spool");
        });
        read.damaged = scanned.damaged;
        read.events = scanned.events;
        if scanned.end < bytes.len() {
            tracing::warn!(path = %self.path.display(), offset = scanned.end,
                bytes = bytes.len() - scanned.end, "torn record at the end of the usage spool");
            read.damaged += 1;
        }
        Ok(read)
    }

    pub fn is_empty(&self) -> bool {
        if self.known_empty.load(Ordering::Relaxed) {
            return true;
        }
        let empty = std::fs::metadata(&self.path).map_or(true, |m| m.len() == 0);
        self.known_empty.store(empty, Ordering::Relaxed);
        empty
    }

    /// Removes the spool: only once the bus acknowledged every event in it.
    pub fn clear(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => {
                self.known_empty.store(true, Ordering::Relaxed);
                Ok(())
            }
        }
    }
}

fn frame(e: &UsageEvent, buf: &mut Vec<u8>) {
    let payload = e.encode_to_vec();
    buf.extend_from_slice(&MARKER);
    buf.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    buf.extend_from_slice(&payload);
}

struct Scanned {
    events: Vec<UsageEvent>,
    damaged: usize,
    /// Just past the last intact record.
    end: usize,
}

/// One intact record at the start of `bytes`: the event and the record's length.
fn record(bytes: &[u8]) -> Option<(UsageEvent, usize)> {
    let header = bytes.get(..HEADER)?;
    if header[..MARKER.len()] != MARKER {
        return None;
    }
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(header.get(at..at + 4)?.try_into().ok()?))
    };
    let len = usize::try_from(word(MARKER.len())?).ok()?;
    let crc = word(MARKER.len() + 4)?;
    if len > MAX_RECORD {
        return None;
    }
    let payload = bytes.get(HEADER..HEADER.checked_add(len)?)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let event = UsageEvent::decode(payload).ok()?;
    Some((event, HEADER + len))
}

/// Walks the records; on damage, reports `(offset, length)` of the skipped
/// stretch and resumes at the next marker. A stretch that runs to the end of
/// `bytes` is a torn tail: left out of `end` and not reported.
fn scan(bytes: &[u8], mut damaged: impl FnMut(usize, usize)) -> Scanned {
    let mut out = Scanned {
        events: Vec::new(),
        damaged: 0,
        end: 0,
    };
    let mut at = 0;
    while at < bytes.len() {
        if let Some((event, len)) = bytes.get(at..).and_then(record) {
            out.events.push(event);
            at += len;
            out.end = at;
            continue;
        }
        // Resync: the next marker after `at` that starts an intact record.
        let next = (at + 1..bytes.len())
            .find(|&i| bytes[i..].starts_with(&MARKER) && record(&bytes[i..]).is_some());
        match next {
            Some(i) => {
                damaged(at, i - at);
                out.damaged += 1;
                at = i;
            }
            None => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str) -> UsageEvent {
        UsageEvent {
            id: id.into(),
            prompt_tokens: 3,
            ..Default::default()
        }
    }

    fn ids(read: &SpoolRead) -> Vec<&str> {
        read.events.iter().map(|e| e.id.as_str()).collect()
    }

    fn append_raw(spool: &Spool, bytes: &[u8]) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(spool.path())
            .unwrap();
        f.write_all(bytes).unwrap();
    }

    #[test]
    fn append_read_clear() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(&dir.path().join("s/usage.spool"));
        assert!(spool.is_empty());
        spool.append(&[ev("a"), ev("b")]).unwrap();
        spool.append(&[ev("c")]).unwrap();
        let read = spool.read_all().unwrap();
        assert_eq!((ids(&read), read.damaged), (vec!["a", "b", "c"], 0));
        spool.clear().unwrap();
        assert!(spool.is_empty());
        assert!(spool.read_all().unwrap().events.is_empty());
    }

    #[test]
    fn a_torn_record_then_more_appends_loses_nothing_after_it() {
        // Given a spool whose last append was torn by a crash,
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(&dir.path().join("usage.spool"));
        spool.append(&[ev("a"), ev("b")]).unwrap();
        let mut torn = Vec::new();
        frame(&ev("torn"), &mut torn);
        append_raw(&spool, &torn[..torn.len() - 3]);
        // when more events are appended after the restart,
        spool.append(&[ev("c")]).unwrap();
        spool.append(&[ev("d")]).unwrap();
        // then the torn tail was cut off first and every accepted event replays.
        let read = spool.read_all().unwrap();
        assert_eq!(ids(&read), ["a", "b", "c", "d"]);
        assert_eq!(
            read.damaged, 0,
            "the torn tail was cut, not left in the middle"
        );
    }

    #[test]
    fn a_damaged_record_in_the_middle_is_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(&dir.path().join("usage.spool"));
        spool.append(&[ev("a"), ev("b"), ev("c")]).unwrap();
        // Flip a payload byte of "b" (disk damage after the write).
        let mut bytes = std::fs::read(spool.path()).unwrap();
        let mut one = Vec::new();
        frame(&ev("a"), &mut one);
        let b_payload = one.len() + HEADER + 2;
        bytes[b_payload] ^= 0xFF;
        // And garbage between records, as a torn write in the middle leaves.
        bytes.splice(one.len()..one.len(), [0x40, 1, 2, 0xA1, b'G']);
        std::fs::write(spool.path(), &bytes).unwrap();
        spool.append(&[ev("d")]).unwrap();

        let read = spool.read_all().unwrap();
        assert_eq!(ids(&read), ["a", "c", "d"]);
        assert_eq!(read.damaged, 1);
    }

    #[test]
    fn an_oversized_length_is_damage_not_an_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(&dir.path().join("usage.spool"));
        let mut bad = MARKER.to_vec();
        bad.extend_from_slice(&u32::MAX.to_le_bytes());
        bad.extend_from_slice(&[0; 4]);
        std::fs::write(spool.path(), &bad).unwrap();
        spool.append(&[ev("a")]).unwrap();
        let read = spool.read_all().unwrap();
        assert_eq!(ids(&read), ["a"]);
    }
}
