//! Config files: read a YAML file into a typed struct, and errors that name
//! the file, the field, what is wrong (with the value found) and the fix.
//!
//! ```text
//! proxy.yaml: inbound.listen: invalid socket address syntax: found `nope` (line 3); write ip:port, e.g. 127.0.0.1:4143 (a host name is not allowed)
//! ```
//!
//! Parsing stops at the first error serde meets; the checks that types
//! cannot make go through a [`Problems`] collector, so that a config is
//! refused whole with every problem listed, one a line.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A refused config: which file, and every problem in it. `field` and
/// `message` are the first problem; `more` holds the others, `(field,
/// message)`, in file order. A message says what is wrong, then `; ` and the
/// fix. Shown one problem a line, each `FILE: FIELD: MESSAGE`, after a
/// `FILE: N problems:` line when there are several.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub field: String,
    pub message: String,
    pub more: Vec<(String, String)>,
}

impl ConfigError {
    /// One problem.
    pub fn new(file: &str, field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_string(),
            field: field.into(),
            message: message.into(),
            more: Vec::new(),
        }
    }

    /// The file could not be read.
    pub fn unreadable(file: &str, e: &std::io::Error) -> Self {
        ConfigError::new(
            file,
            "(file)",
            format!("cannot read the config file: {e}; check the --config path"),
        )
    }

    /// Every problem, `(field, message)`, the first included.
    pub fn problems(&self) -> impl Iterator<Item = (&str, &str)> {
        std::iter::once((self.field.as_str(), self.message.as_str()))
            .chain(self.more.iter().map(|(f, m)| (f.as_str(), m.as_str())))
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.more.is_empty() {
            writeln!(f, "{}: {} problems:", self.file, self.more.len() + 1)?;
        }
        for (i, (field, message)) in self.problems().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {field}: {message}", self.file)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Collects the problems of one file; [`Problems::finish`] refuses the
/// config whole when there is any.
#[derive(Debug)]
pub struct Problems {
    file: String,
    found: Vec<(String, String)>,
}

impl Problems {
    pub fn new(file: &str) -> Self {
        Problems {
            file: file.to_string(),
            found: Vec::new(),
        }
    }

    /// Notes a problem: `message` says what is wrong, then `; ` and the fix.
    pub fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.found.push((field.into(), message.into()));
    }

    /// Notes the problem of `check`, if any.
    pub fn check(&mut self, field: &str, check: Result<(), String>) {
        if let Err(message) = check {
            self.push(field, message);
        }
    }

    /// Adds every problem of `e` (from a nested check).
    pub fn extend(&mut self, e: ConfigError) {
        self.found.push((e.field, e.message));
        self.found.extend(e.more);
    }

    pub fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    /// `Ok` when there is no problem; otherwise all of them.
    pub fn finish(self) -> Result<(), ConfigError> {
        let mut it = self.found.into_iter();
        match it.next() {
            None => Ok(()),
            Some((field, message)) => Err(ConfigError {
                more: it.collect(),
                ..ConfigError::new(&self.file, field, message)
            }),
        }
    }
}

/// Reads `path` and parses it as YAML into `T`; `doc` is the reference page
/// that parse errors point to (e.g. `docs/reference/proxy-config.md`).
pub fn load_yaml<T: DeserializeOwned>(path: &Path, doc: &str) -> Result<T, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::unreadable(&file, &e))?;
    parse_yaml(&file, &text, doc)
}

/// Parses YAML text into `T`. An error names the field once (serde_yaml's
/// own copy of the path is dropped), the line, the value found there and
/// the fix, which points to `doc`.
pub fn parse_yaml<T: DeserializeOwned>(
    file: &str,
    text: &str,
    doc: &str,
) -> Result<T, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." || field.is_empty() {
            "(top level)".to_string()
        } else {
            field
        };
        let inner = e.into_inner();
        let location = inner.location();
        let message = yaml_message(&inner.to_string(), &field);
        let value = location.as_ref().and_then(|l| value_at(text, l.index()));
        let message = parse_message(&message, value, location.map(|l| l.line()), doc);
        ConfigError::new(file, field, message)
    })
}

