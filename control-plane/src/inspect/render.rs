//! A [`Report`] as readable blocks ([`render_human`]) or JSON
//! ([`render_json`]).

use std::fmt::Write;

use anyhow::Result;

use super::{short_duration, CertReport, Report, SourceKind, Verification};

/// The report as pretty JSON.
pub fn render_json(report: &Report) -> Result<String> {
    Ok(serde_json::to_string_pretty(report)?)
}

/// The report as readable text: a header, then one block per certificate.
pub fn render_human(report: &Report) -> String {
    let mut out = String::new();
    let n = report.certificates.len();
    let plural = if n == 1 { "" } else { "s" };
    match report.kind {
        SourceKind::File => {
            let _ = writeln!(out, "{}: {n} certificate{plural}", report.source);
        }
        SourceKind::Connect => {
            connect_header(&mut out, report);
            let _ = writeln!(out, "{n} certificate{plural} presented");
        }
    }
    for note in &report.notes {
        let _ = writeln!(out, "note: {note}");
    }
    for (i, c) in report.certificates.iter().enumerate() {
        out.push('\n');
        let _ = writeln!(out, "[{i}] {}", c.position);
        cert_block(&mut out, c);
    }
    out
}

/// What the handshake gave: the TLS version and ALPN, the verification,
/// the client certificate.
fn connect_header(out: &mut String, report: &Report) {
    let name = match &report.server_name {
        Some(name) => format!(" (server name {name})"),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "{}{name}: {}, ALPN {}",
        report.source,
        report
            .tls_version
            .as_deref()
            .unwrap_or("unknown TLS version"),
        report.alpn.as_deref().unwrap_or("none"),
    );
    verification_lines(out, report.verified.as_ref());
    if let Some(c) = report.client_cert {
        let line = match (c.requested, c.sent) {
            (true, true) => "requested by the server, sent",
            (true, false) => {
                "requested by the server, none sent (pass --cert and --key to send one)"
            }
            (false, true) => "not requested by the server, so not sent",
            (false, false) => "not requested by the server",
        };
        let _ = writeln!(out, "client certificate: {line}");
    }
}

fn verification_lines(out: &mut String, verified: Option<&Verification>) {
    match verified {
        Some(v) if v.ok => {
            let _ = writeln!(
                out,
                "chain verified against {} for {}",
                v.bundle, v.server_name
            );
        }
        Some(v) => {
            let _ = writeln!(
                out,
                "chain NOT verified: {} (against {} for {})",
                v.error.as_deref().unwrap_or("unknown error"),
                v.bundle,
                v.server_name
            );
            if let Some(hint) = &v.hint {
                let _ = writeln!(out, "  hint: {hint}");
            }
        }
        None => {
            let _ = writeln!(out, "not verified (pass --ca BUNDLE to verify)");
        }
    }
}

/// One certificate's fields, one a line.
fn cert_block(out: &mut String, c: &CertReport) {
    let field = |out: &mut String, name: &str, value: &str| {
        let _ = writeln!(out, "  {:<10} {value}", format!("{name}:"));
    };
    match (&c.identity, &c.identity_error) {
        (Some(id), _) => field(
            out,
            "identity",
            &format!("{} ({})", id.spiffe_id, id.dns_name),
        ),
        (None, Some(why)) => field(out, "identity", &format!("none: {why}")),
        (None, None) => {}
    }
    if !c.dns_sans.is_empty() || !c.is_ca {
        field(out, "DNS SANs", &list(&c.dns_sans));
    }
    if !c.uri_sans.is_empty() || !c.is_ca {
        field(out, "URI SANs", &list(&c.uri_sans));
    }
    field(
        out,
        "valid",
        &format!(
            "{} to {} ({})",
            c.not_before_rfc3339,
            c.not_after_rfc3339,
            validity(c)
        ),
    );
    field(out, "subject", &c.subject);
    field(out, "issuer", &c.issuer);
    field(out, "serial", &c.serial);
    field(out, "CA", if c.is_ca { "yes" } else { "no" });
}

fn validity(c: &CertReport) -> String {
    let left = short_duration(c.expires_in_seconds.unsigned_abs());
    if c.expired {
        format!("EXPIRED {left} ago")
    } else if c.not_yet_valid {
        format!("NOT YET VALID, expires in {left}")
    } else {
        format!("expires in {left}")
    }
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}
