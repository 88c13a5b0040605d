//! Small validated value types shared by the codecs: UUIDs, UTC times and DM tree URIs.

use std::fmt;
use std::str::FromStr;

/// A UUID in any version, parsed from the 36-character hyphenated hex form (case-insensitive) and
/// written in lower case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// Builds a version-4 UUID from 16 random bytes (the caller brings the randomness: no IO here).
    pub fn from_random_bytes(mut bytes: [u8; 16]) -> Self {
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        Self(bytes)
    }
}

impl FromStr for Uuid {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let raw = s.as_bytes();
        if raw.len() != 36 {
            return Err("must be a UUID of 36 characters (8-4-4-4-12 hex digits)");
        }
        let mut out = [0u8; 16];
        let mut nibbles = 0usize;
        for (i, &c) in raw.iter().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                if c != b'-' {
                    return Err("must be a UUID in the hyphenated 8-4-4-4-12 form");
                }
                continue;
            }
            let v = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => return Err("must be a UUID: only hexadecimal digits and hyphens"),
            };
            if let Some(byte) = out.get_mut(nibbles / 2) {
                *byte = (*byte << 4) | v;
            }
            nibbles += 1;
        }
        Ok(Self(out))
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl serde::Serialize for Uuid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A point in time in UTC, read from and written as RFC 3339 with `Z` (PROTOCOL.md A.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UtcTime {
    /// Seconds since 1970-01-01T00:00:00Z.
    pub unix_seconds: i64,
    /// Fraction of the second, in nanoseconds (below 1e9).
    pub nanos: u32,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

impl UtcTime {
    pub const fn from_unix(unix_seconds: i64) -> Self {
        Self {
            unix_seconds,
            nanos: 0,
        }
    }
}

impl FromStr for UtcTime {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const FORM: &str = "must be an RFC 3339 time in UTC, e.g. 2026-11-21T22:40:10Z";
        let b = s.as_bytes();
        // RFC 3339 §5.6: "T" and "Z" may be written in lower case.
        if b.len() < 20 || !matches!(b.last(), Some(b'Z' | b'z')) {
            return Err(FORM);
        }
        let digits = |range: std::ops::Range<usize>| -> Result<u32, &'static str> {
            let part = b.get(range).ok_or(FORM)?;
            part.iter().try_fold(0u32, |acc, &c| {
                if c.is_ascii_digit() {
                    Ok(acc * 10 + u32::from(c - b'0'))
                } else {
                    Err(FORM)
                }
            })
        };
        let sep = |i: usize, c: u8| b.get(i) == Some(&c);
        let t = sep(10, b'T') || sep(10, b't');
        if !(sep(4, b'-') && sep(7, b'-') && t && sep(13, b':') && sep(16, b':')) {
            return Err(FORM);
        }
        let year = i64::from(digits(0..4)?);
        let month = digits(5..7)?;
        let day = digits(8..10)?;
        let hour = digits(11..13)?;
        let minute = digits(14..16)?;
        let second = digits(17..19)?;
        if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
            return Err("must be a valid calendar date");
        }
        // A leap second (RFC 3339 §5.7) is 23:59:60 in UTC; it is kept as 23:59:59, as POSIX time does.
        let leap_second = hour == 23 && minute == 59 && second == 60;
        if hour > 23 || minute > 59 || (second > 59 && !leap_second) {
            return Err("must be a valid time of day");
        }
        let second = second.min(59);
        let mut nanos = 0u32;
        let rest = b.get(19..b.len() - 1).ok_or(FORM)?;
        if !rest.is_empty() {
            let frac = rest.strip_prefix(b".").ok_or(FORM)?;
            if frac.is_empty() || frac.len() > 9 || !frac.iter().all(u8::is_ascii_digit) {
                return Err("fraction of a second must have 1 to 9 digits");
            }
            for i in 0..9 {
                nanos = nanos * 10 + frac.get(i).map_or(0, |c| u32::from(c - b'0'));
            }
        }
        let days = days_from_civil(year, month, day);
        let unix_seconds =
            days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second);
        Ok(Self {
            unix_seconds,
            nanos,
        })
    }
}

impl fmt::Display for UtcTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = self.unix_seconds.div_euclid(86_400);
        let secs = self.unix_seconds.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60
        )?;
        if self.nanos != 0 {
            let frac = format!("{:09}", self.nanos);
            write!(f, ".{}", frac.trim_end_matches('0'))?;
        }
        f.write_str("Z")
    }
}

impl serde::Serialize for UtcTime {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An absolute DM tree URI: `.` or `./seg(/seg)*`; segments are non-empty, not `.` or `..`, and have
/// no `?` (properties such as `?prop=ACL` are addressed separately).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DmUri(String);

impl DmUri {
    /// The root of the tree, `.`.
    pub fn root() -> Self {
        Self(".".to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0 == "."
    }

    /// The segments after the root: `./A/B` gives `["A", "B"]`, `.` gives nothing.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').skip(1)
    }

    /// The parent URI; `None` for the root.
    pub fn parent(&self) -> Option<DmUri> {
        if self.is_root() {
            return None;
        }
        let cut = self.0.rfind('/')?;
        Some(Self(self.0.get(..cut)?.to_string()))
    }

    /// The last segment; `None` for the root.
    pub fn name(&self) -> Option<&str> {
        if self.is_root() {
            return None;
        }
        self.0.rsplit('/').next()
    }

