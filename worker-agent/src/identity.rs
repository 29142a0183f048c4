//! The node's identity on disk (`<data>/identity.json`): node id, credential and its expiry,
//! invoke secret. Written atomically (temporary file, fsync, rename, fsync of the directory) with
//! mode 0600, because it holds the secrets that let anyone act as this node.

use std::{
    fmt,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use nimbus_protocol::{Credential, JoinResponse};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// File name of the identity inside the data directory.
pub const IDENTITY_FILE: &str = "identity.json";

/// Who this node is to the control plane.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The control plane that issued it (a different one means joining afresh).
    pub control_plane_url: String,
    /// The node's id.
    pub node_id: Uuid,
    /// The bearer credential of agent calls.
    pub credential: String,
    /// When the credential stops working.
    pub expires_at: DateTime<Utc>,
    /// What the gateway presents to the invocation listener.
    pub invoke_secret: String,
    /// How often to report, milliseconds, as the control plane said at join.
    pub report_interval_ms: u64,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("control_plane_url", &self.control_plane_url)
            .field("node_id", &self.node_id)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The identity a join gave.
    pub fn from_join(control_plane_url: &str, join: JoinResponse) -> Identity {
        Identity {
            control_plane_url: control_plane_url.to_owned(),
            node_id: join.node_id,
            credential: join.credential.token,
            expires_at: join.credential.expires_at,
            invoke_secret: join.invoke_secret,
            report_interval_ms: join.report_interval_ms,
        }
    }

    /// The identity after a renewal.
    pub fn renewed(&self, credential: Credential) -> Identity {
        Identity { credential: credential.token, expires_at: credential.expires_at, ..self.clone() }
    }
}

/// Where the identity of the node with data directory `data_dir` lives.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(IDENTITY_FILE)
}

/// Reads the identity; `None` when there is none (or it cannot be read, which is logged: the
/// node then joins again, which is what an operator would do by hand).
pub fn load(file: &Path) -> Option<Identity> {
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "cannot read the node identity; joining again");
            return None;
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(identity) => Some(identity),
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "the node identity is unreadable; joining again");
            None
        }
    }
}

/// Writes the identity atomically, readable by the agent's user only.
pub fn save(file: &Path, identity: &Identity) -> anyhow::Result<()> {
    let dir = file.parent().context("the identity file has a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let temp = file.with_extension(format!("tmp-{}", std::process::id()));
    let bytes = serde_json::to_vec_pretty(identity)?;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temp)?;
        // Explicitly: `mode` applies only to a file created now, and a stale temporary file of
        // an earlier run with this process id may have another.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&temp, file)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        anyhow::Error::new(e).context(format!("writing {}", file.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_privately_and_never_print_their_secrets() {
        let dir = std::env::temp_dir().join(format!("nimbus-identity-{}", Uuid::now_v7()));
        let file = path(&dir);
        assert!(load(&file).is_none());
        let id = Identity {
            control_plane_url: "http://cp".into(),
            node_id: Uuid::now_v7(),
            credential: "nnc_secret1".into(),
            expires_at: Utc::now(),
            invoke_secret: "nis_secret2".into(),
            report_interval_ms: 1000,
        };
        save(&file, &id).unwrap();
        assert_eq!(load(&file).as_ref(), Some(&id));
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        let shown = format!("{id:?}");
        assert!(!shown.contains("secret1") && !shown.contains("secret2"), "{shown}");
        std::fs::write(&file, b"{torn").unwrap();
        assert!(load(&file).is_none());
        let _ = std::fs::remove_dir_all(dir);
    }
}
