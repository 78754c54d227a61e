//! The watch loop: long-poll `GET /v1/mesh/watch`, apply each new version
//! whole or refuse it whole, and keep serving through every error.

use std::time::Duration;

use crank_api::mesh::MeshUpdate;

use super::Handles;
use super::{credentials, merge, Mesh, Source};

/// The watch request's path and query: what this proxy has applied.
pub fn watch_path(instance: &str, seq: u64, registry: u64, wait: Duration) -> String {
    format!(
        "/v1/mesh/watch?instance={instance}&seq={seq}&registry={registry}&wait={}",
        wait.as_secs()
    )
}

/// What one answer means for this proxy.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The version applied already (the long-poll timed out).
    Same,
    /// The version refused already: not checked or logged again.
    RefusedBefore,
    /// A version to check and apply.
    New,
}

/// A version is `(seq, hash, registry)`.
pub type Version = (u64, String, u64);

pub fn version_of(u: &MeshUpdate) -> Version {
    (u.version.seq, u.version.hash.clone(), u.registry)
}

/// Compares an answer with what was applied and what was refused.
pub fn verdict(u: &MeshUpdate, applied: Option<&Version>, refused: Option<&Version>) -> Verdict {
    let v = version_of(u);
    if applied == Some(&v) {
        Verdict::Same
    } else if refused == Some(&v) {
        Verdict::RefusedBefore
    } else {
        Verdict::New
    }
}

/// Runs until the process exits.
pub async fn run(mesh: &Mesh, handles: &Handles) {
    let mut backoff =
        crate::enroll::schedule::backoff(Duration::from_secs(1), Duration::from_secs(30));
    let mut refused: Option<Version> = None;
    loop {
        match once(mesh, handles, &mut refused).await {
            Ok(true) => backoff.reset(),
            // Refused: crank-control answers at once while this proxy
            // reports an older seq, so wait before asking again.
            Ok(false) => tokio::time::sleep(backoff.next_delay()).await,
            Err(e) => {
                let retry_in = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?retry_in, "mesh watch failed; serving the current mesh config and retrying");
                mesh.update_status(|s| s.last_error = Some(e));
                tokio::time::sleep(retry_in).await;
            }
        }
    }
}

/// One watch call; `Ok(false)` when the answer was a refused version.
async fn once(
    mesh: &Mesh,
    handles: &Handles,
    refused: &mut Option<Version>,
) -> Result<bool, String> {
    let (cert, roots) = credentials(&handles.tls)?;
    let applied = mesh.applied().map(|u| version_of(&u));
    let (seq, registry) = applied.as_ref().map_or((0, 0), |v| (v.0, v.2));
    let wait = mesh.cfg.watch_wait;
    let path = watch_path(&mesh.instance, seq, registry, wait);
    let u: MeshUpdate = mesh
        .client
        .get_json(&roots, Some(&cert), &path, wait + Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    match verdict(&u, applied.as_ref(), refused.as_ref()) {
        Verdict::Same => {
            mesh.update_status(|s| s.last_error = None);
            return Ok(true);
        }
        Verdict::RefusedBefore => return Ok(false),
        Verdict::New => {}
    }
    let v = version_of(&u);
    let origin = merge::origin(&u);
    match mesh.apply(&*handles.writer, u, Source::Pushed) {
        Ok(u) => {
            *refused = None;
            mesh.metrics.updates.with_label_values(&["applied"]).inc();
            tracing::info!(seq = u.version.seq, hash = %u.version.hash, endpoints_fingerprint = u.registry, routes = u.routes.len(), quotas = u.quotas.len(), policies = u.policies.len(), "applied mesh config");
            if let Some(was) = mesh.clear_rejected() {
                tracing::info!(seq = u.version.seq, refused_before = %was, "a good mesh config applied; the earlier refusal is cleared from /config_dump");
            }
            Ok(true)
        }
        Err(e) => {
            *refused = Some(v);
            mesh.metrics.updates.with_label_values(&["rejected"]).inc();
            tracing::error!(update = %origin, error = %e, "mesh config refused; the running config keeps serving");
            mesh.update_status(|s| {
                s.last_error = Some(e.clone());
                s.last_rejected = Some(e);
            });
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crank_api::mesh::ConfigVersion;

    fn u(seq: u64, registry: u64) -> MeshUpdate {
        MeshUpdate {
            version: ConfigVersion {
                seq,
                hash: format!("h{seq}"),
            },
            registry,
            routes: vec![],
            quotas: vec![],
            policies: Default::default(),
            egress: Default::default(),
            tenants: None,
        }
    }

    #[test]
    fn watch_query_reports_what_was_applied() {
        assert_eq!(
            watch_path("ab12", 7, 3, Duration::from_secs(30)),
            "/v1/mesh/watch?instance=ab12&seq=7&registry=3&wait=30"
        );
    }

    #[test]
    fn verdicts() {
        let applied = version_of(&u(7, 3));
        let refused = version_of(&u(8, 3));
        let cases = [
            (u(7, 3), Verdict::Same),
            (u(7, 4), Verdict::New),
            (u(8, 3), Verdict::RefusedBefore),
            (u(8, 4), Verdict::New),
            (u(9, 3), Verdict::New),
        ];
        for (update, want) in cases {
            assert_eq!(
                verdict(&update, Some(&applied), Some(&refused)),
                want,
                "{:?}",
                version_of(&update)
            );
        }
        assert_eq!(verdict(&u(1, 1), None, None), Verdict::New);
    }
}
