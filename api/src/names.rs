//! Validated values (parse, don't validate): a value of these types is known to be well formed,
//! and deserializing a bad one fails with a message naming the rule.

use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Longest e-mail address accepted (RFC 5321 path limit).
pub const EMAIL_MAX: usize = 254;
/// Shortest accepted password.
pub const PASSWORD_MIN: usize = 10;
/// Longest accepted password (argon2 input is bounded to keep hashing time bounded).
pub const PASSWORD_MAX: usize = 256;
/// Longest display name.
pub const DISPLAY_NAME_MAX: usize = 100;
/// Longest DNS-label name.
pub const NAME_MAX: usize = 63;

/// A normalized (lowercase, trimmed) e-mail address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, format = "email", example = "ada@example.com")]
pub struct Email(String);

impl TryFrom<String> for Email {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        let s = s.trim().to_lowercase();
        if s.len() > EMAIL_MAX {
            return Err(format!("must be at most {EMAIL_MAX} characters"));
        }
        let (local, domain) = s.split_once('@').ok_or("must contain @")?;
        let ok = !local.is_empty()
            && domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !s.chars().any(|c| c.is_whitespace() || c.is_control())
            && !domain.contains('@');
        if ok { Ok(Email(s)) } else { Err("must be an e-mail address like name@example.com".into()) }
    }
}

impl From<Email> for String {
    fn from(e: Email) -> String {
        e.0
    }
}

impl Email {
    /// The address.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A lowercase DNS label: 1–63 of `a-z`, `0-9`, `-`, starting with a letter, not ending in `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "acme")]
pub struct Name(String);

impl TryFrom<String> for Name {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        let valid = !s.is_empty()
            && s.len() <= NAME_MAX
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && !s.ends_with('-')
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if valid {
            Ok(Name(s))
        } else {
            Err(format!(
                "must be a DNS label: 1-{NAME_MAX} characters of a-z, 0-9 and -, starting with a letter and not ending with -"
            ))
        }
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl Name {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A human-readable name: 1–100 characters, no control characters, trimmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, example = "Ada Lovelace")]
pub struct DisplayName(String);

impl TryFrom<String> for DisplayName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        let s = s.trim().to_owned();
        if s.is_empty() {
            Err("must not be empty".into())
        } else if s.chars().count() > DISPLAY_NAME_MAX {
            Err(format!("must be at most {DISPLAY_NAME_MAX} characters"))
        } else if s.chars().any(char::is_control) {
            Err("must not contain control characters".into())
        } else {
            Ok(DisplayName(s))
        }
    }
}

impl From<DisplayName> for String {
    fn from(n: DisplayName) -> String {
        n.0
    }
}

impl DisplayName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A new password: 10–256 characters. Never printed.
#[derive(Clone, Deserialize, ToSchema)]
#[serde(try_from = "String")]
#[schema(value_type = String, format = Password)]
pub struct NewPassword(String);

impl TryFrom<String> for NewPassword {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        let n = s.chars().count();
        if n < PASSWORD_MIN {
            Err(format!("must be at least {PASSWORD_MIN} characters"))
        } else if n > PASSWORD_MAX {
            Err(format!("must be at most {PASSWORD_MAX} characters"))
        } else {
            Ok(NewPassword(s))
        }
    }
}

impl NewPassword {
    /// The password, for hashing.
    pub fn expose(self) -> String {
        self.0
    }
}

impl fmt::Debug for NewPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NewPassword([redacted])")
    }
}

/// A secret presented by a caller (a password at sign-in, a refresh token): any string, never
/// printed.
#[derive(Clone, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = String, format = Password)]
pub struct SecretText(String);

impl SecretText {
    /// The secret, for checking.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretText([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> bool {
        Name::try_from(s.to_owned()).is_ok()
    }

    #[test]
    fn names_are_dns_labels() {
        for ok in ["a", "acme", "acme-2", "a1", &"a".repeat(63)] {
            assert!(name(ok), "{ok}");
        }
        for bad in ["", "1acme", "Acme", "acme-", "ac_me", "ac.me", &"a".repeat(64), "-a"] {
            assert!(!name(bad), "{bad}");
        }
    }

    #[test]
    fn emails_are_normalized_and_checked() {
        assert_eq!(Email::try_from(" Ada@Example.COM ".to_owned()).unwrap().as_str(), "ada@example.com");
        for bad in ["ada", "ada@", "@example.com", "ada@example", "a da@example.com", "a@b@c.com"] {
            assert!(Email::try_from(bad.to_owned()).is_err(), "{bad}");
        }
        assert!(Email::try_from(format!("{}@example.com", "a".repeat(250))).is_err());
    }

    #[test]
    fn display_names_and_passwords_have_bounds() {
        assert!(DisplayName::try_from("  ".to_owned()).is_err());
        assert!(DisplayName::try_from("x".repeat(101)).is_err());
        assert_eq!(DisplayName::try_from(" Ada ".to_owned()).unwrap().as_str(), "Ada");
        assert!(NewPassword::try_from("short".to_owned()).is_err());
        assert!(NewPassword::try_from("x".repeat(257)).is_err());
        assert!(NewPassword::try_from("long enough".to_owned()).is_ok());
        assert!(!format!("{:?}", NewPassword::try_from("long enough".to_owned()).unwrap()).contains("long"));
        let secret: SecretText = serde_json::from_str("\"hunter22\"").unwrap();
        assert!(!format!("{secret:?}").contains("hunter22"));
        assert_eq!(secret.expose(), "hunter22");
    }
}
