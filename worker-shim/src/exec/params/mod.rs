//! The declared parameters of a command-line tool, and the validation of the
//! values a caller sends for them.
//!
//! The schema comes from the shim's YAML config:
//!
//! ```yaml
//! params:
//!   height: {type: integer, min: 144, max: 2160, default: 720}
//!   codec:  {type: enum, values: [libx264, libx265, h264_nvenc], default: libx264}
//!   preset: {type: string, pattern: "^[a-z]+$", required: false, default: medium}
//!   crf:    {type: number, min: 0, max: 51}
//!   audio:  {type: boolean, default: true}
//! ```
//!
//! Values end up as single argv elements (never a shell), so quoting is not a
//! concern; what is refused is what a tool could still misread: a value that
//! starts with `-` (an option, unless the parameter sets
//! `allow_leading_dash`), control characters and NUL, over-long values, and
//! non-finite numbers.

use std::collections::BTreeMap;
use std::fmt;

use regex::Regex;
use serde::{Deserialize, Serialize};

use self::spec::check_spec;

mod spec;
#[cfg(test)]
mod tests;
mod value;

/// Names the shim itself fills in; a parameter cannot take them.
pub const RESERVED_NAMES: [&str; 4] = ["input", "output", "workdir", "job_id"];

/// Names the job API itself reads from a submission's query string.
pub const SUBMIT_FIELDS: [&str; 2] = ["priority", "timeout"];

/// The length limit of a value when the spec sets no `max_len`.
pub const DEFAULT_MAX_LEN: usize = 256;

/// The type of a parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamType {
    String,
    Integer,
    Number,
    Boolean,
    Enum,
}

impl ParamType {
    pub fn as_str(self) -> &'static str {
        match self {
            ParamType::String => "string",
            ParamType::Integer => "integer",
            ParamType::Number => "number",
            ParamType::Boolean => "boolean",
            ParamType::Enum => "enum",
        }
    }
}

/// One declared parameter, as written in the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    #[serde(rename = "type")]
    pub kind: ParamType,
    /// As written; `None` means "required unless there is a default". Use
    /// [`ParamSpec::is_required`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required: Option<bool>,
    /// A scalar, valid against this spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_yaml::Value>,
    /// `string` only: a regex the whole value must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// `integer` and `number` only: inclusive bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// `enum` only: the accepted values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// Longest accepted value, in characters ([`DEFAULT_MAX_LEN`] when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_len: Option<usize>,
    /// Accept values that start with `-` (negative numbers included).
    #[serde(default)]
    pub allow_leading_dash: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl ParamSpec {
    /// A spec of this type with every option at its default.
    pub fn new(kind: ParamType) -> ParamSpec {
        ParamSpec {
            kind,
            required: None,
            default: None,
            pattern: None,
            min: None,
            max: None,
            values: Vec::new(),
            max_len: None,
            allow_leading_dash: false,
            description: None,
        }
    }

    /// Required unless it has a default or says `required: false`.
    pub fn is_required(&self) -> bool {
        self.required.unwrap_or(self.default.is_none())
    }

    pub fn max_len(&self) -> usize {
        self.max_len.unwrap_or(DEFAULT_MAX_LEN)
    }
}

/// A refused parameter value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamError {
    pub param: String,
    pub problem: String,
}

const UNKNOWN: &str = "unknown parameter";

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problem.strip_prefix(UNKNOWN) {
            // "unknown parameter `heigth`; declared parameters: …"
            Some(rest) => write!(f, "{UNKNOWN} `{}`{rest}", self.param),
            None => write!(f, "parameter `{}`: {}", self.param, self.problem),
        }
    }
}

impl std::error::Error for ParamError {}

/// A spec checked once, with its pattern compiled.
#[derive(Debug, Clone)]
struct Checked {
    spec: ParamSpec,
    pattern: Option<Regex>,
    /// The default, already in canonical form.
    default: Option<String>,
}

/// The checked parameter schema of one tool.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(try_from = "BTreeMap<String, ParamSpec>")]
pub struct ParamSchema {
    params: BTreeMap<String, Checked>,
}

impl TryFrom<BTreeMap<String, ParamSpec>> for ParamSchema {
    type Error = String;

    fn try_from(specs: BTreeMap<String, ParamSpec>) -> Result<Self, String> {
        ParamSchema::new(specs)
    }
}

/// `^[a-z][a-z0-9_]*$`, shared with the template's placeholders.
pub(crate) fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

fn yaml_to_json(v: &serde_yaml::Value) -> Option<serde_json::Value> {
    use serde_yaml::Value as Y;
    match v {
        Y::Bool(b) => Some(serde_json::Value::Bool(*b)),
        Y::String(s) => Some(serde_json::Value::String(s.clone())),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Some(i.into())
            } else if let Some(u) = n.as_u64() {
                Some(u.into())
            } else {
                // NaN and infinities have no JSON form: refused as a default.
                n.as_f64()
                    .and_then(serde_json::Number::from_f64)
                    .map(serde_json::Value::Number)
            }
        }
        _ => None,
    }
}

