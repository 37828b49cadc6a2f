//! [`ByteSize`]: memory sizes written as `64Mi`, `1Gi`, `512M` or a number of bytes.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes.
///
/// Written in a spec as an integer (bytes) or a string: digits and an optional suffix, binary
/// `Ki Mi Gi Ti` or decimal `K M G T` (`"64Mi"`, `"512M"`, `"1048576"`). Serialized as the
/// shortest exact string, binary suffixes winning ties: `67108864` is written `"64Mi"`,
/// `512000000` `"512M"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

const SUFFIXES: [(&str, u64); 8] = [
    ("Ti", 1 << 40),
    ("Gi", 1 << 30),
    ("Mi", 1 << 20),
    ("Ki", 1 << 10),
    ("T", 1_000_000_000_000),
    ("G", 1_000_000_000),
    ("M", 1_000_000),
    ("K", 1_000),
];

impl ByteSize {
    /// `n` bytes.
    pub const fn bytes(n: u64) -> ByteSize {
        ByteSize(n)
    }

    /// `n` KiB.
    pub const fn kib(n: u64) -> ByteSize {
        ByteSize(n << 10)
    }

    /// `n` MiB.
    pub const fn mib(n: u64) -> ByteSize {
        ByteSize(n << 20)
    }

    /// `n` GiB.
    pub const fn gib(n: u64) -> ByteSize {
        ByteSize(n << 30)
    }

    /// The size in bytes.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        let mut best = n.to_string();
        for (suffix, unit) in SUFFIXES {
            if n != 0 && n.is_multiple_of(unit) {
                let candidate = format!("{}{suffix}", n / unit);
                if candidate.len() < best.len() {
                    best = candidate;
                }
            }
        }
        f.write_str(&best)
    }
}

/// Why a string is not a [`ByteSize`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ByteSizeError {
    /// Not digits followed by a known suffix.
    #[error("{0:?} is not a size (use e.g. 64Mi, 1Gi, 512M)")]
    Malformed(String),
    /// More than 2^64-1 bytes.
    #[error("{0:?} is too large")]
    TooLarge(String),
}

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(s: &str) -> Result<ByteSize, ByteSizeError> {
        let t = s.trim();
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, suffix) = t.split_at(digits_end);
        if digits.is_empty() {
            return Err(ByteSizeError::Malformed(s.to_owned()));
        }
        let unit = if suffix.is_empty() {
            1
        } else {
            SUFFIXES
                .iter()
                .find(|(name, _)| *name == suffix)
                .map(|(_, unit)| *unit)
                .ok_or_else(|| ByteSizeError::Malformed(s.to_owned()))?
        };
        digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(unit))
            .map(ByteSize)
            .ok_or_else(|| ByteSizeError::TooLarge(s.to_owned()))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        d.deserialize_any(ByteSizeVisitor)
    }
}

struct ByteSizeVisitor;

impl Visitor<'_> for ByteSizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size such as \"64Mi\" or a number of bytes")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
        Ok(ByteSize(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
        u64::try_from(v)
            .map(ByteSize)
            .map_err(|_| E::custom(format!("expected a size, found the negative number {v}")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
        v.parse().map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_suffix() {
        for (text, bytes) in [
            ("0", 0),
            ("1048576", 1 << 20),
            ("64Mi", 64 << 20),
            ("1Ki", 1024),
            ("2Gi", 2 << 30),
            ("1Ti", 1 << 40),
            ("512M", 512_000_000),
            ("3K", 3000),
            ("1G", 1_000_000_000),
            ("1T", 1_000_000_000_000),
        ] {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
    }

    #[test]
    fn rejects_malformed_sizes() {
        for text in ["", "Mi", "64Qi", "64mi", "1.5Gi", "-1", "64 MiB", "0x10"] {
            assert!(text.parse::<ByteSize>().is_err(), "{text}");
        }
        assert_eq!(
            "64Qi".parse::<ByteSize>().unwrap_err().to_string(),
            "\"64Qi\" is not a size (use e.g. 64Mi, 1Gi, 512M)"
        );
        assert_eq!(
            "99999999999Ti".parse::<ByteSize>(),
            Err(ByteSizeError::TooLarge("99999999999Ti".into()))
        );
    }

    #[test]
    fn displays_the_shortest_exact_form() {
        assert_eq!(ByteSize::mib(64).to_string(), "64Mi");
        assert_eq!(ByteSize(3072).to_string(), "3Ki");
        assert_eq!(ByteSize(1536).to_string(), "1536");
        assert_eq!(ByteSize(512_000_000).to_string(), "512M");
        assert_eq!(ByteSize(1001).to_string(), "1001");
        assert_eq!(ByteSize(1024).to_string(), "1Ki");
        assert_eq!(ByteSize(1000).to_string(), "1K");
        assert_eq!(ByteSize(0).to_string(), "0");
        for n in [0, 1, 1001, 1536, 512_000_000, 1 << 40, u64::MAX] {
            assert_eq!(ByteSize(n).to_string().parse(), Ok(ByteSize(n)));
        }
    }
}
