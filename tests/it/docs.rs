//! The documentation is checked against the code.
//!
//! - **Commands.** Every `imagectl …` command in a shell code block (```` ```sh ````, `bash`,
//!   `shell`, `console`) of `README.md` and `docs/*.md` is parsed by the real clap definition
//!   ([`imagectl::cli::command`]): its subcommand, flags, values and required arguments must be
//!   accepted. A block preceded by `<!-- not-tested: REASON -->` is skipped. A block preceded by
//!   `<!-- pending: REASON -->` documents commands that are still being built: it must currently
//!   fail to parse, and the test fails once it parses, so the marker gets removed.
//! - **Spec reference.** `docs/spec-reference.md` lists every key of the spec types (derived from
//!   `builder/src/spec/mod.rs` and cross-checked by serialising a parsed spec), and no key that
//!   does not exist; its complete example parses as a spec.
//! - **Links.** Relative links between the docs point at files and headings that exist.

use crate::support::workspace;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// How a shell block is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Marker {
    Checked,
    NotTested,
    Pending,
}

/// One `imagectl` command found in a document.
#[derive(Debug, Clone)]
struct DocCommand {
    /// `file:line` of the command.
    at: String,
    /// argv, starting with `imagectl`.
    argv: Vec<String>,
}

/// A fenced shell block and its commands.
#[derive(Debug, Clone)]
struct Block {
    at: String,
    marker: Marker,
    commands: Vec<DocCommand>,
}

const SHELL_LANGS: [&str; 4] = ["sh", "bash", "shell", "console"];

/// Splits a shell line into words: quotes and backslash escapes, stopping at a comment.
pub(crate) fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match quote {
            Some(q) if c == q => quote = None,
            Some('"') if c == '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            Some(_) => cur.push(c),
            None => match c {
                '\'' | '"' => {
                    quote = Some(c);
                    in_word = true;
                }
                '\\' => {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                        in_word = true;
                    }
                }
                '#' if !in_word => break,
                c if c.is_whitespace() => {
                    if in_word {
                        words.push(std::mem::take(&mut cur));
                        in_word = false;
                    }
                }
                // Operators are words of their own, even when glued to a word (`a|b`, `x;y`).
                '|' | '&' | ';' => {
                    if in_word {
                        words.push(std::mem::take(&mut cur));
                        in_word = false;
                    }
                    let mut op = c.to_string();
                    if chars.peek() == Some(&c) {
                        op.push(chars.next().unwrap_or(c));
                    }
                    words.push(op);
                }
                c => {
                    cur.push(c);
                    in_word = true;
                }
            },
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

/// The `imagectl` invocations in one logical shell line (pipelines and lists split, redirections,
/// environment assignments, `sudo` and a `$ ` prompt dropped).
pub(crate) fn imagectl_commands(line: &str) -> Vec<Vec<String>> {
    let line = line.trim_start();
    let line = line.strip_prefix("$ ").unwrap_or(line);
    let mut out = Vec::new();
    for segment in shell_words(line).split(|w| matches!(w.as_str(), "|" | "||" | "&&" | ";" | "&"))
    {
        let mut words = segment.iter().peekable();
        // Leading VAR=value assignments and sudo.
        while let Some(w) = words.peek() {
            let is_assignment = w.split_once('=').is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            });
            if is_assignment || w.as_str() == "sudo" {
                words.next();
            } else {
                break;
            }
        }
        let Some(first) = words.next() else { continue };
        if Path::new(first).file_name().and_then(|n| n.to_str()) != Some("imagectl") {
            continue;
        }
        let mut argv = vec!["imagectl".to_owned()];
        let mut skip_next = false;
        for w in words {
            if skip_next {
                skip_next = false;
                continue;
            }
            // Redirections: `>file`, `> file`, `2>&1`, `<file`.
            let rest = w.trim_start_matches(|c: char| c.is_ascii_digit());
            if rest.starts_with('>') || rest.starts_with('<') {
                let target = rest.trim_start_matches(['>', '<', '&']);
                skip_next = target.is_empty() && !rest.ends_with("&1") && !rest.ends_with("&2");
                continue;
            }
            argv.push(w.clone());
        }
        out.push(argv);
    }
    out
}

