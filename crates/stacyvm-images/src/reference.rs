//! Image references: `python:3.12`, `ghcr.io/org/img:tag`,
//! `127.0.0.1:5000/test/python:bookworm`, `name@sha256:…`.
//!
//! Parsing and normalisation follow the rules of the Docker CLI: a first path
//! component is a registry host only if it contains `.` or `:` or is
//! `localhost`; otherwise the image lives on Docker Hub (`docker.io`), where a
//! single-component name is an official image under `library/`. Without a tag
//! or digest the tag is `latest`.

use crate::ImageError;
use std::fmt;

/// The registry name Docker Hub images are normalised to.
pub const DOCKER_HUB: &str = "docker.io";
const LEGACY_DOCKER_HUB: &str = "index.docker.io";
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host with optional port, e.g. `docker.io`, `ghcr.io`,
    /// `127.0.0.1:5000`.
    pub domain: String,
    /// Repository path inside the registry, e.g. `library/python`.
    pub path: String,
    /// Tag; `latest` when neither tag nor digest was given, `None` when only a
    /// digest was given.
    pub tag: Option<String>,
    /// `sha256:<64 hex>` when the reference pins a digest.
    pub digest: Option<String>,
}

impl Reference {
    /// Parse and normalise a reference.
    pub fn parse(input: &str) -> Result<Reference, ImageError> {
        let bad = |reason: &str| ImageError::InvalidReference {
            reference: input.to_string(),
            reason: reason.to_string(),
        };
        if input.is_empty() {
            return Err(bad("empty reference"));
        }
        if input.trim() != input {
            return Err(bad("surrounding whitespace"));
        }
        let (name_tag, digest) = match input.split_once('@') {
            Some((n, d)) => {
                validate_digest(d).map_err(|r| bad(&r))?;
                (n, Some(d.to_string()))
            }
            None => (input, None),
        };
        if name_tag.is_empty() {
            return Err(bad("missing repository name"));
        }

        // Registry host: the first component, if it looks like one.
        let (domain, remainder) = match name_tag.split_once('/') {
            Some((first, rest))
                if first.contains('.')
                    || first.contains(':')
                    || first == "localhost"
                    || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                (first.to_string(), rest)
            }
            _ => (DOCKER_HUB.to_string(), name_tag),
        };
        let domain = if domain == LEGACY_DOCKER_HUB {
            DOCKER_HUB.to_string()
        } else {
            domain
        };
        validate_domain(&domain).map_err(|r| bad(&r))?;

        // The path cannot contain ':', so a ':' left here starts the tag.
        let (path, tag) = match remainder.rsplit_once(':') {
            Some((p, t)) => {
                validate_tag(t).map_err(|r| bad(&r))?;
                (p, Some(t.to_string()))
            }
            None => (remainder, None),
        };
        validate_path(path).map_err(|r| bad(&r))?;
        let path = if domain == DOCKER_HUB && !path.contains('/') {
            if path.len() == 64 && path.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad("a repository name cannot be a 64-character hex string"));
            }
            format!("library/{path}")
        } else {
            path.to_string()
        };
        if domain.len() + 1 + path.len() > MAX_NAME_LEN {
            return Err(bad("repository name longer than 255 characters"));
        }
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".to_string()),
            (t, _) => t,
        };
        Ok(Reference {
            domain,
            path,
            tag,
            digest,
        })
    }

    /// `domain/path`, e.g. `docker.io/library/python`.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// What the manifest is fetched by: the digest if pinned, else the tag.
    pub fn object(&self) -> &str {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d,
            (None, Some(t)) => t,
            (None, None) => "latest",
        }
    }

    /// Whether the registry is on this machine (`localhost`, `127.0.0.0/8`,
    /// `[::1]`) and so may be spoken to over plain HTTP.
    pub fn is_loopback_registry(&self) -> bool {
        is_loopback_host(&self.domain)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.path)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Reference, ImageError> {
        Reference::parse(s)
    }
}

/// `host[:port]` without the port, brackets of IPv6 literals removed.
pub(crate) fn host_of(domain: &str) -> &str {
    if let Some(rest) = domain.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match domain.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => domain,
    }
}

