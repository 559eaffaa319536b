//! Glob patterns over the sandbox filesystem.
//!
//! Within one path component: `*` (any run of characters), `?` (one
//! character), `[abc]`, `[a-z]` and negated `[!a]` / `[^a]` classes. A whole
//! component `**` matches zero or more directories (as the last component it
//! matches everything below, files included). Wildcards match names starting
//! with a dot too. Symlinked directories are not followed while descending
//! through `**`; unreadable directories are skipped, and so is the reserved
//! agent tree.

use std::collections::BTreeSet;
use std::fs;
use std::fs::FileType;

use stacyvm_agent_proto::path::is_reserved;

/// At most this many paths are returned.
pub const MAX_RESULTS: usize = 100_000;
/// At most this many directory entries are examined per glob.
pub const MAX_VISITED: usize = 2_000_000;

/// True when a component contains glob syntax.
fn has_meta(comp: &str) -> bool {
    comp.contains(['*', '?', '['])
}

/// Match a bracket class starting at `p[start] == '['` against `c`.
/// Returns `(matched, index after the closing ']')`, or `None` when the class
/// is not closed (then `[` is an ordinary character).
fn match_class(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(p.get(i), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let &lo = p.get(i)?;
        if lo == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|&hi| hi != ']') {
            let hi = p[i + 2];
            if lo <= c && c <= hi {
                matched = true;
            }
            i += 3;
        } else {
            if lo == c {
                matched = true;
            }
            i += 1;
        }
    }
}

