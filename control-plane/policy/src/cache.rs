//! The per-revision decision cache: a decision is reused for a request
//! whose input agrees with an earlier one on every part the policy reads.
//!
//! It is only switched on where that is provably safe, by a scan of the
//! set's modules when it is compiled ([`plan`]):
//!
//! - no built-in whose result can change between two evaluations of the same
//!   input (`time.*`, `rand.*`, `uuid.*`, `http.send`, `net.lookup_ip_addr`,
//!   `opa.runtime`, `io.*`, whose JWT checks read the clock);
//! - every reference to `input` is a path of fixed names (`input.source.tenant`,
//!   or `input.request.headers[...]`, which counts as `input.request.headers`),
//!   or `object.get(input, ["a", "b"], ...)` with literal keys: a bare `input`
//!   (`x := input`, `walk(input, ...)`, `import input`) turns it off;
//! - nothing reads `input.time`, and the input shape is crank's (the envoy
//!   shape carries the request id and its time).
//!
//! The key is the value at each of those paths (a whole subtree where the
//! path ends on an object), so two inputs with one key evaluate every
//! reference the policy has to the same value, and, with the same data and
//! modules, to the same decision. The cache belongs to one compiled set: a
//! reload compiles a new set and starts empty. Errors (a timeout is one) are
//! never cached.

use std::collections::BTreeMap;

use regorus::Value;

use crate::manifest::InputShape;

/// Entries per thread and revision before the cache is emptied.
const MAX_ENTRIES: usize = 4096;

/// Built-ins whose result is not a function of their arguments.
const UNSTABLE: [&str; 7] = [
    "time.",
    "rand.",
    "uuid.",
    "http.send",
    "net.lookup_ip_addr",
    "opa.runtime",
    "io.",
];

/// The paths into `input` the set reads, or why the cache is off.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    paths: Vec<Vec<Value>>,
}

impl Plan {
    /// Whether the value at `path` (or under it) can be read: a read path
    /// runs through it, or it lies inside a read subtree.
    pub fn wants(&self, path: &[&str]) -> bool {
        self.paths.iter().any(|p| {
            p.iter()
                .zip(path)
                .all(|(a, b)| a.as_string().is_ok_and(|a| a.as_ref() == *b))
        })
    }

    /// The key of one input: the value at each path, with how deep the
    /// walk got (an object missing the key, or a non-object on the way,
    /// stops it).
    pub fn key(&self, input: &Value) -> Vec<Value> {
        let mut key = Vec::with_capacity(self.paths.len() * 2);
        for path in &self.paths {
            let mut at = input;
            let mut depth = 0usize;
            for seg in path {
                match at {
                    Value::Object(o) => match o.get(seg) {
                        Some(v) => {
                            at = v;
                            depth += 1;
                        }
                        None => break,
                    },
                    _ => break,
                }
            }
            key.push(Value::from(depth));
            key.push(at.clone());
        }
        key
    }
}

/// Decides whether a set may use the cache: `Ok` with the paths it reads,
/// or `Err` with the reason it may not.
pub fn plan<'a>(
    modules: impl IntoIterator<Item = &'a str>,
    shape: InputShape,
) -> Result<Plan, String> {
    if shape == InputShape::Envoy {
        return Err("the envoy input shape carries a per-request id and time".into());
    }
    let mut paths: Vec<Vec<String>> = Vec::new();
    for text in modules {
        for (pos, token) in tokens(text) {
            if let Some(b) = UNSTABLE.iter().find(|b| token.starts_with(**b)) {
                return Err(format!("a module calls {b}..., whose result can change"));
            }
            if token != "input" && !token.starts_with("input.") {
                continue;
            }
            let path: Vec<String> = match token.strip_prefix("input.") {
                Some(rest) => rest.split('.').map(str::to_string).collect(),
                None => object_get_path(text, pos).ok_or_else(|| {
                    "a module reads the whole input document (a bare `input`)".to_string()
                })?,
            };
            if path.first().map(String::as_str) == Some("time") {
                return Err("a module reads input.time".into());
            }
            paths.push(path);
        }
    }
    Ok(Plan {
        paths: minimal(paths)
            .into_iter()
            .map(|p| p.into_iter().map(Value::from).collect())
            .collect(),
    })
}

/// Drops paths under another one (`a.b` under `a`) and repeats.
fn minimal(mut paths: Vec<Vec<String>>) -> Vec<Vec<String>> {
    paths.sort();
    paths.dedup();
    let mut out: Vec<Vec<String>> = Vec::new();
    for p in paths {
        if !out.iter().any(|q| p.starts_with(q)) {
            out.push(p);
        }
    }
    out
}

