//! Environment variables of functions. Plain values are stored as given; secret values are
//! sealed with the configured secrets keys (AES-256-GCM, the key id kept beside the value so keys
//! can rotate), bound to their tenant, function and name, and never shown again: the API says
//! only whether a secret is set. Values are never logged (`EnvVarInput` redacts its `Debug`).

use std::{collections::BTreeMap, fmt};

use base64::{Engine, engine::general_purpose::STANDARD};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    error::{ApiError, FieldError},
    secrets::{Sealed, SecretBox},
    startup::AppState,
};

/// Most variables per function.
pub const MAX_VARS: usize = 64;
/// Longest variable name.
pub const MAX_NAME: usize = 128;
/// Longest value, bytes.
pub const MAX_VALUE: usize = 4096;
/// Most bytes of names and values together.
pub const MAX_TOTAL: usize = 16 * 1024;
/// Names the handler contract sets itself (DESIGN §5); functions cannot override them.
pub const RESERVED: &[&str] = &[
    "REQUEST_METHOD",
    "PATH_INFO",
    "QUERY_STRING",
    "CONTENT_TYPE",
    "CONTENT_LENGTH",
    "SERVER_NAME",
    "SERVER_PORT",
    "SERVER_PROTOCOL",
    "GATEWAY_INTERFACE",
    "SCRIPT_NAME",
    "REMOTE_ADDR",
];
/// Prefixes the handler contract owns.
pub const RESERVED_PREFIXES: &[&str] = &["NIMBUS_", "HTTP_"];

/// A sealed secret as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedValue {
    /// Id of the key that sealed it.
    pub key_id: String,
    /// Nonce, ciphertext and tag, base64.
    pub sealed: String,
}

/// A variable as stored: `{"value": "..."}` or `{"secret": {...}}` (`{"secret": null}`: declared,
/// no value yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoredVar {
    /// A plain value.
    Value(String),
    /// A sealed secret, or a declared one without a value.
    Secret(Option<SealedValue>),
}

/// A variable as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EnvVar {
    /// The value; absent for secrets, which are never shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Whether the value is a secret.
    pub secret: bool,
    /// Whether a value is set (secrets can be declared without one).
    pub set: bool,
}

/// A variable as given in a create or update.
#[derive(Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvVarInput {
    /// The value. Required for plain variables; for a secret in an update, leaving it out keeps
    /// the stored value.
    #[serde(default)]
    pub value: Option<String>,
    /// Seal the value at rest and never show it again.
    #[serde(default)]
    pub secret: bool,
}

impl fmt::Debug for EnvVarInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Values never reach logs, secret or not: plain values can be sensitive too.
        f.debug_struct("EnvVarInput")
            .field("value", &self.value.as_ref().map(|_| "[redacted]"))
            .field("secret", &self.secret)
            .finish()
    }
}

/// What the API shows of stored variables.
pub fn present(stored: &BTreeMap<String, StoredVar>) -> BTreeMap<String, EnvVar> {
    stored
        .iter()
        .map(|(k, v)| {
            let shown = match v {
                StoredVar::Value(value) => EnvVar { value: Some(value.clone()), secret: false, set: true },
                StoredVar::Secret(sealed) => EnvVar { value: None, secret: true, set: sealed.is_some() },
            };
            (k.clone(), shown)
        })
        .collect()
}

/// Associated data binding a sealed value to its variable.
fn context(tenant: Uuid, function: Uuid, name: &str) -> Vec<u8> {
    format!("nimbus/env/{tenant}/{function}/{name}").into_bytes()
}

fn name_error(name: &str) -> Option<FieldError> {
    let field = format!("environment.{name}");
    let well_formed = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !well_formed {
        return Some(FieldError::new(
            field,
            "format",
            format!("names are 1-{MAX_NAME} of A-Z, a-z, 0-9 and _, not starting with a digit"),
        ));
    }
    let upper = name.to_ascii_uppercase();
    if RESERVED.contains(&upper.as_str()) || RESERVED_PREFIXES.iter().any(|p| upper.starts_with(p)) {
        return Some(FieldError::new(field, "reserved", "set by the handler contract; choose another name"));
    }
    None
}

/// The stored variables after applying `input` (a full replacement) to `current`. Problems with
/// the input go to `errors`; a secret value without configured keys is an error of its own.
pub fn apply(
    state: &AppState,
    tenant: Uuid,
    function: Uuid,
    current: &BTreeMap<String, StoredVar>,
    input: BTreeMap<String, EnvVarInput>,
    errors: &mut Vec<FieldError>,
) -> Result<BTreeMap<String, StoredVar>, ApiError> {
    seal_all(state.secrets.as_deref(), tenant, function, current, input, errors)
}

