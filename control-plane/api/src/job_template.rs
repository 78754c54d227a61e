//! A job template: `job_templates/<name>.yaml` in the mesh config
//! directory, read by `crankctl check`/`config validate` and by the worker
//! shims of its capability (`exec.templates_dir`).
//!
//! ```yaml
//! capability: transcode:h264
//! params: {height: 720, crf: 23}
//! overridable: [crf]          # what a submission may change
//! priority: batch
//! limits: {cpu: "1.5", memory: 512MiB}
//! timeout: 10m
//! schedule: "*/5 * * * *"     # optional: fire on the shims by cron
//! ```
//!
//! Checks that need the tool's parameter schema (values, overridable
//! names) run on the shim; these are the ones a file can fail alone.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A YAML scalar: a parameter value or a limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl Scalar {
    pub fn text(&self) -> String {
        match self {
            Scalar::Bool(b) => b.to_string(),
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Text(s) => s.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateLimits {
    /// Cores, like `"1.5"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Scalar>,
    /// Like `512MiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Scalar>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobTemplate {
    /// The capability whose shims run it, like `transcode:h264`.
    pub capability: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Parameter values; the tool's defaults fill the rest.
    #[serde(default)]
    pub params: BTreeMap<String, Scalar>,
    /// Parameters a submission by template name may set or change.
    #[serde(default)]
    pub overridable: Vec<String>,
    /// `live`, `high`, `medium` (default), `low` or `batch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<TemplateLimits>,
    /// A run timeout, like `10m` (at most the shim's `exec.timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// A cron expression (5 fields, or 6 with seconds first), UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
}

pub const PRIORITIES: [&str; 5] = ["live", "high", "medium", "low", "batch"];

impl JobTemplate {
    /// Every problem as (field, message).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if !self.capability.contains(':') {
            p.push((
                "capability".into(),
                format!(
                    "{:?} is not a capability like transcode:h264",
                    self.capability
                ),
            ));
        }
        if let Some(pr) = self.priority.as_deref().filter(|x| !PRIORITIES.contains(x)) {
            p.push((
                "priority".into(),
                format!(
                    "unknown priority {pr:?}; use one of {}",
                    PRIORITIES.join(", ")
                ),
            ));
        }
        if let Some(s) = &self.schedule {
            if let Err(m) = check_cron(s) {
                p.push(("schedule".into(), m));
            }
        }
        p
    }
}

/// The five cron fields' ranges (minute … day of week), seconds first
/// when there are six.
const FIELDS: [(&str, u32, u32); 6] = [
    ("second", 0, 59),
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
];

/// A cron expression's shape and ranges: `*`, `N`, `A-B`, `*/S`, `A-B/S`
/// and lists of them; names (`MON`, `JAN`) and `?`, `L`, `W`, `#` are
/// passed on to the shim's parser.
pub fn check_cron(expr: &str) -> Result<(), String> {
    let parts: Vec<&str> = expr.split_whitespace().collect();
    let fields: &[(&str, u32, u32)] = match parts.len() {
        5 => &FIELDS[1..],
        6 => &FIELDS[..],
        n => {
            return Err(format!(
                "{expr:?} has {n} fields; give 5 (minute hour day-of-month month day-of-week, like \"*/5 * * * *\") or 6 with seconds first"
            ))
        }
    };
    for (part, (name, lo, hi)) in parts.iter().zip(fields) {
        for item in part.split(',') {
            let range = item.split_once('/').map_or(item, |(r, _)| r);
            let numbers = range.split('-').filter(|x| *x != "*" && !x.is_empty());
            for n in numbers {
                match n.parse::<u32>() {
                    Ok(v) if v < *lo || v > *hi => {
                        return Err(format!(
                            "{expr:?}: {v} is out of range for the {name} field ({lo}-{hi})"
                        ))
                    }
                    Ok(_) => {}
                    Err(_)
                        if n.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "?#".contains(c)) => {}
                    Err(_) => {
                        return Err(format!("{expr:?}: {n:?} is not valid in the {name} field"))
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_expressions_are_checked_for_shape_and_range() {
        for ok in [
            "*/5 * * * *",
            "0 3 * * MON-FRI",
            "* * * * * *",
            "0,30 8-18 1 1-12 0",
        ] {
            assert_eq!(check_cron(ok), Ok(()), "{ok}");
        }
        let cases = [
            ("* * * *", "4 fields"),
            ("61 * * * *", "out of range for the minute field"),
            ("* 24 * * *", "hour field"),
            ("* * * * * * *", "7 fields"),
            ("*/5 * * 13 *", "month field"),
        ];
        for (bad, want) in cases {
            let e = check_cron(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
