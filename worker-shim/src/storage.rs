//! Job inputs and outputs in S3-compatible object storage
//! (`exec.storage.s3`), so that any shim sharing the bucket can run a job
//! or serve its output. Without the section, the job directory on the
//! local disk is the store (the default).
//!
//! Keys: `<prefix>/<job id>/input` and `<prefix>/<job id>/output`. The
//! local job directory stays the tool's working copy: an input is uploaded
//! as it is received and fetched before a run when this host lacks it; an
//! output is uploaded when the run succeeds, and its local copy removed.

use std::path::Path as FsPath;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::ObjectStore;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

/// The `exec.storage:` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default)]
    pub s3: Option<S3Config>,
}

/// An S3-compatible bucket.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// Like `https://s3.eu-west-1.amazonaws.com` or `http://127.0.0.1:9000`;
    /// default AWS for the region.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    /// The environment variable holding the access key id.
    #[serde(default = "default_access_env")]
    pub access_key_env: String,
    /// The environment variable holding the secret access key.
    #[serde(default = "default_secret_env")]
    pub secret_key_env: String,
    /// Keys start with this (no leading or trailing slash needed).
    #[serde(default)]
    pub prefix: String,
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_access_env() -> String {
    "AWS_ACCESS_KEY_ID".into()
}
fn default_secret_env() -> String {
    "AWS_SECRET_ACCESS_KEY".into()
}

impl StorageConfig {
    /// Every problem, each under `exec.storage.s3.<field>`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let Some(s3) = &self.s3 else {
            return Vec::new();
        };
        let mut p = Vec::new();
        if s3.bucket.is_empty() {
            p.push((
                "exec.storage.s3.bucket".into(),
                "is empty; name the bucket".into(),
            ));
        }
        if let Some(e) = &s3.endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                p.push((
                    "exec.storage.s3.endpoint".into(),
                    format!("{e:?} must be a URL like https://s3.example.com"),
                ));
            }
        }
        p
    }
}

/// A bucket's jobs.
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    /// `s3://bucket/prefix`, for messages.
    pub location: String,
}

/// An object store failure, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("object storage {what}: {source}")]
pub struct StorageError {
    what: String,
    #[source]
    source: object_store::Error,
}

impl StorageError {
    pub fn not_found(&self) -> bool {
        matches!(self.source, object_store::Error::NotFound { .. })
    }
}

impl Storage {
    /// The client for `exec.storage.s3`; credentials come from the named
    /// environment variables.
    pub fn open(s3: &S3Config) -> Result<Storage, String> {
        let env = |name: &str, field: &str| {
            std::env::var(name).map_err(|_| {
                format!("exec.storage.s3.{field}: the environment variable {name} is not set; set it for crank-shim, or name another variable")
            })
        };
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&s3.bucket)
            .with_region(&s3.region)
            .with_access_key_id(env(&s3.access_key_env, "access_key_env")?)
            .with_secret_access_key(env(&s3.secret_key_env, "secret_key_env")?);
        if let Some(e) = &s3.endpoint {
            b = b
                .with_endpoint(e)
                .with_allow_http(e.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        let store = b
            .build()
            .map_err(|e| format!("exec.storage.s3: cannot make the S3 client: {e}"))?;
        let prefix = s3.prefix.trim_matches('/').to_string();
        Ok(Storage {
            store: Arc::new(store),
            location: format!("s3://{}/{prefix}", s3.bucket),
            prefix,
        })
    }

    fn key(&self, job: &str, name: &str) -> Path {
        match self.prefix.is_empty() {
            true => Path::from(format!("{job}/{name}")),
            false => Path::from(format!("{}/{job}/{name}", self.prefix)),
        }
    }

    fn err(&self, what: String, source: object_store::Error) -> StorageError {
        StorageError {
            what: format!("{what} ({})", self.location),
            source,
        }
    }

    /// Uploads a local file as the job's `name` (`input` or `output`).
    pub async fn upload(&self, job: &str, name: &str, file: &FsPath) -> Result<u64, StorageError> {
        let key = self.key(job, name);
        let io = |e: std::io::Error| object_store::Error::Generic {
            store: "local",
            source: Box::new(e),
        };
        let what = format!("uploading {key}");
        let mut f = tokio::fs::File::open(file)
            .await
            .map_err(|e| self.err(what.clone(), io(e)))?;
        let mut w = BufWriter::new(self.store.clone(), key);
        let n = tokio::io::copy(&mut f, &mut w)
            .await
            .map_err(|e| self.err(what.clone(), io(e)))?;
        w.shutdown().await.map_err(|e| self.err(what, io(e)))?;
        Ok(n)
    }

    /// Fetches the job's `name` into a local file.
    pub async fn download(&self, job: &str, name: &str, to: &FsPath) -> Result<u64, StorageError> {
        let (_, mut stream) = self.stream(job, name).await?;
        let what = format!("downloading {}", self.key(job, name));
        let io = |e: std::io::Error| object_store::Error::Generic {
            store: "local",
            source: Box::new(e),
        };
        let mut f = tokio::fs::File::create(to)
            .await
            .map_err(|e| self.err(what.clone(), io(e)))?;
        let mut n = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.err(what.clone(), e))?;
            n += chunk.len() as u64;
            f.write_all(&chunk)
                .await
                .map_err(|e| self.err(what.clone(), io(e)))?;
        }
        f.flush().await.map_err(|e| self.err(what, io(e)))?;
        Ok(n)
    }

    /// The job's `name` as a stream, with its size.
    pub async fn stream(
        &self,
        job: &str,
        name: &str,
    ) -> Result<(u64, BoxStream<'static, object_store::Result<Bytes>>), StorageError> {
        let key = self.key(job, name);
        let got = self
            .store
            .get(&key)
            .await
            .map_err(|e| self.err(format!("reading {key}"), e))?;
        Ok((got.meta.size, got.into_stream()))
    }

    /// Removes the job's objects in the background (a deleted or refused
    /// job, retention).
    pub fn remove_later(self: &Arc<Self>, job: &str) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (me, job) = (self.clone(), job.to_string());
        rt.spawn(async move { me.remove(&job).await });
    }

    /// Removes the job's objects; missing ones are fine.
    pub async fn remove(&self, job: &str) {
        for name in ["input", "output"] {
            let key = self.key(job, name);
            match self.store.delete(&key).await {
                Ok(()) => {}
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(job, key = %key, error = %e, "could not delete from object storage")
                }
            }
        }
    }
}