pub(crate) fn is_loopback_host(domain: &str) -> bool {
    let host = host_of(domain);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => false,
    }
}

/// `sha256:<64 lowercase hex>`; other algorithms are refused.
pub(crate) fn validate_digest(d: &str) -> Result<(), String> {
    let Some((algo, hex)) = d.split_once(':') else {
        return Err(format!("digest {d:?} must look like sha256:<hex>"));
    };
    if algo != "sha256" {
        return Err(format!("unsupported digest algorithm {algo:?}"));
    }
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err("a sha256 digest has 64 lowercase hex characters".to_string());
    }
    Ok(())
}

fn validate_tag(t: &str) -> Result<(), String> {
    let ok_first = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let ok = |c: char| ok_first(c) || c == '.' || c == '-';
    let mut chars = t.chars();
    match chars.next() {
        None => return Err("empty tag".to_string()),
        Some(c) if !ok_first(c) => {
            return Err(format!("tag {t:?} must start with a letter, digit or '_'"))
        }
        _ => {}
    }
    if !chars.all(ok) {
        return Err(format!(
            "tag {t:?} may only contain letters, digits, '_', '.' and '-'"
        ));
    }
    if t.len() > MAX_TAG_LEN {
        return Err("tag longer than 128 characters".to_string());
    }
    Ok(())
}

fn validate_domain(d: &str) -> Result<(), String> {
    let err = || format!("invalid registry host {d:?}");
    let (host, port) = if let Some(rest) = d.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or_else(err)?;
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(err());
        }
        match after {
            "" => (None, None),
            p => (None, Some(p.strip_prefix(':').ok_or_else(err)?)),
        }
    } else {
        match d.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(d), None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.parse::<u16>().is_err() {
            return Err(err());
        }
    }
    if let Some(h) = host {
        if h.is_empty() {
            return Err(err());
        }
        for comp in h.split('.') {
            let b = comp.as_bytes();
            let alnum = |c: &u8| c.is_ascii_alphanumeric();
            if b.is_empty()
                || !alnum(&b[0])
                || !alnum(&b[b.len() - 1])
                || !b.iter().all(|c| alnum(c) || *c == b'-')
            {
                return Err(err());
            }
        }
    }
    Ok(())
}

/// `component('/'component)*`, component := `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn validate_path(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("missing repository name".to_string());
    }
    for comp in p.split('/') {
        if !valid_path_component(comp) {
            return Err(format!(
                "repository path component {comp:?} must be lowercase letters and digits, \
                 separated by '.', '_', '__' or dashes"
            ));
        }
    }
    Ok(())
}

fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__' or any number of '-'.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        Reference::parse(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .to_string()
    }

    fn invalid(s: &str) {
        match Reference::parse(s) {
            Err(ImageError::InvalidReference { .. }) => {}
            other => panic!("{s:?} should be invalid, got {other:?}"),
        }
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn docker_hub_short_names() {
        assert_eq!(norm("python:3.12"), "docker.io/library/python:3.12");
        assert_eq!(norm("node:20"), "docker.io/library/node:20");
        assert_eq!(norm("python"), "docker.io/library/python:latest");
        assert_eq!(norm("library/python"), "docker.io/library/python:latest");
        assert_eq!(norm("bitnami/redis:7.2"), "docker.io/bitnami/redis:7.2");
        assert_eq!(norm("docker.io/python:3"), "docker.io/library/python:3");
        assert_eq!(
            norm("index.docker.io/library/python:3"),
            "docker.io/library/python:3"
        );
        assert_eq!(
            norm("stacyvm-test/python:bookworm"),
            "docker.io/stacyvm-test/python:bookworm"
        );
        let r = Reference::parse("python:3.12").unwrap();
        assert_eq!(r.domain, "docker.io");
        assert_eq!(r.path, "library/python");
        assert_eq!(r.tag.as_deref(), Some("3.12"));
        assert_eq!(r.object(), "3.12");
        assert_eq!(r.repository(), "docker.io/library/python");
    }

    #[test]
    fn other_registries() {
        assert_eq!(norm("ghcr.io/org/img:tag"), "ghcr.io/org/img:tag");
        assert_eq!(norm("ghcr.io/org/sub/img"), "ghcr.io/org/sub/img:latest");
        let r = Reference::parse("127.0.0.1:5000/test/python:bookworm").unwrap();
        assert_eq!(r.domain, "127.0.0.1:5000");
        assert_eq!(r.path, "test/python");
        assert_eq!(r.tag.as_deref(), Some("bookworm"));
        assert!(r.is_loopback_registry());
        let r = Reference::parse("localhost/img").unwrap();
        assert_eq!(r.domain, "localhost");
        assert_eq!(r.path, "img", "no library/ prefix outside Docker Hub");
        assert!(r.is_loopback_registry());
        let r = Reference::parse("localhost:5000/img:1").unwrap();
        assert_eq!(r.domain, "localhost:5000");
        let r = Reference::parse("[::1]:5000/a/b:c").unwrap();
        assert_eq!(r.domain, "[::1]:5000");
        assert!(r.is_loopback_registry());
        let r = Reference::parse("my.registry.example:443/team/app").unwrap();
        assert!(!r.is_loopback_registry());
        assert!(!Reference::parse("ghcr.io/a/b")
            .unwrap()
            .is_loopback_registry());
        // Without '.', ':' or "localhost" the first component is a namespace.
        assert_eq!(norm("myhost/img"), "docker.io/myhost/img:latest");
        // Docker's rule: a bare "host:port" without a slash is a name and a tag.
        assert_eq!(norm("localhost:5000"), "docker.io/library/localhost:5000");
    }

    #[test]
    fn digests() {
        let r = Reference::parse(&format!("python@{D}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(D));
        assert_eq!(r.object(), D);
        assert_eq!(r.to_string(), format!("docker.io/library/python@{D}"));
        let r = Reference::parse(&format!("ghcr.io/o/i:1.0@{D}")).unwrap();
        assert_eq!(r.tag.as_deref(), Some("1.0"));
        assert_eq!(r.object(), D, "the digest wins over the tag");
        assert_eq!(r.to_string(), format!("ghcr.io/o/i:1.0@{D}"));
        invalid("python@sha256:abc");
        invalid(&format!(
            "python@{}",
            D.to_uppercase().replace("SHA256", "sha256")
        ));
        invalid(&format!("python@md5:{}", &D[7..]));
        invalid("python@");
        invalid(&format!("@{D}"));
    }

    #[test]
    fn garbage_is_rejected() {
        for s in [
            "",
            " python",
            "python ",
            "Python",
            "python:",
            "python:-x",
            "python:a/b",
            "python::1",
            "/python",
            "python/",
            "a//b",
            "ghcr.io/",
            "ghcr.io//x",
            "ghcr.io:abc/x",
            "ghcr.io:99999/x",
            "-bad.io/x",
            "bad-.io/x",
            "bad..io/x",
            "[::1/x",
            "[zz::1]:5000/x",
            "python:tag with space",
            "a--b_",
            "a___b",
            "a..b",
            ".a",
            "a@b@c",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            invalid(s);
        }
        invalid(&format!("python:{}", "a".repeat(129)));
        invalid(&format!("ghcr.io/{}", "a".repeat(250)));
    }

    #[test]
    fn separators() {
        for ok in ["a.b", "a_b", "a__b", "a-b", "a---b", "a-b.c_d__e"] {
            assert_eq!(
                Reference::parse(ok).unwrap().path,
                format!("library/{ok}"),
                "{ok}"
            );
        }
        assert_eq!(
            Reference::parse(&format!("python:{}", "a".repeat(128)))
                .unwrap()
                .tag
                .map(|t| t.len()),
            Some(128)
        );
        assert_eq!(norm("python:_x.Y-1"), "docker.io/library/python:_x.Y-1");
    }

    #[test]
    fn hosts() {
        assert_eq!(host_of("127.0.0.1:5000"), "127.0.0.1");
        assert_eq!(host_of("[::1]:5000"), "::1");
        assert_eq!(host_of("[::1]"), "::1");
        assert_eq!(host_of("ghcr.io"), "ghcr.io");
        assert!(is_loopback_host("127.1.2.3:80"));
        assert!(is_loopback_host("LOCALHOST:1"));
        assert!(!is_loopback_host("192.0.2.1:5000"));
    }
}
