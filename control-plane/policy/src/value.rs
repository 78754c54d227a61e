//! The crank input document built straight into regorus values, with no
//! JSON document in between: the JSON detour (build a `serde_json::Value`,
//! then deserialise it into a `regorus::Value`) was a third of the policy's
//! cost per request. Object keys are made once per process and shared.
//!
//! [`build_value`] gives the same document as [`crate::input::build`]; the
//! tests below compare the two.

use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::{Duration, UNIX_EPOCH};

use regorus::value::Object;
use regorus::Value;

use crate::cache::Plan;
use crate::input::{parse_path, split_path, RequestFacts, Workload};
use crate::manifest::{InputShape, Manifest};

macro_rules! keys {
    ($($name:ident),* $(,)?) => {
        /// Every key of the crank shape, made once.
        #[allow(non_snake_case)]
        struct Keys { $($name: Value),* }
        static KEYS: LazyLock<Keys> = LazyLock::new(|| Keys {
            $($name: Value::from(stringify!($name))),*
        });
    };
}

keys!(
    source,
    destination,
    request,
    time,
    spiffe_id,
    service,
    tenant,
    trust_domain,
    address,
    capability,
    route,
    direction,
    method,
    path,
    raw_path,
    parsed_path,
    query,
    host,
    scheme,
    protocol,
    headers,
    body_size,
    unix_ns,
    rfc3339,
);

/// The input document for a policy set's manifest, as a regorus value.
pub fn build_value(facts: &RequestFacts, manifest: &Manifest) -> Value {
    build_value_for(facts, manifest, None)
}

/// [`build_value`], with only the parts `reads` names when it is given
/// ([`crate::PolicySet::reads`]): a set whose modules provably read
/// nothing else cannot tell the difference, and the request path skips
/// building (and dropping) the parsed path, the query, the headers and the
/// time it does not read.
pub fn build_value_for(facts: &RequestFacts, manifest: &Manifest, reads: Option<&Plan>) -> Value {
    match manifest.input {
        InputShape::Crank => crank(facts, &manifest.headers, reads),
        InputShape::Envoy => Value::from(crate::input::build(facts, manifest)),
    }
}

/// One object of the input, each field built only when wanted.
struct Obj<'a> {
    o: Object,
    /// The top-level key this object sits under, or "" for the root.
    at: &'static str,
    reads: Option<&'a Plan>,
}

impl<'a> Obj<'a> {
    fn new(at: &'static str, reads: Option<&'a Plan>) -> Obj<'a> {
        Obj {
            o: Object::new(),
            at,
            reads,
        }
    }

    fn put(&mut self, k: &Value, v: impl FnOnce() -> Value) {
        let wanted = self.reads.is_none_or(|p| {
            let name = k.as_string().map(|s| s.as_ref()).unwrap_or("");
            match self.at {
                "" => p.wants(&[name]),
                at => p.wants(&[at, name]),
            }
        });
        if wanted {
            self.o.insert(k.clone(), v());
        }
    }

    fn done(self) -> Value {
        self.o.into_value()
    }
}

fn opt_str(s: Option<&str>) -> Value {
    s.map_or(Value::Null, Value::from)
}

fn crank(f: &RequestFacts, wanted: &[String], reads: Option<&Plan>) -> Value {
    let k = &*KEYS;
    let mut root = Obj::new("", reads);
    root.put(&k.source, || {
        f.source
            .as_ref()
            .map_or(Value::Null, |s| workload(s, f.source_address, reads))
    });
    root.put(&k.destination, || {
        let mut d = Obj::new("destination", reads);
        d.put(&k.spiffe_id, || f.destination.spiffe_id.as_str().into());
        d.put(&k.service, || f.destination.service.as_str().into());
        d.put(&k.tenant, || f.destination.tenant.as_str().into());
        d.put(&k.trust_domain, || {
            f.destination.trust_domain.as_str().into()
        });
        d.put(&k.capability, || opt_str(f.capability.as_deref()));
        d.put(&k.route, || opt_str(f.route.as_deref()));
        d.put(&k.direction, || f.direction.into());
        d.done()
    });
    root.put(&k.request, || request(f, wanted, reads));
    root.put(&k.time, || {
        let since = f.time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        let mut t = Obj::new("time", reads);
        t.put(&k.unix_ns, || Value::from(since.as_nanos() as u64));
        t.put(&k.rfc3339, || {
            Value::from(humantime::format_rfc3339_seconds(f.time).to_string())
        });
        t.done()
    });
    root.done()
}

fn request(f: &RequestFacts, wanted: &[String], reads: Option<&Plan>) -> Value {
    let k = &*KEYS;
    let (path, query) = split_path(&f.path_and_query);
    let mut r = Obj::new("request", reads);
    r.put(&k.method, || f.method.as_str().into());
    r.put(&k.path, || path.into());
    r.put(&k.raw_path, || f.path_and_query.as_str().into());
    r.put(&k.parsed_path, || {
        Value::from(
            parse_path(path)
                .into_iter()
                .map(Value::from)
                .collect::<Vec<_>>(),
        )
    });
    r.put(&k.query, || parse_query(query));
    r.put(&k.host, || opt_str(f.host.as_deref()));
    r.put(&k.scheme, || f.scheme.as_str().into());
    r.put(&k.protocol, || f.protocol.as_str().into());
    r.put(&k.headers, || headers(f, wanted));
    r.put(&k.body_size, || {
        f.body_size.map_or(Value::Null, Value::from)
    });
    r.done()
}

