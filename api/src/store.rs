//! The object store for code packages: content-addressed by SHA-256, so the same bytes are
//! stored once. One small trait; the local-directory implementation lives here (the default of
//! the local runner), the S3 implementation comes with the packages work of issue 3.
//!
//! A put streams the body to a temporary object while hashing and counting it; only a complete
//! body within the size limit is moved to its content address (an atomic rename), so a failed or
//! oversize upload leaves nothing behind.

use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
};

use axum::body::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

/// What a put stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Lowercase hex SHA-256 of the bytes: their address.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Whether these bytes were new (false: they were stored already and nothing was written).
    pub created: bool,
}

/// Why a put or get failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The body is larger than the limit.
    #[error("package larger than {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// Reading the request body failed.
    #[error("reading the upload: {0}")]
    Body(String),
    /// Not a SHA-256 in lowercase hex.
    #[error("not a content address: {0:?}")]
    BadAddress(String),
    /// The storage itself failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A content-addressed object store.
pub trait ObjectStore: Send + Sync {
    /// Stores a streamed body under its SHA-256, refusing bodies over `limit` bytes.
    fn put<S, E>(&self, body: S, limit: u64) -> impl Future<Output = Result<Stored, StoreError>> + Send
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display + Send;

    /// The bytes at an address, if stored.
    fn get(&self, sha256: &str) -> impl Future<Output = Result<Option<Bytes>, StoreError>> + Send;

    /// Whether an address is stored.
    fn exists(&self, sha256: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

/// Objects as files under a directory: `sha256/<first two hex digits>/<hex>`.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// A store rooted at `root` (created if missing).
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        tokio::fs::create_dir_all(root.join("tmp")).await?;
        tokio::fs::create_dir_all(root.join("sha256")).await?;
        Ok(LocalStore { root })
    }

    fn path_of(&self, sha256: &str) -> Result<PathBuf, StoreError> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(StoreError::BadAddress(sha256.to_owned()));
        }
        Ok(self.root.join("sha256").join(&sha256[..2]).join(sha256))
    }

    async fn write_temp<S, E>(&self, mut body: S, limit: u64, temp: &Path) -> Result<(String, u64), StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display + Send,
    {
        let mut file = tokio::fs::File::create(temp).await?;
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        let mut size = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| StoreError::Body(e.to_string()))?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(StoreError::TooLarge { limit });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.sync_all().await?;
        let sha256 = hasher.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Ok((sha256, size))
    }
}

impl ObjectStore for LocalStore {
    async fn put<S, E>(&self, body: S, limit: u64) -> Result<Stored, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display + Send,
    {
        let temp = self.root.join("tmp").join(uuid::Uuid::now_v7().simple().to_string());
        let written = self.write_temp(body, limit, &temp).await;
        let (sha256, size) = match written {
            Ok(v) => v,
            Err(e) => {
                let _ = tokio::fs::remove_file(&temp).await;
                return Err(e);
            }
        };
        let target = self.path_of(&sha256)?;
        if tokio::fs::try_exists(&target).await? {
            tokio::fs::remove_file(&temp).await?;
            return Ok(Stored { sha256, size, created: false });
        }
        if let Some(dir) = target.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        // Same bytes put concurrently: both renames succeed and leave one identical file.
        tokio::fs::rename(&temp, &target).await?;
        Ok(Stored { sha256, size, created: true })
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

    fn chunks(parts: &[&[u8]]) -> impl Stream<Item = Result<Bytes, io::Error>> + Send + Unpin + use<> {
        futures_util::stream::iter(parts.iter().map(|p| Ok(Bytes::copy_from_slice(p))).collect::<Vec<_>>())
    }

    async fn store() -> (LocalStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!("nimbus-store-{}", uuid::Uuid::now_v7().simple()));
        (LocalStore::open(&dir).await.unwrap(), dir)
    }

    fn count_files(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .map(|it| it.flatten().map(|e| if e.path().is_dir() { count_files(&e.path()) } else { 1 }).sum())
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn same_bytes_are_stored_once_under_their_sha256() {
        let (s, dir) = store().await;
        let first = s.put(chunks(&[b"ab", b"c"]), 1024).await.unwrap();
        assert_eq!(first.sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!((first.size, first.created), (3, true));
        let again = s.put(chunks(&[b"abc"]), 1024).await.unwrap();
        assert_eq!((again.sha256.as_str(), again.created), (first.sha256.as_str(), false));
        assert_eq!(count_files(&dir.join("sha256")), 1);
        assert_eq!(count_files(&dir.join("tmp")), 0);
        assert_eq!(s.get(&first.sha256).await.unwrap().as_deref(), Some(&b"abc"[..]));
        assert!(s.exists(&first.sha256).await.unwrap());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn oversize_and_broken_uploads_leave_nothing() {
        let (s, dir) = store().await;
        let err = s.put(chunks(&[b"12345", b"678"]), 6).await.unwrap_err();
        assert!(matches!(err, StoreError::TooLarge { limit: 6 }), "{err:?}");
        let broken = futures_util::stream::iter(vec![Ok(Bytes::from_static(b"part")), Err(io::Error::other("reset"))]);
        assert!(matches!(s.put(broken, 1024).await.unwrap_err(), StoreError::Body(_)));
        assert_eq!(count_files(&dir), 0, "no temporary or stored object remains");
        // Exactly at the limit is fine.
        assert!(s.put(chunks(&[b"123456"]), 6).await.is_ok());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn concurrent_puts_of_the_same_bytes_both_succeed() {
        let (s, dir) = store().await;
        let data = vec![7u8; 256 * 1024];
        let (a, b) = tokio::join!(s.put(chunks(&[&data]), 1 << 20), s.put(chunks(&[&data]), 1 << 20));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.sha256, b.sha256);
        assert_eq!(count_files(&dir.join("sha256")), 1);
        assert_eq!(s.get(&a.sha256).await.unwrap().unwrap().len(), data.len());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn addresses_are_checked() {
        let (s, dir) = store().await;
        for bad in ["", "../../etc/passwd", &"A".repeat(64), &"a".repeat(63)] {
            assert!(matches!(s.get(bad).await, Err(StoreError::BadAddress(_))), "{bad}");
        }
        assert_eq!(s.get(&"0".repeat(64)).await.unwrap(), None);
        let _ = std::fs::remove_dir_all(dir);
    }
}
