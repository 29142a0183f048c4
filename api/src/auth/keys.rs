//! Access-token signing keys: Ed25519 keys stored in PostgreSQL so every replica signs and
//! verifies alike, held in memory, published as a JWKS, rotated without logging anyone out
//! (a retired key keeps verifying until every token it signed has expired).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use crate::db::{self, Db, Scope};
use anyhow::Context;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey, Header, Validation,
    jwk::{
        AlgorithmParameters, CommonParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, OctetKeyPairParameters,
        OctetKeyPairType, PublicKeyUse,
    },
};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: Uuid,
    /// The session (refresh-token family) the token was issued in.
    pub sid: Uuid,
    /// Issuer: the deployment's public URL.
    pub iss: String,
    /// Audience: always `nimbus-api`.
    pub aud: String,
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// Expires at (seconds since the epoch).
    pub exp: i64,
    /// Token id.
    pub jti: Uuid,
}

/// Claims of a role credential: what an invocation of a function with an execution role acts
/// as when it calls the API (see [`KeyRing::issue_role`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoleClaims {
    /// The role id.
    pub sub: Uuid,
    /// The role's tenant.
    pub tid: Uuid,
    /// The function whose invocations hold it (the credential is void once the function no
    /// longer has this role).
    pub fid: Uuid,
    /// Issuer: the deployment's public URL.
    pub iss: String,
    /// Audience: always `nimbus-role`.
    pub aud: String,
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// Expires at (seconds since the epoch).
    pub exp: i64,
    /// Token id.
    pub jti: Uuid,
}

/// Audience of every role credential (so that one is never taken for an access token).
pub const ROLE_AUDIENCE: &str = "nimbus-role";
/// How long a role credential is valid (a retired signing key keeps verifying at least this
/// long, so that rotation never voids one early).
pub const ROLE_CREDENTIAL_TTL: Duration = Duration::from_secs(3600);

/// What the cache of verified tokens holds.
#[derive(Debug, Clone)]
enum Verified {
    Access(Claims),
    Role(RoleClaims),
}

impl Verified {
    fn exp(&self) -> i64 {
        match self {
            Verified::Access(c) => c.exp,
            Verified::Role(c) => c.exp,
        }
    }
}

/// Clock-skew allowance when checking expiry, in seconds.
const LEEWAY_SECS: u64 = 30;

/// Audience of every access token.
pub const AUDIENCE: &str = "nimbus-api";

#[derive(sqlx::FromRow)]
struct KeyRow {
    kid: String,
    private_key: Vec<u8>,
    public_key: Vec<u8>,
    created_at: DateTime<Utc>,
    retired_at: Option<DateTime<Utc>>,
}

struct LoadedKey {
    created_at: DateTime<Utc>,
    retired_at: Option<DateTime<Utc>>,
    encoding: EncodingKey,
    decoding: DecodingKey,
    public_key: Vec<u8>,
}

#[derive(Default)]
struct Keys {
    by_kid: HashMap<String, Arc<LoadedKey>>,
    /// The kid that signs new tokens.
    active: Option<String>,
}

/// The in-memory set of signing keys.
#[derive(Clone)]
pub struct KeyRing {
    pool: Db,
    keys: Arc<RwLock<Keys>>,
    issuer: String,
    access_ttl: Duration,
    /// Tokens already verified, by the SHA-256 of the whole token: a client sends the same
    /// token for its whole life, and an Ed25519 verification is the costliest step of
    /// authentication. Emptied whenever the set of trusted keys changes.
    verified: Arc<Mutex<HashMap<Vec<u8>, Verified>>>,
    /// When an unknown `kid` last made us reload, so that bogus tokens cannot make every
    /// request query the database.
    last_miss_reload: Arc<Mutex<Option<Instant>>>,
}

/// Most verified tokens remembered at once.
const VERIFIED_CACHE_MAX: usize = 50_000;
/// Least time between reloads caused by unknown key ids.
const MISS_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

impl KeyRing {
    /// Loads the keys, creating the first one if the database has none.
    pub async fn load(pool: Db, issuer: String, access_ttl: Duration) -> anyhow::Result<Self> {
        let ring = KeyRing {
            pool,
            keys: Arc::default(),
            issuer,
            access_ttl,
            verified: Arc::default(),
            last_miss_reload: Arc::default(),
        };
        ring.ensure_active_key().await?;
        ring.reload().await?;
        Ok(ring)
    }

    /// The access-token lifetime.
    pub fn access_ttl(&self) -> Duration {
        self.access_ttl
    }

