//! Reading a policy directory: `.rego` modules, `*_test.rego` tests,
//! `data.json` / `data.yaml` documents and the optional `policy.yaml`.

use std::path::{Path, PathBuf};

use crate::manifest::{Manifest, MANIFEST_FILE};
use crate::PolicyError;

/// One source file, named by its path relative to the policy directory.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceFile {
    pub name: String,
    pub text: String,
}

/// Everything a policy directory holds, read at one moment.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// Policy modules (not tests), sorted by name.
    pub modules: Vec<SourceFile>,
    /// `*_test.rego` modules, sorted by name.
    pub tests: Vec<SourceFile>,
    /// The data document: `data.json`/`data.yaml` files merged at the path
    /// of their directory, as in OPA bundles (`roles/data.yaml` → `data.roles`).
    pub data: serde_json::Value,
    /// Content hash of every file read: the policy revision.
    pub revision: String,
}

impl Bundle {
    pub fn manifest_ref(&self) -> &Manifest {
        &self.manifest
    }

    pub fn read(dir: &Path) -> Result<Bundle, PolicyError> {
        let meta = std::fs::metadata(dir).map_err(|e| PolicyError::Io {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?;
        if !meta.is_dir() {
            return Err(PolicyError::NotADirectory(dir.to_path_buf()));
        }
        let mut files = Vec::new();
        walk(dir, dir, &mut files)?;
        files.sort();

        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        let mut modules = Vec::new();
        let mut tests = Vec::new();
        let mut data = serde_json::Value::Object(Default::default());
        let mut manifest = Manifest::default();
        for rel in files {
            let path = dir.join(&rel);
            let text = std::fs::read_to_string(&path).map_err(|e| PolicyError::Io {
                path: path.clone(),
                message: e.to_string(),
            })?;
            hash.update(rel.as_bytes());
            hash.update(&[0]);
            hash.update(text.as_bytes());
            hash.update(&[0]);
            let file_name = rel.rsplit('/').next().unwrap_or(&rel);
            if rel == MANIFEST_FILE {
                manifest = parse_manifest(&path, &text)?;
            } else if file_name.ends_with("_test.rego") {
                tests.push(SourceFile { name: rel, text });
            } else if file_name.ends_with(".rego") {
                modules.push(SourceFile { name: rel, text });
            } else {
                merge_data(&mut data, &path, &rel, file_name, &text)?;
            }
        }
        let digest = hash.finish();
        let revision = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Bundle {
            dir: dir.to_path_buf(),
            manifest,
            modules,
            tests,
            data,
            revision,
        })
    }
}

/// Merges a data file (`data.json`, or YAML) into `data` at the path of its
/// folder.
fn merge_data(
    data: &mut serde_json::Value,
    path: &Path,
    rel: &str,
    file_name: &str,
    text: &str,
) -> Result<(), PolicyError> {
    let bad = |message: String| PolicyError::Data {
        path: path.to_path_buf(),
        message,
    };
    let doc: serde_json::Value = match file_name {
        "data.json" => serde_json::from_str(text).map_err(|e| bad(e.to_string()))?,
        _ => serde_yaml::from_str(text).map_err(|e| bad(e.to_string()))?,
    };
    let prefix: Vec<&str> = match rel.rfind('/') {
        Some(i) => rel[..i].split('/').collect(),
        None => Vec::new(),
    };
    merge_at(data, &prefix, doc).map_err(bad)
}

/// Collects relative paths of the files a bundle uses; hidden entries are
/// skipped (editors' swap files, `.git`).
fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), PolicyError> {
    let entries = std::fs::read_dir(dir).map_err(|e| PolicyError::Io {
        path: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    for entry in entries {
        let entry = entry.map_err(|e| PolicyError::Io {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            walk(root, &path, out)?;
            continue;
        }
        let wanted = name.ends_with(".rego")
            || matches!(name.as_str(), "data.json" | "data.yaml" | "data.yml")
            || (dir == root && name == MANIFEST_FILE);
        if wanted {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            out.push(rel);
        }
    }
    Ok(())
}

fn parse_manifest(path: &Path, text: &str) -> Result<Manifest, PolicyError> {
    if text.trim().is_empty() {
        return Ok(Manifest::default());
    }
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        PolicyError::Manifest {
            path: path.to_path_buf(),
            field: if field == "." { String::new() } else { field },
            message: e.inner().to_string(),
        }
    })
}

/// Merges `doc` into `data` under `prefix`. Two files may not both set the
/// same leaf: that is ambiguous, so it is an error, as in OPA.
fn merge_at(
    data: &mut serde_json::Value,
    prefix: &[&str],
    doc: serde_json::Value,
) -> Result<(), String> {
    let mut node = data;
    for key in prefix {
        let obj = node
            .as_object_mut()
            .ok_or_else(|| format!("data path {key} is not an object"))?;
        node = obj
            .entry(key.to_string())
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
    }
    merge(node, doc, &prefix.join("."))
}

fn merge(into: &mut serde_json::Value, doc: serde_json::Value, at: &str) -> Result<(), String> {
    match (into, doc) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                match a.get_mut(&k) {
                    Some(existing) => merge(existing, v, &path)?,
                    None => {
                        a.insert(k, v);
                    }
                }
            }
            Ok(())
        }
        (serde_json::Value::Object(a), serde_json::Value::Null) if a.is_empty() => Ok(()),
        (_, _) => Err(format!(
            "data.{at} is set by more than one data file (or is not an object); \
             keep each key in one file"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_files_merge_at_their_directory_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("data.yaml"), "shared: [public]\n").unwrap();
        std::fs::create_dir(dir.path().join("roles")).unwrap();
        std::fs::write(dir.path().join("roles/data.json"), r#"{"acme": ["media"]}"#).unwrap();
        std::fs::write(dir.path().join("a.rego"), "package a\n").unwrap();
        std::fs::write(dir.path().join("a_test.rego"), "package a\n").unwrap();
        std::fs::write(dir.path().join("README.md"), "ignored").unwrap();
        let b = Bundle::read(dir.path()).unwrap();
        assert_eq!(
            b.data,
            serde_json::json!({"shared": ["public"], "roles": {"acme": ["media"]}})
        );
        assert_eq!(b.modules.len(), 1);
        assert_eq!(b.tests.len(), 1);
        assert_eq!(b.revision.len(), 16);
    }

    #[test]
    fn revision_changes_with_any_file_and_not_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.rego"), "package a\n").unwrap();
        let r1 = Bundle::read(dir.path()).unwrap().revision;
        assert_eq!(r1, Bundle::read(dir.path()).unwrap().revision);
        std::fs::write(dir.path().join("policy.yaml"), "mode: audit\n").unwrap();
        let b = Bundle::read(dir.path()).unwrap();
        assert_ne!(r1, b.revision);
        assert_eq!(b.manifest.mode, crate::Mode::Audit);
    }

    #[test]
    fn conflicting_data_is_an_error_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("data.yaml"), "roles: {acme: [a]}\n").unwrap();
        std::fs::create_dir(dir.path().join("roles")).unwrap();
        std::fs::write(dir.path().join("roles/data.yaml"), "acme: [b]\n").unwrap();
        let e = Bundle::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("data.roles.acme"), "{e}");
    }

    #[test]
    fn manifest_errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("policy.yaml"), "mode: enforced\n").unwrap();
        let e = Bundle::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("policy.yaml") && e.contains("mode"), "{e}");
    }
}
