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

fn check_spec(name: &str, spec: &ParamSpec, errors: &mut Vec<String>) -> Option<Checked> {
    let before = errors.len();
    let mut err = |msg: String| errors.push(format!("parameter `{name}`: {msg}"));
    if !valid_name(name) {
        err("names must match [a-z][a-z0-9_]* (lower case, digits, underscores); rename it".into());
    }
    if RESERVED_NAMES.contains(&name) {
        err(format!(
            "`{name}` is reserved (the shim fills in {}); rename it",
            RESERVED_NAMES.join(", ")
        ));
    }
    if SUBMIT_FIELDS.contains(&name) {
        err(format!(
            "`{name}` is a submission field of the job API (as are {}); rename it",
            SUBMIT_FIELDS.join(", ")
        ));
    }
    if spec.required == Some(true) && spec.default.is_some() {
        err("`required: true` with a default makes no sense; drop one of them".into());
    }
    let mut pattern = None;
    match (&spec.pattern, spec.kind) {
        (Some(p), ParamType::String) => match Regex::new(&format!("^(?:{p})$")) {
            Ok(re) => pattern = Some(re),
            Err(e) => err(format!("pattern does not compile, fix the regex: {e}")),
        },
        (Some(_), kind) => err(format!(
            "`pattern` applies to type string only, not {}; remove it",
            kind.as_str()
        )),
        (None, _) => {}
    }
    let numeric = matches!(spec.kind, ParamType::Integer | ParamType::Number);
    if (spec.min.is_some() || spec.max.is_some()) && !numeric {
        err(format!(
            "`min`/`max` apply to types integer and number only, not {}; remove them",
            spec.kind.as_str()
        ));
    }
    for (key, bound) in [("min", spec.min), ("max", spec.max)] {
        if bound.is_some_and(|b| !b.is_finite()) {
            err(format!("`{key}` must be a finite number"));
        }
    }
    if let (Some(lo), Some(hi)) = (spec.min, spec.max) {
        if lo > hi {
            err(format!("min ({lo}) is greater than max ({hi}); swap them"));
        }
    }
    if numeric && spec.min.is_some_and(|lo| lo < 0.0) && !spec.allow_leading_dash {
        err(format!(
            "min ({}) allows negative values, which start with `-`; set `allow_leading_dash: true` or raise min to 0",
            spec.min.unwrap_or_default()
        ));
    }
    match spec.kind {
        ParamType::Enum if spec.values.is_empty() => {
            err("type enum needs a non-empty `values` list".into())
        }
        ParamType::Enum => {
            let mut seen = std::collections::BTreeSet::new();
            for v in &spec.values {
                if !seen.insert(v) {
                    err(format!("enum value {v:?} is listed twice; remove one"));
                }
                if v.chars().any(char::is_control) {
                    err(format!("enum value {v:?} contains control characters"));
                }
            }
        }
        _ if !spec.values.is_empty() => err(format!(
            "`values` applies to type enum only, not {}; remove it or use type enum",
            spec.kind.as_str()
        )),
        _ => {}
    }
    if spec.max_len == Some(0) {
        err("max_len 0 would refuse every value; raise it or remove it".into());
    }
    if errors.len() > before {
        return None;
    }
    let mut checked = Checked {
        spec: spec.clone(),
        pattern,
        default: None,
    };
    if let Some(d) = &spec.default {
        let problem = match yaml_to_json(d) {
            None => Err(format!(
                "default must be a string, number or boolean, got {}",
                yaml_kind(d)
            )),
            Some(j) => checked
                .canonical(&j)
                .map_err(|p| format!("default is invalid: {p}")),
        };
        match problem {
            Ok(v) => checked.default = Some(v),
            Err(p) => {
                errors.push(format!("parameter `{name}`: {p}; fix the default"));
                return None;
            }
        }
    }
    Some(checked)
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

    /// The canonical string form of a value, or what is wrong with it.
    fn canonical(&self, v: &serde_json::Value) -> Result<String, String> {
        use serde_json::Value as J;
        let s = &self.spec;
        let bad = || format!("must be {}, got {}", self.expectation(), shown(v));
        let in_range = |x: f64| s.min.is_none_or(|lo| x >= lo) && s.max.is_none_or(|hi| x <= hi);
        let text = match (s.kind, v) {
            (ParamType::Integer, _) => {
                let n = match v {
                    J::Number(n) => n.as_i64().or_else(|| {
                        n.as_f64()
                            .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                            .map(|f| f as i64)
                    }),
                    J::String(t) => t.parse::<i64>().ok(),
                    _ => None,
                }
                .ok_or_else(bad)?;
                if !in_range(n as f64) {
                    return Err(bad());
                }
                n.to_string()
            }
            (ParamType::Number, _) => {
                let x = match v {
                    J::Number(n) => n.as_f64(),
                    J::String(t) => t.parse::<f64>().ok(),
                    _ => None,
                }
                .filter(|x| x.is_finite())
                .ok_or_else(bad)?;
                if !in_range(x) {
                    return Err(bad());
                }
                // `+ 0.0` turns -0 into 0.
                (x + 0.0).to_string()
            }
            (ParamType::Boolean, J::Bool(b)) => b.to_string(),
            (ParamType::Boolean, J::Number(n)) => match n.as_u64() {
                Some(0) => "false".into(),
                Some(1) => "true".into(),
                _ => return Err(bad()),
            },
            (ParamType::Boolean, J::String(t)) => match t.to_ascii_lowercase().as_str() {
                "true" | "1" => "true".into(),
                "false" | "0" => "false".into(),
                _ => return Err(bad()),
            },
            (ParamType::Enum, J::String(t)) if s.values.contains(t) => t.clone(),
            (ParamType::Enum, J::Number(n)) if s.values.contains(&n.to_string()) => n.to_string(),
            (ParamType::String, J::String(t)) => t.clone(),
            (ParamType::String, J::Number(_) | J::Bool(_)) => v.to_string(),
            _ => return Err(bad()),
        };
        if text.chars().any(char::is_control) {
            return Err(format!(
                "must not contain control characters or NUL, got {}",
                shown(v)
            ));
        }
        let len = text.chars().count();
        if len > s.max_len() {
            return Err(format!(
                "must be at most {} characters, got {len}",
                s.max_len()
            ));
        }
        if text.starts_with('-') && !s.allow_leading_dash {
            return Err(format!(
                "must not start with `-` (the tool could read it as an option), got {}",
                shown(v)
            ));
        }
        if let Some(re) = &self.pattern {
            if !re.is_match(&text) {
                return Err(bad());
            }
        }
        Ok(text)
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const EXAMPLE: &str = r#"
params:
  height: {type: integer, min: 144, max: 2160, default: 720}
  codec:  {type: enum, values: [libx264, libx265, h264_nvenc], default: libx264}
  preset: {type: string, pattern: "^[a-z]+$", required: false, default: medium}
  crf:    {type: number, min: 0, max: 51}
  audio:  {type: boolean, default: true}
"#;

    #[derive(Deserialize)]
    struct Config {
        params: ParamSchema,
    }

    fn example() -> ParamSchema {
        serde_yaml::from_str::<Config>(EXAMPLE).unwrap().params
    }

    fn given(v: serde_json::Value) -> BTreeMap<String, serde_json::Value> {
        serde_json::from_value(v).unwrap()
    }

    fn specs(yaml: &str) -> BTreeMap<String, ParamSpec> {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn example_config_fills_defaults_and_canonicalises() {
        let s = example();
        assert_eq!(
            s.names().collect::<Vec<_>>(),
            ["audio", "codec", "crf", "height", "preset"]
        );
        assert!(s.get("crf").unwrap().is_required());
        assert!(!s.get("height").unwrap().is_required());
        let out = s.validate(&given(json!({"crf": 23}))).unwrap();
        let want: BTreeMap<String, String> = [
            ("audio", "true"),
            ("codec", "libx264"),
            ("crf", "23"),
            ("height", "720"),
            ("preset", "medium"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(out, want);
    }

    #[test]
    fn accepted_values_and_their_canonical_form() {
        let s = example();
        // (param, given, canonical)
        let table = [
            ("height", json!(1080), "1080"),
            ("height", json!("1080"), "1080"),
            ("height", json!(1080.0), "1080"),
            ("height", json!(144), "144"),
            ("height", json!(2160), "2160"),
            ("crf", json!(23.5), "23.5"),
            ("crf", json!("18"), "18"),
            ("crf", json!("0"), "0"),
            ("crf", json!("-0"), "0"),
            ("crf", json!(51), "51"),
            ("audio", json!(false), "false"),
            ("audio", json!("TRUE"), "true"),
            ("audio", json!("0"), "false"),
            ("audio", json!(1), "true"),
            ("codec", json!("h264_nvenc"), "h264_nvenc"),
            ("preset", json!("slow"), "slow"),
        ];
        for (param, value, want) in table {
            let mut g = given(json!({"crf": 20}));
            g.insert(param.into(), value.clone());
            let out = s
                .validate(&g)
                .unwrap_or_else(|e| panic!("{param}={value}: {e:?}"));
            assert_eq!(out[param], want, "{param}={value}");
        }
        // null means "not given": the default applies.
        let out = s
            .validate(&given(json!({"crf": 1, "height": null})))
            .unwrap();
        assert_eq!(out["height"], "720");
    }

    #[test]
    fn refused_values_say_what_is_expected() {
        let s = example();
        let table = [
            (
                "height",
                json!("abc"),
                r#"parameter `height`: must be an integer from 144 to 2160, got "abc""#,
            ),
            (
                "height",
                json!(5000),
                "parameter `height`: must be an integer from 144 to 2160, got 5000",
            ),
            (
                "height",
                json!(720.5),
                "parameter `height`: must be an integer from 144 to 2160, got 720.5",
            ),
            (
                "height",
                json!([720]),
                "parameter `height`: must be an integer from 144 to 2160, got a list",
            ),
            (
                "crf",
                json!("NaN"),
                r#"parameter `crf`: must be a number from 0 to 51, got "NaN""#,
            ),
            (
                "crf",
                json!("inf"),
                r#"parameter `crf`: must be a number from 0 to 51, got "inf""#,
            ),
            (
                "crf",
                json!(-1),
                "parameter `crf`: must be a number from 0 to 51, got -1",
            ),
            (
                "audio",
                json!("yes please"),
                r#"parameter `audio`: must be true or false, got "yes please""#,
            ),
            (
                "codec",
                json!("libfoo"),
                r#"parameter `codec`: must be one of libx264, libx265, h264_nvenc, got "libfoo""#,
            ),
            (
                "preset",
                json!("Slow"),
                r#"parameter `preset`: must be a string matching `^[a-z]+$`, got "Slow""#,
            ),
            (
                // the pattern must match the whole value
                "preset",
                json!("slow fast"),
                r#"parameter `preset`: must be a string matching `^[a-z]+$`, got "slow fast""#,
            ),
        ];
        for (param, value, want) in table {
            let mut g = given(json!({"crf": 20}));
            g.insert(param.into(), value.clone());
            let errs = s.validate(&g).unwrap_err();
            assert_eq!(errs.len(), 1, "{param}={value}: {errs:?}");
            assert_eq!(errs[0].param, param);
            assert_eq!(errs[0].to_string(), want);
        }
    }

    #[test]
    fn every_error_is_collected_unknown_and_missing_included() {
        let errs = example()
            .validate(&given(json!({"heigth": 1080, "codec": "libfoo"})))
            .unwrap_err();
        let shown: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                r#"parameter `codec`: must be one of libx264, libx265, h264_nvenc, got "libfoo""#,
                "parameter `crf`: is required (a number from 0 to 51)",
                "unknown parameter `heigth`; declared parameters: audio, codec, crf, height, preset",
            ]
        );
        assert_eq!(errs[2].param, "heigth");
    }

    #[test]
    fn values_a_tool_could_misread_are_refused() {
        let s = ParamSchema::new(specs(
            r#"
name:  {type: string}
short: {type: string, max_len: 4}
dash:  {type: string, allow_leading_dash: true}
gain:  {type: integer}
shift: {type: number, min: -10, max: 10, allow_leading_dash: true}
"#,
        ))
        .unwrap();
        let ok = json!({"name": "a", "short": "a", "dash": "a", "gain": 1, "shift": 0});
        let table: [(&str, serde_json::Value, Option<&str>); 11] = [
            (
                "name",
                json!("-f"),
                Some("must not start with `-` (the tool could read it as an option), got \"-f\""),
            ),
            (
                "name",
                json!("--help"),
                Some(
                    "must not start with `-` (the tool could read it as an option), got \"--help\"",
                ),
            ),
            (
                "name",
                json!("a\u{0}b"),
                Some("must not contain control characters or NUL, got \"a\\u0000b\""),
            ),
            (
                "name",
                json!("a\nb"),
                Some("must not contain control characters or NUL, got \"a\\nb\""),
            ),
            (
                "name",
                json!("x".repeat(257)),
                Some("must be at most 256 characters, got 257"),
            ),
            ("name", json!("x".repeat(256)), None),
            ("name", json!("a-b c;rm -rf /"), None),
            (
                "short",
                json!("abcde"),
                Some("must be at most 4 characters, got 5"),
            ),
            ("dash", json!("-vf"), None),
            (
                "gain",
                json!(-3),
                Some("must not start with `-` (the tool could read it as an option), got -3"),
            ),
            ("shift", json!("-2.5"), None),
        ];
        for (param, value, want) in table {
            let mut g = given(ok.clone());
            g.insert(param.into(), value.clone());
            match (s.validate(&g), want) {
                (Ok(out), None) => assert!(out.contains_key(param)),
                (Err(errs), Some(want)) => {
                    assert_eq!(errs.len(), 1, "{param}={value}: {errs:?}");
                    assert_eq!(errs[0].problem, want, "{param}={value}");
                }
                (got, want) => panic!("{param}={value}: got {got:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn schema_mistakes_name_the_parameter_and_the_fix() {
        let table = [
            ("Height: {type: integer}", "parameter `Height`: names must match [a-z][a-z0-9_]*"),
            ("2pass: {type: boolean}", "parameter `2pass`: names must match"),
            ("input: {type: string}", "parameter `input`: `input` is reserved"),
            ("job_id: {type: string}", "parameter `job_id`: `job_id` is reserved"),
            ("p: {type: string, pattern: \"([a-z\"}", "parameter `p`: pattern does not compile"),
            ("p: {type: integer, pattern: \"[0-9]+\"}", "`pattern` applies to type string only"),
            ("p: {type: integer, min: 10, max: 1}", "parameter `p`: min (10) is greater than max (1); swap them"),
            ("p: {type: integer, min: -5}", "set `allow_leading_dash: true` or raise min to 0"),
            ("p: {type: string, min: 1}", "`min`/`max` apply to types integer and number only"),
            ("p: {type: enum}", "parameter `p`: type enum needs a non-empty `values` list"),
            ("p: {type: enum, values: [a, a]}", "enum value \"a\" is listed twice"),
            ("p: {type: string, values: [a]}", "`values` applies to type enum only"),
            ("p: {type: integer, default: 5, required: true}", "`required: true` with a default makes no sense"),
            ("p: {type: integer, min: 1, max: 9, default: 10}", "parameter `p`: default is invalid: must be an integer from 1 to 9, got 10; fix the default"),
            ("p: {type: enum, values: [a, b], default: c}", "default is invalid: must be one of a, b, got \"c\""),
            ("p: {type: string, default: [a]}", "default must be a string, number or boolean, got a list"),
            ("p: {type: string, pattern: \"[a-z]+\", default: \"-x\"}", "default is invalid: must not start with `-`"),
            ("p: {type: string, max_len: 0}", "max_len 0 would refuse every value"),
        ];
        for (yaml, want) in table {
            let err = ParamSchema::new(specs(yaml)).unwrap_err();
            assert!(err.contains(want), "{yaml}: {err}");
        }
        // Several problems are all reported.
        let err = ParamSchema::new(specs("output: {type: enum}\nA: {type: string}")).unwrap_err();
        assert_eq!(err.matches("; parameter `").count(), 2, "{err}");
        // Unknown fields in a spec are refused by the config parser.
        let e = serde_yaml::from_str::<BTreeMap<String, ParamSpec>>(
            "p: {type: string, requird: false}",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `requird`"), "{e}");
        // Defaults of every type are accepted as YAML scalars.
        let ok = "a: {type: number, default: 1.5}\nb: {type: string, default: 42}\nc: {type: boolean, default: false}\nd: {type: string, required: false}";
        let s = ParamSchema::new(specs(ok)).unwrap();
        let out = s.validate(&BTreeMap::new()).unwrap();
        assert_eq!(out.get("a").map(String::as_str), Some("1.5"));
        assert_eq!(out.get("b").map(String::as_str), Some("42"));
        assert_eq!(out.get("c").map(String::as_str), Some("false"));
        assert_eq!(out.get("d"), None);
    }

    #[test]
    fn describe_lists_every_parameter() {
        let d = example().describe();
        assert_eq!(
            d["height"],
            json!({"type": "integer", "required": false, "default": 720, "min": 144.0, "max": 2160.0, "max_len": 256})
        );
        assert_eq!(
            d["codec"]["values"],
            json!(["libx264", "libx265", "h264_nvenc"])
        );
        assert_eq!(d["crf"]["required"], true);
        assert_eq!(d["preset"]["pattern"], "^[a-z]+$");
        assert_eq!(d["audio"]["default"], true);
        let empty = ParamSchema::default();
        assert_eq!(empty.describe(), json!({}));
        let errs = empty.validate(&given(json!({"x": 1}))).unwrap_err();
        assert_eq!(
            errs[0].to_string(),
            "unknown parameter `x`; this tool declares no parameters"
        );
    }
}