fn yaml_kind(v: &serde_yaml::Value) -> &'static str {
    match v {
        serde_yaml::Value::Null => "null",
        serde_yaml::Value::Sequence(_) => "a list",
        serde_yaml::Value::Mapping(_) => "a mapping",
        serde_yaml::Value::Tagged(_) => "a tagged value",
        _ => "a scalar",
    }
}

/// `"abc"`, `5000`, `true`, cut short for long values.
fn shown(v: &serde_json::Value) -> String {
    let s = match v {
        serde_json::Value::Array(_) => return "a list".into(),
        serde_json::Value::Object(_) => return "an object".into(),
        other => other.to_string(),
    };
    if s.chars().count() > 80 {
        let cut: String = s.chars().take(77).collect();
        format!("{cut}...")
    } else {
        s
    }
}

fn range_text(min: Option<f64>, max: Option<f64>) -> String {
    match (min, max) {
        (Some(lo), Some(hi)) => format!(" from {lo} to {hi}"),
        (Some(lo), None) => format!(" of at least {lo}"),
        (None, Some(hi)) => format!(" of at most {hi}"),
        (None, None) => String::new(),
    }
}

impl Checked {
    /// What a valid value looks like, for error messages.
    fn expectation(&self) -> String {
        let s = &self.spec;
        match s.kind {
            ParamType::Integer => format!("an integer{}", range_text(s.min, s.max)),
            ParamType::Number => format!("a number{}", range_text(s.min, s.max)),
            ParamType::Boolean => "true or false".into(),
            ParamType::Enum => format!("one of {}", s.values.join(", ")),
            ParamType::String => match &s.pattern {
                Some(p) => format!("a string matching `{p}`"),
                None => "a string".into(),
            },
        }
    }
}

impl ParamSchema {
    /// Check the schema itself. Every problem is reported, each naming the
    /// parameter and the fix, joined with "; ".
    pub fn new(specs: BTreeMap<String, ParamSpec>) -> Result<ParamSchema, String> {
        let mut errors = Vec::new();
        let mut params = BTreeMap::new();
        for (name, spec) in &specs {
            if let Some(c) = check_spec(name, spec, &mut errors) {
                params.insert(name.clone(), c);
            }
        }
        if errors.is_empty() {
            Ok(ParamSchema { params })
        } else {
            Err(errors.join("; "))
        }
    }

    pub fn get(&self, name: &str) -> Option<&ParamSpec> {
        self.params.get(name).map(|c| &c.spec)
    }

    /// Declared names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Validate what a caller sent: every parameter checked, defaults filled
    /// in, values returned in canonical form. `null` counts as not given.
    /// All problems are reported, not just the first.
    pub fn validate(
        &self,
        given: &BTreeMap<String, serde_json::Value>,
    ) -> Result<BTreeMap<String, String>, Vec<ParamError>> {
        let mut out = BTreeMap::new();
        let mut errors = Vec::new();
        for (name, c) in &self.params {
            let value = given.get(name).filter(|v| !v.is_null());
            match value {
                Some(v) => match c.canonical(v) {
                    Ok(s) => {
                        out.insert(name.clone(), s);
                    }
                    Err(problem) => errors.push(ParamError {
                        param: name.clone(),
                        problem,
                    }),
                },
                None => match &c.default {
                    Some(d) => {
                        out.insert(name.clone(), d.clone());
                    }
                    None if c.spec.is_required() => errors.push(ParamError {
                        param: name.clone(),
                        problem: format!("is required ({})", c.expectation()),
                    }),
                    None => {}
                },
            }
        }
        for name in given.keys().filter(|k| !self.params.contains_key(*k)) {
            let declared = if self.params.is_empty() {
                "this tool declares no parameters".to_string()
            } else {
                format!(
                    "declared parameters: {}",
                    self.names().collect::<Vec<_>>().join(", ")
                )
            };
            errors.push(ParamError {
                param: name.clone(),
                problem: format!("{UNKNOWN}; {declared}"),
            });
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
        }
    }

    /// The schema as JSON, for `GET /v1/schema`: an object keyed by parameter
    /// name, each with `type`, `required` and whichever of `default`, `min`,
    /// `max`, `values`, `pattern`, `max_len`, `allow_leading_dash`,
    /// `description` apply.
    pub fn describe(&self) -> serde_json::Value {
        let mut all = serde_json::Map::new();
        for (name, c) in &self.params {
            let s = &c.spec;
            let mut o = serde_json::Map::new();
            o.insert("type".into(), s.kind.as_str().into());
            o.insert("required".into(), s.is_required().into());
            if let Some(d) = s.default.as_ref().and_then(yaml_to_json) {
                o.insert("default".into(), d);
            }
            for (key, bound) in [("min", s.min), ("max", s.max)] {
                if let Some(b) = bound {
                    o.insert(key.into(), b.into());
                }
            }
            if !s.values.is_empty() {
                o.insert("values".into(), s.values.clone().into());
            }
            if let Some(p) = &s.pattern {
                o.insert("pattern".into(), p.clone().into());
            }
            o.insert("max_len".into(), s.max_len().into());
            if s.allow_leading_dash {
                o.insert("allow_leading_dash".into(), true.into());
            }
            if let Some(d) = &s.description {
                o.insert("description".into(), d.clone().into());
            }
            all.insert(name.clone(), o.into());
        }
        all.into()
    }
}