fn workload(w: &Workload, addr: Option<SocketAddr>, reads: Option<&Plan>) -> Value {
    let k = &*KEYS;
    let mut o = Obj::new("source", reads);
    o.put(&k.spiffe_id, || w.spiffe_id.as_str().into());
    o.put(&k.service, || w.service.as_str().into());
    o.put(&k.tenant, || w.tenant.as_str().into());
    o.put(&k.trust_domain, || w.trust_domain.as_str().into());
    o.put(&k.address, || {
        addr.map_or(Value::Null, |a| Value::from(a.to_string()))
    });
    o.done()
}

/// The selected headers as one object, repeats joined with ", ".
fn headers(f: &RequestFacts, wanted: &[String]) -> Value {
    let all = wanted.iter().any(|h| h == "*");
    let mut joined: Vec<(String, String)> = Vec::new();
    for (k, v) in &f.headers {
        if !(all || wanted.iter().any(|w| w.eq_ignore_ascii_case(k))) {
            continue;
        }
        let k = k.to_ascii_lowercase();
        match joined.iter_mut().find(|(name, _)| *name == k) {
            Some((_, existing)) => {
                existing.push_str(", ");
                existing.push_str(v);
            }
            None => joined.push((k, v.clone())),
        }
    }
    let mut o = Object::new();
    for (k, v) in joined {
        o.insert(Value::from(k), Value::from(v));
    }
    o.into_value()
}

/// `a=1&a=2&b` → `{"a": ["1", "2"], "b": [""]}`.
fn parse_query(query: &str) -> Value {
    let mut pairs: Vec<(String, Vec<Value>)> = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let v = Value::from(v.as_ref());
        match pairs.iter_mut().find(|(name, _)| name.as_str() == k) {
            Some((_, values)) => values.push(v),
            None => pairs.push((k.into_owned(), vec![v])),
        }
    }
    let mut o = Object::new();
    for (k, values) in pairs {
        o.insert(Value::from(k), Value::from(values));
    }
    o.into_value()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{build, tests::facts};

    fn same(m: &Manifest, f: &RequestFacts) {
        assert_eq!(build_value(f, m), Value::from(build(f, m)));
    }

    #[test]
    fn the_direct_build_equals_the_json_document() {
        let mut f = facts();
        for headers in [vec![], vec!["*".to_string()], vec!["X-Tag".to_string()]] {
            let m = Manifest {
                headers,
                ..Manifest::default()
            };
            same(&m, &f);
        }
        f.source = None;
        f.body_size = None;
        f.host = None;
        f.path_and_query = "/".into();
        same(&Manifest::default(), &f);
        f.path_and_query = "/a?x&x=1&y=%20".into();
        same(&Manifest::default(), &f);
        let envoy = Manifest {
            input: InputShape::Envoy,
            ..Manifest::default()
        };
        same(&envoy, &facts());
    }

    /// The shipped set decides the same on the input cut down to what it
    /// reads as on the whole input (evaluated by a copy of the set with the
    /// cache off, so that every decision is a fresh evaluation).
    #[test]
    fn the_shipped_set_decides_the_same_on_the_parts_it_reads() {
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
        let dir = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(&shipped).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
            }
        }
        let cut = crate::PolicySet::load(dir.path()).unwrap();
        let plan = cut
            .reads()
            .expect("the shipped set reads fixed paths")
            .clone();
        std::fs::write(
            dir.path().join("clock.rego"),
            "package crank.clock\nnow := time.now_ns()\n",
        )
        .unwrap();
        let whole = crate::PolicySet::load(dir.path()).unwrap();
        assert!(whole.cache_off().is_some());
        let m = cut.manifest().clone();
        let mut seen = std::collections::BTreeSet::new();
        for (i, method) in ["GET", "DELETE", "POST"].into_iter().enumerate() {
            for tenant in ["acme", "media", "evil"] {
                for cap in [None, Some("transcode:v1"), Some("thumbnail:v1")] {
                    let mut f = facts();
                    f.method = method.into();
                    f.source.as_mut().unwrap().tenant = tenant.into();
                    f.capability = cap.map(Into::into);
                    f.body_size = [None, Some(10), Some(1 << 40)][i];
                    if tenant == "evil" && method == "POST" {
                        f.source = None;
                    }
                    let small = build_value_for(&f, &m, Some(&plan));
                    assert!(small != build_value(&f, &m), "the cut input is smaller");
                    let a = cut.decide_value(small);
                    let b = whole.decide_value(build_value(&f, &m));
                    assert_eq!((a.outcome, &a.reasons), (b.outcome, &b.reasons), "{f:?}");
                    seen.insert(format!("{:?}", a.outcome));
                }
            }
        }
        assert!(seen.len() >= 2, "both allow and deny are covered: {seen:?}");
    }
}
