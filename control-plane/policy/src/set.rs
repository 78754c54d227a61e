//! A compiled policy set and its evaluation.
//!
//! Compilation (parse, analysis, rule gathering) happens once per revision in
//! [`PolicySet::compile`]. Each thread then keeps its own clone of the
//! prepared engine for that revision, so the request path only sets the input
//! and evaluates: no parse, no lock, no allocation of the policy.

use std::cell::RefCell;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::program::Program;
use regorus::rvm::vm::RegoVM;
use regorus::utils::limits::ExecutionTimerConfig;
use regorus::{CompiledPolicy, Engine};
use serde_json::Value as Json;

use crate::bundle::Bundle;
use crate::cache::{Cache, Plan};
use crate::manifest::{EngineChoice, Entrypoints, FailureMode, Manifest, Mode};
use crate::PolicyError;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// How many compiled sets one thread keeps engines for (inbound, outbound,
/// and the previous revision of each during a reload).
const ENGINES_PER_THREAD: usize = 4;

thread_local! {
    static ENGINES: RefCell<Vec<(u64, Local, Cache)>> = const { RefCell::new(Vec::new()) };
}

/// How a set is evaluated.
enum Backend {
    /// regorus's register VM: the policy compiled to a program once.
    Vm {
        compiled: CompiledPolicy,
        program: Arc<Program>,
        data: regorus::Value,
        timer: ExecutionTimerConfig,
    },
    /// The tree-walking interpreter, for policies the VM cannot compile.
    Interpreter(Box<Mutex<Engine>>),
}

/// A thread's own evaluator for one set.
enum Local {
    Vm(Box<RegoVM>),
    Interpreter(Box<Engine>),
}

/// A compiled, ready-to-evaluate policy set.
pub struct PolicySet {
    id: u64,
    revision: String,
    manifest: Manifest,
    entrypoints: Entrypoints,
    files: Vec<String>,
    backend: Backend,
    /// Why the VM was not used, when it was not.
    vm_fallback: Option<String>,
    /// What the decision cache keys on, or why it is off.
    cache: Result<Plan, String>,
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet")
            .field("revision", &self.revision)
            .field("manifest", &self.manifest)
            .field("files", &self.files)
            .finish()
    }
}

/// The result class of one evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allow,
    Deny,
    /// The evaluation failed or timed out.
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::Error => "error",
        }
    }
}

/// One decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub outcome: Outcome,
    /// Why it was denied (the deny set's members, or a fixed explanation).
    pub reasons: Vec<String>,
    /// The evaluation error, when `outcome` is `Error`.
    pub error: Option<String>,
    pub elapsed: Duration,
    /// Whether the request goes on, after mode and failure mode.
    pub permitted: bool,
    /// Reused from the decision cache rather than evaluated.
    pub cached: bool,
}

impl PolicySet {
    /// Reads and compiles a policy directory.
    pub fn load(dir: &std::path::Path) -> Result<PolicySet, PolicyError> {
        PolicySet::compile(&Bundle::read(dir)?)
    }

    /// Compiles a bundle. Any error leaves nothing half-built: the caller keeps
    /// the set it had.
    pub fn compile(bundle: &Bundle) -> Result<PolicySet, PolicyError> {
        if bundle.modules.is_empty() {
            return Err(PolicyError::NoPolicies(bundle.dir.clone()));
        }
        let mut engine = new_engine(bundle)?;
        let timer = ExecutionTimerConfig {
            limit: bundle.manifest.timeout,
            check_interval: NonZeroU32::new(32).expect("non-zero"),
        };
        engine.set_execution_timer_config(timer);
        let entrypoints = prove_entrypoints(&mut engine, bundle)?;
        let entry_error = |e: &dyn std::fmt::Display| PolicyError::Entrypoint {
            rule: entrypoints.allow.clone(),
            message: one_line(&e.to_string()),
        };
        // One entry rule yields both values, so a deny set that `allow`
        // also reads (`allow if count(deny) == 0`) is computed once.
        engine
            .add_policy(ENTRY_FILE.into(), entry_module(&entrypoints))
            .map_err(|e| entry_error(&e))?;
        let compiled = engine
            .compile_with_entrypoint(&DECISION_RULE.into())
            .map_err(|e| entry_error(&e))?;
        engine.set_gather_prints(false);
        let (backend, vm_fallback) =
            choose_backend(bundle, engine, compiled, timer).map_err(|message| {
                PolicyError::Entrypoint {
                    rule: entrypoints.allow.clone(),
                    message,
                }
            })?;
        Ok(PolicySet {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            revision: bundle.revision.clone(),
            manifest: bundle.manifest.clone(),
            entrypoints,
            files: bundle.modules.iter().map(|m| m.name.clone()).collect(),
            backend,
            vm_fallback,
            cache: crate::cache::plan(
                bundle.modules.iter().map(|m| m.text.as_str()),
                bundle.manifest.input,
            ),
        })
    }

