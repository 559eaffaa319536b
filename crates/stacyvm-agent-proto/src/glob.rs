//! Glob patterns of `GET /v1/files/glob`.
//!
//! Within one path component: `*` (any run of characters), `?` (one
//! character), `[abc]`, `[a-z]` and negated `[!a]` / `[^a]` classes. A whole
//! component `**` matches zero or more directories (as the last component it
//! matches everything below, files included). Wildcards match names starting
//! with a dot too. Symlinked directories are not followed while descending
//! through `**`; unreadable directories are skipped, and so is the reserved
//! agent tree.
//!
//! The walk itself is here; the filesystem is the caller's ([`GlobFs`]):
//! the agent's is the real one, the mock provider's is a sandbox root
//! directory on the host.

use crate::path::{is_reserved, join};
use std::collections::BTreeSet;

/// At most this many paths are returned.
pub const MAX_RESULTS: usize = 100_000;
/// At most this many directory entries are examined per glob.
pub const MAX_VISITED: usize = 2_000_000;

/// True when a component contains glob syntax.
pub fn has_meta(comp: &str) -> bool {
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
pub fn match_path(pattern: &str, path: &str) -> bool {
    let pat: Vec<&str> = pattern.split('/').filter(|c| !c.is_empty()).collect();
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    match_comps(&pat, &comps)
}

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

/// What a directory entry is, without following a symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    Symlink,
    Other,
}

impl From<std::fs::FileType> for EntryKind {
    fn from(ft: std::fs::FileType) -> EntryKind {
        if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_symlink() {
            EntryKind::Symlink
        } else {
            EntryKind::Other
        }
    }
}

/// One entry read from a directory: its name and kind, or `None` for an
/// entry whose kind could not be read (counted, then skipped).
pub type DirItem = Option<(String, EntryKind)>;

/// The filesystem a [`glob`] walks. A `Node` is where the implementation
/// finds one sandbox path (the path itself, or a host path standing for it).
pub trait GlobFs {
    type Node;

    /// The node of the pattern's literal prefix `path` (normalized,
    /// absolute); a final symlink is followed when `follow_last` is set.
    /// `None` when it cannot be found at all.
    fn start(&self, path: &str, follow_last: bool) -> Option<Self::Node>;

    /// The node of the entry `name` of the directory `dir`.
    fn child(&self, dir: &Self::Node, name: &str) -> Self::Node;

    /// The entries of the directory `node`; `None` when it is unreadable.
    fn read_dir(&self, node: &Self::Node) -> Option<Box<dyn Iterator<Item = DirItem> + '_>>;

    /// Whether `node` exists (a symlink counts, whatever it points to).
    fn exists(&self, node: &Self::Node) -> bool;

    /// Whether the walk may descend into `node` when a component names it
    /// literally or a wildcard matches a symlink: it is a directory (through
    /// a symlink or not, as the implementation decides).
    fn is_dir(&self, node: &Self::Node) -> bool;
}

struct Walker<'f, F: GlobFs> {
    fs: &'f F,
    found: BTreeSet<String>,
    visited: usize,
}

impl<F: GlobFs> Walker<'_, F> {
    fn full(&self) -> bool {
        self.found.len() >= MAX_RESULTS || self.visited >= MAX_VISITED
    }

    fn add(&mut self, path: String) {
        if self.found.len() < MAX_RESULTS && !is_reserved(&path) {
            self.found.insert(path);
        }
    }

    /// The entries of `dir` (empty when unreadable), without the reserved tree.
    fn read(&mut self, dir: &str, node: &F::Node) -> Vec<(String, EntryKind)> {
        let Some(entries) = self.fs.read_dir(node) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for item in entries {
            self.visited += 1;
            if self.visited >= MAX_VISITED {
                break;
            }
            let Some((name, kind)) = item else { continue };
            if is_reserved(&join(dir, &name)) {
                continue;
            }
            out.push((name, kind));
        }
        out
    }

    /// Match the pattern components `pats` below the existing directory `dir`.
    fn walk(&mut self, dir: &str, node: &F::Node, pats: &[&str]) {
        if self.full() {
            return;
        }
        let Some((&first, rest)) = pats.split_first() else {
            self.add(dir.to_string());
            return;
        };
        if first == "**" {
            // Zero directories...
            self.walk(dir, node, rest);
            // ...or one more (real directories only), keeping `**`.
            for (name, kind) in self.read(dir, node) {
                if self.full() {
                    return;
                }
                let child = join(dir, &name);
                if rest.is_empty() {
                    self.add(child.clone());
                }
                if kind == EntryKind::Dir {
                    let cnode = self.fs.child(node, &name);
                    self.walk(&child, &cnode, pats);
                }
            }
        } else if !has_meta(first) {
            let child = join(dir, first);
            if is_reserved(&child) {
                return;
            }
            let cnode = self.fs.child(node, first);
            if rest.is_empty() {
                if self.fs.exists(&cnode) {
                    self.add(child);
                }
            } else if self.fs.is_dir(&cnode) {
                self.walk(&child, &cnode, rest);
            }
        } else {
            for (name, kind) in self.read(dir, node) {
                if self.full() {
                    return;
                }
                if !match_component(first, &name) {
                    continue;
                }
                let child = join(dir, &name);
                if rest.is_empty() {
                    self.add(child);
                    continue;
                }
                let cnode = self.fs.child(node, &name);
                let descend = match kind {
                    EntryKind::Dir => true,
                    EntryKind::Symlink => self.fs.is_dir(&cnode),
                    EntryKind::Other => false,
                };
                if descend {
                    self.walk(&child, &cnode, rest);
                }
            }
        }
    }
}

