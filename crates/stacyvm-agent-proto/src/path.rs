//! Validation of paths inside a sandbox, shared by the server (first line of
//! defence, for clear 400s) and the agent (which re-checks everything), and
//! the helpers that take normalized paths apart and put them together.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    Empty,
    Relative,
    Nul,
    Escapes,
    TooLong,
    Reserved,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::Empty => "path is empty",
            PathError::Relative => "path must be absolute (start with /)",
            PathError::Nul => "path contains a NUL byte",
            PathError::Escapes => "path climbs out of the sandbox root with ..",
            PathError::TooLong => "path is longer than 4096 bytes",
            PathError::Reserved => "path is reserved for the StacyVM agent",
        })
    }
}

impl std::error::Error for PathError {}

/// Check and normalise an absolute path inside the sandbox: collapses `//`
/// and `.`, resolves `..` lexically and refuses any `..` that would climb
/// above `/`. Paths under [`crate::RESERVED_PREFIX`] are refused.
pub fn normalize(path: &str) -> Result<String, PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > 4096 {
        return Err(PathError::TooLong);
    }
    if path.contains('\0') {
        return Err(PathError::Nul);
    }
    if !path.starts_with('/') {
        return Err(PathError::Relative);
    }
    let mut parts: Vec<&str> = Vec::new();
    for comp in path.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(PathError::Escapes);
                }
            }
            c => parts.push(c),
        }
    }
    let out = format!("/{}", parts.join("/"));
    if is_reserved(&out) {
        return Err(PathError::Reserved);
    }
    Ok(out)
}

/// True for the agent's own directory and everything under it.
pub fn is_reserved(normalized: &str) -> bool {
    let p = crate::RESERVED_PREFIX;
    normalized == p
        || normalized
            .strip_prefix(p)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The last component of a normalized path (`/` for the root).
pub fn base_name(p: &str) -> String {
    match p.rsplit_once('/') {
        Some((_, "")) | None => "/".to_string(),
        Some((_, name)) => name.to_string(),
    }
}

/// The parent directory of a normalized path other than `/`.
pub fn parent_of(p: &str) -> &str {
    match p.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &p[..i],
    }
}

/// `dir/name` for a normalized `dir`.
pub fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes() {
        assert_eq!(normalize("/").unwrap(), "/");
        assert_eq!(normalize("/a//b/./c/").unwrap(), "/a/b/c");
        assert_eq!(normalize("/a/b/../c").unwrap(), "/a/c");
        assert_eq!(
            normalize("/workspace/.stacyvm").unwrap(),
            "/workspace/.stacyvm"
        );
    }

    #[test]
    fn refuses_bad_paths() {
        assert_eq!(normalize(""), Err(PathError::Empty));
        assert_eq!(normalize("a/b"), Err(PathError::Relative));
        assert_eq!(normalize("/a\0b"), Err(PathError::Nul));
        assert_eq!(normalize("/.."), Err(PathError::Escapes));
        assert_eq!(normalize("/a/../../etc"), Err(PathError::Escapes));
        assert_eq!(
            normalize("/.stacyvm/run/agent.sock"),
            Err(PathError::Reserved)
        );
        assert_eq!(normalize("/.stacyvm"), Err(PathError::Reserved));
        assert!(normalize(&format!("/{}", "a".repeat(5000))).is_err());
    }

    #[test]
    fn path_pieces() {
        assert_eq!(base_name("/"), "/");
        assert_eq!(base_name("/a"), "a");
        assert_eq!(base_name("/a/b.txt"), "b.txt");
        assert_eq!(parent_of("/a"), "/");
        assert_eq!(parent_of("/a/b/c"), "/a/b");
        assert_eq!(join("/", "x"), "/x");
        assert_eq!(join("/a", "x"), "/a/x");
    }
}
