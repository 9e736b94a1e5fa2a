//! The import rules between `mesh-agent`'s rooms (ARCHITECTURE.md), checked by `cargo xtask
//! lint`.
//!
//! Every `crate::` path in `mesh-agent/src/**/*.rs` (in `use` items, grouped ones such as
//! `use crate::{a, b::c}` included, and inline paths), every `super::` path that climbs out of
//! its room, and every `tokio::`/`aya::` path is checked against the rules below; comments and
//! string literals are skipped. A broken rule is reported as `file:line: rule: what`. The
//! scanner is a tokenizer, not a parser: it needs no dependency and the crate's code is plain
//! enough (no macros that build paths).
//!
//! The rules:
//! * the pure core (model, config, catalog, balance, health but its probing runtime, reconcile)
//!   imports no runtime room (dataplane, gossip, tunnel, admin, telemetry, app, cli) and uses
//!   neither tokio nor aya;
//! * model imports nothing else of the crate;
//! * config imports only model;
//! * nothing imports app but `main.rs` and `cli/` (which start the daemon).
//!
//! There are no exceptions: a rule that must bend is a design change, argued in review.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The pure core's rooms.
const CORE: &[&str] = &[
    "model",
    "config",
    "catalog",
    "balance",
    "health",
    "reconcile",
];
/// Files of core rooms that are runtime (they do I/O on tokio).
const CORE_RUNTIME_FILES: &[&str] = &["health/probe.rs", "health/checker.rs"];
/// The runtime rooms.
const RUNTIME: &[&str] = &[
    "dataplane",
    "gossip",
    "tunnel",
    "admin",
    "telemetry",
    "app",
    "cli",
];
/// Crates the pure core does not use.
const RUNTIME_CRATES: &[&str] = &["tokio", "aya"];
/// Who may import `app`: the binary and the CLI, which starts the daemon.
const APP_IMPORTERS: &[&str] = &["main", "cli"];

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Relative to `mesh-agent/src`.
    pub file: String,
    pub line: usize,
    pub rule: &'static str,
    /// What was imported.
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mesh-agent/src/{}:{}: {}: imports {}",
            self.file, self.line, self.rule, self.what
        )
    }
}

/// Checks every file under `<root>/mesh-agent/src`; fails naming each broken rule.
pub fn run(root: &Path) -> Result<()> {
    let src = root.join("mesh-agent").join("src");
    let mut files = Vec::new();
    collect(&src, &mut files)?;
    files.sort();
    let mut violations = Vec::new();
    for path in &files {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let rel = path
            .strip_prefix(&src)
            .unwrap_or(path)
            .to_string_lossy()
            .replace('\\', "/");
        violations.extend(check_file(&rel, &text));
    }
    if violations.is_empty() {
        println!("import rules hold in {} files", files.len());
        return Ok(());
    }
    for v in &violations {
        eprintln!("{v}");
    }
    bail!(
        "{} import(s) break the rooms' rules (ARCHITECTURE.md, xtask/src/layers.rs)",
        violations.len()
    )
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, files)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    Ok(())
}

/// The module path of a file relative to `src` (`config/mtls.rs` → `[config, mtls]`,
/// `config/mod.rs` → `[config]`, `lib.rs` → `[]`, `main.rs` → `[main]`: the binary's root,
/// a room of its own here).
fn module_path(rel: &str) -> Vec<String> {
    let mut parts: Vec<String> = rel.split('/').map(str::to_owned).collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_owned());
    }
    parts
}

/// The room of a file: the first component of its module path (`lib` for `lib.rs`).
fn room_of(rel: &str) -> String {
    module_path(rel)
        .into_iter()
        .next()
        .unwrap_or_else(|| "lib".to_owned())
}

/// The rule `room` (of file `rel`) breaks by importing `target` (a room, or a crate with
/// `external`), if any.
fn broken_rule(rel: &str, room: &str, target: &str, external: bool) -> Option<&'static str> {
    let core = CORE.contains(&room) && !CORE_RUNTIME_FILES.contains(&rel);
    if external {
        return (core && RUNTIME_CRATES.contains(&target))
            .then_some("the pure core uses neither tokio nor aya");
    }
    if target == room {
        return None;
    }
    if room == "model" {
        return Some("model imports nothing else of the crate");
    }
    if room == "config" && target != "model" {
        return Some("config imports only model");
    }
    if core && RUNTIME.contains(&target) {
        return Some("the pure core imports no runtime room");
    }
    if target == "app" && !APP_IMPORTERS.contains(&room) {
        return Some("nothing imports app but main.rs and cli");
    }
    None
}