/// Makes relative paths absolute against `base` (the config file's folder).
pub fn resolve_paths<'a>(base: &Path, paths: impl IntoIterator<Item = &'a mut PathBuf>) {
    for p in paths {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
}

/// serde_yaml's message without its copy of the field path (`inbound.listen:
/// invalid …`) and its ` at line N column M` tail (the line is added back).
fn yaml_message(raw: &str, field: &str) -> String {
    let mut msg = raw.to_string();
    if let Some(i) = msg.find(" at line ") {
        msg.truncate(i);
    }
    if let Some(rest) = msg.strip_prefix(&format!("{field}: ")) {
        msg = rest.to_string();
    }
    msg
}

/// `what is wrong: found VALUE (line N); the fix`.
fn parse_message(msg: &str, value: Option<String>, line: Option<usize>, doc: &str) -> String {
    let mut out = msg.to_string();
    // Unknown or missing keys and bad enum variants already say what was
    // found; type and syntax errors do not.
    let names_it = msg.contains("unknown field") || msg.contains("unknown variant");
    match (
        value.filter(|_| !names_it && !msg.contains("missing field")),
        line,
    ) {
        (Some(v), Some(l)) => out.push_str(&format!(": found {v} (line {l})")),
        (None, Some(l)) => out.push_str(&format!(" (line {l})")),
        (Some(v), None) => out.push_str(&format!(": found {v}")),
        (None, None) => {}
    }
    out.push_str("; ");
    out.push_str(&parse_fix(msg, doc));
    out
}

/// How to fix a parse error, by its kind.
fn parse_fix(msg: &str, doc: &str) -> String {
    const FIXES: &[(&str, &str)] = &[
        ("unknown field", "remove it or fix its spelling (see {doc})"),
        ("missing field", "add it (see {doc})"),
        (
            "unknown variant",
            "use one of the values listed (see {doc})",
        ),
        (
            "socket address",
            "write ip:port, e.g. 127.0.0.1:4143 (a host name is not allowed)",
        ),
        ("duration", "write a duration such as 250ms, 10s or 5m"),
        ("invalid type", "give a value of the type named (see {doc})"),
    ];
    FIXES
        .iter()
        .find(|(kind, _)| msg.contains(kind))
        .map_or("fix the value (see {doc})", |(_, fix)| fix)
        .replace("{doc}", doc)
}

/// The YAML scalar (or the start of the node) at byte `index` of `text`, as
/// written, quoted for the message; `None` past the end or when empty.
fn value_at(text: &str, index: usize) -> Option<String> {
    let rest = text.get(index..)?;
    let raw = match rest.chars().next()? {
        q @ ('"' | '\'') => {
            let end = rest[1..].find(q).map_or(rest.len(), |e| e + 2);
            &rest[..end]
        }
        _ => {
            let end = rest.find([',', '}', ']', '\n', '\r']).unwrap_or(rest.len());
            let v = &rest[..end];
            v.split(" #").next().unwrap_or(v)
        }
    };
    let raw = raw.trim();
    let raw: String = raw.chars().take(80).collect();
    (!raw.is_empty()).then(|| format!("`{raw}`"))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use serde::Deserialize;

    use super::*;

    const DOC: &str = "docs/reference/x.md";

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        listen: SocketAddr,
        #[serde(default, with = "humantime_serde_stub")]
        every: Option<Duration>,
        mode: Option<Mode>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Mode {
        Serve,
    }

    /// A duration as a number of milliseconds is enough for these tests.
    mod humantime_serde_stub {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer};

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
        }
    }

    #[test]
    fn parse_errors_name_field_value_line_and_fix() {
        let cases = [
            (
                "listen: nope\n",
                "listen",
                "invalid socket address syntax: found `nope` (line 1); write ip:port",
            ),
            (
                "listen: 127.0.0.1:1\nbogus: 1\n",
                "bogus",
                "unknown field `bogus`",
            ),
            ("every: 5\n", "(top level)", "missing field `listen`"),
            (
                "listen: 127.0.0.1:1\nmode: exec\n",
                "mode",
                "use one of the values listed (see docs/reference/x.md)",
            ),
            (
                "listen: 127.0.0.1:1\nevery: \"x\" # soon\n",
                "every",
                "invalid type: string \"x\", expected u64: found `\"x\"` (line 2); give a value of the type named (see docs/reference/x.md)",
            ),
        ];
        for (text, field, want) in cases {
            let e = parse_yaml::<Doc>("x.yaml", text, DOC).unwrap_err();
            assert_eq!(e.file, "x.yaml");
            assert_eq!(e.field, field, "{text}");
            assert!(e.message.contains(want), "{text}: {e}");
            assert!(e.to_string().starts_with(&format!("x.yaml: {field}: ")));
        }
        let ok: Doc = parse_yaml("x.yaml", "listen: 127.0.0.1:9\n", DOC).unwrap();
        assert_eq!(ok.listen.port(), 9);
    }

    #[test]
    fn problems_refuse_the_whole_file_one_a_line() {
        let mut p = Problems::new("c.yaml");
        assert!(p.is_empty());
        p.push("a", "is wrong; fix a");
        p.check("b", Ok(()));
        p.check("c", Err("is wrong; fix c".into()));
        p.extend(ConfigError::new("other", "d", "is wrong; fix d"));
        let e = p.finish().unwrap_err();
        assert_eq!(
            e.to_string(),
            "c.yaml: 3 problems:\nc.yaml: a: is wrong; fix a\nc.yaml: c: is wrong; fix c\nc.yaml: d: is wrong; fix d"
        );
        assert_eq!(e.problems().count(), 3);
        assert!(Problems::new("c.yaml").finish().is_ok());
        let one = ConfigError::new("c.yaml", "a", "is wrong; fix a");
        assert_eq!(one.to_string(), "c.yaml: a: is wrong; fix a");
    }

    #[test]
    fn load_names_an_unreadable_file_and_resolves_paths() {
        let e = load_yaml::<Doc>(Path::new("/nonexistent/c.yaml"), DOC).unwrap_err();
        assert_eq!(e.field, "(file)");
        assert!(e
            .to_string()
            .starts_with("/nonexistent/c.yaml: (file): cannot read the config file"));
        assert!(e.message.ends_with("check the --config path"));
        let mut a = PathBuf::from("state");
        let mut b = PathBuf::from("/abs");
        resolve_paths(Path::new("/etc/crank"), [&mut a, &mut b]);
        assert_eq!(a, PathBuf::from("/etc/crank/state"));
        assert_eq!(b, PathBuf::from("/abs"));
    }
}
