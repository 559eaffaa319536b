//! Turning raw output bytes into strings without splitting a character
//! between two streamed chunks.

/// Length of an incomplete (but so far plausible) UTF-8 sequence at the end
/// of `bytes`: 0 when `bytes` ends on a character boundary.
pub fn incomplete_tail(bytes: &[u8]) -> usize {
    // A sequence is at most 4 bytes long, so only the last 3 can start an
    // unfinished one.
    let n = bytes.len();
    for back in 1..=n.min(3) {
        let b = bytes[n - back];
        if b & 0xC0 == 0x80 {
            continue; // continuation byte: keep looking for the lead byte
        }
        let need = match b {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return 0, // ASCII or an invalid lead: nothing to carry
        };
        return if need > back { back } else { 0 };
    }
    0
}

/// Splits a byte stream into lossy UTF-8 strings on character boundaries,
/// carrying an unfinished trailing sequence over to the next chunk.
#[derive(Debug, Default)]
pub struct Utf8Chunker {
    carry: Vec<u8>,
}

impl Utf8Chunker {
    /// Add `data` and return everything that is complete so far.
    pub fn push(&mut self, data: &[u8]) -> String {
        if self.carry.is_empty() {
            let keep = incomplete_tail(data);
            let (done, rest) = data.split_at(data.len() - keep);
            self.carry.extend_from_slice(rest);
            return String::from_utf8_lossy(done).into_owned();
        }
        let mut all = std::mem::take(&mut self.carry);
        all.extend_from_slice(data);
        let keep = incomplete_tail(&all);
        self.carry = all.split_off(all.len() - keep);
        lossy(all)
    }

    /// Whatever is left at the end of the stream (invalid bytes replaced).
    pub fn finish(&mut self) -> String {
        lossy(std::mem::take(&mut self.carry))
    }
}

/// Convert bytes to a string, replacing invalid sequences, without copying
/// when they are already valid.
pub fn lossy(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_detection() {
        assert_eq!(incomplete_tail(b""), 0);
        assert_eq!(incomplete_tail(b"abc"), 0);
        let e = "é".as_bytes(); // 2 bytes
        assert_eq!(incomplete_tail(&e[..1]), 1);
        assert_eq!(incomplete_tail(e), 0);
        let euro = "€".as_bytes(); // 3 bytes
        assert_eq!(incomplete_tail(&euro[..1]), 1);
        assert_eq!(incomplete_tail(&euro[..2]), 2);
        assert_eq!(incomplete_tail(euro), 0);
        let crab = "🦀".as_bytes(); // 4 bytes
        assert_eq!(incomplete_tail(&crab[..3]), 3);
        assert_eq!(incomplete_tail(crab), 0);
        assert_eq!(incomplete_tail(b"a\xff"), 0);
        assert_eq!(incomplete_tail(b"\x80\x80\x80"), 0);
    }

    #[test]
    fn chunks_split_on_char_boundaries() {
        let text = "héllo €uro 🦀 crab";
        let bytes = text.as_bytes();
        // Every possible split into single bytes must round-trip.
        let mut c = Utf8Chunker::default();
        let mut out = String::new();
        for b in bytes {
            let s = c.push(std::slice::from_ref(b));
            assert!(!s.contains('\u{FFFD}'));
            out.push_str(&s);
        }
        out.push_str(&c.finish());
        assert_eq!(out, text);

        // And every two-way split.
        for cut in 0..=bytes.len() {
            let mut c = Utf8Chunker::default();
            let mut out = c.push(&bytes[..cut]);
            out.push_str(&c.push(&bytes[cut..]));
            out.push_str(&c.finish());
            assert_eq!(out, text, "cut at {cut}");
        }
    }

    #[test]
    fn invalid_bytes_are_replaced() {
        let mut c = Utf8Chunker::default();
        assert_eq!(c.push(b"a\xffb"), "a\u{FFFD}b");
        assert_eq!(c.push(b"\xe2\x82"), "");
        assert_eq!(c.finish(), "\u{FFFD}");
        assert_eq!(lossy(b"ok".to_vec()), "ok");
    }
}