/// Finds the shell blocks of a markdown text and the `imagectl` commands in them.
fn shell_blocks(name: &str, text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    let mut last_nonblank = "";
    while i < lines.len() {
        let trimmed = lines[i].trim_start();
        if let Some(info) = trimmed.strip_prefix("```") {
            let indent = lines[i].len() - trimmed.len();
            let lang = info.split_whitespace().next().unwrap_or("");
            let marker = marker_of(last_nonblank);
            let start = i + 1;
            let mut end = start;
            while end < lines.len() && !lines[end].trim_start().starts_with("```") {
                end += 1;
            }
            if SHELL_LANGS.contains(&lang) {
                let mut commands = Vec::new();
                let mut logical = String::new();
                let mut logical_start = start;
                for (n, raw) in lines[start..end].iter().enumerate() {
                    let raw = raw.get(indent..).unwrap_or(raw.trim_start());
                    if logical.is_empty() {
                        logical_start = start + n;
                    }
                    if let Some(cont) = raw.strip_suffix('\\') {
                        logical.push_str(cont);
                        logical.push(' ');
                        continue;
                    }
                    logical.push_str(raw);
                    for argv in imagectl_commands(&logical) {
                        commands.push(DocCommand {
                            at: format!("{name}:{}", logical_start + 1),
                            argv,
                        });
                    }
                    logical.clear();
                }
                blocks.push(Block {
                    at: format!("{name}:{}", i + 1),
                    marker,
                    commands,
                });
            }
            i = end + 1;
            last_nonblank = "";
            continue;
        }
        if !trimmed.is_empty() {
            last_nonblank = trimmed;
        }
        i += 1;
    }
    blocks
}

fn marker_of(line: &str) -> Marker {
    let reason = |prefix: &str| {
        line.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix("-->"))
            .map(str::trim)
            .filter(|r| !r.is_empty())
    };
    if reason("<!-- not-tested:").is_some() {
        Marker::NotTested
    } else if reason("<!-- pending:").is_some() {
        Marker::Pending
    } else {
        Marker::Checked
    }
}

/// Parses argv with the real CLI definition: `Err` carries clap's message.
pub(crate) fn parse_with_cli(argv: &[String]) -> Result<(), String> {
    match imagectl::cli::command().try_get_matches_from(argv) {
        Ok(_) => Ok(()),
        // --help and --version "fail" with a message for stdout: the command is fine.
        Err(e) if !e.use_stderr() => Ok(()),
        Err(e) => Err(e
            .to_string()
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .to_owned()),
    }
}

