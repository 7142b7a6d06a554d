//! The largest encoding of a request type, where its descriptor bounds one: a message of scalars
//! (and of messages of scalars) cannot grow, so its methods need no message limit of their own;
//! a string, bytes, repeated, map or recursive field can, and such a method falls back to what its
//! service declares or to `limits.max_recv_message_bytes` (`server::tables`).

use std::collections::BTreeMap;

use prost_reflect::{DescriptorPool, Kind, MessageDescriptor};

/// The largest encoding of each method's request type, by path (`/package.Service/Method`), for
/// the methods whose request type has one; methods missing from the map have none.
///
/// # Panics
/// If a set does not decode: they are compiled in, so that is a build defect.
pub fn largest_requests(sets: &[&[u8]]) -> BTreeMap<String, usize> {
    let mut pool = DescriptorPool::new();
    for set in sets {
        pool.decode_file_descriptor_set(*set)
            .expect("embedded descriptor sets decode and agree");
    }
    pool.services()
        .flat_map(|service| service.methods().collect::<Vec<_>>())
        .filter_map(|method| {
            let path = format!("/{}/{}", method.parent_service().full_name(), method.name());
            largest(&method.input(), &mut Vec::new()).map(|bytes| (path, bytes))
        })
        .collect()
}

/// `None` when `message` can grow without bound. `enclosing`: the messages being measured, which
/// a field naming again is recursion, hence unbounded.
fn largest(message: &MessageDescriptor, enclosing: &mut Vec<String>) -> Option<usize> {
    if message.extension_ranges().len() > 0 || enclosing.iter().any(|m| m == message.full_name()) {
        return None;
    }
    enclosing.push(message.full_name().to_owned());
    let mut total = 0;
    for field in message.fields() {
        if field.is_list() || field.is_map() || field.is_group() {
            return None;
        }
        let value = match field.kind() {
            Kind::Bool => 1,
            Kind::Float | Kind::Fixed32 | Kind::Sfixed32 => 4,
            Kind::Uint32 | Kind::Sint32 => 5,
            Kind::Double | Kind::Fixed64 | Kind::Sfixed64 => 8,
            // A negative int32 or enum value is sign-extended to ten bytes, like an int64.
            Kind::Int32 | Kind::Int64 | Kind::Uint64 | Kind::Sint64 | Kind::Enum(_) => 10,
            Kind::String | Kind::Bytes => return None,
            Kind::Message(inner) => {
                let inner = largest(&inner, enclosing)?;
                varint_len(inner as u64) + inner
            }
        };
        total += varint_len(u64::from(field.number()) << 3) + value;
    }
    enclosing.pop();
    Some(total)
}

/// Bytes of `value` as a protobuf varint: seven bits a byte.
fn varint_len(value: u64) -> usize {
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use prost_types::{
        DescriptorProto, FieldDescriptorProto, FileDescriptorProto, FileDescriptorSet,
        MethodDescriptorProto, ServiceDescriptorProto,
        field_descriptor_proto::{Label, Type},
    };

    fn field(name: &str, number: i32, kind: Type, label: Label) -> FieldDescriptorProto {
        FieldDescriptorProto {
            name: Some(name.into()),
            number: Some(number),
            label: Some(label as i32),
            r#type: Some(kind as i32),
            type_name: matches!(kind, Type::Message).then(|| ".t.Inner".into()),
            ..Default::default()
        }
    }

    fn message(name: &str, fields: Vec<FieldDescriptorProto>) -> DescriptorProto {
        DescriptorProto {
            name: Some(name.into()),
            field: fields,
            ..Default::default()
        }
    }

    /// The largest request of `/t.S/M`, whose request type is `request`, beside `Inner`.
    fn bound(
        request: Vec<FieldDescriptorProto>,
        inner: Vec<FieldDescriptorProto>,
    ) -> Option<usize> {
        let file = FileDescriptorProto {
            name: Some("t.proto".into()),
            package: Some("t".into()),
            syntax: Some("proto3".into()),
            message_type: vec![message("Request", request), message("Inner", inner)],
            service: vec![ServiceDescriptorProto {
                name: Some("S".into()),
                method: vec![MethodDescriptorProto {
                    name: Some("M".into()),
                    input_type: Some(".t.Request".into()),
                    output_type: Some(".t.Request".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let set = FileDescriptorSet { file: vec![file] }.encode_to_vec();
        largest_requests(&[&set]).get("/t.S/M").copied()
    }

    #[test]
    fn scalars_have_a_largest_encoding() {
        let one = Label::Optional;
        assert_eq!(bound(vec![], vec![]), Some(0));
        assert_eq!(
            bound(
                vec![
                    field("a", 1, Type::Sint64, one),
                    field("b", 2, Type::Fixed32, one),
                    field("c", 16, Type::Bool, one),
                ],
                vec![],
            ),
            // Tags of one byte, and of two from field 16 on.
            Some((1 + 10) + (1 + 4) + (2 + 1))
        );
        assert_eq!(
            bound(
                vec![field("inner", 1, Type::Message, one)],
                vec![field("x", 1, Type::Int32, one)],
            ),
            Some(1 + 1 + (1 + 10))
        );
    }

    #[test]
    fn what_can_grow_has_none() {
        let one = Label::Optional;
        for request in [
            vec![field("s", 1, Type::String, one)],
            vec![field("b", 1, Type::Bytes, one)],
            vec![field("r", 1, Type::Uint32, Label::Repeated)],
        ] {
            assert_eq!(bound(request.clone(), vec![]), None, "{request:?}");
        }
        // A string one message down, and a message that contains itself.
        assert_eq!(
            bound(
                vec![field("inner", 1, Type::Message, one)],
                vec![field("s", 1, Type::String, one)],
            ),
            None
        );
        assert_eq!(
            bound(
                vec![field("inner", 1, Type::Message, one)],
                vec![field("again", 1, Type::Message, one)],
            ),
            None
        );
    }

    #[test]
    fn varints_take_seven_bits_a_byte() {
        for (value, len) in [
            (0, 1),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (u64::MAX, 10),
        ] {
            assert_eq!(varint_len(value), len, "{value}");
        }
    }
}
