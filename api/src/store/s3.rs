//! The S3 store: objects under `packages/sha256/<hex>` in one bucket of any S3-protocol server,
//! through `aws-sdk-s3` (TLS by rustls with ring). Uploads through the API are spooled to a local
//! directory, validated, then PUT; presigned uploads go straight to a staging key
//! (`uploads/<tenant>/<upload id>`); once read back and verified, the verified bytes (the spool
//! file, not the staging object, which the client could still overwrite) are PUT to their
//! content address and the staging object is deleted.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use aws_sdk_s3::{
    Client,
    config::{BehaviorVersion, Credentials, Region},
    error::{DisplayErrorContext, SdkError},
    presigning::PresigningConfig,
    primitives::ByteStream,
};
use axum::body::Bytes;
use futures_util::Stream;

use super::{ObjectStore, Spooled, StoreError, check_address};

/// How to reach the bucket.
#[derive(Clone)]
pub struct S3Settings {
    /// Endpoint URL (`http://127.0.0.1:9000`); `None` means AWS itself.
    pub endpoint: Option<String>,
    /// Region name.
    pub region: String,
    /// Bucket.
    pub bucket: String,
    /// Path-style addressing (`endpoint/bucket/key`), which most self-hosted servers need.
    pub path_style: bool,
    /// Static credentials; `None` reads `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`.
    pub credentials: Option<(String, String)>,
    /// Where uploads are spooled before they are validated.
    pub spool_dir: PathBuf,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.credentials.as_ref().map(|(id, _)| id))
            .field("secret_access_key", &self.credentials.as_ref().map(|_| "[redacted]"))
            .field("spool_dir", &self.spool_dir)
            .finish()
    }
}

/// A presigned PUT the client sends the package with.
#[derive(Debug, Clone)]
pub struct PresignedPut {
    /// The URL to PUT to.
    pub url: String,
    /// Headers the client must send as they are (they are signed).
    pub headers: Vec<(String, String)>,
}

/// Objects in an S3 bucket.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    spool_dir: PathBuf,
}

fn s3_error<E: std::error::Error + 'static>(e: E) -> StoreError {
    StoreError::S3(DisplayErrorContext(e).to_string())
}

/// The HTTP(S) client of the S3 SDK: hyper with rustls on ring (the crypto the rest of Nimbus
/// uses already, so aws-lc is not built).
pub fn http_client() -> aws_sdk_s3::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

