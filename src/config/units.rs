//! Sizes and durations as people write them (`"200GiB"`, `"1h 30m"`), in both directions.

/// Parses a size such as `"200GiB"`, `"500 MB"` or `"1048576"` into bytes.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = (&text[..split], text[split..].trim());
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size"))?;
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ))
        }
    };
    Ok((value * multiplier as f64) as u64)
}

/// A size for people: `1.5 KiB`, `293.0 MiB`.
pub fn format_byte_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Optional sizes as text (`"200GiB"`) or a number of bytes.
pub(super) mod byte_size_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }

    pub fn serialize<S: Serializer>(size: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match size {
            Some(n) if n % (1 << 30) == 0 => s.serialize_str(&format!("{}GiB", n >> 30)),
            Some(n) if n % (1 << 20) == 0 => s.serialize_str(&format!("{}MiB", n >> 20)),
            Some(n) => s.serialize_u64(*n),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(Some(n)),
            Raw::Text(t) => super::parse_byte_size(&t)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Byte sizes as human text (`"16MiB"`) or a number of bytes.
pub(super) mod byte_size {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(size: &u64, s: S) -> Result<S::Ok, S::Error> {
        super::byte_size_opt::serialize(&Some(*size), s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        super::byte_size_opt::deserialize(d).map(|size| size.unwrap_or_default())
    }
}

/// Durations as human text (`"60s"`, `"5m"`, `"1h 30m"`).
pub(super) mod duration_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration: {e}")))
    }
}
