//! Job templates (`job_templates/*.yaml` of the mesh config directory,
//! read from `exec.templates_dir` at start): a named set of parameters,
//! priority, limits and timeout that a submission names instead of
//! repeating them, and an optional cron `schedule` (see [`crate::cron`]).
//!
//! Only the templates of this shim's capability are kept; each is checked
//! against the tool's parameter schema at start, and a bad one stops the
//! start naming its file.

use std::collections::BTreeMap;
use std::path::Path;

use crank_api::job_template::{JobTemplate, Scalar};

use crate::exec::params::ParamSchema;
use crate::limits::{LimitsRequest, Quantity};

/// A template checked against this shim's tool.
#[derive(Debug, Clone)]
pub struct Template {
    pub name: String,
    pub spec: JobTemplate,
    /// Parsed `schedule`.
    pub cron: Option<croner::Cron>,
}

/// The templates of this shim's capability, by name.
#[derive(Debug, Clone, Default)]
pub struct Templates {
    pub by_name: BTreeMap<String, Template>,
}

impl Templates {
    /// Reads `dir/*.yaml`; every problem is returned, each naming the file.
    pub fn load(
        dir: &Path,
        capability: &str,
        schema: &ParamSchema,
        takes_input: bool,
    ) -> Result<Templates, String> {
        let rd = std::fs::read_dir(dir).map_err(|e| {
            format!(
                "exec.templates_dir {}: {e}; point it at the mesh config's job_templates/",
                dir.display()
            )
        })?;
        let mut paths: Vec<_> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        paths.sort();
        let mut out = Templates::default();
        let mut problems = Vec::new();
        for path in paths {
            let file = path.display().to_string();
            match read(&path).and_then(|t| check(t, &path, capability, schema, takes_input)) {
                Ok(Some(t)) => {
                    out.by_name.insert(t.name.clone(), t);
                }
                Ok(None) => {}
                Err(m) => problems.extend(m.into_iter().map(|m| format!("{file}: {m}"))),
            }
        }
        match problems.is_empty() {
            true => Ok(out),
            false => Err(problems.join("; ")),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Template> {
        self.by_name.get(name)
    }
}

fn read(path: &Path) -> Result<JobTemplate, Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| vec![e.to_string()])?;
    serde_yaml::from_str(&text).map_err(|e| vec![e.to_string()])
}

/// The template, or `None` when it is another capability's.
fn check(
    spec: JobTemplate,
    path: &Path,
    capability: &str,
    schema: &ParamSchema,
    takes_input: bool,
) -> Result<Option<Template>, Vec<String>> {
    let found = spec.problems();
    let bad_schedule = found.iter().any(|(f, _)| f == "schedule");
    let mut p: Vec<String> = found
        .into_iter()
        .map(|(f, m)| format!("{f}: {m}"))
        .collect();
    if spec.capability != capability {
        return Ok(None);
    }
    if let Err(errs) = schema.validate(&json_params(&spec.params)) {
        p.extend(errs.iter().map(|e| format!("params: {e}")));
    }
    for name in spec.overridable.iter().filter(|n| schema.get(n).is_none()) {
        p.push(format!(
            "overridable: {name:?} is not a parameter of the tool"
        ));
    }
    let schedule = spec.schedule.as_deref().filter(|_| !bad_schedule);
    let cron = match schedule.map(parse_cron) {
        Some(Ok(c)) => Some(c),
        Some(Err(m)) => {
            p.push(format!("schedule: {m}"));
            None
        }
        None => None,
    };
    if cron.is_some() && takes_input {
        p.push("schedule: this tool needs an input file, which a scheduled job cannot have; remove the schedule".into());
    }
    if !p.is_empty() {
        return Err(p);
    }
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Some(Template { name, spec, cron }))
}

/// A cron expression, 5 fields or 6 with seconds first.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    crank_api::job_template::check_cron(expr)?;
    croner::Cron::new(expr)
        .with_seconds_optional()
        .parse()
        .map_err(|e| format!("{expr:?}: {e}"))
}

pub fn json_params(p: &BTreeMap<String, Scalar>) -> BTreeMap<String, serde_json::Value> {
    p.iter()
        .map(|(k, v)| {
            let j = match v {
                Scalar::Bool(b) => serde_json::Value::Bool(*b),
                Scalar::Int(i) => serde_json::Value::from(*i),
                Scalar::Float(f) => serde_json::Value::from(*f),
                Scalar::Text(s) => serde_json::Value::String(s.clone()),
            };
            (k.clone(), j)
        })
        .collect()
}