    /// Re-reads the keys from the database.
    pub async fn reload(&self) -> anyhow::Result<()> {
        let mut tx = db::begin(&self.pool, &Scope::default()).await?;
        let rows: Vec<KeyRow> = sqlx::query_as(
            "SELECT kid, private_key, public_key, created_at, retired_at FROM signing_keys \
             WHERE retired_at IS NULL OR retired_at > now() - make_interval(secs => $1) \
             ORDER BY created_at",
        )
        .bind(self.verify_grace().as_secs_f64())
        .fetch_all(&mut *tx)
        .await
        .context("loading signing keys")?;
        tx.commit().await?;
        let mut keys = Keys::default();
        for KeyRow { kid, private_key, public_key, created_at, retired_at } in rows {
            let loaded = LoadedKey {
                created_at,
                retired_at,
                encoding: EncodingKey::from_ed_der(&private_key),
                decoding: DecodingKey::from_ed_der(&public_key),
                public_key,
            };
            if retired_at.is_none() {
                keys.active = Some(kid.clone());
            }
            keys.by_kid.insert(kid, Arc::new(loaded));
        }
        let mut current = self.keys.write().expect("key ring lock");
        let same_keys = current.active == keys.active
            && current.by_kid.len() == keys.by_kid.len()
            && keys.by_kid.keys().all(|k| current.by_kid.contains_key(k));
        if !same_keys {
            self.verified.lock().expect("verified cache lock").clear();
        }
        *current = keys;
        Ok(())
    }

    /// How long a retired key keeps verifying: the token lifetime plus clock-skew leeway.
    fn verify_grace(&self) -> Duration {
        self.access_ttl.max(ROLE_CREDENTIAL_TTL) + Duration::from_secs(120)
    }

    async fn ensure_active_key(&self) -> anyhow::Result<()> {
        let mut tx = db::begin(&self.pool, &Scope::default()).await?;
        // Replicas starting together must not each create a key.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('nimbus.signing_keys'))").execute(&mut *tx).await?;
        let active: Option<String> =
            sqlx::query_scalar("SELECT kid FROM signing_keys WHERE retired_at IS NULL LIMIT 1")
                .fetch_optional(&mut *tx)
                .await?;
        if active.is_none() {
            insert_new_key(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Retires the active key and makes a new one active. Tokens signed by the old key stay valid.
    pub async fn rotate(&self) -> anyhow::Result<String> {
        let mut tx = db::begin(&self.pool, &Scope::default()).await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('nimbus.signing_keys'))").execute(&mut *tx).await?;
        sqlx::query("UPDATE signing_keys SET retired_at = now() WHERE retired_at IS NULL").execute(&mut *tx).await?;
        let kid = insert_new_key(&mut tx).await?;
        tx.commit().await?;
        self.reload().await?;
        tracing::info!(kid = %kid, "signing key rotated");
        Ok(kid)
    }

    /// Rotates if the active key is older than `max_age`; returns whether it did.
    pub async fn rotate_if_older_than(&self, max_age: Duration) -> anyhow::Result<bool> {
        let mut tx = db::begin(&self.pool, &Scope::default()).await?;
        let too_old: Option<bool> = sqlx::query_scalar(
            "SELECT created_at < now() - make_interval(secs => $1) FROM signing_keys \
             WHERE retired_at IS NULL ORDER BY created_at DESC LIMIT 1",
        )
        .bind(max_age.as_secs_f64())
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        if too_old == Some(true) {
            self.rotate().await?;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// The issuer: this deployment's public base URL.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Issues an access token for a user session; returns the token and its expiry.
    pub fn issue(&self, user: Uuid, session: Uuid) -> anyhow::Result<(String, DateTime<Utc>)> {
        let now = Utc::now();
        let exp = now + chrono::Duration::from_std(self.access_ttl)?;
        let claims = Claims {
            sub: user,
            sid: session,
            iss: self.issuer.clone(),
            aud: AUDIENCE.to_owned(),
            iat: now.timestamp(),
            exp: exp.timestamp(),
            jti: Uuid::now_v7(),
        };
        Ok((self.sign(&claims)?, exp))
    }

    /// Issues a credential for `role` of `tenant`, held by invocations of `function`, valid for
    /// `ttl`; returns the token and its expiry.
    pub fn issue_role(
        &self,
        role: Uuid,
        tenant: Uuid,
        function: Uuid,
        ttl: Duration,
    ) -> anyhow::Result<(String, DateTime<Utc>)> {
        let now = Utc::now();
        let exp = now + chrono::Duration::from_std(ttl)?;
        let claims = RoleClaims {
            sub: role,
            tid: tenant,
            fid: function,
            iss: self.issuer.clone(),
            aud: ROLE_AUDIENCE.to_owned(),
            iat: now.timestamp(),
            exp: exp.timestamp(),
            jti: Uuid::now_v7(),
        };
        Ok((self.sign(&claims)?, exp))
    }

    fn sign(&self, claims: &impl Serialize) -> anyhow::Result<String> {
        let (kid, key) = {
            let keys = self.keys.read().expect("key ring lock");
            let kid = keys.active.clone().context("no active signing key")?;
            let key = keys.by_kid.get(&kid).cloned().context("active key not loaded")?;
            (kid, key)
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid);
        Ok(jsonwebtoken::encode(&header, claims, &key.encoding)?)
    }

    /// Verifies an access token: signature by a known key, issuer, audience, expiry.
    /// An unknown `kid` triggers one reload, so a key rotated on another replica is found.
    pub async fn verify(&self, token: &str) -> Result<Claims, VerifyError> {
        match self.verify_as::<Claims>(token, AUDIENCE, Verified::Access).await? {
            Verified::Access(c) => Ok(c),
            Verified::Role(_) => Err(VerifyError::Invalid),
        }
    }

    /// Verifies a role credential as [`KeyRing::verify`] does an access token.
    pub async fn verify_role(&self, token: &str) -> Result<RoleClaims, VerifyError> {
        match self.verify_as::<RoleClaims>(token, ROLE_AUDIENCE, Verified::Role).await? {
            Verified::Role(c) => Ok(c),
            Verified::Access(_) => Err(VerifyError::Invalid),
        }
    }

    async fn verify_as<C: serde::de::DeserializeOwned>(
        &self,
        token: &str,
        audience: &str,
        wrap: fn(C) -> Verified,
    ) -> Result<Verified, VerifyError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| VerifyError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(VerifyError::Malformed);
        }
        let kid = header.kid.ok_or(VerifyError::Malformed)?;
        let digest = super::secret::sha256(token.as_bytes());
        let cached = self.verified.lock().expect("verified cache lock").get(&digest).cloned();
        if let Some(claims) = cached {
            // Same checks as a fresh verification would make, minus the signature (the audience
            // is told by the kind of claims the token was verified as).
            return if claims.exp() + LEEWAY_SECS as i64 > Utc::now().timestamp() && self.key(&kid).is_some() {
                Ok(claims)
            } else {
                Err(VerifyError::Expired)
            };
        }
        let key = match self.key(&kid) {
            Some(k) => k,
            None => {
                let due = {
                    let mut last = self.last_miss_reload.lock().expect("reload lock");
                    let due = last.is_none_or(|t| t.elapsed() >= MISS_RELOAD_INTERVAL);
                    if due {
                        *last = Some(Instant::now());
                    }
                    due
                };
                if due {
                    self.reload().await.map_err(VerifyError::Internal)?;
                }
                self.key(&kid).ok_or(VerifyError::UnknownKey)?
            }
        };
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&[audience]);
        validation.set_issuer(&[&self.issuer]);
        validation.leeway = LEEWAY_SECS;
        let claims = jsonwebtoken::decode::<C>(token, &key.decoding, &validation).map(|d| wrap(d.claims)).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => VerifyError::Expired,
                _ => VerifyError::Invalid,
            },
        )?;
        let mut cache = self.verified.lock().expect("verified cache lock");
        if cache.len() >= VERIFIED_CACHE_MAX {
            let now = Utc::now().timestamp();
            cache.retain(|_, c| c.exp() + LEEWAY_SECS as i64 > now);
            if cache.len() >= VERIFIED_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(digest, claims.clone());
        Ok(claims)
    }

