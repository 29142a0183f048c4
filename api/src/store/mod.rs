//! The object store for code packages: content-addressed by SHA-256, so the same bytes are
//! stored once. One small trait, two implementations: a local directory ([`LocalStore`], the
//! default of the local runner) and S3 ([`S3Store`], any S3-protocol server via `aws-sdk-s3`).
//!
//! An upload is first *spooled*: streamed to a temporary file while it is hashed and counted,
//! refused as soon as it passes the size limit. The caller validates the spooled file, and only
//! then hands it to the store, which moves it to its content address (an atomic rename, or a PUT
//! to S3). A failed, oversize or invalid upload therefore leaves nothing stored: the spooled file
//! removes itself when dropped.

mod local;
mod s3;

use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
};

use axum::body::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

pub use local::LocalStore;
pub use s3::{PresignedPut, S3Settings, S3Store, http_client};

/// Why a store operation failed.
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
    /// The local storage failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The S3 service failed.
    #[error("S3: {0}")]
    S3(String),
}

/// An upload received into a temporary file, hashed and counted. Dropping it removes the file,
/// unless a store took it.
#[derive(Debug)]
pub struct Spooled {
    path: Option<PathBuf>,
    /// Lowercase hex SHA-256 of the bytes.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

impl Spooled {
    /// Where the bytes are.
    pub fn path(&self) -> &Path {
        self.path.as_deref().expect("a spooled file that was not taken")
    }

    /// Takes the file out; the caller is now responsible for it.
    fn take(mut self) -> PathBuf {
        self.path.take().expect("a spooled file that was not taken")
    }
}

impl Drop for Spooled {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Streams `body` into a new file in `dir` while hashing it; refuses it once it passes `limit`
/// bytes. Nothing remains in `dir` when it fails. `durable` syncs the file to disk before
/// returning (when the file itself becomes the stored object).
pub async fn spool<S, E>(dir: &Path, mut body: S, limit: u64, durable: bool) -> Result<Spooled, StoreError>
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: std::fmt::Display + Send,
{
    let path = dir.join(format!("spool-{}", uuid::Uuid::now_v7().simple()));
    let mut file = tokio::fs::File::create(&path).await?;
    // From here on, dropping `spooled` (an error, a cancelled request) removes the file.
    let mut spooled = Spooled { path: Some(path), sha256: String::new(), size: 0 };
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, &mut file);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| StoreError::Body(e.to_string()))?;
        spooled.size += chunk.len() as u64;
        if spooled.size > limit {
            return Err(StoreError::TooLarge { limit });
        }
        hasher.update(&chunk);
        out.write_all(&chunk).await?;
    }
    out.flush().await?;
    drop(out);
    if durable {
        file.sync_all().await?;
    }
    spooled.sha256 = hex(hasher.finish().as_ref());
    Ok(spooled)
}

/// Checks that `sha256` is a content address (64 lowercase hex digits).
pub fn check_address(sha256: &str) -> Result<(), StoreError> {
    if sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(StoreError::BadAddress(sha256.to_owned()))
    }
}

/// A content-addressed object store.
pub trait ObjectStore: Send + Sync {
    /// Stores a spooled upload under its SHA-256. Returns whether the bytes were new (false:
    /// they were stored already and nothing was written).
    fn put_spooled(&self, spooled: Spooled) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The bytes at an address, if stored.
    fn get(&self, sha256: &str) -> impl Future<Output = Result<Option<Bytes>, StoreError>> + Send;

    /// Whether an address is stored.
    fn exists(&self, sha256: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

/// The configured store.
#[derive(Debug, Clone)]
pub enum PackageStore {
    /// A local directory.
    Local(LocalStore),
    /// An S3 bucket.
    S3(S3Store),
}

impl PackageStore {
    /// The directory uploads are spooled to before they are stored.
    pub fn spool_dir(&self) -> &Path {
        match self {
            PackageStore::Local(s) => s.spool_dir(),
            PackageStore::S3(s) => s.spool_dir(),
        }
    }

    /// The S3 store, when configured (presigned uploads need it).
    pub fn s3(&self) -> Option<&S3Store> {
        match self {
            PackageStore::S3(s) => Some(s),
            PackageStore::Local(_) => None,
        }
    }

    /// Spools a body into this store's spool directory.
    pub async fn spool<S, E>(&self, body: S, limit: u64) -> Result<Spooled, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display + Send,
    {
        // A local store renames the spool file into place: it must be on disk first. An S3
        // store only reads it back to send it.
        spool(self.spool_dir(), body, limit, matches!(self, PackageStore::Local(_))).await
    }
}

impl ObjectStore for PackageStore {
    async fn put_spooled(&self, spooled: Spooled) -> Result<bool, StoreError> {
        match self {
            PackageStore::Local(s) => s.put_spooled(spooled).await,
            PackageStore::S3(s) => s.put_spooled(spooled).await,
        }
    }

    async fn get(&self, sha256: &str) -> Result<Option<Bytes>, StoreError> {
        match self {
            PackageStore::Local(s) => s.get(sha256).await,
            PackageStore::S3(s) => s.get(sha256).await,
        }
    }

    async fn exists(&self, sha256: &str) -> Result<bool, StoreError> {
        match self {
            PackageStore::Local(s) => s.exists(sha256).await,
            PackageStore::S3(s) => s.exists(sha256).await,
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// A stream of the given chunks.
    pub fn chunks(parts: &[&[u8]]) -> impl Stream<Item = Result<Bytes, io::Error>> + Send + Unpin + use<> {
        futures_util::stream::iter(parts.iter().map(|p| Ok(Bytes::copy_from_slice(p))).collect::<Vec<_>>())
    }

    /// Files under `dir`, recursively.
    pub fn count_files(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .map(|it| it.flatten().map(|e| if e.path().is_dir() { count_files(&e.path()) } else { 1 }).sum())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::{test_support::*, *};

    #[tokio::test]
    async fn spooling_hashes_counts_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("nimbus-spool-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = spool(&dir, chunks(&[b"ab", b"c"]), 3, true).await.unwrap();
        assert_eq!(s.sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(s.size, 3);
        assert_eq!(std::fs::read(s.path()).unwrap(), b"abc");
        drop(s);
        assert_eq!(count_files(&dir), 0, "a dropped spool file is removed");
        let err = spool(&dir, chunks(&[b"12345", b"678"]), 6, false).await.unwrap_err();
        assert!(matches!(err, StoreError::TooLarge { limit: 6 }), "{err:?}");
        let broken = futures_util::stream::iter(vec![Ok(Bytes::from_static(b"part")), Err(io::Error::other("reset"))]);
        assert!(matches!(spool(&dir, broken, 1024, false).await.unwrap_err(), StoreError::Body(_)));
        assert_eq!(count_files(&dir), 0, "failed spools leave nothing");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn addresses_are_checked() {
        for bad in ["", "../../etc/passwd", &"A".repeat(64), &"a".repeat(63)] {
            assert!(matches!(check_address(bad), Err(StoreError::BadAddress(_))), "{bad}");
        }
        assert!(check_address(&"0".repeat(64)).is_ok());
    }
}