/// The markdown files whose commands are checked.
fn documents() -> Vec<PathBuf> {
    let root = workspace();
    let mut docs = vec![root.join("README.md")];
    let mut in_docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.expect("docs entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    in_docs.sort();
    docs.extend(in_docs);
    docs
}

fn rel(p: &Path) -> String {
    p.strip_prefix(workspace())
        .unwrap_or(p)
        .display()
        .to_string()
}

#[test]
fn shell_words_handle_quotes_comments_and_operators() {
    assert_eq!(
        shell_words(r#"imagectl seed --hostname "a b" 'c#d' x\ y # comment"#),
        ["imagectl", "seed", "--hostname", "a b", "c#d", "x y"]
    );
    assert_eq!(
        imagectl_commands("$ IMAGECTL_LOG=debug imagectl status --fleet ci | jq .; imagectl gc"),
        [
            vec!["imagectl", "status", "--fleet", "ci"],
            vec!["imagectl", "gc"]
        ]
    );
    assert_eq!(
        imagectl_commands(
            "target/release/imagectl completions bash > /etc/bash_completion.d/imagectl 2>&1"
        ),
        [vec!["imagectl", "completions", "bash"]]
    );
    assert!(imagectl_commands("cargo build --release # then imagectl build").is_empty());
}

#[test]
fn the_checker_catches_wrong_flags_and_honours_markers() {
    let md = "intro\n\n```sh\nimagectl build spec.yaml --locked\nimagectl build spec.yaml --no-such-flag\n```\n\n\
              <!-- not-tested: illustrative -->\n```bash\nimagectl frobnicate\n```\n\n\
              <!-- pending: not written yet -->\n```sh\nimagectl completions \\\n  tcsh\n```\n\n\
              ```yaml\nimagectl: not a command\n```\n";
    let blocks = shell_blocks("t.md", md);
    assert_eq!(blocks.len(), 3, "{blocks:?}");
    assert_eq!(blocks[0].marker, Marker::Checked);
    assert_eq!(blocks[1].marker, Marker::NotTested);
    assert_eq!(blocks[2].marker, Marker::Pending);
    assert_eq!(blocks[0].commands[1].at, "t.md:5");
    assert_eq!(
        blocks[2].commands[0].argv,
        ["imagectl", "completions", "tcsh"]
    );
    assert!(parse_with_cli(&blocks[0].commands[0].argv).is_ok());
    let err = parse_with_cli(&blocks[0].commands[1].argv).unwrap_err();
    assert!(err.contains("--no-such-flag"), "{err}");
    assert!(parse_with_cli(&blocks[2].commands[0].argv).is_err());
    // Help and version requests count as valid.
    assert!(parse_with_cli(&["imagectl".into(), "--help".into()]).is_ok());
    assert!(parse_with_cli(&["imagectl".into(), "build".into(), "--help".into()]).is_ok());
    // A missing required argument is an error.
    assert!(parse_with_cli(&["imagectl".into(), "build".into()]).is_err());
}

#[test]
fn every_documented_command_exists_with_its_flags() {
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut pending = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).expect("reading doc");
        for block in shell_blocks(&rel(&doc), &text) {
            let results: Vec<(DocCommand, Result<(), String>)> = block
                .commands
                .iter()
                .map(|c| (c.clone(), parse_with_cli(&c.argv)))
                .collect();
            match block.marker {
                Marker::NotTested => {}
                Marker::Checked => {
                    for (c, r) in results {
                        checked += 1;
                        if let Err(e) = r {
                            failures.push(format!("{}: `{}`: {e}", c.at, c.argv.join(" ")));
                        }
                    }
                }
                Marker::Pending => {
                    let failing: Vec<String> = results
                        .iter()
                        .filter_map(|(c, r)| r.as_ref().err().map(|e| format!("{}: {e}", c.at)))
                        .collect();
                    if failing.is_empty() {
                        failures.push(format!(
                            "{}: block is marked <!-- pending: … --> but every command in it now \
                             parses: remove the marker so it is checked",
                            block.at
                        ));
                    } else {
                        pending.push(format!("{} ({})", block.at, failing.join("; ")));
                    }
                }
            }
        }
    }
    if !pending.is_empty() {
        eprintln!(
            "pending doc blocks (not yet accepted by the CLI):\n  {}",
            pending.join("\n  ")
        );
    }
    assert!(
        failures.is_empty(),
        "documented commands the CLI rejects:\n  {}",
        failures.join("\n  ")
    );
    // README and docs show at least build, test, inspect, completions and man.
    assert!(
        checked >= 10,
        "only {checked} commands checked: is the extractor broken?"
    );
}

/// Fields of the `pub struct`s in a Rust source file: struct → [(field, type)].
fn struct_fields(src: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in src.lines() {
        if let Some(rest) = line.strip_prefix("pub struct ") {
            if let Some(name) = rest.strip_suffix(" {") {
                current = Some(name.trim().to_owned());
                out.insert(name.trim().to_owned(), Vec::new());
            }
            continue;
        }
        if line.starts_with('}') {
            current = None;
            continue;
        }
        if let (Some(s), Some(field)) = (&current, line.trim().strip_prefix("pub ")) {
            if let Some((name, ty)) = field.split_once(':') {
                let ty = ty.trim().trim_end_matches(',').to_owned();
                out.get_mut(s)
                    .expect("struct")
                    .push((name.trim().to_owned(), ty));
            }
        }
    }
    out
}

