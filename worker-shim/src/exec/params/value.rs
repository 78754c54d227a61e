//! A caller's value for a declared parameter: typed, bounded, and safe to
//! pass as one argv element, in one canonical string form.

use serde_json::Value as J;

use super::{shown, Checked, ParamType};

impl Checked {
    /// The canonical string form of a value, or what is wrong with it.
    pub(super) fn canonical(&self, v: &J) -> Result<String, String> {
        let bad = || format!("must be {}, got {}", self.expectation(), shown(v));
        let text = self.typed(v).ok_or_else(bad)?;
        self.safe(&text, v)?;
        match &self.pattern {
            Some(re) if !re.is_match(&text) => Err(bad()),
            _ => Ok(text),
        }
    }

    /// The value as its type's text, within the bounds; `None` when it is
    /// not a value of the type.
    fn typed(&self, v: &J) -> Option<String> {
        let s = &self.spec;
        let in_range = |x: f64| s.min.is_none_or(|lo| x >= lo) && s.max.is_none_or(|hi| x <= hi);
        match (s.kind, v) {
            (ParamType::Integer, _) => integer(v)
                .filter(|n| in_range(*n as f64))
                .map(|n| n.to_string()),
            // `+ 0.0` turns -0 into 0.
            (ParamType::Number, _) => number(v)
                .filter(|x| in_range(*x))
                .map(|x| (x + 0.0).to_string()),
            (ParamType::Boolean, _) => boolean(v).map(|b| b.to_string()),
            (ParamType::Enum, J::String(t)) if s.values.contains(t) => Some(t.clone()),
            (ParamType::Enum, J::Number(n)) if s.values.contains(&n.to_string()) => {
                Some(n.to_string())
            }
            (ParamType::String, J::String(t)) => Some(t.clone()),
            (ParamType::String, J::Number(_) | J::Bool(_)) => Some(v.to_string()),
            _ => None,
        }
    }

    /// What a tool could misread: control characters, length, a leading
    /// `-`.
    fn safe(&self, text: &str, v: &J) -> Result<(), String> {
        let s = &self.spec;
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
        Ok(())
    }
}

/// A whole number: an integer, a float without a fraction, or its text.
fn integer(v: &J) -> Option<i64> {
    match v {
        J::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                .map(|f| f as i64)
        }),
        J::String(t) => t.parse::<i64>().ok(),
        _ => None,
    }
}

/// A finite number, or its text.
fn number(v: &J) -> Option<f64> {
    match v {
        J::Number(n) => n.as_f64(),
        J::String(t) => t.parse::<f64>().ok(),
        _ => None,
    }
    .filter(|x| x.is_finite())
}

/// `true`/`false`, `1`/`0`, as JSON or text (any case).
fn boolean(v: &J) -> Option<bool> {
    match v {
        J::Bool(b) => Some(*b),
        J::Number(n) => match n.as_u64() {
            Some(0) => Some(false),
            Some(1) => Some(true),
            _ => None,
        },
        J::String(t) => match t.to_ascii_lowercase().as_str() {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            _ => None,
        },
        _ => None,
    }
}