    pub fn revision(&self) -> &str {
        &self.revision
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn entrypoints(&self) -> &Entrypoints {
        &self.entrypoints
    }

    pub fn files(&self) -> &[String] {
        &self.files
    }

    /// `rvm` or `interpreter`.
    pub fn engine(&self) -> &'static str {
        match self.backend {
            Backend::Vm { .. } => "rvm",
            Backend::Interpreter(_) => "interpreter",
        }
    }

    /// Why the VM is not used for this set (`engine: auto` fell back).
    pub fn vm_fallback(&self) -> Option<&str> {
        self.vm_fallback.as_deref()
    }

    /// Evaluates one input document and applies mode and failure mode.
    pub fn decide(&self, input: &Json) -> Decision {
        self.decide_owned(input.clone())
    }

    /// [`PolicySet::decide`] without copying the input document.
    pub fn decide_owned(&self, input: Json) -> Decision {
        self.decide_value(regorus::Value::from(input))
    }

    /// The parts of the input this set provably reads, when the scan could
    /// tell (see [`crate::cache`]): the request path builds only those
    /// ([`crate::value::build_value_for`]).
    pub fn reads(&self) -> Option<&Plan> {
        self.cache.as_ref().ok()
    }

    /// Why the decision cache is off for this set, or `None` when it is on.
    pub fn cache_off(&self) -> Option<&str> {
        self.cache.as_ref().err().map(String::as_str)
    }

    /// [`PolicySet::decide`] on an input built as a regorus value (see
    /// [`crate::build_value`]). A decision already made on this thread for an
    /// input that agrees on everything the set reads is reused, where the
    /// set allows it (see [`crate::cache`]).
    pub fn decide_value(&self, value: regorus::Value) -> Decision {
        let start = Instant::now();
        let key = self.cache.as_ref().ok().map(|plan| plan.key(&value));
        let mut cached = false;
        let decided = self.with_local(|local, cache| {
            if let Some(hit) = key.as_ref().and_then(|k| cache.get(k)) {
                cached = true;
                return Ok(hit.clone());
            }
            let decided = self
                .evaluate(local, value)
                .and_then(|(a, d)| interpret(&self.entrypoints, &a, &d));
            if let (Some(k), Ok(d)) = (key, &decided) {
                cache.put(k, d.clone());
            }
            decided
        });
        Decision {
            cached,
            ..self.decision(decided, start.elapsed())
        }
    }

    /// Runs the entry rule on this thread's evaluator.
    fn evaluate(
        &self,
        local: &mut Local,
        value: regorus::Value,
    ) -> Result<(regorus::Value, regorus::Value), String> {
        let decision = match local {
            Local::Vm(vm) => {
                vm.set_input(value);
                vm.execute_entry_point_by_name(DECISION_RULE)
                    .map_err(|e| e.to_string())
            }
            Local::Interpreter(engine) => {
                engine.set_input(value);
                engine
                    .eval_rule(DECISION_RULE.to_string())
                    .map_err(|e| e.to_string())
            }
        }?;
        match decision.as_array() {
            Ok(pair) if pair.len() == 2 => Ok((pair[0].clone(), pair[1].clone())),
            _ => Err(format!(
                "the entry points did not evaluate ({} undefined?)",
                self.entrypoints.allow
            )),
        }
    }