impl S3Store {
    /// A store on the configured bucket (which must exist; see [`S3Store::ensure_bucket`]).
    pub async fn open(settings: S3Settings) -> Result<Self, StoreError> {
        let (id, secret) = match settings.credentials {
            Some(c) => c,
            None => (
                std::env::var("AWS_ACCESS_KEY_ID").map_err(|_| {
                    StoreError::S3("no S3 credentials: set --s3-access-key-id or AWS_ACCESS_KEY_ID".into())
                })?,
                std::env::var("AWS_SECRET_ACCESS_KEY").map_err(|_| {
                    StoreError::S3("no S3 credentials: set --s3-secret-access-key or AWS_SECRET_ACCESS_KEY".into())
                })?,
            ),
        };
        let mut config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(settings.region))
            .credentials_provider(Credentials::new(id, secret, None, None, "nimbus-settings"))
            .force_path_style(settings.path_style)
            // The package's SHA-256 is computed and checked by Nimbus itself; an extra CRC32
            // trailer (aws-chunked encoding) only slows uploads down.
            .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
            .http_client(http_client());
        if let Some(endpoint) = settings.endpoint {
            config = config.endpoint_url(endpoint);
        }
        tokio::fs::create_dir_all(&settings.spool_dir).await?;
        Ok(S3Store {
            client: Client::from_conf(config.build()),
            bucket: settings.bucket,
            spool_dir: settings.spool_dir,
        })
    }

    /// Creates the bucket if it does not exist (the local runner and tests use this).
    pub async fn ensure_bucket(&self) -> Result<(), StoreError> {
        if self.client.head_bucket().bucket(&self.bucket).send().await.is_ok() {
            return Ok(());
        }
        self.client.create_bucket().bucket(&self.bucket).send().await.map_err(s3_error)?;
        Ok(())
    }

    /// Where uploads are spooled.
    pub fn spool_dir(&self) -> &Path {
        &self.spool_dir
    }

    fn key_of(sha256: &str) -> Result<String, StoreError> {
        check_address(sha256)?;
        Ok(format!("packages/sha256/{sha256}"))
    }

    /// A URL the client can PUT exactly `size` bytes to, at `key`, for `ttl`.
    pub async fn presign_put(&self, key: &str, size: u64, ttl: Duration) -> Result<PresignedPut, StoreError> {
        let config = PresigningConfig::expires_in(ttl).map_err(|e| StoreError::S3(e.to_string()))?;
        let size = i64::try_from(size).map_err(|_| StoreError::S3("size out of range".into()))?;
        let req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(size)
            .presigned(config)
            .await
            .map_err(s3_error)?;
        Ok(PresignedPut {
            url: req.uri().to_owned(),
            headers: req.headers().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
        })
    }

    /// A URL to GET the package `sha256` from, valid for `ttl` (what agents fetch code with).
    pub async fn presign_get(&self, sha256: &str, ttl: Duration) -> Result<String, StoreError> {
        let key = Self::key_of(sha256)?;
        let config = PresigningConfig::expires_in(ttl).map_err(|e| StoreError::S3(e.to_string()))?;
        let req = self.client.get_object().bucket(&self.bucket).key(key).presigned(config).await.map_err(s3_error)?;
        Ok(req.uri().to_owned())
    }

    /// The package `sha256` as a stream, if it is stored.
    pub async fn stream_package(
        &self,
        sha256: &str,
    ) -> Result<Option<impl Stream<Item = Result<Bytes, StoreError>> + Send + Unpin + use<>>, StoreError> {
        self.stream(&Self::key_of(sha256)?).await
    }

    /// The object at `key` as a stream, if it exists.
    pub async fn stream(
        &self,
        key: &str,
    ) -> Result<Option<impl Stream<Item = Result<Bytes, StoreError>> + Send + Unpin + use<>>, StoreError> {
        let out = match self.client.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(out) => out,
            Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => return Ok(None),
            Err(e) => return Err(s3_error(e)),
        };
        let stream = futures_util::stream::unfold(out.body, |mut body| async move {
            match body.try_next().await {
                Ok(Some(bytes)) => Some((Ok(bytes), body)),
                Ok(None) => None,
                Err(e) => Some((Err(s3_error(e)), body)),
            }
        });
        Ok(Some(Box::pin(stream)))
    }

    /// Deletes an object by key (absent is fine).
    pub async fn delete_key(&self, key: &str) -> Result<(), StoreError> {
        self.client.delete_object().bucket(&self.bucket).key(key).send().await.map_err(s3_error)?;
        Ok(())
    }

    /// Whether an object exists at `key`.
    pub async fn key_exists(&self, key: &str) -> Result<bool, StoreError> {
        match self.client.head_object().bucket(&self.bucket).key(key).send().await {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(e)) if e.err().is_not_found() => Ok(false),
            Err(e) => Err(s3_error(e)),
        }
    }
}

impl ObjectStore for S3Store {
    async fn put_spooled(&self, spooled: Spooled) -> Result<bool, StoreError> {
        let key = Self::key_of(&spooled.sha256)?;
        if self.key_exists(&key).await? {
            return Ok(false);
        }
        let body = ByteStream::from_path(spooled.path()).await.map_err(|e| StoreError::S3(e.to_string()))?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .content_length(spooled.size as i64)
            .body(body)
            .send()
            .await
            .map_err(s3_error)?;
        Ok(true)
    }

    async fn get(&self, sha256: &str) -> Result<Option<Bytes>, StoreError> {
        let key = Self::key_of(sha256)?;
        match self.client.get_object().bucket(&self.bucket).key(&key).send().await {
            Ok(out) => Ok(Some(out.body.collect().await.map_err(s3_error)?.into_bytes())),
            Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => Ok(None),
            Err(e) => Err(s3_error(e)),
        }
    }

    async fn exists(&self, sha256: &str) -> Result<bool, StoreError> {
        self.key_exists(&Self::key_of(sha256)?).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_never_print_the_secret_key() {
        let s = S3Settings {
            endpoint: None,
            region: "us-east-1".into(),
            bucket: "b".into(),
            path_style: false,
            credentials: Some(("AKIDEXAMPLE".into(), "wJalrXUtnFEMI-secret".into())),
            spool_dir: "/tmp".into(),
        };
        let printed = format!("{s:?}");
        assert!(printed.contains("AKIDEXAMPLE") && !printed.contains("wJalrXUtnFEMI"), "{printed}");
    }
}