/// All existing paths of `fs` matching the normalized absolute `pattern`,
/// sorted.
pub fn glob<F: GlobFs>(fs: &F, pattern: &str) -> Vec<String> {
    let comps: Vec<&str> = pattern.split('/').filter(|c| !c.is_empty()).collect();
    // Start from the longest literal prefix.
    let lit = comps.iter().take_while(|c| !has_meta(c)).count();
    let mut base = String::from("/");
    for c in &comps[..lit] {
        base = join(&base, c);
    }
    let mut w = Walker {
        fs,
        found: BTreeSet::new(),
        visited: 0,
    };
    if lit == comps.len() {
        if fs.start(&base, false).is_some_and(|n| fs.exists(&n)) {
            w.add(base);
        }
    } else if let Some(node) = fs.start(&base, true).filter(|n| fs.is_dir(n)) {
        w.walk(&base, &node, &comps[lit..]);
    }
    w.found.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

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

    /// An in-memory tree: path → kind; a symlink's target is in `links`.
    #[derive(Default)]
    struct Tree {
        kinds: BTreeMap<String, EntryKind>,
        links: BTreeMap<String, String>,
    }

    impl Tree {
        fn add(&mut self, path: &str, kind: EntryKind) {
            let mut dir = String::from("/");
            for c in path.split('/').filter(|c| !c.is_empty()) {
                self.kinds.entry(dir.clone()).or_insert(EntryKind::Dir);
                dir = join(&dir, c);
            }
            self.kinds.insert(path.to_string(), kind);
        }

        fn link(&mut self, path: &str, target: &str) {
            self.add(path, EntryKind::Symlink);
            self.links.insert(path.to_string(), target.to_string());
        }

        /// `p` with symlinks in its directories replaced by their targets.
        fn canon(&self, p: &str) -> String {
            let mut out = String::from("/");
            for c in p.split('/').filter(|c| !c.is_empty()) {
                if let Some(t) = self.links.get(&out) {
                    out = t.clone();
                }
                out = join(&out, c);
            }
            out
        }

        /// The kind of `p`, following symlinks.
        fn follow(&self, p: &str) -> Option<EntryKind> {
            let p = self.canon(p);
            match self.kinds.get(&p)? {
                EntryKind::Symlink => self.follow(self.links.get(&p)?),
                k => Some(*k),
            }
        }
    }

    impl GlobFs for Tree {
        type Node = String;

        fn start(&self, path: &str, _follow_last: bool) -> Option<String> {
            Some(path.to_string())
        }

        fn child(&self, dir: &String, name: &str) -> String {
            join(dir, name)
        }

        fn read_dir(&self, node: &String) -> Option<Box<dyn Iterator<Item = DirItem> + '_>> {
            if self.follow(node)? != EntryKind::Dir {
                return None;
            }
            let node = self.canon(node);
            let node = self.links.get(&node).cloned().unwrap_or(node);
            let prefix = if node == "/" {
                node.clone()
            } else {
                format!("{node}/")
            };
            Some(Box::new(self.kinds.iter().filter_map(move |(p, k)| {
                let name = p.strip_prefix(&prefix)?;
                (!name.is_empty() && !name.contains('/')).then(|| Some((name.to_string(), *k)))
            })))
        }

        fn exists(&self, node: &String) -> bool {
            self.kinds.contains_key(&self.canon(node))
        }

        fn is_dir(&self, node: &String) -> bool {
            self.follow(node) == Some(EntryKind::Dir)
        }
    }

    #[test]
    fn walks_a_tree() {
        let mut t = Tree::default();
        for f in [
            "/w/a.py",
            "/w/b.txt",
            "/w/x/c.py",
            "/w/x/y/d.py",
            "/w/.h/f.py",
        ] {
            t.add(f, EntryKind::Other);
        }
        t.link("/w/link", "/w/x");
        t.add("/.stacyvm/agent.sock", EntryKind::Other);
        assert_eq!(glob(&t, "/w/*.py"), ["/w/a.py"]);
        assert_eq!(
            glob(&t, "/w/**/*.py"),
            ["/w/.h/f.py", "/w/a.py", "/w/x/c.py", "/w/x/y/d.py"],
            "symlinked dirs are not followed by **"
        );
        assert_eq!(glob(&t, "/w/*/c.py"), ["/w/link/c.py", "/w/x/c.py"]);
        assert_eq!(
            glob(&t, "/w/x/**"),
            ["/w/x", "/w/x/c.py", "/w/x/y", "/w/x/y/d.py"]
        );
        assert_eq!(glob(&t, "/w/[ab].*"), ["/w/a.py", "/w/b.txt"]);
        assert_eq!(glob(&t, "/w/x/y/d.py"), ["/w/x/y/d.py"]);
        assert!(glob(&t, "/w/nope/*").is_empty());
        assert!(
            glob(&t, "/*/agent.sock").is_empty(),
            "the reserved tree is skipped"
        );
        for p in glob(&t, "/**") {
            assert!(match_path("/**", &p), "{p}");
            assert!(!p.starts_with("/.stacyvm"), "{p}");
        }
    }
}
