//! Encryption of secrets at rest (function environment secrets, later the signing keys' private
//! halves): AES-256-GCM under keys from configuration. Every sealed value names the id of its
//! key, so keys rotate by putting a new key first and keeping the old ones until their values are
//! re-sealed. The associated data binds a value to where it belongs (tenant, function, variable),
//! so a ciphertext copied into another row does not open.
//!
//! Configuration form: `id:base64url-key[,id:base64url-key...]`, the first key sealing new values,
//! every key opening values sealed with it. Keys are 32 random bytes ([`generate_key`]).

use std::{collections::HashMap, fmt};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

use crate::auth::secret::random_bytes;

/// Longest key id.
pub const MAX_KEY_ID: usize = 32;

/// A value sealed under one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Id of the key that sealed it.
    pub key_id: String,
    /// Nonce followed by ciphertext and tag.
    pub blob: Vec<u8>,
}

/// Why a value did not open or a key set did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretsError {
    /// The key set is malformed.
    #[error("secrets keys: {0}")]
    Config(String),
    /// The value names a key this deployment does not have.
    #[error("no secrets key with id {0:?}")]
    UnknownKey(String),
    /// Wrong key, wrong associated data, or tampered ciphertext.
    #[error("the sealed value does not open")]
    Invalid,
}

/// The configured keys.
pub struct SecretBox {
    current: String,
    keys: HashMap<String, LessSafeKey>,
}

impl fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<&String> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("SecretBox").field("current", &self.current).field("key_ids", &ids).finish_non_exhaustive()
    }
}

/// A new random key in the configuration's encoding.
pub fn generate_key() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes::<32>())
}

impl SecretBox {
    /// Parses `id:key,id:key,...`; the first key seals.
    pub fn from_spec(spec: &str) -> Result<SecretBox, SecretsError> {
        let err = |m: String| SecretsError::Config(m);
        let mut keys = HashMap::new();
        let mut current = None;
        for (i, part) in spec.split(',').map(str::trim).enumerate() {
            let (id, encoded) = part.split_once(':').ok_or_else(|| err(format!("entry {} is not id:key", i + 1)))?;
            let id_ok = !id.is_empty()
                && id.len() <= MAX_KEY_ID
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !id_ok {
                return Err(err(format!("key id {id:?} must be 1-{MAX_KEY_ID} of a-z, A-Z, 0-9, - and _")));
            }
            let raw = URL_SAFE_NO_PAD.decode(encoded).map_err(|_| err(format!("key {id:?} is not base64url")))?;
            let unbound =
                UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| err(format!("key {id:?} must be 32 bytes")))?;
            if keys.insert(id.to_owned(), LessSafeKey::new(unbound)).is_some() {
                return Err(err(format!("key id {id:?} appears twice")));
            }
            current.get_or_insert_with(|| id.to_owned());
        }
        Ok(SecretBox { current: current.ok_or_else(|| err("no keys".into()))?, keys })
    }

    /// Seals `plaintext` under the current key, bound to `context`.
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Sealed {
        let key = &self.keys[&self.current];
        let nonce_bytes = random_bytes::<NONCE_LEN>();
        let mut in_out = plaintext.to_vec();
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce_bytes), Aad::from(context), &mut in_out)
            .expect("AES-GCM sealing of an in-memory buffer cannot fail");
        let mut blob = Vec::with_capacity(NONCE_LEN + in_out.len());
        blob.extend_from_slice(&nonce_bytes);
        blob.extend_from_slice(&in_out);
        Sealed { key_id: self.current.clone(), blob }
    }

    /// Opens a sealed value bound to `context`.
    pub fn open(&self, sealed: &Sealed, context: &[u8]) -> Result<Vec<u8>, SecretsError> {
        let key = self.keys.get(&sealed.key_id).ok_or_else(|| SecretsError::UnknownKey(sealed.key_id.clone()))?;
        if sealed.blob.len() < NONCE_LEN {
            return Err(SecretsError::Invalid);
        }
        let (nonce, ciphertext) = sealed.blob.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SecretsError::Invalid)?;
        let mut in_out = ciphertext.to_vec();
        let plain = key.open_in_place(nonce, Aad::from(context), &mut in_out).map_err(|_| SecretsError::Invalid)?;
        Ok(plain.to_vec())
    }

    /// Whether a value was sealed with an older key and should be re-sealed.
    pub fn needs_reseal(&self, sealed: &Sealed) -> bool {
        sealed.key_id != self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_open_bound_to_context() {
        let b = SecretBox::from_spec(&format!("k1:{}", generate_key())).unwrap();
        let sealed = b.seal(b"postgres://user:pw@db/app", b"tenant-a/fn/DATABASE_URL");
        assert_eq!(sealed.key_id, "k1");
        assert!(!String::from_utf8_lossy(&sealed.blob).contains("pw@db"));
        assert_eq!(b.open(&sealed, b"tenant-a/fn/DATABASE_URL").unwrap(), b"postgres://user:pw@db/app");
        // Moved to another row, it does not open.
        assert_eq!(b.open(&sealed, b"tenant-b/fn/DATABASE_URL"), Err(SecretsError::Invalid));
        // Nor does a tampered one.
        let mut bad = sealed.clone();
        *bad.blob.last_mut().unwrap() ^= 1;
        assert_eq!(b.open(&bad, b"tenant-a/fn/DATABASE_URL"), Err(SecretsError::Invalid));
        // Two seals of the same value differ (fresh nonces).
        assert_ne!(b.seal(b"x", b"c").blob, b.seal(b"x", b"c").blob);
    }

    #[test]
    fn keys_rotate_without_losing_old_values() {
        let (old, new) = (generate_key(), generate_key());
        let before = SecretBox::from_spec(&format!("k1:{old}")).unwrap();
        let sealed = before.seal(b"secret", b"ctx");
        let after = SecretBox::from_spec(&format!("k2:{new}, k1:{old}")).unwrap();
        assert_eq!(after.open(&sealed, b"ctx").unwrap(), b"secret");
        assert!(after.needs_reseal(&sealed));
        let resealed = after.seal(b"secret", b"ctx");
        assert_eq!(resealed.key_id, "k2");
        assert!(!after.needs_reseal(&resealed));
        // Once the old key is dropped, its values name a missing key.
        let later = SecretBox::from_spec(&format!("k2:{new}")).unwrap();
        assert_eq!(later.open(&sealed, b"ctx"), Err(SecretsError::UnknownKey("k1".into())));
    }

    #[test]
    fn key_sets_are_checked_and_never_printed() {
        let key = generate_key();
        let bad = |spec: String| matches!(SecretBox::from_spec(&spec), Err(SecretsError::Config(_)));
        assert!(bad(String::new()));
        assert!(bad(format!("k1{key}")));
        assert!(bad(format!("k1:{}", &key[..20])));
        assert!(bad("k1:not base64!".to_owned()));
        assert!(bad(format!("k1:{key},k1:{key}")));
        assert!(bad(format!("bad id:{key}")));
        let b = SecretBox::from_spec(&format!("k1:{key}")).unwrap();
        assert!(!format!("{b:?}").contains(&key));
    }
}