    /// Applies mode and failure mode to what the entry points gave.
    fn decision(
        &self,
        decided: Result<(bool, Vec<String>), String>,
        elapsed: Duration,
    ) -> Decision {
        let (outcome, reasons, error) = match decided {
            Ok((true, _)) => (Outcome::Allow, Vec::new(), None),
            Ok((false, reasons)) => (Outcome::Deny, reasons, None),
            Err(e) => {
                let e = one_line(&e);
                (
                    Outcome::Error,
                    vec![format!("policy evaluation failed: {e}")],
                    Some(e),
                )
            }
        };
        let permitted = match (self.manifest.mode, outcome) {
            (Mode::Audit, _) | (_, Outcome::Allow) => true,
            (Mode::Enforce, Outcome::Deny) => false,
            (Mode::Enforce, Outcome::Error) => self.manifest.failure_mode == FailureMode::Open,
        };
        Decision {
            outcome,
            reasons,
            error,
            elapsed,
            permitted,
            cached: false,
        }
    }

    /// A fresh evaluator for this thread.
    fn new_local(&self) -> Local {
        match &self.backend {
            Backend::Vm {
                compiled,
                program,
                data,
                timer,
            } => {
                let mut vm = RegoVM::new_with_policy(compiled.clone());
                vm.load_program(program.clone());
                // Checked once in compile_vm; cannot fail here.
                let _ = vm.set_data(data.clone());
                vm.set_execution_timer_config(Some(*timer));
                Local::Vm(Box::new(vm))
            }
            Backend::Interpreter(template) => Local::Interpreter(Box::new(
                template.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            )),
        }
    }

    /// Runs `f` with this thread's evaluator for this set, made the first
    /// time a thread sees the set.
    fn with_local<R>(&self, f: impl FnOnce(&mut Local, &mut Cache) -> R) -> R {
        ENGINES.with(|cell| {
            let mut engines = cell.borrow_mut();
            let pos = match engines.iter().position(|(id, ..)| *id == self.id) {
                Some(pos) => pos,
                None => {
                    let engine = self.new_local();
                    if engines.len() >= ENGINES_PER_THREAD {
                        // The lowest id is the oldest revision.
                        let oldest = engines
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, (id, ..))| *id)
                            .map(|(i, _)| i)
                            .unwrap_or(0);
                        engines.swap_remove(oldest);
                    }
                    engines.push((self.id, engine, Cache::default()));
                    engines.len() - 1
                }
            };
            let (_, local, cache) = &mut engines[pos];
            f(local, cache)
        })
    }
}

/// Compiles the entry points into one VM program and checks the data
/// against it.
/// The entry points of the bundle (its manifest's, or the defaults for its
/// input), proven to exist: the engine is prepared now (analysis, rule
/// gathering; nothing is evaluated) so the first request pays nothing. The
/// default deny rule is optional: a policy may use allow only.
fn prove_entrypoints(engine: &mut Engine, bundle: &Bundle) -> Result<Entrypoints, PolicyError> {
    let explicit = bundle.manifest.entrypoints.is_some();
    let mut entrypoints = bundle
        .manifest
        .entrypoints
        .clone()
        .unwrap_or_else(|| Entrypoints::default_for(bundle.manifest.input));
    if let Err(e) = engine.compile_with_entrypoint(&entrypoints.allow.as_str().into()) {
        return Err(PolicyError::Entrypoint {
            rule: entrypoints.allow.clone(),
            message: one_line(&e.to_string()),
        });
    }
    if let Some(deny) = entrypoints.deny.clone() {
        if let Err(e) = engine.compile_with_entrypoint(&deny.as_str().into()) {
            if explicit {
                return Err(PolicyError::Entrypoint {
                    rule: deny,
                    message: one_line(&e.to_string()),
                });
            }
            entrypoints.deny = None;
        }
    }
    Ok(entrypoints)
}

/// The register VM when it compiles the policy (and the manifest does not
/// ask for the interpreter), else the interpreter with the VM's reason; an
/// `engine: rvm` that cannot compile is an error.
fn choose_backend(
    bundle: &Bundle,
    engine: Engine,
    compiled: CompiledPolicy,
    timer: ExecutionTimerConfig,
) -> Result<(Backend, Option<String>), String> {
    let data = regorus::Value::from(bundle.data.clone());
    let vm = match bundle.manifest.engine {
        EngineChoice::Interpreter => Err("engine: interpreter in policy.yaml".to_string()),
        _ => compile_vm(&compiled, &data),
    };
    match vm {
        Ok(program) => Ok((
            Backend::Vm {
                compiled,
                program,
                data,
                timer,
            },
            None,
        )),
        Err(e) if bundle.manifest.engine == EngineChoice::Rvm => Err(format!(
            "engine: rvm was asked for, but the VM cannot compile this policy: {e}"
        )),
        Err(e) => Ok((Backend::Interpreter(Box::new(Mutex::new(engine))), Some(e))),
    }
}

