//! Events that could not be published yet, on disk: length-prefixed protobuf
//! records appended to one file, replayed and truncated once the bus is back.

use super::UsageEvent;
use prost::Message;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub struct Spool {
    path: PathBuf,
}

impl Spool {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends and fsyncs: spooled events survive a crash of the node.
    pub fn append(&self, events: &[UsageEvent]) -> std::io::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut buf = Vec::new();
        for e in events {
            e.encode_length_delimited(&mut buf)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        f.write_all(&buf)?;
        f.sync_data()
    }

    /// Every spooled event; a torn last record (crash mid-append) is skipped.
    pub fn read_all(&self) -> std::io::Result<Vec<UsageEvent>> {
        let mut bytes = Vec::new();
        match std::fs::File::open(&self.path) {
            Ok(mut f) => f.read_to_end(&mut bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(e),
        };
        let mut cur = &bytes[..];
        let mut out = Vec::new();
        while !cur.is_empty() {
            match UsageEvent::decode_length_delimited(&mut cur) {
                Ok(e) => out.push(e),
                Err(_) => {
                    tracing::warn!(path = %self.path.display(), "skipping a torn record at the end of the usage spool");
                    break;
                }
            }
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        std::fs::metadata(&self.path).map_or(true, |m| m.len() == 0)
    }

    pub fn clear(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_read_clear_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(&dir.path().join("s/usage.spool"));
        assert!(spool.is_empty());
        let ev = |id: &str| UsageEvent {
            id: id.into(),
            prompt_tokens: 3,
            ..Default::default()
        };
        spool.append(&[ev("a"), ev("b")]).unwrap();
        spool.append(&[ev("c")]).unwrap();
        let ids: Vec<_> = spool
            .read_all()
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
        // A torn record at the end is skipped, the rest kept.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(spool.path())
            .unwrap();
        f.write_all(&[0x40, 1, 2]).unwrap();
        assert_eq!(spool.read_all().unwrap().len(), 3);
        spool.clear().unwrap();
        assert!(spool.is_empty());
        assert!(spool.read_all().unwrap().is_empty());
    }
}
