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

/// The values each of the config's enums accepts, for the config crate's "enum ClientAuth does
/// not have variant constructor require", which names neither the values nor how to write them.
/// Read from each enum's own `Deserialize` (a deserializer that only records what
/// `deserialize_enum` is asked for), so the list cannot drift from what is accepted.
pub(super) mod variants {
    use serde::{
        Deserialize,
        de::{self, Visitor},
        forward_to_deserialize_any,
    };

    use crate::config::{
        AnonymousQuota, AuthMode, ClientAuth, Encoding, IdentityClass, LogFormat, OtlpProtocol,
        QuotaStore, RedisFallback,
    };

    /// Every enum the config holds: a new one belongs here.
    const ENUMS: [fn() -> Option<Recorded>; 9] = [
        record::<ClientAuth>,
        record::<AuthMode>,
        record::<Encoding>,
        record::<OtlpProtocol>,
        record::<QuotaStore>,
        record::<RedisFallback>,
        record::<IdentityClass>,
        record::<AnonymousQuota>,
        record::<LogFormat>,
    ];

    type Recorded = (&'static str, &'static [&'static str]);

    /// The config crate's message for a value no variant has, rewritten to list those that are.
    pub fn explain(message: &str) -> Option<String> {
        let rest = message.strip_prefix("enum ")?;
        let (name, value) = rest.split_once(" does not have variant constructor ")?;
        let (_, accepted) = ENUMS
            .iter()
            .filter_map(|record| record())
            .find(|(enum_name, _)| *enum_name == name)?;
        let accepted: Vec<String> = accepted.iter().map(|v| format!("{v:?}")).collect();
        Some(format!(
            "{value:?} is not accepted: give one of {}",
            accepted.join(", ")
        ))
    }

    fn record<'de, T: Deserialize<'de>>() -> Option<Recorded> {
        let mut recorder = Recorder(None);
        // The recorder answers every request with an error once it has what it wants.
        let _ = T::deserialize(&mut recorder);
        recorder.0
    }

    struct Recorder(Option<Recorded>);

    #[derive(Debug)]
    struct Stop;

    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("recorded")
        }
    }

    impl std::error::Error for Stop {}

    impl de::Error for Stop {
        fn custom<T: std::fmt::Display>(_: T) -> Self {
            Stop
        }
    }

    impl<'de> de::Deserializer<'de> for &mut Recorder {
        type Error = Stop;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }

        fn deserialize_enum<V: Visitor<'de>>(
            self,
            name: &'static str,
            variants: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0 = Some((name, variants));
            Err(Stop)
        }

        forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map struct identifier
            ignored_any
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn every_enum_lists_what_it_accepts() {
            assert_eq!(
                super::explain("enum ClientAuth does not have variant constructor require")
                    .as_deref(),
                Some(r#""require" is not accepted: give one of "none", "optional", "required""#)
            );
            for record in super::ENUMS {
                let (name, accepted) = record().expect("each entry is an enum");
                assert!(!accepted.is_empty(), "{name}");
            }
            assert_eq!(super::explain("expected a string"), None);
        }
    }
}
