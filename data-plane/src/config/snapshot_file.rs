use crate::error::Error;
use aigw_shared::crypto::{Cipher, Sealed};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The last applied snapshot on disk (`data_plane.snapshot_cache`; the key
/// and the sealing labels below keep their old names: the file format), so a node can boot while the control
/// plane is unreachable. It holds decrypted provider secrets, so it is sealed
/// with a key derived from the node token and written with mode 0600.
pub struct SnapshotFile {
    path: PathBuf,
    cipher: Cipher,
}

#[derive(Serialize, Deserialize)]
struct SnapshotDoc {
    version: u64,
    sealed: Sealed,
    /// The snapshot's data key as the control plane sealed it for this node.
    data_key: Sealed,
}

/// A snapshot as received: its body (credentials sealed with its data key)
/// and the data key sealed for this node.
pub struct StoredSnapshot {
    pub version: u64,
    pub body: Vec<u8>,
    pub data_key: Sealed,
}

const OWNER: &str = "aigw:snapshot-cache";

impl SnapshotFile {
    pub fn new(path: &Path, node_token: &str) -> Self {
        let key: [u8; 32] = Sha256::new()
            .chain_update(b"aigw snapshot cache v1\0")
            .chain_update(node_token.as_bytes())
            .finalize()
            .into();
        Self {
            path: path.to_path_buf(),
            cipher: Cipher::new(&key),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes atomically: a temp file, fsync, then rename over the old one.
    pub fn store(&self, snapshot: &StoredSnapshot) -> Result<(), Error> {
        let text =
            std::str::from_utf8(&snapshot.body).map_err(|e| Error::SnapshotFile(e.to_string()))?;
        let doc = SnapshotDoc {
            version: snapshot.version,
            sealed: self.cipher.seal(OWNER, text)?,
            data_key: snapshot.data_key.clone(),
        };
        let bytes = serde_json::to_vec(&doc).map_err(|e| Error::SnapshotFile(e.to_string()))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("tmp");
        write_private(&tmp, &bytes)?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(())
    }

    /// The stored snapshot, if a readable one exists.
    pub fn load(&self) -> Result<Option<StoredSnapshot>, Error> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let doc: SnapshotDoc = serde_json::from_slice(&bytes)
            .map_err(|e| Error::SnapshotFile(format!("{}: {e}", self.path.display())))?;
        let text = self.cipher.open(OWNER, &doc.sealed).map_err(|_| {
            Error::SnapshotFile(format!(
                "{}: sealed with another node token",
                self.path.display()
            ))
        })?;
        Ok(Some(StoredSnapshot {
            version: doc.version,
            body: text.into_bytes(),
            data_key: doc.data_key,
        }))
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_sealed_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/cache.json");
        let cache = SnapshotFile::new(&path, "token-a");
        assert!(cache.load().unwrap().is_none());
        let data_key = Sealed {
            nonce: "n".into(),
            ciphertext: "c".into(),
        };
        cache
            .store(&StoredSnapshot {
                version: 7,
                body: br#"{"secret":"sk-plain"}"#.to_vec(),
                data_key: data_key.clone(),
            })
            .unwrap();
        let raw = std::fs::read_to_string(&path).unwrap();
        assert!(!raw.contains("sk-plain"));
        let back = cache.load().unwrap().unwrap();
        assert_eq!(back.body, br#"{"secret":"sk-plain"}"#);
        assert_eq!((back.version, back.data_key), (7, data_key));
        assert!(SnapshotFile::new(&path, "token-b").load().is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