fn compile_vm(compiled: &CompiledPolicy, data: &regorus::Value) -> Result<Arc<Program>, String> {
    let program = Compiler::compile_from_policy(compiled, &[DECISION_RULE])
        .map_err(|e| one_line(&e.to_string()))?;
    let mut vm = RegoVM::new_with_policy(compiled.clone());
    vm.load_program(program.clone());
    vm.set_data(data.clone())
        .map_err(|e| one_line(&e.to_string()))?;
    Ok(program)
}

/// The module added to every set: `decision` is `[allow, deny]`.
const ENTRY_FILE: &str = "<crank decision entry>";
const DECISION_RULE: &str = "data.crank_decision_entry.decision";

fn entry_module(e: &Entrypoints) -> String {
    let deny = match &e.deny {
        Some(rule) => format!("deny_value := {rule}\n"),
        None => String::new(),
    };
    format!(
        "package crank_decision_entry\n\
         default allow_value := false\n\
         allow_value := {}\n\
         default deny_value := []\n\
         {deny}\
         decision := [allow_value, deny_value]\n",
        e.allow
    )
}

/// Builds an engine with every module and the data document of a bundle.
/// `with_tests` adds the `*_test.rego` modules too (for `crankctl policy test`).
pub(crate) fn new_engine_with(bundle: &Bundle, with_tests: bool) -> Result<Engine, PolicyError> {
    let mut engine = Engine::new();
    let tests = if with_tests { &bundle.tests[..] } else { &[] };
    for file in bundle.modules.iter().chain(tests) {
        engine
            .add_policy(
                bundle.dir.join(&file.name).display().to_string(),
                file.text.clone(),
            )
            .map_err(|e| PolicyError::Compile {
                file: file.name.clone(),
                message: crate::diagnostics::point_at_the_gap(&e.to_string(), &file.text),
            })?;
    }
    engine
        .add_data(regorus::Value::from(bundle.data.clone()))
        .map_err(|e| PolicyError::Data {
            path: bundle.dir.clone(),
            message: e.to_string(),
        })?;
    Ok(engine)
}

fn new_engine(bundle: &Bundle) -> Result<Engine, PolicyError> {
    new_engine_with(bundle, false)
}

/// Turns the entry points' values into (allowed, reasons). Pure.
fn interpret(
    entry: &Entrypoints,
    allow: &regorus::Value,
    deny: &regorus::Value,
) -> Result<(bool, Vec<String>), String> {
    let mut reasons = Vec::new();
    if !matches!(deny, regorus::Value::Undefined) {
        let json = to_json(deny);
        match json {
            Json::Array(items) => reasons.extend(items.iter().map(reason_text)),
            Json::Bool(false) | Json::Null => {}
            other => reasons.push(reason_text(&other)),
        }
    }
    let allowed = match allow {
        regorus::Value::Undefined => false,
        regorus::Value::Bool(b) => *b,
        other => match to_json(other) {
            // OPA-Envoy style: {"allowed": bool, "body": ..., "headers": ...}
            Json::Object(obj) => match obj.get("allowed") {
                Some(Json::Bool(b)) => {
                    if !b {
                        for key in ["reason", "reasons", "body"] {
                            match obj.get(key) {
                                Some(Json::Array(items)) => {
                                    reasons.extend(items.iter().map(reason_text))
                                }
                                Some(v @ Json::String(_)) => reasons.push(reason_text(v)),
                                _ => {}
                            }
                        }
                    }
                    *b
                }
                _ => {
                    return Err(format!(
                        "{} is an object without a boolean \"allowed\" field",
                        entry.allow
                    ))
                }
            },
            other => {
                return Err(format!(
                    "{} must be a boolean, but it is {}",
                    entry.allow,
                    type_name(&other)
                ))
            }
        },
    };
    if !reasons.is_empty() {
        return Ok((false, reasons));
    }
    if !allowed {
        reasons.push(format!("not allowed: {} is not true", entry.allow));
    }
    Ok((allowed, reasons))
}

fn to_json(v: &regorus::Value) -> Json {
    serde_json::to_value(v).unwrap_or(Json::Null)
}