/// `object.get(input, ["a", "b"], ...)`: the literal path, when the bare
/// `input` at `pos` is that call's first argument.
fn object_get_path(text: &str, pos: usize) -> Option<Vec<String>> {
    let before = text[..pos].trim_end();
    if !before.ends_with("object.get(") {
        return None;
    }
    let after = text[pos + "input".len()..].trim_start().strip_prefix(',')?;
    let list = after.trim_start().strip_prefix('[')?;
    let list = &list[..list.find(']')?];
    list.split(',')
        .map(|item| {
            let s = item.trim().strip_prefix('"')?.strip_suffix('"')?;
            let plain = s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            (plain && !s.is_empty()).then(|| s.to_string())
        })
        .collect()
}

/// Dotted names (`input.request.method`, `time.now_ns`) outside strings
/// and comments, with their byte offsets.
fn tokens(text: &str) -> Vec<(usize, &str)> {
    let bytes = text.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'#' => i = text[i..].find('\n').map_or(bytes.len(), |n| i + n),
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'`' => i = text[i + 1..].find('`').map_or(bytes.len(), |n| i + n + 2),
            c if ident(c) && (i == 0 || bytes[i - 1] != b'.') => {
                let start = i;
                while i < bytes.len() && (ident(bytes[i]) || bytes[i] == b'.') {
                    i += 1;
                }
                out.push((start, text[start..i].trim_end_matches('.')));
            }
            _ => i += 1,
        }
    }
    out
}

/// One thread's cached decisions for one revision: the allow/deny outcome
/// and the reasons.
#[derive(Default)]
pub(crate) struct Cache {
    entries: BTreeMap<Vec<Value>, (bool, Vec<String>)>,
}

impl Cache {
    pub(crate) fn get(&self, key: &[Value]) -> Option<&(bool, Vec<String>)> {
        self.entries.get(key)
    }

    pub(crate) fn put(&mut self, key: Vec<Value>, decided: (bool, Vec<String>)) {
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.clear();
        }
        self.entries.insert(key, decided);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(p: &Plan) -> Vec<String> {
        p.paths
            .iter()
            .map(|p| {
                p.iter()
                    .map(|s| s.as_string().unwrap().to_string())
                    .collect::<Vec<_>>()
                    .join(".")
            })
            .collect()
    }

    #[test]
    fn the_plan_names_what_the_policy_reads_or_why_there_is_none() {
        let crank = InputShape::Crank;
        let ok = plan(
            [r#"package a
# input.time in a comment, and time.now_ns() too
allow if input.request.method == "GET"
allow if input.request.headers["x-a"] == "input.time"
allow if object.get(input, ["source", "tenant"], "?") == input.source.tenant
"#],
            crank,
        )
        .unwrap();
        assert_eq!(
            paths(&ok),
            ["request.headers", "request.method", "source.tenant"]
        );
        for (text, why) in [
            ("allow if time.now_ns() > 0", "time."),
            ("allow if rand.intn(\"x\", 2) == 1", "rand."),
            ("allow if input.time.unix_ns > 0", "input.time"),
            ("allow if count(input) > 0", "bare"),
            ("import input\nallow if input.x", "bare"),
            ("allow if object.get(input, [k], 1)", "bare"),
            ("allow if io.jwt.decode_verify(t, {})", "io."),
        ] {
            let e = plan([text], crank).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
        let e = plan(["allow if input.x"], InputShape::Envoy).unwrap_err();
        assert!(e.contains("envoy"), "{e}");
    }

    #[test]
    fn the_key_is_the_value_at_each_path_and_how_deep_it_got() {
        let p = plan(
            ["allow if input.source.tenant == input.request.method"],
            InputShape::Crank,
        )
        .unwrap();
        let doc = |v: serde_json::Value| Value::from(v);
        let a = doc(
            serde_json::json!({"source": {"tenant": "acme", "address": "1"},
            "request": {"method": "GET", "path": "/1"}, "time": {"unix_ns": 1}}),
        );
        let b = doc(
            serde_json::json!({"source": {"tenant": "acme", "address": "2"},
            "request": {"method": "GET", "path": "/2"}, "time": {"unix_ns": 2}}),
        );
        assert_eq!(p.key(&a), p.key(&b), "unread parts do not split the key");
        let null = doc(serde_json::json!({"source": null, "request": {"method": "GET"}}));
        let missing = doc(serde_json::json!({"source": {}, "request": {"method": "GET"}}));
        assert_ne!(p.key(&a), p.key(&null));
        assert_ne!(p.key(&null), p.key(&missing));
    }

    /// The scanner reads any text without panicking (strings cut short,
    /// comments, raw strings, multi-byte characters).
    #[test]
    fn the_scan_survives_arbitrary_text() {
        let pieces = [
            "input",
            ".",
            "time",
            "[",
            "]",
            "\"",
            "\\",
            "`",
            "#",
            "\n",
            " ",
            "object.get(",
            ",",
            "\"a\"",
            "é",
            "rand.",
            "x",
            "(",
            ")",
            "data.",
            "_",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..5000 {
            let mut text = String::new();
            for _ in 0..(seed % 24) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                text.push_str(pieces[(seed % pieces.len() as u64) as usize]);
            }
            let _ = plan([text.as_str()], InputShape::Crank);
        }
    }
}
