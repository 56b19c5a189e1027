//! Secrets in the pipeline: no job defines a secret-named variable, carries a secret-looking
//! literal, or passes a secret variable as a command argument; assignments stay in the shell.

use super::pipeline_text;
use super::yaml::{job_lines, jobs, parse, variables};
use crate::docs::shell_words;
use serde_yaml::Mapping;

/// Whether a variable name names a secret (and not its id, file or URL).
pub(super) fn is_secret_name(name: &str) -> bool {
    let n = name.to_ascii_uppercase();
    let secretish = [
        "TOKEN",
        "SECRET",
        "PASSWORD",
        "PASSWD",
        "PRIVATE_KEY",
        "API_KEY",
    ]
    .iter()
    .any(|s| n.contains(s));
    let harmless = ["_ID", "_FILE", "_PATH", "_URL"]
        .iter()
        .any(|s| n.ends_with(s));
    secretish && !harmless
}

/// The secret variables a word refers to (`$NAME`, `${NAME}`, `${NAME:-…}`).
pub(super) fn secret_refs(word: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = word;
    while let Some(i) = rest.find('$') {
        let after = rest[i + 1..].trim_start_matches('{');
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..end];
        if is_secret_name(name) {
            out.push(name.to_owned());
        }
        rest = &after[end..];
    }
    out
}

pub(super) fn is_assignment(w: &str) -> bool {
    w.split_once('=').is_some_and(|(k, _)| {
        !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// Secret variables a shell line passes as a command argument (or as the command itself).
/// Assignments, alone or after `export`/`readonly`/`local`/`declare`, stay in the shell.
pub(super) fn secret_arguments(line: &str) -> Vec<String> {
    const KEYWORDS: [&str; 10] = [
        "if", "then", "else", "elif", "do", "while", "until", "!", "{", "(",
    ];
    let mut out = Vec::new();
    for segment in shell_words(line).split(|w| matches!(w.as_str(), "|" | "||" | "&&" | ";" | "&"))
    {
        let mut words = segment
            .iter()
            .skip_while(|w| KEYWORDS.contains(&w.as_str()))
            .skip_while(|w| is_assignment(w))
            .peekable();
        if words
            .peek()
            .is_some_and(|w| matches!(w.as_str(), "export" | "readonly" | "local" | "declare"))
        {
            words.next();
            if words.all(|w| is_assignment(w) || w.starts_with('-')) {
                continue;
            }
            out.push(format!("`{line}`: a declaration with a non-assignment"));
            continue;
        }
        for w in words {
            for name in secret_refs(w) {
                out.push(format!("`{line}`: ${name} is a command argument"));
            }
        }
    }
    out
}

/// Whether a value looks like a credential itself.
pub(super) fn looks_like_secret(s: &str) -> bool {
    const PREFIXES: [&str; 8] = [
        "glpat-",
        "glrt-",
        "gldt-",
        "glptt-",
        "glcbt-",
        "glsoat-",
        "GR1348941",
        "PVEAPIToken=",
    ];
    if PREFIXES.iter().any(|p| s.contains(p)) {
        return true;
    }
    // A PVE token (`user@realm!id=…`) or a UUID-shaped secret.
    if s.contains('@') && s.contains('!') && s.contains('=') && !s.contains('$') {
        return true;
    }
    let b = s.as_bytes();
    (0..b.len()).any(|i| {
        let uuid = b.get(i..i + 36);
        uuid.is_some_and(|u| {
            u.iter().enumerate().all(|(j, c)| match j {
                8 | 13 | 18 | 23 => *c == b'-',
                _ => c.is_ascii_hexdigit(),
            })
        })
    })
}

/// Every secret problem of a pipeline.
pub(super) fn secret_problems(doc: &Mapping) -> Vec<String> {
    let mut out = Vec::new();
    let mut scopes = vec![("variables".to_owned(), variables(doc))];
    for (name, job) in jobs(doc) {
        scopes.push((format!("{name}.variables"), variables(&job)));
        for (section, line) in job_lines(&job) {
            for p in secret_arguments(&line) {
                out.push(format!("{name}.{section}: {p}"));
            }
            if looks_like_secret(&line) {
                out.push(format!("{name}.{section}: a literal secret in `{line}`"));
            }
        }
    }
    for (scope, vars) in scopes {
        for (k, v) in vars {
            if is_secret_name(&k) {
                out.push(format!(
                    "{scope}: defines {k}: secrets belong in masked, protected CI/CD variables"
                ));
            }
            if looks_like_secret(&v) {
                out.push(format!("{scope}: {k} holds a secret-looking value"));
            }
        }
    }
    out
}

#[test]
fn no_secret_is_in_the_file_or_on_a_command_line() {
    let doc = parse(&pipeline_text());
    let problems = secret_problems(&doc);
    assert!(
        problems.is_empty(),
        "secret handling:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn the_secret_check_catches_arguments_literals_and_definitions() {
    for bad in [
        r#"imagectl deploy --fleet ci --gitlab-token "$GITLAB_TOKEN""#,
        r#"curl -H "PRIVATE-TOKEN: ${GITLAB_TOKEN}" https://gitlab.example/api/v4/runners"#,
        r#"echo "$PROXMOX_VE_API_TOKEN" | tee /tmp/t"#,
        r#"if true; then printf %s "${PROXMOX_VE_API_TOKEN_SECRET:-}"; fi"#,
        r#"export FOO="$GITLAB_TOKEN" bar"#,
    ] {
        assert!(!secret_arguments(bad).is_empty(), "not caught: {bad}");
    }
    for good in [
        r#"export PROXMOX_VE_API_TOKEN="${PROXMOX_VE_API_TOKEN_ID}=${PROXMOX_VE_API_TOKEN_SECRET:?x}""#,
        r#"GITLAB_TOKEN="$GITLAB_TOKEN" imagectl deploy --fleet ci"#,
        r#"if [ -n "${PROXMOX_VE_API_TOKEN_ID:-}" ]; then"#,
        r#"imagectl deploy --gitlab-token-file "$GITLAB_TOKEN_PATH" --fleet ci"#,
        r#"imagectl gc --keep "$GC_KEEP" # never "$GITLAB_TOKEN" here"#,
    ] {
        assert_eq!(secret_arguments(good), Vec::<String>::new(), "{good}");
    }
    for lit in [
        "glpat-abcdefghijklmnopqrst",
        "imagectl@pve!ci=0b7f3e2a-1c4d-4e5f-8a9b-0c1d2e3f4a5b",
        "0b7f3e2a-1c4d-4e5f-8a9b-0c1d2e3f4a5b",
    ] {
        assert!(looks_like_secret(lit), "{lit}");
    }
    assert!(!looks_like_secret(
        "imagectl deploy --fleet \"$FLEET\" --image \"$IMAGE_VERSION\""
    ));

    let doc = parse(
        "variables:\n  GITLAB_TOKEN: x\njob:\n  variables:\n    HOOK: \"glrt-abc\"\n  script:\n    \
         - imagectl status --fleet ci --gitlab-url \"$GITLAB_TOKEN\"\n",
    );
    let problems = secret_problems(&doc);
    assert_eq!(problems.len(), 3, "{problems:#?}");
}
