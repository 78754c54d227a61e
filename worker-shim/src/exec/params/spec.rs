//! Checking a declared parameter once, at config load: its name, the
//! options its type allows, its pattern, its bounds and its default.

use regex::Regex;

use super::{valid_name, yaml_kind, yaml_to_json, Checked, ParamSpec, ParamType};
use super::{RESERVED_NAMES, SUBMIT_FIELDS};

/// The spec checked, or `None` with its problems added to `errors`, each
/// naming the parameter and the fix.
pub(super) fn check_spec(
    name: &str,
    spec: &ParamSpec,
    errors: &mut Vec<String>,
) -> Option<Checked> {
    let before = errors.len();
    let mut err = |msg: String| errors.push(format!("parameter `{name}`: {msg}"));
    check_name(name, &mut err);
    if spec.required == Some(true) && spec.default.is_some() {
        err("`required: true` with a default makes no sense; drop one of them".into());
    }
    let pattern = check_pattern(spec, &mut err);
    check_bounds(spec, &mut err);
    check_values(spec, &mut err);
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
    match default(&checked) {
        Ok(d) => checked.default = d,
        Err(p) => {
            errors.push(format!("parameter `{name}`: {p}; fix the default"));
            return None;
        }
    }
    Some(checked)
}

fn check_name(name: &str, err: &mut impl FnMut(String)) {
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
}

/// The compiled pattern (`string` only), anchored at both ends.
fn check_pattern(spec: &ParamSpec, err: &mut impl FnMut(String)) -> Option<Regex> {
    match (&spec.pattern, spec.kind) {
        (Some(p), ParamType::String) => match Regex::new(&format!("^(?:{p})$")) {
            Ok(re) => Some(re),
            Err(e) => {
                err(format!("pattern does not compile, fix the regex: {e}"));
                None
            }
        },
        (Some(_), kind) => {
            err(format!(
                "`pattern` applies to type string only, not {}; remove it",
                kind.as_str()
            ));
            None
        }
        (None, _) => None,
    }
}

/// `min`/`max`: numeric types only, finite, in order, and not negative
/// unless a leading `-` is allowed.
fn check_bounds(spec: &ParamSpec, err: &mut impl FnMut(String)) {
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
}

/// `values`: `enum` only, non-empty, each once, no control characters.
fn check_values(spec: &ParamSpec, err: &mut impl FnMut(String)) {
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
}

/// The default in canonical form, checked against the spec.
fn default(checked: &Checked) -> Result<Option<String>, String> {
    let Some(d) = &checked.spec.default else {
        return Ok(None);
    };
    match yaml_to_json(d) {
        None => Err(format!(
            "default must be a string, number or boolean, got {}",
            yaml_kind(d)
        )),
        Some(j) => checked
            .canonical(&j)
            .map(Some)
            .map_err(|p| format!("default is invalid: {p}")),
    }
}