    fn key(&self, kid: &str) -> Option<Arc<LoadedKey>> {
        self.keys.read().expect("key ring lock").by_kid.get(kid).cloned()
    }

    /// The public keys that verify tokens, as a JWK set.
    pub fn jwks(&self) -> JwkSet {
        let keys = self.keys.read().expect("key ring lock");
        let mut list: Vec<(&String, &Arc<LoadedKey>)> = keys.by_kid.iter().collect();
        list.sort_by_key(|(_, k)| k.created_at);
        let grace = chrono::Duration::from_std(self.verify_grace()).unwrap_or_default();
        JwkSet {
            keys: list
                .into_iter()
                .filter(|(_, k)| k.retired_at.is_none_or(|r| r + grace > Utc::now()))
                .map(|(kid, k)| Jwk {
                    common: CommonParameters {
                        public_key_use: Some(PublicKeyUse::Signature),
                        key_algorithm: Some(KeyAlgorithm::EdDSA),
                        key_id: Some(kid.clone()),
                        ..CommonParameters::default()
                    },
                    algorithm: AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
                        key_type: OctetKeyPairType::OctetKeyPair,
                        curve: EllipticCurve::Ed25519,
                        x: URL_SAFE_NO_PAD.encode(&k.public_key),
                    }),
                })
                .collect(),
        }
    }
}

async fn insert_new_key(tx: &mut db::Tx) -> anyhow::Result<String> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| anyhow::anyhow!("generating an Ed25519 key"))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| anyhow::anyhow!("reading the new key"))?;
    let kid = format!("k{}", Uuid::now_v7().simple());
    sqlx::query("INSERT INTO signing_keys (kid, algorithm, private_key, public_key) VALUES ($1, 'EdDSA', $2, $3)")
        .bind(&kid)
        .bind(pkcs8.as_ref())
        .bind(pair.public_key().as_ref())
        .execute(&mut **tx)
        .await?;
    Ok(kid)
}

/// Why a token did not verify.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Not a well-formed EdDSA JWT with a `kid`.
    #[error("malformed token")]
    Malformed,
    /// Signed by a key this deployment does not know (or no longer trusts).
    #[error("unknown signing key")]
    UnknownKey,
    /// Past its expiry.
    #[error("token expired")]
    Expired,
    /// Bad signature, issuer or audience.
    #[error("invalid token")]
    Invalid,
    /// The keys could not be loaded.
    #[error(transparent)]
    Internal(anyhow::Error),
}