/// The violations in one file (`rel`: its path relative to `src`).
pub fn check_file(rel: &str, text: &str) -> Vec<Violation> {
    let room = room_of(rel);
    let mut out = Vec::new();
    for import in imports(rel, text) {
        let Some(rule) = broken_rule(rel, &room, &import.target, import.external) else {
            continue;
        };
        out.push(Violation {
            file: rel.to_owned(),
            line: import.line,
            rule,
            what: import.what,
        });
    }
    out
}

/// A path that leaves the file's module.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Import {
    line: usize,
    /// The room (first segment under the crate root) or the external crate.
    target: String,
    external: bool,
    /// As written, for the message (`crate::tunnel::Tunnel`).
    what: String,
}

/// Tokens: identifiers, `::`, and single punctuation characters, with their line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Path,
    Punct(char),
}

fn tokenize(text: &str) -> Vec<(Tok, usize)> {
    let chars: Vec<char> = text.chars().collect();
    let mut toks = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            '\n' => {
                line += 1;
                i += 1;
            }
            c if c.is_whitespace() => i += 1,
            '/' if next == Some('/') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if next == Some('*') => {
                let mut depth = 0;
                while i < chars.len() {
                    if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 2;
                    } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        line += usize::from(chars[i] == '\n');
                        i += 1;
                    }
                }
            }
            'r' if matches!(next, Some('"') | Some('#')) && raw_string_start(&chars, i) => {
                // r"…", r#"…"#, …
                let mut j = i + 1;
                let mut hashes = 0;
                while chars.get(j) == Some(&'#') {
                    hashes += 1;
                    j += 1;
                }
                j += 1; // the opening quote
                loop {
                    match chars.get(j) {
                        None => break,
                        Some('"') if (1..=hashes).all(|k| chars.get(j + k) == Some(&'#')) => {
                            j += 1 + hashes;
                            break;
                        }
                        Some(ch) => {
                            line += usize::from(*ch == '\n');
                            j += 1;
                        }
                    }
                }
                i = j;
            }
            '"' => {
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    if chars.get(i) == Some(&'\n') {
                        line += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            '\'' => {
                // A char literal ('x', '\n', '\'') or a lifetime ('a).
                if next == Some('\\') {
                    i += 2;
                    while i < chars.len() && chars[i] != '\'' {
                        i += 1;
                    }
                    i += 1;
                } else if chars.get(i + 2) == Some(&'\'') {
                    i += 3;
                } else {
                    i += 1;
                }
            }
            ':' if next == Some(':') => {
                toks.push((Tok::Path, line));
                i += 2;
            }
            c if c.is_alphanumeric() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                toks.push((Tok::Ident(chars[start..i].iter().collect()), line));
            }
            c => {
                toks.push((Tok::Punct(c), line));
                i += 1;
            }
        }
    }
    toks
}

/// Whether the `r` at `i` opens a raw string (not the end of an identifier like `for`).
fn raw_string_start(chars: &[char], i: usize) -> bool {
    let before = i.checked_sub(1).map(|j| chars[j]);
    if before.is_some_and(|b| b.is_alphanumeric() || b == '_') {
        return false;
    }
    let mut j = i + 1;
    while chars.get(j) == Some(&'#') {
        j += 1;
    }
    chars.get(j) == Some(&'"')
}

fn ident(tok: Option<&(Tok, usize)>) -> Option<&str> {
    match tok {
        Some((Tok::Ident(s), _)) => Some(s),
        _ => None,
    }
}