fn reason_text(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Object(o) => match o.get("msg").or_else(|| o.get("reason")) {
            Some(Json::String(s)) => s.clone(),
            _ => v.to_string(),
        },
        other => other.to_string(),
    }
}

fn type_name(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array or set",
        Json::Object(_) => "an object",
    }
}

/// A multi-line regorus message (location, source line, caret) as one line.
pub(crate) fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Both evaluators must decide the same way.
    const ENGINES: [&str; 2] = ["rvm", "interpreter"];

    fn set_with(files: &[(&str, &str)], engine: &str) -> Result<PolicySet, PolicyError> {
        let dir = tempfile::tempdir().unwrap();
        let mut manifest = format!("engine: {engine}\n");
        for (name, text) in files {
            if *name == "policy.yaml" {
                manifest.push_str(text);
                continue;
            }
            let p = dir.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        std::fs::write(dir.path().join("policy.yaml"), manifest).unwrap();
        let set = PolicySet::load(dir.path())?;
        assert_eq!(set.engine(), engine, "{:?}", set.vm_fallback());
        Ok(set)
    }

    fn set(files: &[(&str, &str)]) -> Result<PolicySet, PolicyError> {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        PolicySet::load(dir.path())
    }

    #[test]
    fn auto_uses_the_vm_and_falls_back_to_the_interpreter() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.rego"), AUTHZ).unwrap();
        std::fs::write(dir.path().join("data.yaml"), "roles: {}").unwrap();
        // OPA's semantics unless the set asks for the VM.
        assert_eq!(PolicySet::load(dir.path()).unwrap().engine(), "interpreter");
        std::fs::write(dir.path().join("policy.yaml"), "engine: auto\n").unwrap();
        assert_eq!(PolicySet::load(dir.path()).unwrap().engine(), "rvm");
        // The VM refuses direct access to the data root; the interpreter runs it.
        std::fs::write(
            dir.path().join("b.rego"),
            "package crank.authz\ndeny contains \"x\" if object.get(data, \"nope\", false)\n",
        )
        .unwrap();
        let s = PolicySet::load(dir.path()).unwrap();
        assert_eq!(s.engine(), "interpreter");
        assert!(
            s.vm_fallback().unwrap().contains("data"),
            "{:?}",
            s.vm_fallback()
        );
        std::fs::write(dir.path().join("policy.yaml"), "engine: rvm\n").unwrap();
        let e = PolicySet::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("engine: rvm"), "{e}");
    }

    const AUTHZ: &str = r#"
package crank.authz
default allow := false
allow if count(deny) == 0
deny contains "method not allowed" if not input.request.method in {"GET", "POST"}
deny contains sprintf("tenant %s may not call %s", [input.source.tenant, input.destination.capability]) if {
    input.destination.capability == "transcode:v1"
    not "media" in data.roles[input.source.tenant]
}
"#;

    fn input(tenant: &str, method: &str) -> Json {
        json!({"source": {"tenant": tenant}, "destination": {"capability": "transcode:v1"},
               "request": {"method": method}})
    }

    #[test]
    fn allow_and_deny_with_reasons_from_the_deny_set() {
        for engine in ENGINES {
            let s = set_with(
                &[
                    ("authz.rego", AUTHZ),
                    ("data.yaml", "roles: {acme: [media], evil: []}"),
                ],
                engine,
            )
            .unwrap();
            let d = s.decide(&input("acme", "GET"));
            assert_eq!((d.outcome, d.permitted), (Outcome::Allow, true), "{d:?}");
            let d = s.decide(&input("evil", "DELETE"));
            assert_eq!((d.outcome, d.permitted), (Outcome::Deny, false));
            assert_eq!(
                d.reasons,
                vec![
                    "method not allowed",
                    "tenant evil may not call transcode:v1"
                ]
            );
            // The engine cache must not leak one input's result into the next.
            assert_eq!(s.decide(&input("acme", "POST")).outcome, Outcome::Allow);
        }
    }

    #[test]
    fn audit_mode_permits_a_denial_but_reports_it() {
        for engine in ENGINES {
            let s = set_with(
                &[
                    ("authz.rego", AUTHZ),
                    ("data.yaml", "roles: {}"),
                    ("policy.yaml", "mode: audit"),
                ],
                engine,
            )
            .unwrap();
            let d = s.decide(&input("evil", "GET"));
            assert_eq!((d.outcome, d.permitted), (Outcome::Deny, true));
        }
    }

    const CONFLICT: &str = r#"