/// Key paths of the spec from its source: `base.mirror`, `apt_repositories[].key_file`, ….
fn spec_paths_from_source() -> BTreeSet<String> {
    let src =
        std::fs::read_to_string(workspace().join("builder/src/spec/mod.rs")).expect("spec source");
    assert!(
        !src.contains("serde(rename =") && !src.contains("serde(flatten"),
        "the spec uses serde rename/flatten: teach tests/it/docs.rs about it"
    );
    let structs = struct_fields(&src);
    assert!(
        structs.contains_key("Spec"),
        "no `pub struct Spec {{` in spec/mod.rs"
    );
    fn walk(
        structs: &BTreeMap<String, Vec<(String, String)>>,
        name: &str,
        prefix: &str,
        out: &mut BTreeSet<String>,
    ) {
        for (field, ty) in &structs[name] {
            let path = format!("{prefix}{field}");
            out.insert(path.clone());
            let is_vec = ty.starts_with("Vec<");
            let inner = ty
                .trim_start_matches("Vec<")
                .trim_start_matches("Option<")
                .trim_end_matches('>');
            if structs.contains_key(inner) {
                let sep = if is_vec { "[]." } else { "." };
                walk(structs, inner, &format!("{path}{sep}"), out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&structs, "Spec", "", &mut out);
    out
}

/// Key paths of a serialised value (objects and lists of objects).
fn json_paths(v: &serde_json::Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let path = format!("{prefix}{k}");
                out.insert(path.clone());
                match v {
                    serde_json::Value::Object(_) => json_paths(v, &format!("{path}."), out),
                    serde_json::Value::Array(items) => {
                        for item in items.iter().filter(|i| i.is_object()) {
                            json_paths(item, &format!("{path}[]."), out);
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => panic!("not an object: {v}"),
    }
}

/// The text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`.
fn section<'a>(text: &'a str, name: &str) -> &'a str {
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let a = text
        .find(&begin)
        .unwrap_or_else(|| panic!("{begin} missing"))
        + begin.len();
    let b = text[a..]
        .find(&end)
        .unwrap_or_else(|| panic!("{end} missing"))
        + a;
    &text[a..b]
}

/// The first cell of each table row, when it is a single `code` span.
fn table_keys(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix('|'))
        .filter_map(|l| l.split('|').next())
        .filter_map(|cell| {
            let cell = cell.trim();
            cell.strip_prefix('`')?.strip_suffix('`').map(str::to_owned)
        })
        .collect()
}

/// The fenced block right after a `<!-- NAME -->` line.
fn block_after(text: &str, marker: &str) -> String {
    let at = text
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} missing"));
    let rest = &text[at..];
    let open = rest.find("```").expect("opening fence");
    let body = &rest[open..];
    let body = &body[body.find('\n').expect("fence line") + 1..];
    body[..body.find("```").expect("closing fence")].to_owned()
}

#[test]
fn spec_reference_lists_every_spec_key_and_nothing_else() {
    let doc = std::fs::read_to_string(workspace().join("docs/spec-reference.md"))
        .expect("spec reference");
    let from_source = spec_paths_from_source();
    // The source parser must see the whole spec: spot-check nested and list paths.
    for p in [
        "name",
        "base.mirror",
        "apt_repositories[].key_fingerprint",
        "files[].content",
        "units.mask",
        "disk.boot",
    ] {
        assert!(
            from_source.contains(p),
            "source parse lost {p}: {from_source:?}"
        );
    }

    // The complete example is a real spec, and serde sees the same keys as the source parse.
    let example = block_after(&doc, "<!-- example-spec -->");
    let spec: imagectl::spec::Spec = serde_yaml::from_str(&example)
        .unwrap_or_else(|e| panic!("the example in docs/spec-reference.md does not parse: {e}"));
    let mut from_serde = BTreeSet::new();
    json_paths(
        &serde_json::to_value(&spec).expect("serialise spec"),
        "",
        &mut from_serde,
    );
    assert_eq!(
        from_serde, from_source,
        "serde and the source disagree on the spec's keys (example incomplete, or a rename)"
    );

    let documented = table_keys(section(&doc, "spec-keys"));
    let missing: Vec<_> = from_source.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&from_source).collect();
    assert!(
        missing.is_empty(),
        "spec keys missing from docs/spec-reference.md: {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "docs/spec-reference.md documents keys the spec does not have: {stale:?}"
    );
}

