//! Live previews: preview host names and signed access tokens.
//!
//! A web app on port `P` of sandbox `ID` is reached at
//! `http://P-ID.{preview_domain}` through the server's own proxy (the API
//! crate's `preview` module), which carries each connection through the
//! sandbox agent's TCP tunnel. This module holds the pure parts: parsing
//! host names, and the HMAC-SHA256 tokens that grant access to one port of
//! one sandbox until an expiry.
//!
//! Token: `v1.<sandbox id>.<port>.<expiry, unix seconds>.<signature>`, the
//! signature being base64url(HMAC-SHA256(secret, "stacyvm-preview\0v1\0" id
//! "\0" port "\0" expiry)). The secret is generated once per data directory
//! and kept in the store.

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// Who may open a sandbox's previews.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreviewAccess {
    /// Anyone who can reach the proxy.
    Public,
    /// Only holders of a token for that sandbox and port.
    Token,
}

impl PreviewAccess {
    pub fn parse(s: &str) -> Option<PreviewAccess> {
        match s.trim().to_ascii_lowercase().as_str() {
            "public" => Some(PreviewAccess::Public),
            "token" => Some(PreviewAccess::Token),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            PreviewAccess::Public => "public",
            PreviewAccess::Token => "token",
        }
    }
}

/// Metadata key (and create field) with which a sandbox chooses its access.
pub const ACCESS_KEY: &str = "preview";

/// The configured preview domain: a host name, optionally with a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// Lowercase, without a trailing dot.
    pub host: String,
    pub port: Option<u16>,
}

fn valid_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

/// A port number as written in a host name: 1–65535, decimal digits only,
/// no sign, no leading zero.
pub fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || s.starts_with('0') || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok()
}

impl Domain {
    pub fn parse(s: &str) -> Option<Domain> {
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(parse_port(p)?)),
            None => (s, None),
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if host.is_empty() || host.len() > 200 || !host.split('.').all(valid_label) {
            return None;
        }
        Some(Domain { host, port })
    }
}

/// What a request's host name asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// Not under the preview domain: an API request.
    Api,
    /// `{port}-{id}.{domain}`.
    Preview { port: u16, id: String },
    /// Under the preview domain but not a valid preview name; `not_found`
    /// when only the sandbox id part is wrong.
    Invalid { not_found: bool, reason: String },
}

/// Longest host name looked at; longer ones under the preview domain are
/// refused, others go to the API (which ignores the host).
const MAX_HOST: usize = 1024;

/// Classify a `Host` header (or request authority) against the preview domain.
pub fn match_host(host: &str, domain: &Domain) -> HostMatch {
    let host = host.trim();
    if host.starts_with('[') {
        return HostMatch::Api; // an IPv6 literal
    }
    let name = host.split_once(':').map_or(host, |(n, _)| n);
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.len() <= domain.host.len() {
        return HostMatch::Api;
    }
    let split = name.len() - domain.host.len();
    let (label, rest) = name.split_at(split);
    if !rest.eq_ignore_ascii_case(&domain.host) {
        return HostMatch::Api;
    }
    let Some(label) = label.strip_suffix('.') else {
        return HostMatch::Api; // e.g. "xpreview.test"
    };
    let invalid = |reason: String| HostMatch::Invalid {
        not_found: false,
        reason,
    };
    let shape = format!(
        "preview host names look like {{port}}-{{sandbox id}}.{}",
        domain.host
    );
    if host.len() > MAX_HOST {
        return invalid(format!("the host name is too long; {shape}"));
    }
    if label.is_empty() || label.contains('.') {
        return invalid(shape);
    }
    let Some((port, id)) = label.split_once('-') else {
        return invalid(shape);
    };
    let Some(port) = parse_port(port) else {
        return invalid(format!(
            "{port:?} is not a port: ports are 1 to 65535; {shape}"
        ));
    };
    let id = id.to_ascii_lowercase();
    if !crate::id::is_sandbox_id(&id) {
        return HostMatch::Invalid {
            not_found: true,
            reason: format!("{id:?} is not a sandbox id; {shape}"),
        };
    }
    HostMatch::Preview { port, id }
}

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// Compare without leaking where the first difference is.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn signature(secret: &[u8], id: &str, port: u16, exp: u64) -> String {
    let msg = format!("stacyvm-preview\0v1\0{id}\0{port}\0{exp}");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hmac_sha256(secret, msg.as_bytes()))
}

/// A token for `port` of sandbox `id`, valid until `exp` (unix seconds).
pub fn sign(secret: &[u8], id: &str, port: u16, exp: u64) -> String {
    format!("v1.{id}.{port}.{exp}.{}", signature(secret, id, port, exp))
}

/// Why a token does not open a preview.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the preview token is malformed")]
    Malformed,
    #[error("the preview token's signature is not valid")]
    Forged,
    #[error("the preview token is for port {port} of sandbox {id}")]
    OtherTarget { id: String, port: u16 },
    #[error("the preview token expired")]
    Expired,
}

