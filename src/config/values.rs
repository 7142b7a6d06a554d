//! How some values are written in the layers, beyond what serde derives.

/// Map entries a later layer can remove: layers merge maps key by key, so without a way to say
/// "gone", a file could change an entry of `auth.policy` or `deadline.methods` but never drop
/// one. An entry set to `""` is removed (an empty string is no valid rule or limit anyway).
pub(super) mod removable {
    use std::{collections::BTreeMap, fmt, marker::PhantomData};

    use serde::{
        Deserialize, Deserializer,
        de::{self, IntoDeserializer as _, value::MapAccessDeserializer},
    };

    /// One entry: present, or `""` for removed.
    struct Entry<T>(Option<T>);

    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Entry<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(EntryVisitor(PhantomData))
        }
    }

    struct EntryVisitor<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> de::Visitor<'de> for EntryVisitor<T> {
        type Value = Entry<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a value, or \"\" to remove the entry")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Entry<T>, E> {
            if text.is_empty() {
                return Ok(Entry(None));
            }
            T::deserialize(text.into_deserializer()).map(|v| Entry(Some(v)))
        }

        fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Entry<T>, A::Error> {
            T::deserialize(MapAccessDeserializer::new(map)).map(|v| Entry(Some(v)))
        }
    }

    pub fn map<'de, D, T>(d: D) -> Result<BTreeMap<String, T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        let entries = BTreeMap::<String, Entry<T>>::deserialize(d)?;
        Ok(entries
            .into_iter()
            .filter_map(|(key, Entry(value))| value.map(|v| (key, v)))
            .collect())
    }
}

/// File modes written as octal strings ("0660"), as `chmod` takes them. A TOML integer is refused:
/// `0o660` and `660` would both arrive as numbers, and guessing between them is how a socket ends
/// up world-writable.
pub(super) mod octal_mode {
    use std::fmt;

    use serde::{Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{mode:04o}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        d.deserialize_any(OctalMode)
    }

    struct OctalMode;

    impl de::Visitor<'_> for OctalMode {
        type Value = u32;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a quoted octal file mode like \"0660\"")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<u32, E> {
            u32::from_str_radix(text, 8)
                .map_err(|_| E::custom(format!("{text:?} is not an octal file mode like \"0660\"")))
        }
    }
}

/// `listen = ""` means "no such listener": TOML has no null.
pub(super) mod optional_addr {
    use std::net::SocketAddr;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(addr: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match addr {
            Some(addr) => s.collect_str(addr),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(None);
        }
        text.parse()
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("{e} ({text:?})")))
    }
}
