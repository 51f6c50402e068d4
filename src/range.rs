//! `Range: bytes=...` on blobs (RFC 9110 §14): which part of a blob of known size a client wants.
//!
//! Pure: no I/O. Only single ranges are honoured; a multi-range request gets the whole blob,
//! which RFC 9110 allows.

/// What to send for a request of a blob of `size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// 200 with the whole blob.
    Whole,
    /// 206 with bytes `start..end` (end exclusive).
    Partial { start: u64, end: u64 },
    /// 416: no byte of the range exists.
    Unsatisfiable,
}

/// Plans the answer to a `Range` header value (`None` when the request had none).
pub fn plan(header: Option<&str>, size: u64) -> Plan {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Plan::Whole;
    };
    if spec.contains(',') {
        return Plan::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Plan::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // Suffix range: the last N bytes.
        let Ok(n) = last.parse::<u64>() else {
            return Plan::Whole;
        };
        if n == 0 || size == 0 {
            return Plan::Unsatisfiable;
        }
        return Plan::Partial {
            start: size.saturating_sub(n),
            end: size,
        };
    }
    let Ok(start) = first.parse::<u64>() else {
        return Plan::Whole;
    };
    let end = if last.is_empty() {
        size
    } else {
        match last.parse::<u64>() {
            Ok(l) if l >= start => l.saturating_add(1).min(size),
            _ => return Plan::Whole,
        }
    };
    if start >= size {
        return Plan::Unsatisfiable;
    }
    Plan::Partial { start, end }
}

/// The `Content-Range` value of a partial answer.
pub fn content_range(start: u64, end: u64, size: u64) -> String {
    format!("bytes {}-{}/{}", start, end - 1, size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        let p = |h| plan(Some(h), 100);
        assert_eq!(plan(None, 100), Plan::Whole);
        assert_eq!(p("bytes=0-9"), Plan::Partial { start: 0, end: 10 });
        assert_eq!(
            p("bytes=90-"),
            Plan::Partial {
                start: 90,
                end: 100
            }
        );
        assert_eq!(
            p("bytes=90-1000"),
            Plan::Partial {
                start: 90,
                end: 100
            }
        );
        assert_eq!(
            p("bytes=-10"),
            Plan::Partial {
                start: 90,
                end: 100
            }
        );
        assert_eq!(p("bytes=-1000"), Plan::Partial { start: 0, end: 100 });
        assert_eq!(p("bytes=100-"), Plan::Unsatisfiable);
        assert_eq!(p("bytes=-0"), Plan::Unsatisfiable);
        assert_eq!(p("bytes=5-2"), Plan::Whole);
        assert_eq!(p("bytes=0-1,5-6"), Plan::Whole);
        assert_eq!(p("items=0-1"), Plan::Whole);
        assert_eq!(p("bytes=x-"), Plan::Whole);
        assert_eq!(plan(Some("bytes=0-"), 0), Plan::Unsatisfiable);
        assert_eq!(content_range(90, 100, 100), "bytes 90-99/100");
    }
}