/// Every path of `text` that reaches out of its module: `crate::…` (with each item of a
/// grouped `crate::{…}`), `super::…` beyond the file's room, and `tokio::…`/`aya::…`.
fn imports(rel: &str, text: &str) -> Vec<Import> {
    let toks = tokenize(text);
    let file_module = module_path(rel);
    // Inline modules (`mod tests { … }`) open below the file's module.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let (tok, line) = &toks[i];
        let after_path = i > 0 && toks[i - 1].0 == Tok::Path;
        match tok {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|&(_, d)| d == depth) {
                    inline.pop();
                }
            }
            Tok::Ident(kw) if kw == "mod" => {
                if let (Some(name), Some((Tok::Punct('{'), _))) =
                    (ident(toks.get(i + 1)), toks.get(i + 2))
                {
                    inline.push((name.to_owned(), depth));
                }
            }
            Tok::Ident(kw)
                if kw == "crate"
                    && !after_path
                    && toks.get(i + 1).map(|t| &t.0) == Some(&Tok::Path) =>
            {
                for (target, what_line) in first_segments(&toks, i + 2) {
                    out.push(Import {
                        line: what_line,
                        what: format!("crate::{target}"),
                        target,
                        external: false,
                    });
                }
            }
            Tok::Ident(kw) if kw == "super" && !after_path => {
                // Climb: the module this path starts from, then one level per `super`.
                let mut module: Vec<String> = file_module.clone();
                module.extend(inline.iter().map(|(n, _)| n.clone()));
                let mut j = i;
                while ident(toks.get(j)) == Some("super")
                    && toks.get(j + 1).map(|t| &t.0) == Some(&Tok::Path)
                {
                    module.pop();
                    j += 2;
                }
                if module.is_empty() {
                    // At the crate root: the next segment names a room.
                    for (target, what_line) in first_segments(&toks, j) {
                        out.push(Import {
                            line: what_line,
                            what: format!("super::…::{target} (the crate root's {target})"),
                            target,
                            external: false,
                        });
                    }
                }
                i = j.max(i + 1);
                continue;
            }
            Tok::Ident(name)
                if RUNTIME_CRATES.contains(&name.as_str())
                    && !after_path
                    && toks.get(i + 1).map(|t| &t.0) == Some(&Tok::Path) =>
            {
                out.push(Import {
                    line: *line,
                    target: name.clone(),
                    external: true,
                    what: format!("{name}::"),
                });
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// The first segment of the path starting at token `i` (after `crate::`), or of each item
/// of the group there (`{a, b::{c, d}, e as f}` → a, b, e), with their lines.
fn first_segments(toks: &[(Tok, usize)], i: usize) -> Vec<(String, usize)> {
    match toks.get(i) {
        Some((Tok::Ident(s), line)) if s != "self" => vec![(s.clone(), *line)],
        Some((Tok::Punct('{'), _)) => {
            let mut out = Vec::new();
            let mut depth = 0;
            let mut expect_item = true;
            for (tok, line) in &toks[i..] {
                match tok {
                    Tok::Punct('{') => {
                        depth += 1;
                        if depth == 1 {
                            expect_item = true;
                        }
                    }
                    Tok::Punct('}') => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    Tok::Punct(',') if depth == 1 => expect_item = true,
                    Tok::Ident(s) if depth == 1 && expect_item => {
                        if s != "self" {
                            out.push((s.clone(), *line));
                        }
                        expect_item = false;
                    }
                    _ => {
                        if depth == 1 {
                            expect_item = false;
                        }
                    }
                }
            }
            out
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(rel: &str, text: &str) -> Vec<(usize, &'static str, String)> {
        check_file(rel, text)
            .into_iter()
            .map(|v| (v.line, v.rule, v.what))
            .collect()
    }

    #[test]
    fn model_imports_nothing_of_the_crate() {
        assert_eq!(
            rules("model/rules.rs", "use std::fmt;\nuse super::x;\n"),
            []
        );
        // From model/mod.rs, super:: is the crate root.
        assert_eq!(rules("model/mod.rs", "use super::config;\n").len(), 1);
        assert_eq!(
            rules(
                "model/rules.rs",
                "use std::fmt;\n\nuse crate::config::Config;\n"
            ),
            [(
                3,
                "model imports nothing else of the crate",
                "crate::config".into()
            )]
        );
        assert_eq!(rules("model/rules.rs", "use crate::model::Service;\n"), []);
    }

    #[test]
    fn config_imports_only_model() {
        assert_eq!(
            rules("config/mod.rs", "use crate::model::{rules, Service};\n"),
            []
        );
        let got = rules(
            "config/health.rs",
            "use crate::{\n    model::Service,\n    balance::maglev,\n};\n",
        );
        assert_eq!(
            got,
            [(3, "config imports only model", "crate::balance".into())]
        );
    }

    #[test]
    fn the_core_imports_no_runtime_room_nor_tokio_or_aya() {
        let got = rules(
            "catalog/mod.rs",
            "use crate::sys::state_file;\nfn f() { crate::gossip::x(); }\nuse tokio::sync;\n",
        );
        assert_eq!(
            got,
            [
                (
                    2,
                    "the pure core imports no runtime room",
                    "crate::gossip".into()
                ),
                (
                    3,
                    "the pure core uses neither tokio nor aya",
                    "tokio::".into()
                ),
            ]
        );
        // Health's probing runtime may use tokio and the tunnel; its state may not.
        assert_eq!(rules("health/probe.rs", "use tokio::net::TcpStream;\n"), []);
        assert_eq!(
            rules("health/checker.rs", "use crate::tunnel::Tunnel;\n"),
            []
        );
        assert_eq!(rules("health/mod.rs", "use aya::maps;\n").len(), 1);
        // A runtime room may use anything but app.
        assert_eq!(
            rules(
                "gossip/mod.rs",
                "use crate::{catalog, telemetry::x};\nuse tokio;\n"
            ),
            []
        );
    }

    #[test]
    fn nothing_imports_app_but_main_and_cli() {
        assert_eq!(rules("cli/mod.rs", "use crate::app;\n"), []);
        assert_eq!(
            rules("main.rs", "use mesh_agent::app;\nuse crate::app::run;\n"),
            []
        );
        assert_eq!(
            rules(
                "admin/mod.rs",
                "use crate::{\n    app::takeover::{self, Successor},\n};\n"
            ),
            [(
                2,
                "nothing imports app but main.rs and cli",
                "crate::app".into()
            )]
        );
    }

    #[test]
    fn super_that_climbs_out_of_the_room_is_an_import() {
        // From config/mtls.rs, super:: is config: fine; super::super:: is the crate root.
        assert_eq!(
            rules("config/mtls.rs", "use super::{Source, ConfigError};\n"),
            []
        );
        assert_eq!(
            rules("config/mtls.rs", "use super::super::gossip::Stats;\n"),
            [(
                1,
                "config imports only model",
                "super::…::gossip (the crate root's gossip)".into()
            )]
        );
        // From config/mod.rs super:: is the root already; an inline `mod tests` adds a level.
        assert_eq!(rules("config/mod.rs", "use super::balance;\n").len(), 1);
        assert_eq!(
            rules(
                "config/mod.rs",
                "mod tests {\n    use super::*;\n    use super::Config;\n}\n"
            ),
            []
        );
        assert_eq!(
            rules("config/mod.rs", "mod tests {\n}\nuse super::gossip::X;\n").len(),
            1
        );
    }

    #[test]
    fn comments_and_strings_are_not_imports() {
        let text = "//! See [`crate::tunnel`].\n/* crate::app */\nconst S: &str = \"crate::gossip::x\";\nconst R: &str = r#\"use crate::admin;\"#;\nlet c = '\"'; use crate::model::X;\n";
        assert_eq!(rules("catalog/mod.rs", text), []);
        assert_eq!(rules("model/mod.rs", text), []);
        // A path after `::` is not a root (`x::crate` cannot happen, `foo::tokio::` can).
        assert_eq!(rules("catalog/mod.rs", "use mesh_common::aya::Pod;\n"), []);
    }

    #[test]
    fn config_may_not_import_the_tunnel() {
        assert_eq!(
            rules("config/mtls.rs", "use crate::tunnel::TunnelConfig;\n").len(),
            1
        );
        assert_eq!(
            rules("config/mtls.rs", "use crate::model::policy::Rule;\n"),
            []
        );
    }

    #[test]
    fn module_paths() {
        assert_eq!(module_path("config/mtls.rs"), ["config", "mtls"]);
        assert_eq!(module_path("config/mod.rs"), ["config"]);
        assert_eq!(
            module_path("tunnel/authz/policy.rs"),
            ["tunnel", "authz", "policy"]
        );
        assert!(module_path("lib.rs").is_empty());
        assert_eq!(room_of("main.rs"), "main");
        assert_eq!(room_of("lib.rs"), "lib");
    }
}

#[cfg(test)]
mod tree {
    /// The rules hold in the workspace this xtask belongs to (what `cargo xtask lint` checks
    /// first).
    #[test]
    fn the_rules_hold_in_this_tree() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        if let Err(e) = super::run(&root) {
            panic!("{e:#}");
        }
    }
}