/// Match one path component `name` against the component pattern `pat`.
pub fn match_component(pat: &str, name: &str) -> bool {
    let p: Vec<char> = pat.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0usize, 0usize);
    // Where to resume after the last `*`: (pattern index, name index).
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if let Some(&pc) = p.get(pi) {
            match pc {
                '*' => {
                    star = Some((pi + 1, ni));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                '[' => match match_class(&p, pi, n[ni]) {
                    Some((true, next)) => {
                        pi = next;
                        ni += 1;
                        continue;
                    }
                    Some((false, _)) => {}
                    None if n[ni] == '[' => {
                        pi += 1;
                        ni += 1;
                        continue;
                    }
                    None => {}
                },
                c if c == n[ni] => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                _ => {}
            }
        }
        // Mismatch: let the last `*` swallow one more character.
        match star {
            Some((sp, sn)) => {
                pi = sp;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Match a whole absolute path against an absolute pattern: the reference
/// for what [`glob`] finds.
#[cfg(test)]
fn match_path(pattern: &str, path: &str) -> bool {
    let pat: Vec<&str> = pattern.split('/').filter(|c| !c.is_empty()).collect();
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    match_comps(&pat, &comps)
}

#[cfg(test)]
fn match_comps(pat: &[&str], comps: &[&str]) -> bool {
    match pat.split_first() {
        None => comps.is_empty(),
        Some((&"**", rest)) => (0..=comps.len()).any(|k| match_comps(rest, &comps[k..])),
        Some((first, rest)) => match comps.split_first() {
            Some((c, crest)) => match_component(first, c) && match_comps(rest, crest),
            None => false,
        },
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

struct Walker {
    found: BTreeSet<String>,
    visited: usize,
}

impl Walker {
    fn full(&self) -> bool {
        self.found.len() >= MAX_RESULTS || self.visited >= MAX_VISITED
    }

    fn add(&mut self, path: String) {
        if self.found.len() < MAX_RESULTS && !is_reserved(&path) {
            self.found.insert(path);
        }
    }

    /// The entries of `dir` (empty when unreadable), without the reserved tree.
    fn read(&mut self, dir: &str) -> Vec<(String, FileType)> {
        let Ok(rd) = fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for ent in rd.flatten() {
            self.visited += 1;
            if self.visited >= MAX_VISITED {
                break;
            }
            let Ok(ft) = ent.file_type() else { continue };
            let name = ent.file_name().to_string_lossy().into_owned();
            if is_reserved(&join(dir, &name)) {
                continue;
            }
            out.push((name, ft));
        }
        out
    }

    /// Whether `path` (of type `ft`) is a directory, following symlinks.
    fn is_dir_following(path: &str, ft: FileType) -> bool {
        if ft.is_dir() {
            true
        } else if ft.is_symlink() {
            fs::metadata(path).is_ok_and(|m| m.is_dir())
        } else {
            false
        }
    }

    /// Match the pattern components `pats` below the existing directory `dir`.
    fn walk(&mut self, dir: &str, pats: &[&str]) {
        if self.full() {
            return;
        }
        let Some((&first, rest)) = pats.split_first() else {
            self.add(dir.to_string());
            return;
        };
        if first == "**" {
            // Zero directories...
            self.walk(dir, rest);
            // ...or one more (real directories only), keeping `**`.
            for (name, ft) in self.read(dir) {
                if self.full() {
                    return;
                }
                let child = join(dir, &name);
                if rest.is_empty() {
                    self.add(child.clone());
                }
                if ft.is_dir() {
                    self.walk(&child, pats);
                }
            }
        } else if !has_meta(first) {
            let child = join(dir, first);
            if is_reserved(&child) {
                return;
            }
            if rest.is_empty() {
                if fs::symlink_metadata(&child).is_ok() {
                    self.add(child);
                }
            } else if fs::metadata(&child).is_ok_and(|m| m.is_dir()) {
                self.walk(&child, rest);
            }
        } else {
            for (name, ft) in self.read(dir) {
                if self.full() {
                    return;
                }
                if !match_component(first, &name) {
                    continue;
                }
                let child = join(dir, &name);
                if rest.is_empty() {
                    self.add(child);
                } else if Self::is_dir_following(&child, ft) {
                    self.walk(&child, rest);
                }
            }
        }
    }
}

/// All existing paths matching the normalized absolute `pattern`, sorted.
pub fn glob(pattern: &str) -> Vec<String> {
    let comps: Vec<&str> = pattern.split('/').filter(|c| !c.is_empty()).collect();
    // Start from the longest literal prefix.
    let lit = comps.iter().take_while(|c| !has_meta(c)).count();
    let mut base = String::from("/");
    for c in &comps[..lit] {
        base = join(&base, c);
    }
    let mut w = Walker {
        found: BTreeSet::new(),
        visited: 0,
    };
    if lit == comps.len() {
        if fs::symlink_metadata(&base).is_ok() {
            w.add(base);
        }
    } else if fs::metadata(&base).is_ok_and(|m| m.is_dir()) {
        w.walk(&base, &comps[lit..]);
    }
    w.found.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn component_matching() {
        assert!(match_component("*.py", "a.py"));
        assert!(match_component("*.py", ".py"));
        assert!(!match_component("*.py", "a.pyc"));
        assert!(match_component("a?c", "abc"));
        assert!(!match_component("a?c", "ac"));
        assert!(match_component("[abc]x", "bx"));
        assert!(!match_component("[abc]x", "dx"));
        assert!(match_component("[a-z]1", "q1"));
        assert!(!match_component("[a-z]1", "Q1"));
        assert!(match_component("[!a]", "b"));
        assert!(!match_component("[!a]", "a"));
        assert!(match_component("[^a]", "b"));
        assert!(match_component("[]]", "]"));
        assert!(match_component("[a-]", "-"));
        assert!(match_component("x[", "x["));
        assert!(!match_component("x[", "xa"));
        assert!(match_component("*", ""));
        assert!(match_component("**", "anything"));
        assert!(match_component("a*b*c", "aXXbYYc"));
        assert!(!match_component("a*b*c", "aXXbYY"));
        assert!(match_component("*é?", "caféé"));
        assert!(match_component("f*", "f"));
        assert!(!match_component("", "a"));
        assert!(match_component("", ""));
    }

    #[test]
    fn path_matching() {
        assert!(match_path("/w/**/*.py", "/w/a.py"));
        assert!(match_path("/w/**/*.py", "/w/x/y/b.py"));
        assert!(!match_path("/w/**/*.py", "/v/a.py"));
        assert!(match_path("/w/*.txt", "/w/a.txt"));
        assert!(!match_path("/w/*.txt", "/w/sub/a.txt"));
        assert!(match_path("/w/**", "/w"));
        assert!(match_path("/w/**", "/w/a/b"));
        assert!(match_path("/**/c", "/a/b/c"));
    }

    fn tmpdir(tag: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let d = format!("/tmp/stacyvm-glob-{tag}-{}-{nanos}", std::process::id());
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn walks_the_filesystem() {
        let d = tmpdir("walk");
        for f in [
            "a.py",
            "b.txt",
            "x/c.py",
            "x/y/d.py",
            "x/y/e.txt",
            ".h/f.py",
        ] {
            let p = format!("{d}/{f}");
            fs::create_dir_all(Path::new(&p).parent().unwrap()).unwrap();
            fs::write(&p, b"").unwrap();
        }
        std::os::unix::fs::symlink(format!("{d}/x"), format!("{d}/link")).unwrap();
        let g = |pat: &str| -> Vec<String> {
            glob(&format!("{d}/{pat}"))
                .into_iter()
                .map(|p| p[d.len() + 1..].to_string())
                .collect()
        };
        assert_eq!(g("*.py"), vec!["a.py"]);
        assert_eq!(
            g("**/*.py"),
            vec![".h/f.py", "a.py", "x/c.py", "x/y/d.py"],
            "symlinked dirs are not followed by **"
        );
        assert_eq!(g("*/c.py"), vec!["link/c.py", "x/c.py"]);
        assert_eq!(
            g("x/**"),
            vec!["x", "x/c.py", "x/y", "x/y/d.py", "x/y/e.txt"]
        );
        assert_eq!(g("[ab].*"), vec!["a.py", "b.txt"]);
        assert_eq!(g("x/y/d.py"), vec!["x/y/d.py"]);
        assert!(g("nope/*").is_empty());
        assert!(g("*.rs").is_empty());
        for p in glob(&format!("{d}/**")) {
            assert!(match_path(&format!("{d}/**"), &p));
        }
        fs::remove_dir_all(&d).unwrap();
    }
}
