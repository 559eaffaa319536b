//! Unguessable identifiers.

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// `n` characters of `[a-z0-9]` from the OS random source (~5.17 bits each).
pub fn random_token(n: usize) -> String {
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 64];
    while out.len() < n {
        if getrandom::fill(&mut buf).is_err() {
            // The OS RNG does not fail on Linux after boot; refuse to go on
            // with weak ids rather than fall back to something predictable.
            panic!("the operating system's random source is unavailable");
        }
        for b in buf {
            // Rejection sampling keeps the distribution uniform (252 = 36 * 7).
            if b < 252 && out.len() < n {
                out.push(ALPHABET[(b % 36) as usize] as char);
            }
        }
    }
    out
}

/// A new sandbox id: `sb_` + 16 characters (≈ 82 bits).
pub fn new_sandbox_id() -> String {
    format!("sb_{}", random_token(16))
}

/// Whether `s` has the shape of a sandbox id.
pub fn is_sandbox_id(s: &str) -> bool {
    s.strip_prefix("sb_").is_some_and(|rest| {
        rest.len() >= 12
            && rest.len() <= 64
            && rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_documented_shape() {
        let a = new_sandbox_id();
        let b = new_sandbox_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 19);
        assert!(is_sandbox_id(&a));
        assert!(!is_sandbox_id("sb_short"));
        assert!(!is_sandbox_id("sb_ABCDEFGHIJKLMNOP"));
        assert!(!is_sandbox_id("xx_abcdefghijklmnop"));
        assert!(!is_sandbox_id("sb_../../etc/passwd"));
    }
}
