//! `crankctl policy test`: run the `test_*` rules of `*_test.rego` files, as
//! `opa test` does. A test passes when its rule is defined and not `false`.

use std::time::{Duration, Instant};

use regorus::unstable::{Rule, RuleHead};
use regorus::Engine;

use crate::bundle::Bundle;
use crate::set::new_engine_with;
use crate::PolicyError;

#[derive(Debug, Clone, PartialEq)]
pub enum TestOutcome {
    Pass,
    /// The rule was false or undefined.
    Fail,
    /// Evaluating the rule failed.
    Error(String),
    /// A `todo_test_*` rule: listed, not run.
    Skip,
}

#[derive(Debug, Clone)]
pub struct TestResult {
    /// The test file, relative to the policy directory.
    pub file: String,
    /// The rule's full path, for example `data.crank.authz.test_media_allowed`.
    pub name: String,
    pub outcome: TestOutcome,
    pub elapsed: Duration,
}

/// Runs every test of a policy directory. `filter` keeps tests whose name
/// contains it. An error means the policies or tests did not compile.
pub fn run_tests(
    dir: &std::path::Path,
    filter: Option<&str>,
) -> Result<Vec<TestResult>, PolicyError> {
    let bundle = Bundle::read(dir)?;
    let mut engine = new_engine_with(&bundle, true)?;
    let mut results = Vec::new();
    for file in &bundle.tests {
        for (name, skip) in test_rules(&bundle, &file.name, &file.text)? {
            if filter.is_some_and(|f| !name.contains(f)) {
                continue;
            }
            let start = Instant::now();
            let outcome = if skip {
                TestOutcome::Skip
            } else {
                run_one(&mut engine, &name)
            };
            results.push(TestResult {
                file: file.name.clone(),
                name,
                outcome,
                elapsed: start.elapsed(),
            });
        }
    }
    Ok(results)
}

fn run_one(engine: &mut Engine, rule: &str) -> TestOutcome {
    engine.set_input(regorus::Value::new_object());
    match engine.eval_rule(rule.to_string()) {
        Ok(regorus::Value::Undefined) | Ok(regorus::Value::Bool(false)) => TestOutcome::Fail,
        Ok(_) => TestOutcome::Pass,
        Err(e) => TestOutcome::Error(crate::set::one_line(&e.to_string())),
    }
}

/// The `test_*` (and `todo_test_*`) rule paths a test module defines, in
/// source order, each once. Parsed on its own engine so that only this file's
/// rules are listed.
fn test_rules(bundle: &Bundle, name: &str, text: &str) -> Result<Vec<(String, bool)>, PolicyError> {
    let mut parser = Engine::new();
    parser
        .add_policy(
            bundle.dir.join(name).display().to_string(),
            text.to_string(),
        )
        .map_err(|e| PolicyError::Compile {
            file: name.to_string(),
            message: crate::diagnostics::point_at_the_gap(&e.to_string(), text),
        })?;
    let mut out: Vec<(String, bool)> = Vec::new();
    for module in parser.get_modules().iter() {
        let package =
            regorus::utils::get_path_string(&module.package.refr, Some("data")).map_err(|e| {
                PolicyError::Compile {
                    file: name.to_string(),
                    message: e.to_string(),
                }
            })?;
        for rule in &module.policy {
            let refr = match rule.as_ref() {
                Rule::Spec {
                    head: RuleHead::Compr { refr, .. },
                    ..
                } => refr,
                _ => continue,
            };
            let Ok(local) = regorus::utils::get_path_string(refr, None) else {
                continue;
            };
            let skip = local.starts_with("todo_test_");
            if !(local.starts_with("test_") || skip) {
                continue;
            }
            let full = format!("{package}.{local}");
            if !out.iter().any(|(n, _)| *n == full) {
                out.push((full, skip));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_fails_errors_and_skips_like_opa_test() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("authz.rego"),
            "package crank.authz\ndefault allow := false\nallow if input.user == \"alice\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("authz_test.rego"),
            r#"package crank.authz_test
import data.crank.authz
test_alice if authz.allow with input as {"user": "alice"}
test_bob_denied if not authz.allow with input as {"user": "bob"}
test_wrong if authz.allow with input as {"user": "bob"}
test_error if {
    x := 1 / 0
    x > 0
}
todo_test_later if false
helper := 1
"#,
        )
        .unwrap();
        let r = run_tests(dir.path(), None).unwrap();
        let by_name = |n: &str| {
            r.iter()
                .find(|t| t.name == format!("data.crank.authz_test.{n}"))
                .unwrap_or_else(|| panic!("{n} missing from {r:?}"))
                .outcome
                .clone()
        };
        assert_eq!(by_name("test_alice"), TestOutcome::Pass);
        assert_eq!(by_name("test_bob_denied"), TestOutcome::Pass);
        assert_eq!(by_name("test_wrong"), TestOutcome::Fail);
        assert_ne!(by_name("test_error"), TestOutcome::Pass);
        assert_eq!(by_name("todo_test_later"), TestOutcome::Skip);
        assert_eq!(r.len(), 5, "{r:?}");
        assert_eq!(run_tests(dir.path(), Some("alice")).unwrap().len(), 1);
    }
}
