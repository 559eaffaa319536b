//! Query strings of agent requests (`?path=…&recursive=true`), decoded the
//! way [`crate::percent_encode`] encodes them.

use crate::error::ApiError;

/// Decode `%XX` escapes. `+` stays a literal plus (clients percent-encode
/// spaces). Malformed escapes and non-UTF-8 results are refused.
pub fn percent_decode(s: &str) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ApiError::invalid("malformed percent-encoding in query"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ApiError::invalid("query is not valid UTF-8"))
}

/// The decoded value of query parameter `name` (the first occurrence).
pub fn query_param(query: Option<&str>, name: &str) -> Result<Option<String>, ApiError> {
    let Some(q) = query else { return Ok(None) };
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(k)? == name {
            return percent_decode(v).map(Some);
        }
    }
    Ok(None)
}

/// Like [`query_param`] but the parameter must be present.
pub fn required_param(query: Option<&str>, name: &str) -> Result<String, ApiError> {
    query_param(query, name)?
        .ok_or_else(|| ApiError::invalid(format!("missing query parameter `{name}`")))
}

/// A boolean query parameter (`true`/`false`/`1`/`0`), `false` when absent.
pub fn bool_param(query: Option<&str>, name: &str) -> Result<bool, ApiError> {
    match query_param(query, name)?.as_deref() {
        None | Some("") | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(other) => Err(ApiError::invalid(format!(
            "query parameter `{name}` must be true or false, not {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_queries() {
        let q = Some("path=/a%20b/c%26d%3D%25&mode=644&flag");
        assert_eq!(query_param(q, "path").unwrap().unwrap(), "/a b/c&d=%");
        assert_eq!(query_param(q, "mode").unwrap().unwrap(), "644");
        assert_eq!(query_param(q, "flag").unwrap().unwrap(), "");
        assert_eq!(query_param(q, "nope").unwrap(), None);
        assert_eq!(query_param(None, "path").unwrap(), None);
        assert_eq!(percent_decode("a+b").unwrap(), "a+b");
        assert_eq!(percent_decode("/x%00y").unwrap(), "/x\0y");
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("%4").is_err());
        assert!(percent_decode("%ff").is_err());
        assert!(bool_param(Some("recursive=true"), "recursive").unwrap());
        assert!(!bool_param(Some("recursive=false"), "recursive").unwrap());
        assert!(bool_param(Some("recursive=maybe"), "recursive").is_err());
        assert!(required_param(Some("a=1"), "path").is_err());
    }

    #[test]
    fn round_trips_the_encoder() {
        let raw = "/a b/c+d&e=%/é";
        let q = format!("path={}", crate::percent_encode(raw));
        assert_eq!(query_param(Some(&q), "path").unwrap().unwrap(), raw);
    }
}