fn seal_all(
    secrets: Option<&SecretBox>,
    tenant: Uuid,
    function: Uuid,
    current: &BTreeMap<String, StoredVar>,
    input: BTreeMap<String, EnvVarInput>,
    errors: &mut Vec<FieldError>,
) -> Result<BTreeMap<String, StoredVar>, ApiError> {
    if input.len() > MAX_VARS {
        errors.push(FieldError::new("environment", "max_items", format!("at most {MAX_VARS} variables")));
    }
    let mut total = 0;
    let mut out = BTreeMap::new();
    for (name, var) in input {
        if let Some(e) = name_error(&name) {
            errors.push(e);
            continue;
        }
        let field = format!("environment.{name}");
        if let Some(value) = &var.value {
            total += value.len();
            if value.len() > MAX_VALUE || value.contains('\0') {
                errors.push(FieldError::new(
                    &field,
                    "format",
                    format!("values are at most {MAX_VALUE} bytes, without NUL"),
                ));
                continue;
            }
        }
        total += name.len();
        let stored = match (var.secret, var.value) {
            (false, Some(value)) => StoredVar::Value(value),
            (false, None) => {
                errors.push(FieldError::new(&field, "required", "plain variables need a value"));
                continue;
            }
            (true, Some(value)) => {
                let Some(secrets) = secrets else {
                    return Err(ApiError::NotSupported {
                        code: "secrets_not_configured",
                        message: "this deployment has no secrets keys (--secrets-keys); secret values cannot be stored"
                            .into(),
                    });
                };
                let Sealed { key_id, blob } = secrets.seal(value.as_bytes(), &context(tenant, function, &name));
                StoredVar::Secret(Some(SealedValue { key_id, sealed: STANDARD.encode(blob) }))
            }
            // Keep the stored secret of the same name, if there is one.
            (true, None) => match current.get(&name) {
                Some(StoredVar::Secret(kept)) => StoredVar::Secret(kept.clone()),
                _ => StoredVar::Secret(None),
            },
        };
        out.insert(name, stored);
    }
    if total > MAX_TOTAL {
        errors.push(FieldError::new(
            "environment",
            "max_size",
            format!("names and values total at most {MAX_TOTAL} bytes"),
        ));
    }
    Ok(out)
}

/// The plaintext environment of a function, for handing to the runtime (never to the API).
pub fn reveal(
    secrets: Option<&SecretBox>,
    tenant: Uuid,
    function: Uuid,
    stored: &BTreeMap<String, StoredVar>,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (name, var) in stored {
        match var {
            StoredVar::Value(v) => {
                out.insert(name.clone(), v.clone());
            }
            StoredVar::Secret(None) => {}
            StoredVar::Secret(Some(s)) => {
                let secrets =
                    secrets.ok_or_else(|| anyhow::anyhow!("secret {name} stored but no secrets keys configured"))?;
                let blob = STANDARD.decode(&s.sealed)?;
                let plain =
                    secrets.open(&Sealed { key_id: s.key_id.clone(), blob }, &context(tenant, function, name))?;
                out.insert(name.clone(), String::from_utf8(plain)?);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::generate_key;

    fn input(pairs: &[(&str, Option<&str>, bool)]) -> BTreeMap<String, EnvVarInput> {
        pairs
            .iter()
            .map(|(k, v, secret)| (k.to_string(), EnvVarInput { value: v.map(str::to_owned), secret: *secret }))
            .collect()
    }

    #[test]
    fn secrets_are_sealed_kept_and_revealed_only_to_the_runtime() {
        let b = SecretBox::from_spec(&format!("k1:{}", generate_key())).unwrap();
        let (t, f) = (Uuid::now_v7(), Uuid::now_v7());
        let mut errors = Vec::new();
        let first = seal_all(
            Some(&b),
            t,
            f,
            &BTreeMap::new(),
            input(&[("LOG", Some("info"), false), ("TOKEN", Some("hunter2-value"), true), ("LATER", None, true)]),
            &mut errors,
        )
        .unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        let stored = serde_json::to_string(&first).unwrap();
        assert!(!stored.contains("hunter2"), "sealed at rest: {stored}");
        let shown = serde_json::to_string(&present(&first)).unwrap();
        assert!(!shown.contains("hunter2"));
        assert_eq!(present(&first)["TOKEN"], EnvVar { value: None, secret: true, set: true });
        assert_eq!(present(&first)["LATER"], EnvVar { value: None, secret: true, set: false });
        // An update naming the secret without a value keeps it.
        let second = seal_all(Some(&b), t, f, &first, input(&[("TOKEN", None, true)]), &mut errors).unwrap();
        assert_eq!(second["TOKEN"], first["TOKEN"]);
        let plain = reveal(Some(&b), t, f, &second).unwrap();
        assert_eq!(plain["TOKEN"], "hunter2-value");
        // Bound to its function: the same sealed value under another function does not open.
        assert!(reveal(Some(&b), t, Uuid::now_v7(), &second).is_err());
    }

    #[test]
    fn bad_names_and_values_are_named() {
        let mut errors = Vec::new();
        let long = "x".repeat(MAX_VALUE + 1);
        seal_all(
            None,
            Uuid::now_v7(),
            Uuid::now_v7(),
            &BTreeMap::new(),
            input(&[
                ("1ABC", Some("x"), false),
                ("NIMBUS_VERSION", Some("x"), false),
                ("http_host", Some("x"), false),
                ("PATH_INFO", Some("x"), false),
                ("BIG", Some(&long), false),
                ("EMPTY", None, false),
            ]),
            &mut errors,
        )
        .unwrap();
        let got: Vec<(String, String)> = errors.into_iter().map(|e| (e.field, e.rule)).collect();
        assert_eq!(
            got,
            [
                ("environment.1ABC", "format"),
                ("environment.BIG", "format"),
                ("environment.EMPTY", "required"),
                ("environment.NIMBUS_VERSION", "reserved"),
                ("environment.PATH_INFO", "reserved"),
                ("environment.http_host", "reserved"),
            ]
            .map(|(f, r)| (f.to_owned(), r.to_owned()))
        );
    }

    #[test]
    fn secret_values_need_keys_and_inputs_never_print_values() {
        let mut errors = Vec::new();
        let r = seal_all(
            None,
            Uuid::now_v7(),
            Uuid::now_v7(),
            &BTreeMap::new(),
            input(&[("T", Some("v"), true)]),
            &mut errors,
        );
        assert!(matches!(r, Err(ApiError::NotSupported { code: "secrets_not_configured", .. })));
        let i = EnvVarInput { value: Some("hunter2".into()), secret: false };
        assert!(!format!("{i:?}").contains("hunter2"));
    }
}
