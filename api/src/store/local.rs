//! The local-directory store: objects are files `sha256/<first two hex digits>/<hex>` under a
//! root; uploads are spooled in `tmp/` on the same file system, so storing is an atomic rename.

use std::{
    io,
    path::{Path, PathBuf},
};

use axum::body::Bytes;

use super::{ObjectStore, Spooled, StoreError, check_address};

/// Objects as files under a directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    tmp: PathBuf,
}

impl LocalStore {
    /// A store rooted at `root` (created if missing).
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        let tmp = root.join("tmp");
        tokio::fs::create_dir_all(&tmp).await?;
        tokio::fs::create_dir_all(root.join("sha256")).await?;
        Ok(LocalStore { root, tmp })
    }

    /// Where uploads are spooled (same file system as the objects).
    pub fn spool_dir(&self) -> &Path {
        &self.tmp
    }

    /// The file of an address.
    pub fn path_of(&self, sha256: &str) -> Result<PathBuf, StoreError> {
        check_address(sha256)?;
        Ok(self.root.join("sha256").join(&sha256[..2]).join(sha256))
    }
}

impl ObjectStore for LocalStore {
    async fn put_spooled(&self, spooled: Spooled) -> Result<bool, StoreError> {
        let target = self.path_of(&spooled.sha256)?;
        if tokio::fs::try_exists(&target).await? {
            return Ok(false);
        }
        if let Some(dir) = target.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let from = spooled.path().to_owned();
        // Same bytes stored concurrently: both renames succeed and leave one identical file.
        match tokio::fs::rename(&from, &target).await {
            Ok(()) => {
                spooled.take();
                Ok(true)
            }
            // Spooled on another file system (a spool directory of someone else's): copy.
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
                let temp = self.tmp.join(format!("copy-{}", uuid::Uuid::now_v7().simple()));
                tokio::fs::copy(&from, &temp).await?;
                tokio::fs::rename(&temp, &target).await?;
                Ok(true)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn get(&self, sha256: &str) -> Result<Option<Bytes>, StoreError> {
        match tokio::fs::read(self.path_of(sha256)?).await {
            Ok(bytes) => Ok(Some(Bytes::from(bytes))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn exists(&self, sha256: &str) -> Result<bool, StoreError> {
        Ok(tokio::fs::try_exists(self.path_of(sha256)?).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::{chunks, count_files};

    async fn store() -> (LocalStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!("nimbus-store-{}", uuid::Uuid::now_v7().simple()));
        (LocalStore::open(&dir).await.unwrap(), dir)
    }

    async fn put(s: &LocalStore, parts: &[&[u8]], limit: u64) -> Result<(String, bool), StoreError> {
        let spooled = crate::store::spool(s.spool_dir(), chunks(parts), limit, true).await?;
        let sha = spooled.sha256.clone();
        Ok((sha, s.put_spooled(spooled).await?))
    }

    #[tokio::test]
    async fn same_bytes_are_stored_once_under_their_sha256() {
        let (s, dir) = store().await;
        let (sha, created) = put(&s, &[b"ab", b"c"], 1024).await.unwrap();
        assert_eq!(sha, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(created);
        let (again, created) = put(&s, &[b"abc"], 1024).await.unwrap();
        assert_eq!((again.as_str(), created), (sha.as_str(), false));
        assert_eq!(count_files(&dir.join("sha256")), 1);
        assert_eq!(count_files(&dir.join("tmp")), 0, "the duplicate's spool file is gone");
        assert_eq!(s.get(&sha).await.unwrap().as_deref(), Some(&b"abc"[..]));
        assert!(s.exists(&sha).await.unwrap());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn oversize_uploads_leave_nothing() {
        let (s, dir) = store().await;
        assert!(matches!(put(&s, &[b"12345", b"678"], 6).await, Err(StoreError::TooLarge { limit: 6 })));
        assert_eq!(count_files(&dir), 0, "no temporary or stored object remains");
        assert!(put(&s, &[b"123456"], 6).await.is_ok(), "exactly at the limit is fine");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn concurrent_puts_of_the_same_bytes_both_succeed() {
        let (s, dir) = store().await;
        let data = vec![7u8; 256 * 1024];
        let parts: &[&[u8]] = &[&data];
        let (a, b) = tokio::join!(put(&s, parts, 1 << 20), put(&s, parts, 1 << 20));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.0, b.0);
        assert_eq!(count_files(&dir.join("sha256")), 1);
        assert_eq!(count_files(&dir.join("tmp")), 0);
        assert_eq!(s.get(&a.0).await.unwrap().unwrap().len(), data.len());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn addresses_are_checked() {
        let (s, dir) = store().await;
        assert!(matches!(s.get("../../etc/passwd").await, Err(StoreError::BadAddress(_))));
        assert_eq!(s.get(&"0".repeat(64)).await.unwrap(), None);
        let _ = std::fs::remove_dir_all(dir);
    }
}
