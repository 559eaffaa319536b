//! Wall-clock helpers: Unix milliseconds and RFC 3339 rendering.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// RFC 3339 UTC with millisecond precision at most, e.g. `2026-05-10T10:00:00.123Z`.
pub fn rfc3339_ms(ms: i64) -> String {
    let nanos = (ms as i128) * 1_000_000;
    match OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => t.format(&Rfc3339).unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Parse an RFC 3339 timestamp into Unix milliseconds.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_utc() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_ms(1_778_407_200_123), "2026-05-10T10:00:00.123Z");
        assert_eq!(
            parse_rfc3339("2026-05-10T10:00:00.123Z"),
            Some(1_778_407_200_123)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