package crank.authz
default allow := false
allow if input.request.method == "GET"
# Two values for one complete rule is an evaluation error in Rego.
size := 1 if input.request.path == "/boom"
size := 2 if input.request.path == "/boom"
allow if size > 0
"#;

    #[test]
    fn an_evaluation_error_fails_closed_unless_configured_open() {
        // Conflicting values for one complete rule are an evaluation error in
        // OPA and in regorus's interpreter. The RVM (0.14) takes one value
        // instead: a known difference, documented in the security guide.
        let engine = "interpreter";
        let s = set_with(&[("authz.rego", CONFLICT)], engine).unwrap();
        let boom = json!({"request": {"method": "GET", "path": "/boom"}});
        let d = s.decide(&boom);
        assert_eq!((d.outcome, d.permitted), (Outcome::Error, false), "{d:?}");
        assert!(d.error.is_some());
        let ok = s.decide(&json!({"request": {"method": "GET", "path": "/"}}));
        assert_eq!(ok.outcome, Outcome::Allow);

        let s = set_with(
            &[
                ("authz.rego", CONFLICT),
                ("policy.yaml", "failure_mode: open"),
            ],
            engine,
        )
        .unwrap();
        let d = s.decide(&boom);
        assert_eq!((d.outcome, d.permitted), (Outcome::Error, true));
    }

    #[test]
    fn a_slow_policy_times_out_and_counts_as_an_error() {
        for engine in ENGINES {
            let slow = r#"
package crank.authz
default allow := false
allow if count([x | some x in numbers.range(1, 3000000); x % 7 == 0]) > 0
"#;
            let s = set_with(
                &[("authz.rego", slow), ("policy.yaml", "timeout: 5ms")],
                engine,
            );
            let s = s.unwrap();
            let d = s.decide(&json!({}));
            assert_eq!(d.outcome, Outcome::Error, "{d:?}");
            assert!(!d.permitted);
            assert!(d.error.unwrap().contains("time limit"));

            let s = set_with(
                &[
                    ("authz.rego", slow),
                    ("policy.yaml", "timeout: 5ms\nfailure_mode: open"),
                ],
                engine,
            )
            .unwrap();
            let d = s.decide(&json!({}));
            assert_eq!((d.outcome, d.permitted), (Outcome::Error, true));
        }
    }

    #[test]
    fn compile_errors_name_the_file_and_line() {
        let e = set(&[(
            "authz.rego",
            "package crank.authz\nallow if {\n input.x ==\n}\n",
        )])
        .unwrap_err()
        .to_string();
        // The mistake is the dangling `==` on line 3, not the `}` on line 4.
        assert!(e.contains("authz.rego:3:12\n"), "{e}");
        assert!(e.contains("3 |  input.x =="), "{e}");
        assert!(!e.contains(":4:"), "{e}");
    }

    #[test]
    fn a_missing_entrypoint_is_rejected() {
        let e = set(&[("a.rego", "package other\nallow := true\n")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.crank.authz.allow"), "{e}");
        let e = set(&[]).unwrap_err().to_string();
        assert!(e.contains("no .rego"), "{e}");
    }

    #[test]
    fn envoy_shape_accepts_an_object_result() {
        for engine in ENGINES {
            let s = set_with(
                &[
                    (
                        "envoy.rego",
                        r#"
package envoy.authz
default allow := {"allowed": false, "body": "only GET"}
allow := {"allowed": true} if input.attributes.request.http.method == "GET"
"#,
                    ),
                    ("policy.yaml", "input: envoy"),
                ],
                engine,
            )
            .unwrap();
            let get = json!({"attributes": {"request": {"http": {"method": "GET"}}}});
            let post = json!({"attributes": {"request": {"http": {"method": "POST"}}}});
            assert_eq!(s.decide(&get).outcome, Outcome::Allow);
            let d = s.decide(&post);
            assert_eq!(d.outcome, Outcome::Deny);
            assert_eq!(d.reasons, vec!["only GET"]);
        }
    }

    #[test]
    fn policy_set_is_shared_across_threads() {
        for engine in ENGINES {
            fn assert_send_sync<T: Send + Sync>() {}
            assert_send_sync::<PolicySet>();
            let s = std::sync::Arc::new(
                set_with(
                    &[
                        ("authz.rego", AUTHZ),
                        ("data.yaml", "roles: {acme: [media]}"),
                    ],
                    engine,
                )
                .unwrap(),
            );
            let handles: Vec<_> = (0..4)
                .map(|i| {
                    let s = s.clone();
                    std::thread::spawn(move || {
                        let tenant = if i % 2 == 0 { "acme" } else { "evil" };
                        (0..50)
                            .map(|_| s.decide(&input(tenant, "GET")).outcome)
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for (i, h) in handles.into_iter().enumerate() {
                let want = if i % 2 == 0 {
                    Outcome::Allow
                } else {
                    Outcome::Deny
                };
                assert!(h.join().unwrap().iter().all(|o| *o == want));
            }
        }
    }

    #[test]
    fn the_decision_cache_reuses_a_decision_only_where_that_is_safe() {
        let files = [
            ("authz.rego", AUTHZ),
            ("data.yaml", "roles: {acme: [media], evil: []}"),
        ];
        let s = set_with(&files, "rvm").unwrap();
        assert_eq!(s.cache_off(), None);
        // Inputs that differ only where the set does not look (the path)
        // share a decision; a difference it reads gives its own.
        let mut seen = Vec::new();
        for i in 0..40 {
            let tenant = ["acme", "evil"][i % 2];
            let method = ["GET", "DELETE"][(i / 2) % 2];
            let mut doc = input(tenant, method);
            doc["request"]["path"] = json!(format!("/{i}"));
            let cached = s.decide(&doc);
            // Evaluated afresh by a new set on its own thread (a new set on
            // this thread would push `s`'s evaluator and cache out).
            let fresh = std::thread::scope(|t| {
                t.spawn(|| set_with(&files, "rvm").unwrap().decide(&doc))
                    .join()
                    .unwrap()
            });
            assert_eq!(
                (cached.outcome, &cached.reasons, cached.permitted),
                (fresh.outcome, &fresh.reasons, fresh.permitted),
                "{doc}"
            );
            // Four distinct (tenant, method) pairs: the rest are hits.
            assert_eq!(cached.cached, i >= 4, "request {i}");
            seen.push(cached.outcome);
        }
        assert!(seen.contains(&Outcome::Allow) && seen.contains(&Outcome::Deny));

        // A set that reads the clock never uses the cache.
        let clock = "package crank.authz\ndefault allow := false\nallow if time.now_ns() > 0\n";
        let s = set_with(&[("authz.rego", clock)], "rvm").unwrap();
        assert!(
            s.cache_off().unwrap().contains("time."),
            "{:?}",
            s.cache_off()
        );
        let reads_time = "package crank.authz\nallow if input.time.unix_ns > 5\n";
        let s = set_with(&[("authz.rego", reads_time)], "rvm").unwrap();
        assert!(s.cache_off().is_some());
        assert!(!s.decide(&json!({"time": {"unix_ns": 9}})).cached);
        assert_eq!(
            s.decide(&json!({"time": {"unix_ns": 9}})).outcome,
            Outcome::Allow
        );
        assert_eq!(
            s.decide(&json!({"time": {"unix_ns": 1}})).outcome,
            Outcome::Deny
        );
    }

    #[test]
    fn a_new_revision_starts_with_an_empty_cache() {
        let dir = tempfile::tempdir().unwrap();
        let rule =
            |m: &str| format!("package crank.authz\nallow if input.request.method == \"{m}\"\n");
        std::fs::write(dir.path().join("policy.yaml"), "engine: rvm\n").unwrap();
        std::fs::write(dir.path().join("a.rego"), rule("GET")).unwrap();
        let old = PolicySet::load(dir.path()).unwrap();
        let get = input("acme", "GET");
        assert_eq!(old.decide(&get).outcome, Outcome::Allow);
        // The reload: same input, same thread, the new rule decides.
        std::fs::write(dir.path().join("a.rego"), rule("POST")).unwrap();
        let new = PolicySet::load(dir.path()).unwrap();
        assert_eq!(new.cache_off(), None);
        assert_eq!(new.decide(&get).outcome, Outcome::Deny);
        assert_eq!(old.decide(&get).outcome, Outcome::Allow);
    }

    #[test]
    fn the_shipped_set_may_use_the_cache() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
        let s = PolicySet::load(&dir).unwrap();
        assert_eq!(s.cache_off(), None);
    }
}
