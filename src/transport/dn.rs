//! Distinguished names as text that a certificate cannot forge.
//!
//! A client certificate's subject is an identity: `[[auth.cert_rules]] subject` patterns match it,
//! the access line logs it, and quotas key callers by it. Rendered without escaping, a single
//! attribute whose value is `alice, O=Admins` reads exactly like two attributes, so whoever can
//! get a CN of their choosing signed could pass for `CN=alice, O=Admins`. Values are therefore
//! escaped as RFC 4514 says (`,` `+` `"` `\` `<` `>` `;`, a leading `#` or space, a trailing
//! space, NUL), and values that are not strings are written as `#` and the hex of their DER. The
//! rest of the layout is the one operators already write rules against (x509-parser's): RDNs in
//! the order the certificate encodes them, joined by `", "`, multi-valued RDNs by `" + "`, short
//! attribute names (`CN`, `O`, `OU`, ...) and dotted OIDs for the others.

use std::fmt::Write as _;

use x509_parser::{
    asn1_rs::ToDer as _,
    objects::{oid_registry, oid2abbrev},
    x509::{AttributeTypeAndValue, X509Name},
};

/// `name` as RFC 4514-escaped text, in the certificate's own order.
pub fn render(name: &X509Name<'_>) -> String {
    let mut text = String::new();
    for (i, rdn) in name.iter().enumerate() {
        if i > 0 {
            text.push_str(", ");
        }
        for (j, attribute) in rdn.iter().enumerate() {
            if j > 0 {
                text.push_str(" + ");
            }
            push_attribute(&mut text, attribute);
        }
    }
    text
}

fn push_attribute(text: &mut String, attribute: &AttributeTypeAndValue<'_>) {
    let oid = attribute.attr_type();
    match oid2abbrev(oid, oid_registry()) {
        Ok(short) => text.push_str(short),
        Err(_) => text.push_str(&oid.to_id_string()),
    }
    text.push('=');
    match attribute.as_str() {
        Ok(value) => escape_into(text, value),
        // Not a string type x509-parser reads as UTF-8 (BMPString, T61String, a number...):
        // RFC 4514's `#` form, which no escaped string can look like.
        Err(_) => {
            text.push('#');
            let der = attribute.attr_value().to_der_vec().unwrap_or_default();
            for byte in der {
                let _ = write!(text, "{byte:02x}");
            }
        }
    }
}

/// RFC 4514 section 2.4: the characters that would change the structure are escaped with a
/// backslash; NUL (and any other control character, for the log's sake) as `\XX`.
fn escape_into(text: &mut String, value: &str) {
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' => {
                text.push('\\');
                text.push(c);
            }
            '#' | ' ' if i == 0 => {
                text.push('\\');
                text.push(c);
            }
            ' ' if i == last => text.push_str("\\ "),
            c if c.is_control() => {
                let mut buf = [0; 4];
                for byte in c.encode_utf8(&mut buf).bytes() {
                    let _ = write!(text, "\\{byte:02x}");
                }
            }
            c => text.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue, KeyPair};
    use x509_parser::{certificate::X509Certificate, prelude::FromDer as _};

    use super::*;

    fn subject_of(dn: DistinguishedName) -> String {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        let der = params
            .self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .to_vec();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        render(cert.subject())
    }

    fn dn(attributes: &[(DnType, &str)]) -> DistinguishedName {
        let mut dn = DistinguishedName::new();
        for (kind, value) in attributes {
            dn.push(kind.clone(), *value);
        }
        dn
    }

    #[test]
    fn plain_names_read_as_before() {
        assert_eq!(
            subject_of(dn(&[
                (DnType::CommonName, "alice"),
                (DnType::OrganizationName, "Admins")
            ])),
            "CN=alice, O=Admins"
        );
    }

    #[test]
    fn a_value_cannot_pass_for_more_attributes() {
        let forged = subject_of(dn(&[(DnType::CommonName, "alice, O=Admins")]));
        assert_eq!(forged, r"CN=alice\, O=Admins");
        assert_ne!(forged, "CN=alice, O=Admins");
        for (value, rendered) in [
            ("a+b", r"CN=a\+b"),
            ("q\"uote", r#"CN=q\"uote"#),
            (r"back\slash", r"CN=back\\slash"),
            ("<a>;b", r"CN=\<a\>\;b"),
            ("#hash", r"CN=\#hash"),
            (" lead", r"CN=\ lead"),
            ("trail ", r"CN=trail\ "),
            ("mid # dle", "CN=mid # dle"),
            ("nul\0x", r"CN=nul\00x"),
        ] {
            assert_eq!(
                subject_of(dn(&[(DnType::CommonName, value)])),
                rendered,
                "{value:?}"
            );
        }
    }

    #[test]
    fn values_that_are_not_utf8_strings_are_hex() {
        let mut name = DistinguishedName::new();
        name.push(
            DnType::CommonName,
            DnValue::BmpString("a".try_into().unwrap()),
        );
        // BMPString (tag 0x1e), 2 bytes: UTF-16 "a".
        assert_eq!(subject_of(name), "CN=#1e020061");
    }
}
