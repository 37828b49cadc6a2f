//! Serde helpers for spec fields: humantime durations, and number visitors whose messages say
//! what a user should write (`expected a non-negative integer`, not `expected u32`).

use std::fmt;

use serde::Deserializer;
use serde::de::{self, Visitor};

/// Durations as humantime strings: `"500ms"`, `"2s"`, `"5m"`; written back the same way.
pub(crate) mod duration {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_str(DurationVisitor)
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as \"500ms\", \"2s\" or \"5m\"")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            humantime::parse_duration(v.trim())
                .map_err(|_| E::custom(format!("{v:?} is not a duration (use e.g. 500ms, 2s, 5m)")))
        }
    }
}

pub(crate) fn u32_int<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = d.deserialize_u32(UintVisitor {
        max: u64::from(u32::MAX),
    })?;
    u32::try_from(v).map_err(|_| de::Error::custom("integer out of range"))
}

pub(crate) fn u16_int<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let v = d.deserialize_u16(UintVisitor {
        max: u64::from(u16::MAX),
    })?;
    u16::try_from(v).map_err(|_| de::Error::custom("integer out of range"))
}

/// Accepts a non-negative integer up to `max`.
struct UintVisitor {
    max: u64,
}

impl Visitor<'_> for UintVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a non-negative integer")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        if v > self.max {
            return Err(E::custom(format!(
                "expected an integer no larger than {}, found {v}",
                self.max
            )));
        }
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::custom(format!(
                "expected a non-negative integer, found {v}"
            ))),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        Err(E::custom(format!(
            "expected a non-negative integer, found {v}"
        )))
    }
}

/// A number of cores: any number, integer or not (range checked by validation).
pub(crate) fn cores<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    d.deserialize_f64(CoresVisitor)
}

struct CoresVisitor;

impl Visitor<'_> for CoresVisitor {
    type Value = f64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number of cores such as 0.5 or 2")
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
        Ok(v)
    }

    #[allow(clippy::cast_precision_loss)] // core counts are far below 2^52
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
        Ok(v as f64)
    }

    #[allow(clippy::cast_precision_loss)] // core counts are far below 2^52
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
        Ok(v as f64)
    }
}

/// An optional port number: absent, or 1 to 65535 as [`u16_int`] reads it.
pub(crate) fn opt_u16_int<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    u16_int(d).map(Some)
}

/// An optional [`duration`].
pub(crate) fn opt_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<std::time::Duration>, D::Error> {
    duration::deserialize(d).map(Some)
}

/// A replica count: a non-negative integer or a percentage string `"0%"` to `"100%"`.
pub(crate) struct ReplicaCountVisitor;

impl Visitor<'_> for ReplicaCountVisitor {
    type Value = super::ReplicaCount;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a non-negative integer or a percentage such as \"25%\"")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        UintVisitor {
            max: u64::from(u32::MAX),
        }
        .visit_u64(v)
        .and_then(|v| u32::try_from(v).map_err(|_| E::custom("integer out of range")))
        .map(super::ReplicaCount::Count)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::custom(format!(
                "expected a non-negative integer or a percentage, found {v}"
            ))),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Err(E::custom(format!(
            "expected a non-negative integer or a percentage, found {v}"
        )))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let bad = || {
            E::custom(format!(
                "{v:?} is not a replica count (write an integer, or a percentage from \"0%\" to \"100%\")"
            ))
        };
        let digits = v.trim().strip_suffix('%').ok_or_else(bad)?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        match digits.parse::<u32>() {
            Ok(p) if p <= 100 => Ok(super::ReplicaCount::Percent(p)),
            _ => Err(bad()),
        }
    }
}