impl Template {
    /// The template's parameters with the caller's overrides; a parameter
    /// the template does not let callers set is refused, naming those it
    /// does.
    pub fn merge(
        &self,
        given: &BTreeMap<String, serde_json::Value>,
    ) -> Result<BTreeMap<String, serde_json::Value>, String> {
        let mut params = json_params(&self.spec.params);
        for (k, v) in given {
            if !self.spec.overridable.contains(k) {
                let allowed = match self.spec.overridable.is_empty() {
                    true => "none".to_string(),
                    false => self.spec.overridable.join(", "),
                };
                return Err(format!(
                    "template {} does not let a submission set {k:?}; it allows: {allowed}",
                    self.name
                ));
            }
            params.insert(k.clone(), v.clone());
        }
        Ok(params)
    }

    /// A submission by this template's name: the caller's priority,
    /// timeout and limits where given, else the template's.
    pub fn resolve(&self, caller: Asked) -> Result<Asked, String> {
        Ok(Asked {
            params: self.merge(&caller.params)?,
            priority: caller.priority.or_else(|| self.spec.priority.clone()),
            timeout: caller.timeout.or_else(|| self.spec.timeout.clone()),
            limits: caller.limits.or_else(|| self.limits()),
        })
    }

    pub fn limits(&self) -> Option<LimitsRequest> {
        let l = self.spec.limits.as_ref()?;
        let q = |s: &Option<Scalar>| s.as_ref().map(|v| Quantity::Text(v.text()));
        Some(LimitsRequest {
            cpu: q(&l.cpu),
            memory: q(&l.memory),
        })
    }
}

/// What a submission asks for, as sent (before the schema's checks).
#[derive(Debug, Clone, Default)]
pub struct Asked {
    pub params: BTreeMap<String, serde_json::Value>,
    pub priority: Option<String>,
    pub timeout: Option<String>,
    pub limits: Option<LimitsRequest>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::params::ParamSpec;

    fn schema() -> ParamSchema {
        let specs: BTreeMap<String, ParamSpec> = serde_yaml::from_str(
            "crf: {type: integer, min: 0, max: 51, default: 23}\nheight: {type: integer}\n",
        )
        .unwrap();
        ParamSchema::new(specs).unwrap()
    }

    fn load(files: &[(&str, &str)]) -> Result<Templates, String> {
        let d = tempfile::tempdir().unwrap();
        for (n, t) in files {
            std::fs::write(d.path().join(n), t).unwrap();
        }
        Templates::load(d.path(), "transcode:h264", &schema(), false)
    }

    #[test]
    fn templates_of_this_capability_load_by_file_name() {
        let t = load(&[
            ("h264-720p.yaml", "capability: transcode:h264\nparams: {height: 720}\noverridable: [crf]\nschedule: \"*/5 * * * *\"\n"),
            ("other.yaml", "capability: summarize:v1\n"),
        ])
        .unwrap();
        assert_eq!(t.by_name.keys().collect::<Vec<_>>(), ["h264-720p"]);
        let tpl = t.get("h264-720p").unwrap();
        assert!(tpl.cron.is_some());
        let merged = tpl
            .merge(&[("crf".to_string(), serde_json::json!(30))].into())
            .unwrap();
        assert_eq!(merged["height"], 720);
        assert_eq!(merged["crf"], 30);
        let err = tpl
            .merge(&[("height".to_string(), serde_json::json!(1))].into())
            .unwrap_err();
        assert!(err.contains("allows: crf"), "{err}");
    }

    #[test]
    fn bad_templates_name_the_file_and_the_field() {
        let e = load(&[(
            "bad.yaml",
            "capability: transcode:h264\nparams: {height: tall}\noverridable: [size]\nschedule: \"99 * * * *\"\n",
        )])
        .unwrap_err();
        for want in [
            "bad.yaml",
            "params: parameter `height`",
            "overridable: \"size\"",
            "schedule:",
        ] {
            assert!(e.contains(want), "{want} in {e}");
        }
        assert_eq!(e.matches("schedule:").count(), 1, "{e}");
    }
}
