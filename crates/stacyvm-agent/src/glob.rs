//! `GET /v1/files/glob` over the sandbox's filesystem: the walk and the
//! pattern syntax are [`stacyvm_agent_proto::glob`]'s; here is the real
//! filesystem it walks. Symlinked directories are entered when a component
//! names them or a wildcard matches them, never through `**`.

use stacyvm_agent_proto::glob::{self, DirItem, EntryKind, GlobFs};
use stacyvm_agent_proto::path::join;
use std::fs;

/// The agent's own filesystem: nodes are the paths themselves.
struct RealFs;

impl GlobFs for RealFs {
    type Node = String;

    fn start(&self, path: &str, _follow_last: bool) -> Option<String> {
        Some(path.to_string())
    }

    fn child(&self, dir: &String, name: &str) -> String {
        join(dir, name)
    }

    fn read_dir(&self, dir: &String) -> Option<Box<dyn Iterator<Item = DirItem> + '_>> {
        let rd = fs::read_dir(dir).ok()?;
        Some(Box::new(rd.flatten().map(|ent| {
            let kind = EntryKind::from(ent.file_type().ok()?);
            Some((ent.file_name().to_string_lossy().into_owned(), kind))
        })))
    }

    fn exists(&self, path: &String) -> bool {
        fs::symlink_metadata(path).is_ok()
    }

    /// Follows symlinks.
    fn is_dir(&self, path: &String) -> bool {
        fs::metadata(path).is_ok_and(|m| m.is_dir())
    }
}

/// All existing paths matching the normalized absolute `pattern`, sorted.
pub fn glob(pattern: &str) -> Vec<String> {
    glob::glob(&RealFs, pattern)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stacyvm_agent_proto::glob::match_path;
    use std::path::Path;

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