    /// A child of this URI. The segment is validated.
    pub fn join(&self, segment: &str) -> Result<DmUri, &'static str> {
        check_segment(segment)?;
        Ok(Self(format!("{}/{segment}", self.0)))
    }

    /// True when `other` is this URI or lies under it.
    pub fn contains(&self, other: &DmUri) -> bool {
        self.is_root()
            || other.0 == self.0
            || (other.0.starts_with(&self.0) && other.0.as_bytes().get(self.0.len()) == Some(&b'/'))
    }
}

fn check_segment(segment: &str) -> Result<(), &'static str> {
    if segment.is_empty() {
        return Err("must not have an empty segment");
    }
    if segment == "." || segment == ".." {
        return Err("must not have a '.' or '..' segment");
    }
    if segment.contains('?') {
        return Err("must not contain '?'");
    }
    if segment.contains('/') {
        return Err("a segment must not contain '/'");
    }
    Ok(())
}

impl FromStr for DmUri {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "." {
            return Ok(Self::root());
        }
        let rest = s
            .strip_prefix("./")
            .ok_or("must be '.' or begin with './'")?;
        for segment in rest.split('/') {
            check_segment(segment)?;
        }
        Ok(Self(s.to_string()))
    }
}

impl fmt::Display for DmUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for DmUri {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for DmUri {
    /// Read back with the same rules as [`FromStr`]: what was stored must still be a valid URI.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn uuid_round_trip_and_case() {
        let u: Uuid = "0B6A7E0C-5D1E-4C41-9B0E-3D3F3C2B1A10".parse().unwrap();
        assert_eq!(u.to_string(), "0b6a7e0c-5d1e-4c41-9b0e-3d3f3c2b1a10");
        assert!("0b6a7e0c5d1e4c419b0e3d3f3c2b1a10".parse::<Uuid>().is_err());
        assert!(
            "0b6a7e0c-5d1e-4c41-9b0e-3d3f3c2b1a1g"
                .parse::<Uuid>()
                .is_err()
        );
        assert!(
            "0b6a7e0c-5d1e-4c41-9b0e+3d3f3c2b1a10"
                .parse::<Uuid>()
                .is_err()
        );
    }

    #[test]
    fn utc_time_parses_and_formats() {
        let t: UtcTime = "2026-11-21T22:40:10Z".parse().unwrap();
        assert_eq!(t.unix_seconds, 1_795_300_810);
        assert_eq!(t.to_string(), "2026-11-21T22:40:10Z");
        let f: UtcTime = "2024-02-29T00:00:00.250Z".parse().unwrap();
        assert_eq!(f.nanos, 250_000_000);
        assert_eq!(f.to_string(), "2024-02-29T00:00:00.25Z");
        assert_eq!(
            "1970-01-01T00:00:00Z".parse::<UtcTime>().unwrap(),
            UtcTime::from_unix(0)
        );
        for bad in [
            "2026-11-21T22:40:10+00:00",
            "2026-11-21 22:40:10Z",
            "2023-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-21T24:00:00Z",
            "2026-11-21T22:40:10.Z",
            "2026-11-21T22:40:60Z",
            "2026-11-21T22:59:60Z",
            "2026-11-21T23:59:61Z",
            "2026-11-21T22:40:10.1234567890Z",
            "2026-11-21T22:40:10",
            "2026-11-21T22:40:10ZZ",
            " 2026-11-21T22:40:10Z",
        ] {
            assert!(bad.parse::<UtcTime>().is_err(), "{bad}");
        }
        // RFC 3339 §5.6 allows lower-case "t" and "z"; §5.8 shows the leap second 1990-12-31T23:59:60Z.
        let lower: UtcTime = "2026-11-21t22:40:10.5z".parse().unwrap();
        assert_eq!(lower.to_string(), "2026-11-21T22:40:10.5Z");
        let leap: UtcTime = "1990-12-31T23:59:60Z".parse().unwrap();
        assert_eq!(leap.to_string(), "1990-12-31T23:59:59Z");
        assert!("2000-02-29T23:59:59.999999999Z".parse::<UtcTime>().is_ok());
        assert!("1900-02-29T00:00:00Z".parse::<UtcTime>().is_err());
    }

    #[test]
    fn dm_uri_rules() {
        for good in [".", "./A", "./Vendor/Acme/Apps", "./a b/c"] {
            assert!(good.parse::<DmUri>().is_ok(), "{good}");
        }
        for bad in [
            "", "/A", "A", "./", "./A//B", "./A/../B", "./A/./B", "./A?x", "./A/",
        ] {
            assert!(bad.parse::<DmUri>().is_err(), "{bad}");
        }
        let u: DmUri = "./A/B".parse().unwrap();
        assert_eq!(u.parent().unwrap().as_str(), "./A");
        assert_eq!(u.parent().unwrap().parent().unwrap(), DmUri::root());
        assert!(DmUri::root().contains(&u));
        assert!("./A".parse::<DmUri>().unwrap().contains(&u));
        assert!(
            !"./AB"
                .parse::<DmUri>()
                .unwrap()
                .contains(&"./A".parse().unwrap())
        );
        assert!(
            !"./A"
                .parse::<DmUri>()
                .unwrap()
                .contains(&"./AB".parse().unwrap())
        );
        assert_eq!(u.segments().collect::<Vec<_>>(), ["A", "B"]);
        assert_eq!(u.name(), Some("B"));
    }
}