/// Check `token` for `port` of sandbox `id` at time `now` (unix seconds);
/// returns its expiry.
pub fn verify(
    secret: &[u8],
    token: &str,
    id: &str,
    port: u16,
    now: u64,
) -> Result<u64, TokenError> {
    if token.len() > 256 {
        return Err(TokenError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some("v1"), Some(tid), Some(tport), Some(texp), Some(sig), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(TokenError::Malformed);
    };
    // Claims in canonical form only ("007" is not "7").
    let canonical = |s: &str| {
        !s.is_empty()
            && s.len() <= 20
            && s.bytes().all(|b| b.is_ascii_digit())
            && (s == "0" || !s.starts_with('0'))
    };
    if !canonical(texp) || !crate::id::is_sandbox_id(tid) {
        return Err(TokenError::Malformed);
    }
    let (Some(tport), Ok(texp)) = (parse_port(tport), texp.parse::<u64>()) else {
        return Err(TokenError::Malformed);
    };
    let want = signature(secret, tid, tport, texp);
    if !constant_time_eq(want.as_bytes(), sig.as_bytes()) {
        return Err(TokenError::Forged);
    }
    if tid != id || tport != port {
        return Err(TokenError::OtherTarget {
            id: tid.to_string(),
            port: tport,
        });
    }
    if texp <= now {
        return Err(TokenError::Expired);
    }
    Ok(texp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn hmac_matches_rfc4231() {
        // Test cases 1, 2 and 6 of RFC 4231.
        assert_eq!(
            hex(&hmac_sha256(&[0x0b; 20], b"Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex(&hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn tokens_bind_sandbox_port_and_expiry() {
        let secret = b"secret";
        let id = "sb_abcdefghijkl0123";
        let t = sign(secret, id, 3000, 1_000);
        assert_eq!(verify(secret, &t, id, 3000, 999), Ok(1_000));
        assert_eq!(
            verify(secret, &t, id, 3000, 1_000),
            Err(TokenError::Expired)
        );
        assert!(matches!(
            verify(secret, &t, id, 3001, 0),
            Err(TokenError::OtherTarget { port: 3000, .. })
        ));
        assert!(matches!(
            verify(secret, &t, "sb_zzzzzzzzzzzzzzzz", 3000, 0),
            Err(TokenError::OtherTarget { .. })
        ));
        assert_eq!(verify(b"other", &t, id, 3000, 0), Err(TokenError::Forged));
        // Any change to the claims breaks the signature.
        let longer = t.replace(".1000.", ".9000.");
        assert_eq!(
            verify(secret, &longer, id, 3000, 0),
            Err(TokenError::Forged)
        );
        let padded = t.replace(".1000.", ".01000.");
        assert_eq!(
            verify(secret, &padded, id, 3000, 0),
            Err(TokenError::Malformed)
        );
        let mut flipped = t.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert_eq!(
            verify(secret, &flipped, id, 3000, 0),
            Err(TokenError::Forged)
        );
        for bad in ["", "v1", "v2.a.b.c.d", "v1.sb_x.80.1.sig", &"x".repeat(300)] {
            assert_eq!(
                verify(secret, bad, id, 3000, 0),
                Err(TokenError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn host_names() {
        let d = Domain::parse("Preview.Test").unwrap();
        assert_eq!(d.host, "preview.test");
        let id = "sb_abcdefghijkl0123";
        let ok = |h: &str| match_host(h, &d);
        assert_eq!(
            ok(&format!("3000-{id}.preview.test")),
            HostMatch::Preview {
                port: 3000,
                id: id.to_string()
            }
        );
        assert_eq!(
            ok(&format!("8080-{}.PREVIEW.test.:7423", id.to_uppercase())),
            HostMatch::Preview {
                port: 8080,
                id: id.to_string()
            }
        );
        for api in [
            "",
            "127.0.0.1:7423",
            "preview.test",
            "preview.test:7423",
            "[::1]:7423",
            "localhost",
            "xpreview.test",
            "1-sb_abcdefghijkl.evil.com",
            "3000-sb_abcdefghijkl.preview.test.evil.com",
        ] {
            assert_eq!(ok(api), HostMatch::Api, "{api}");
        }
        for bad in [
            format!("0-{id}.preview.test"),
            format!("99999-{id}.preview.test"),
            format!("65536-{id}.preview.test"),
            format!("+80-{id}.preview.test"),
            format!("080-{id}.preview.test"),
            format!("-{id}.preview.test"),
            format!("a.3000-{id}.preview.test"),
            "nodash.preview.test".to_string(),
            ".preview.test".to_string(),
            format!("{}-{id}.preview.test", "9".repeat(2000)),
        ] {
            assert!(
                matches!(
                    ok(&bad),
                    HostMatch::Invalid {
                        not_found: false,
                        ..
                    }
                ),
                "{bad}"
            );
        }
        for nf in ["3000-sb_short.preview.test", "3000-nope.preview.test"] {
            assert!(
                matches!(
                    ok(nf),
                    HostMatch::Invalid {
                        not_found: true,
                        ..
                    }
                ),
                "{nf}"
            );
        }
        let d = Domain::parse("localhost:7423").unwrap();
        assert_eq!(d.port, Some(7423));
        assert!(matches!(
            match_host(&format!("80-{id}.localhost:9999"), &d),
            HostMatch::Preview { port: 80, .. }
        ));
        for bad in [
            "",
            "a b",
            "x.test:0",
            "x.test:99999",
            "x..test",
            "-x.test",
            ":80",
        ] {
            assert!(Domain::parse(bad).is_none(), "{bad}");
        }
    }
}
