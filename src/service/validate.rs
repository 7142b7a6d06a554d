//! Input validation for names: the one field a caller controls.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

/// Why a name was refused. Kept as a type so the rules are testable without a server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is {len} bytes long; the maximum is {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error("name contains a control character (U+{code:04X}) at byte {at}")]
    ControlCharacter { code: u32, at: usize },
}

/// INVALID_ARGUMENT with a `google.rpc.BadRequest` detail naming the field, so clients that read
/// rich errors (grpcurl, Python's grpc_status, tonic-types) get the violation structured.
impl From<NameError> for Status {
    fn from(error: NameError) -> Self {
        let message = error.to_string();
        let details = ErrorDetails::with_bad_request_violation("name", message.clone());
        Status::with_error_details(Code::InvalidArgument, message, details)
    }
}

/// Accepts a name for greeting: at most `max_bytes` of UTF-8 (prost already refused non-UTF-8)
/// and no control characters, which would let a caller forge lines in logs and terminals.
/// An empty name is valid: it is greeted as "world".
pub fn validate_name(name: &str, max_bytes: usize) -> Result<&str, NameError> {
    if name.len() > max_bytes {
        return Err(NameError::TooLong {
            len: name.len(),
            max: max_bytes,
        });
    }
    if let Some((at, c)) = name.char_indices().find(|(_, c)| c.is_control()) {
        return Err(NameError::ControlCharacter {
            code: u32::from(c),
            at,
        });
    }
    Ok(if name.is_empty() { "world" } else { name })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_name_greets_the_world() {
        assert_eq!(validate_name("", 8), Ok("world"));
    }

    #[test]
    fn limit_is_in_bytes_not_chars() {
        assert_eq!(validate_name("ab", 2), Ok("ab"));
        // "é" is two bytes of UTF-8.
        assert_eq!(
            validate_name("ée", 2),
            Err(NameError::TooLong { len: 3, max: 2 })
        );
    }

    #[test]
    fn control_characters_are_refused_with_their_position() {
        assert_eq!(
            validate_name("ab\ncd", 64),
            Err(NameError::ControlCharacter { code: 0x0a, at: 2 })
        );
        assert!(validate_name("\u{7f}", 64).is_err());
        assert!(validate_name("Zoë 你好", 64).is_ok());
    }

    #[test]
    fn refusal_is_invalid_argument() {
        let status = Status::from(NameError::TooLong { len: 9, max: 8 });
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("maximum is 8 bytes"));
        let violation = &status.get_details_bad_request().unwrap().field_violations[0];
        assert_eq!(violation.field, "name");
        assert_eq!(violation.description, status.message());
    }
}
