//! Reading a GitLab CI file the way GitLab does, as far as the pipeline checks need it: jobs with
//! their `extends` applied, `variables:` defaults, script lines with continuations joined, and
//! `rules:`.

use serde_yaml::{Mapping, Value};
use std::collections::BTreeMap;

/// Top-level keys that are not jobs.
pub(super) const GLOBAL_KEYS: [&str; 11] = [
    "stages",
    "variables",
    "default",
    "workflow",
    "include",
    "spec",
    "image",
    "services",
    "cache",
    "before_script",
    "after_script",
];
pub(super) const SCRIPT_KEYS: [&str; 3] = ["before_script", "script", "after_script"];

pub(super) fn parse(text: &str) -> Mapping {
    match serde_yaml::from_str::<Value>(text).expect("the pipeline is YAML") {
        Value::Mapping(m) => m,
        other => panic!("the pipeline is not a mapping: {other:?}"),
    }
}

pub(super) fn key<'a>(m: &'a Mapping, k: &str) -> Option<&'a Value> {
    m.get(Value::String(k.to_owned()))
}

pub(super) fn string_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// `variables:` as name → value (plain values, or the `value` of the expanded form).
pub(super) fn variables(m: &Mapping) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(Value::Mapping(vars)) = key(m, "variables") {
        for (k, v) in vars {
            let Some(k) = string_of(k) else { continue };
            let v = match v {
                Value::Mapping(full) => key(full, "value").and_then(string_of),
                v => string_of(v),
            };
            out.insert(k, v.unwrap_or_default());
        }
    }
    out
}

/// GitLab's `extends` merge: hashes merge deeply, anything else is replaced.
pub(super) fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(existing) if existing.is_mapping() && v.is_mapping() => merge(existing, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// A job with its `extends` chain applied.
pub(super) fn resolve(doc: &Mapping, name: &str, depth: usize) -> Mapping {
    assert!(depth < 10, "extends loop at {name}");
    let job = match key(doc, name) {
        Some(Value::Mapping(j)) => j,
        _ => panic!("{name}: extended but not a job mapping"),
    };
    let parents: Vec<String> = match key(job, "extends") {
        None => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Sequence(s)) => s.iter().filter_map(string_of).collect(),
        Some(other) => panic!("{name}: extends is {other:?}"),
    };
    let mut out = Value::Mapping(Mapping::new());
    for p in parents {
        merge(&mut out, &Value::Mapping(resolve(doc, &p, depth + 1)));
    }
    let mut own = job.clone();
    own.remove("extends");
    merge(&mut out, &Value::Mapping(own));
    match out {
        Value::Mapping(m) => m,
        _ => unreachable!(),
    }
}

/// The jobs (not hidden, not global keywords), resolved.
pub(super) fn jobs(doc: &Mapping) -> BTreeMap<String, Mapping> {
    doc.keys()
        .filter_map(string_of)
        .filter(|k| !k.starts_with('.') && !GLOBAL_KEYS.contains(&k.as_str()))
        .map(|k| {
            let job = resolve(doc, &k, 0);
            (k, job)
        })
        .collect()
}

/// The logical shell lines of one script value (a string or a list, nested one level, of
/// possibly multi-line strings), with `\` continuations joined.
pub(super) fn logical_lines(v: &Value) -> Vec<String> {
    let mut items = Vec::new();
    fn collect(v: &Value, items: &mut Vec<String>) {
        match v {
            Value::String(s) => items.push(s.clone()),
            Value::Sequence(seq) => seq.iter().for_each(|i| collect(i, items)),
            other => panic!("script item is not a string: {other:?}"),
        }
    }
    collect(v, &mut items);
    let mut out = Vec::new();
    for item in items {
        let mut logical = String::new();
        for line in item.lines() {
            if let Some(cont) = line.strip_suffix('\\') {
                logical.push_str(cont);
                logical.push(' ');
            } else {
                logical.push_str(line);
                out.push(std::mem::take(&mut logical));
            }
        }
        if !logical.is_empty() {
            out.push(logical);
        }
    }
    out
}

/// Every logical script line of a job: (section, line).
pub(super) fn job_lines(job: &Mapping) -> Vec<(String, String)> {
    SCRIPT_KEYS
        .iter()
        .filter_map(|k| key(job, k).map(|v| (k, v)))
        .flat_map(|(k, v)| {
            logical_lines(v)
                .into_iter()
                .map(move |l| (k.to_string(), l))
        })
        .collect()
}

/// Replaces `$NAME` and `${NAME}` of known variables with their values; others stay.
pub(super) fn expand(word: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = word;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => (&braced[..end], end + 2),
                None => ("", 0),
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        match vars.get(name) {
            Some(v) if !name.is_empty() => out.push_str(v),
            _ => out.push_str(&rest[i..i + 1 + len]),
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

pub(super) fn stage_of(job: &Mapping) -> String {
    key(job, "stage")
        .and_then(string_of)
        .unwrap_or_else(|| "test".into())
}

pub(super) fn rules_of(job: &Mapping) -> Vec<Mapping> {
    match key(job, "rules") {
        Some(Value::Sequence(r)) => r.iter().filter_map(|r| r.as_mapping().cloned()).collect(),
        _ => vec![],
    }
}

pub(super) fn rule_if(r: &Mapping) -> String {
    key(r, "if").and_then(string_of).unwrap_or_default()
}

pub(super) fn rule_when(r: &Mapping) -> String {
    key(r, "when")
        .and_then(string_of)
        .unwrap_or_else(|| "on_success".into())
}

/// Whether a job's rules only ever add it on the default branch.
pub(super) fn default_branch_only(job: &Mapping) -> bool {
    let rules = rules_of(job);
    let other_branches_never = rules.first().is_some_and(|r| {
        rule_if(r).replace(' ', "") == "$CI_COMMIT_BRANCH!=$CI_DEFAULT_BRANCH"
            && rule_when(r) == "never"
    });
    let every_rule_on_default = !rules.is_empty()
        && rules.iter().all(|r| {
            rule_when(r) == "never"
                || rule_if(r)
                    .replace(' ', "")
                    .contains("$CI_COMMIT_BRANCH==$CI_DEFAULT_BRANCH")
        });
    other_branches_never || every_rule_on_default
}
