//! RFC 3339 UTC timestamps: file modification times ([`crate::FileEntry`])
//! and the prefix of agent log lines.

use std::time::{SystemTime, UNIX_EPOCH};

/// What a time that cannot be written with a four-digit year becomes.
const FALLBACK: &str = "1970-01-01T00:00:00Z";

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// RFC 3339 UTC, whole seconds (`2023-11-14T22:13:20Z`). Times outside
/// the years 0000–9999 are written as the epoch.
pub fn rfc3339(unix_secs: i64) -> String {
    let (y, mo, d) = civil_from_days(unix_secs.div_euclid(86_400));
    if !(0..=9999).contains(&y) {
        return FALLBACK.to_string();
    }
    let s = unix_secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// RFC 3339 UTC with milliseconds (`2023-11-14T22:13:20.123Z`), for log
/// lines. Times before the epoch are written as the epoch.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    let base = rfc3339(secs);
    format!("{}.{:03}Z", base.trim_end_matches('Z'), d.subsec_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(-62_167_219_200), "0000-01-01T00:00:00Z");
        assert_eq!(rfc3339(253_402_300_800), FALLBACK);
        assert_eq!(rfc3339(-62_167_219_201), FALLBACK);
        assert_eq!(rfc3339(i64::MAX), FALLBACK);
        assert_eq!(rfc3339(i64::MIN), FALLBACK);
        let t = UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339_millis(t), "2023-11-14T22:13:20.123Z");
        let t = UNIX_EPOCH - std::time::Duration::from_secs(5);
        assert_eq!(rfc3339_millis(t), "1970-01-01T00:00:00.000Z");
    }
}
