//! UTC timestamps without a time-zone database: what logs, events and reports print.

/// The civil date (year, month 1-12, day 1-31) of a day counted from 1970-01-01 (Howard
/// Hinnant's `civil_from_days`; proleptic Gregorian, negative days before 1970).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month as u32, day as u32)
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC) of `secs` since the Unix epoch; callers add fractions and `Z`.
pub fn utc_seconds(secs: i64) -> String {
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(utc_seconds(1_709_251_199), "2024-02-29T23:59:59");
        assert_eq!(utc_seconds(1_796_291_267), "2026-12-03T09:47:47");
    }

    proptest::proptest! {
        /// Consecutive days are consecutive dates: the day advances by one, or the month
        /// (or year) rolls over to day 1.
        #[test]
        fn days_follow_each_other(days in -1_000_000i64..1_000_000) {
            let (y, m, d) = civil_from_days(days);
            let (y2, m2, d2) = civil_from_days(days + 1);
            proptest::prop_assert!(
                (y2, m2, d2) == (y, m, d + 1)
                    || (d2 == 1 && ((y2, m2) == (y, m + 1) || (y2, m2, m) == (y + 1, 1, 12)))
            );
            proptest::prop_assert!((1..=12).contains(&m) && (1..=31).contains(&d));
        }
    }
}
