//! `GET /v1/jobs/{id}/output` with object storage: the output is streamed
//! from the bucket, so any shim on it serves any job's output, including
//! one this shim never saw (the embedded queue knows only its own jobs).

use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use crank_plumbing::Refusal;
use futures::{Stream, StreamExt};
use http::{Response, StatusCode};
use hyper::body::Frame;

use super::Body;
use crate::job::JobState;
use crate::jobs::Manager;

pub(super) async fn output(
    m: &Manager,
    id: &str,
    content_type: &str,
) -> Result<Response<Body>, Refusal> {
    let Some(storage) = &m.settings.storage else {
        return Err(crate::jobs::manager::job_not_found(id));
    };
    let known = match m.lookup(id).await {
        Ok(rec) => Some(rec),
        Err(r) if r.reason == "job-not-found" => None,
        Err(r) => return Err(r),
    };
    if let Some(rec) = known.as_ref().filter(|r| r.state != JobState::Succeeded) {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "job-not-finished",
            format!(
                "job {id} is {}; its output exists once it has succeeded",
                rec.state
            ),
        ));
    }
    let (len, stream) =
        storage
            .stream(id, "output")
            .await
            .map_err(|e| match (e.not_found(), &known) {
                (true, None) => crate::jobs::manager::job_not_found(id),
                (true, Some(_)) => Refusal::new(
                    StatusCode::GONE,
                    "output-gone",
                    format!(
                        "the output of job {id} is no longer in {}",
                        storage.location
                    ),
                ),
                (false, _) => Refusal::new(
                    StatusCode::BAD_GATEWAY,
                    "storage-error",
                    format!("{e}; retry later"),
                )
                .retry_after(5),
            })?;
    let frames = stream.map(|chunk| chunk.map(Frame::data).map_err(std::io::Error::other));
    Ok(super::download(
        m,
        id,
        content_type,
        len,
        SyncStream(Mutex::new(frames)),
    ))
}

/// A `Send` stream made `Sync` (the response body must be): only ever
/// polled through `&mut`, so the mutex is never locked.
struct SyncStream<S>(Mutex<S>);

impl<S: Stream + Unpin> Stream for SyncStream<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        match self.0.get_mut() {
            Ok(s) => s.poll_next_unpin(cx),
            Err(_) => Poll::Ready(None),
        }
    }
}