/// A heading's anchor as GitLab and GitHub make it.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a markdown file's headings (outside code blocks).
pub(crate) fn anchors(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn relative_links_between_docs_resolve() {
    assert_eq!(
        slug("Disaster: a PVE node is down"),
        "disaster-a-pve-node-is-down"
    );
    let mut broken = Vec::new();
    let mut seen = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).expect("doc");
        let mut rest = text.as_str();
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            let Some(end) = rest.find(')') else { break };
            let target = &rest[..end];
            if target.contains("://") || target.starts_with("mailto:") || target.contains(' ') {
                continue;
            }
            seen += 1;
            let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
            let path = if file.is_empty() {
                doc.clone()
            } else {
                doc.parent().expect("doc dir").join(file)
            };
            if !path.exists() {
                broken.push(format!("{}: {target}: no such file", rel(&doc)));
                continue;
            }
            if !anchor.is_empty() {
                let t = std::fs::read_to_string(&path).unwrap_or_default();
                if !anchors(&t).contains(anchor) {
                    broken.push(format!("{}: {target}: no such heading", rel(&doc)));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "broken links:\n  {}",
        broken.join("\n  ")
    );
    assert!(seen > 5, "only {seen} relative links found");
}

fn run_imagectl(args: &[&str]) -> std::process::Output {
    std::process::Command::new(crate::imagectl_bin())
        .args(args)
        .output()
        .expect("running imagectl")
}

fn subcommand_names() -> Vec<String> {
    imagectl::cli::command()
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect()
}

#[test]
fn completions_cover_every_subcommand_and_bash_loads_them() {
    let subs = subcommand_names();
    assert!(subs.len() >= 15, "{subs:?}");
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run_imagectl(&["completions", shell]);
        assert!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8(out.stdout).expect("utf-8 script");
        for sub in &subs {
            assert!(
                script.contains(sub.as_str()),
                "{shell} completion lacks {sub}"
            );
        }
    }
    let bad = run_imagectl(&["completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2), "an unknown shell is bad input");

    // bash parses the script and registers a completion for imagectl that offers the subcommands.
    let d = tempfile::tempdir().expect("tempdir");
    let script = d.path().join("imagectl.bash");
    std::fs::write(&script, run_imagectl(&["completions", "bash"]).stdout).expect("write script");
    let probe = format!(
        "set -e; source {}; complete -p imagectl; COMP_WORDS=(imagectl ro); COMP_CWORD=1; \
         _imagectl imagectl ro imagectl; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display()
    );
    let out = std::process::Command::new("bash")
        .args(["--norc", "-c", &probe])
        .output()
        .expect("running bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("-F _imagectl imagectl"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l == "rollback"),
        "`imagectl ro<TAB>` does not offer rollback: {stdout}"
    );
}

#[test]
fn man_pages_render_for_imagectl_and_every_subcommand() {
    let out = run_imagectl(&["man"]);
    assert!(out.status.success());
    let page = String::from_utf8(out.stdout).expect("utf-8 page");
    assert!(page.contains(".TH imagectl 1"), "{page}");
    let subs = subcommand_names();
    for sub in subs.iter().filter(|s| s.as_str() != "help") {
        assert!(
            page.contains(&format!("imagectl\\-{sub}")),
            "imagectl(1) does not list {sub}"
        );
    }

    let d = tempfile::tempdir().expect("tempdir");
    let out = run_imagectl(&["man", "--out-dir", &d.path().display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for sub in subs.iter().filter(|s| s.as_str() != "help") {
        let p = d.path().join(format!("imagectl-{sub}.1"));
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(
            text.contains(&format!(".TH imagectl-{sub} 1")),
            "{}",
            p.display()
        );
    }

    // groff formats every page without a warning (-ww: all warnings; -k: preconv, as man does).
    if Path::new("/usr/bin/groff").is_file() {
        let mut pages: Vec<PathBuf> = std::fs::read_dir(d.path())
            .expect("read man dir")
            .map(|e| e.expect("entry").path())
            .collect();
        pages.sort();
        assert_eq!(
            pages.len(),
            1 + subs.iter().filter(|s| s.as_str() != "help").count(),
            "imagectl.1 plus one page per subcommand but help"
        );
        for p in pages {
            let out = std::process::Command::new("groff")
                .args(["-k", "-man", "-Tutf8", "-ww", "-z"])
                .arg(&p)
                .output()
                .expect("running groff");
            assert!(
                out.status.success() && out.stderr.is_empty(),
                "{}: {}",
                p.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
