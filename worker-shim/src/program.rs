//! Finding the worker's program before anything runs: a `command` whose
//! program is missing would otherwise pass `--check`, let the shim report
//! ready, and then fail every job (or every worker start) as `internal`.
//!
//! The rules are the ones the child's `exec` follows: a program with a `/` is
//! a path (a relative one is relative to the config file's directory, like
//! every other path in the config, so what is checked is what runs); a bare
//! name is looked up in the `PATH` the child gets, which is `env.PATH` from
//! the config when set, else the shim's own.

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What `execvp` searches when `PATH` is not set at all (glibc's default).
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// Resolves `program` to the file that would run, or says why none would.
///
/// `base` is the config file's directory; `path_env` the child's `PATH`
/// (`None`: unset); `env_field` the config field that sets the child's
/// environment (`exec.env`, `serve.env`), named in the fix.
pub fn resolve(
    program: &str,
    base: &Path,
    path_env: Option<&OsStr>,
    env_field: &str,
) -> Result<PathBuf, String> {
    if program.contains('/') {
        let path = base.join(program);
        return match check_executable(&path) {
            Ok(()) => Ok(path),
            Err(why) => Err(format!(
                "the program {program:?} ({}) {why}",
                path.display()
            )),
        };
    }
    let searched: OsString = path_env.map_or_else(|| DEFAULT_PATH.into(), OsStr::to_os_string);
    let mut found_not_executable = None;
    for dir in std::env::split_paths(&searched) {
        if dir.as_os_str().is_empty() {
            continue; // an empty entry means the child's cwd, a job dir: never the tool
        }
        let candidate = dir.join(program);
        match check_executable(&candidate) {
            Ok(()) => return Ok(PathBuf::from(program)),
            Err(Why::NotExecutable) if found_not_executable.is_none() => {
                found_not_executable = Some(candidate)
            }
            Err(_) => {}
        }
    }
    let searched = searched.to_string_lossy();
    let which = if path_env.is_some() {
        "PATH"
    } else {
        "PATH (unset, so the default)"
    };
    Err(match found_not_executable {
        Some(file) => format!(
            "the program {program:?} is not executable: {} is on the {which} {searched:?} but \
             lacks execute permission; make it executable (chmod +x) or give the path of the \
             right program",
            file.display()
        ),
        None => format!(
            "the program {program:?} is not found on the {which} {searched:?}; install it, fix \
             the name, give its absolute path, or add its directory to PATH (the shim's \
             environment, or {env_field}.PATH)"
        ),
    })
}

/// Why a path cannot be run.
#[derive(Debug, PartialEq, Eq)]
enum Why {
    Missing,
    NotAFile,
    NotExecutable,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Why::Missing => "does not exist; fix the path or install the program there",
            Why::NotAFile => "is not a file; give the path of the program itself",
            Why::NotExecutable => "is not executable; make it executable (chmod +x)",
        })
    }
}

fn check_executable(path: &Path) -> Result<(), Why> {
    let meta = std::fs::metadata(path).map_err(|_| Why::Missing)?;
    if !meta.is_file() {
        return Err(Why::NotAFile);
    }
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return Err(Why::Missing);
    };
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    if unsafe { libc::access(c.as_ptr(), libc::X_OK) } != 0 {
        return Err(Why::NotExecutable);
    }
    Ok(())
}

/// The `PATH` a child with `env` on top of the shim's environment gets.
pub fn child_path(env: &std::collections::BTreeMap<String, String>) -> Option<OsString> {
    match env.get("PATH") {
        Some(p) => Some(p.into()),
        None => std::env::var_os("PATH"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn names_are_looked_up_on_the_childs_path_and_paths_must_run() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        file(&bin, "tool", 0o755);
        file(&bin, "plain", 0o644);
        file(tmp.path(), "local", 0o755);
        let path = std::env::join_paths([Path::new("/nonexistent"), &bin]).unwrap();
        let p = Some(path.as_os_str());
        let base = tmp.path();

        // (program, Ok(resolved) or a piece of the error)
        let cases: Vec<(&str, Result<PathBuf, &str>)> = vec![
            ("tool", Ok(PathBuf::from("tool"))),
            ("nosuchtool", Err("is not found on the PATH")),
            ("plain", Err("lacks execute permission")),
            ("./local", Ok(base.join("./local"))),
            ("local", Err("is not found")),
            ("bin/tool", Ok(base.join("bin/tool"))),
            ("bin/missing", Err("does not exist")),
            ("bin/plain", Err("is not executable")),
            ("bin", Err("is not found")),
            ("./bin", Err("is not a file")),
        ];
        for (program, want) in cases {
            let got = resolve(program, base, p, "exec.env");
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w, "{program}"),
                (Err(e), Err(w)) => {
                    assert!(e.contains(w), "{program}: {e}");
                    assert!(e.contains(&format!("{program:?}")), "names it: {e}");
                }
                (got, want) => panic!("{program}: got {got:?}, want {want:?}"),
            }
        }
        let abs = base.join("local");
        assert_eq!(
            resolve(
                abs.to_str().unwrap(),
                Path::new("/elsewhere"),
                p,
                "exec.env"
            ),
            Ok(abs)
        );
    }

    #[test]
    fn the_error_names_the_path_searched_and_the_fix() {
        let e = resolve(
            "ffmpge",
            Path::new("/"),
            Some(OsStr::new("/a:/b")),
            "exec.env",
        )
        .unwrap_err();
        assert!(e.contains("\"ffmpge\""), "{e}");
        assert!(e.contains("\"/a:/b\""), "{e}");
        assert!(e.contains("exec.env.PATH"), "{e}");
        assert!(e.contains("absolute path"), "{e}");
        let e = resolve("ffmpge", Path::new("/"), None, "serve.env").unwrap_err();
        assert!(e.contains("unset") && e.contains(DEFAULT_PATH), "{e}");
    }
}
