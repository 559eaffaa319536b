//! Diagnostics: every line goes to stderr and into an in-memory ring buffer
//! that `GET /v1/logs` serves.
//!
//! Lines start with an RFC 3339 UTC timestamp. Callers must never log file
//! contents or environment values.

use stacyvm_agent_proto::timestamp::rfc3339_millis;
use std::collections::VecDeque;
use std::io::Write;
use std::sync::Mutex;
use std::time::SystemTime;

/// How many lines the ring buffer keeps.
pub const CAPACITY: usize = 1000;

static LINES: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());

/// Log one line (use the [`alog!`](crate::alog) macro).
pub fn log(args: std::fmt::Arguments<'_>) {
    let line = format!("{} {args}", rfc3339_millis(SystemTime::now()));
    // Stderr may be closed; diagnostics are best effort.
    let _ = writeln!(std::io::stderr().lock(), "{line}");
    push(line);
}

fn push(line: String) {
    let mut lines = LINES.lock().unwrap_or_else(|e| e.into_inner());
    if lines.len() >= CAPACITY {
        lines.pop_front();
    }
    lines.push_back(line);
}

/// The last `n` lines, oldest first.
pub fn tail(n: usize) -> Vec<String> {
    let lines = LINES.lock().unwrap_or_else(|e| e.into_inner());
    let skip = lines.len().saturating_sub(n);
    lines.iter().skip(skip).cloned().collect()
}

/// Log a formatted line to stderr and the ring buffer.
#[macro_export]
macro_rules! alog {
    ($($arg:tt)*) => {
        $crate::logbuf::log(format_args!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_buffer_keeps_the_newest_lines() {
        log(format_args!("line 0"));
        for i in 1..CAPACITY + 5 {
            push(format!("1970-01-01T00:00:00.000Z line {i}"));
        }
        let t = tail(3);
        assert_eq!(t.len(), 3);
        assert!(t[2].ends_with(&format!(" line {}", CAPACITY + 4)));
        assert!(t[0].ends_with(&format!(" line {}", CAPACITY + 2)));
        assert!(tail(100_000).len() <= CAPACITY);
        // RFC 3339 UTC prefix.
        let stamp = t[0].split(' ').next().unwrap();
        assert_eq!(stamp.len(), 24);
        assert!(stamp.ends_with('Z'));
        assert_eq!(&stamp[10..11], "T");
    }
}
