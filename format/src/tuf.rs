//! Signed update metadata, after The Update Framework (TUF, specification 1.0.x), and the
//! client-side checks a node (or a browser) runs before it installs a capsule.
//!
//! Two roles, both signed offline by publishers with ed25519 keys:
//! - **root** lists the trusted keys and, per role, which keys sign it and how many must
//!   (threshold). Nodes pin a root file; a new root is accepted only when signed by a
//!   threshold of the old root's keys and of its own (key rotation, TUF 5.3.4).
//! - **targets** lists every capsule a publisher approved: path, length, SHA-256, model name
//!   and version; it has a version number (no rollback) and an expiry (no freeze).
//!
//! The hub only stores and serves these files: it cannot make a node install a capsule that is
//! not in a targets file signed by a threshold of the publishers' keys. TUF's snapshot and
//! timestamp roles are not used (ARCHITECTURE.md): there is one targets file, so what snapshot
//! protects against (mixing targets files of different versions) reduces to the targets
//! version check, and freshness is the targets expiry.
//!
//! Signatures cover the canonical JSON of `signed`: UTF-8, object keys sorted, no whitespace
//! (what `serde_json` writes for a `Value`).

use std::collections::BTreeMap;

use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Largest metadata file a client parses (checked before parsing).
pub const MAX_METADATA_BYTES: usize = 1 << 20;

fn refuse(step: &'static str, reason: impl Into<String>) -> crate::Error {
    crate::Error::Refused {
        step,
        reason: reason.into(),
    }
}

/// A public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKey {
    /// Always `ed25519`.
    pub keytype: String,
    /// The 32-byte key, lowercase hex.
    pub public: String,
}

impl PublicKey {
    /// The key of an ed25519 verifying key.
    pub fn ed25519(key: &ed25519_dalek::VerifyingKey) -> PublicKey {
        PublicKey {
            keytype: "ed25519".into(),
            public: hex(key.as_bytes()),
        }
    }

    /// TUF's key id: SHA-256 of the key's canonical JSON.
    pub fn keyid(&self) -> String {
        hex(&Sha256::digest(canonical(self).unwrap_or_default()))
    }

    fn verifying_key(&self) -> Option<ed25519_dalek::VerifyingKey> {
        if self.keytype != "ed25519" {
            return None;
        }
        let bytes: [u8; 32] = unhex(&self.public)?.try_into().ok()?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes).ok()
    }
}

/// Which keys sign a role, and how many signatures it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    /// Key ids allowed to sign.
    pub keyids: Vec<String>,
    /// Distinct valid signatures needed (>= 1).
    pub threshold: u32,
}

/// The root role's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Root {
    /// Always `root`.
    #[serde(rename = "_type")]
    pub kind: String,
    /// Version, starting at 1, +1 per rotation.
    pub version: u64,
    /// Expiry, seconds since the Unix epoch.
    pub expires: u64,
    /// Keys by key id.
    pub keys: BTreeMap<String, PublicKey>,
    /// `root` and `targets`.
    pub roles: BTreeMap<String, Role>,
}

/// One approved artifact: a capsule (`MODEL/VERSION.capsule.wasm`), a model image
/// (`MODEL/VERSION.capsule.img`, [`image_target_path`]) or a guest code module
/// (`code/SHA256.wasm`, [`code_target_path`]; its model and version are empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Size in bytes.
    pub length: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
    /// Model name.
    pub model: String,
    /// Model version.
    pub version: String,
    /// For a model image: the SHA-256 of the only code module it may be joined with, itself a
    /// target at [`code_target_path`]. Absent for capsules and code modules (and then not
    /// serialized, so metadata without model images signs as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// The targets role's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    /// Always `targets`.
    #[serde(rename = "_type")]
    pub kind: String,
    /// Version; a client never accepts a lower one than it has seen.
    pub version: u64,
    /// Expiry, seconds since the Unix epoch.
    pub expires: u64,
    /// Targets by path (`MODEL/VERSION.capsule.wasm`).
    pub targets: BTreeMap<String, Target>,
}

/// A signature over the canonical JSON of `signed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// The signing key's id.
    pub keyid: String,
    /// The 64-byte ed25519 signature, lowercase hex.
    pub sig: String,
}

/// Metadata with its signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signed<T> {
    /// The signed part.
    pub signed: T,
    /// Signatures.
    pub signatures: Vec<Signature>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Canonical JSON: object keys sorted, no whitespace.
pub fn canonical<T: Serialize>(value: &T) -> Result<Vec<u8>, crate::Error> {
    let value = serde_json::to_value(value).map_err(|e| refuse("capsule", e.to_string()))?;
    serde_json::to_vec(&value).map_err(|e| refuse("capsule", e.to_string()))
}

/// A publisher's signing key.
#[derive(Clone)]
pub struct SigningKey(ed25519_dalek::SigningKey);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.public().keyid())
    }
}

impl SigningKey {
    /// A key from its 32-byte secret.
    pub fn from_secret(secret: [u8; 32]) -> SigningKey {
        SigningKey(ed25519_dalek::SigningKey::from_bytes(&secret))
    }

    /// A key from the lowercase hex of its secret (a key file).
    pub fn from_hex(text: &str) -> Option<SigningKey> {
        let bytes: [u8; 32] = unhex(text.trim())?.try_into().ok()?;
        Some(SigningKey::from_secret(bytes))
    }

    /// The secret as lowercase hex (what a key file holds).
    pub fn to_hex(&self) -> String {
        hex(self.0.as_bytes())
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey::ed25519(&self.0.verifying_key())
    }

    /// Adds this key's signature over `metadata.signed` (replacing an older one of the key).
    pub fn sign<T: Serialize>(&self, metadata: &mut Signed<T>) -> Result<(), crate::Error> {
        let bytes = canonical(&metadata.signed)?;
        let keyid = self.public().keyid();
        metadata.signatures.retain(|s| s.keyid != keyid);
        metadata.signatures.push(Signature {
            keyid,
            sig: hex(&self.0.sign(&bytes).to_bytes()),
        });
        Ok(())
    }
}

/// Parses metadata, refusing oversized files before parsing (TUF 5.3.1 / 5.6.1: bounded
/// downloads).
pub fn parse<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
) -> Result<Signed<T>, crate::Error> {
    if bytes.len() > MAX_METADATA_BYTES {
        return Err(refuse(
            "5.6.1",
            format!(
                "{what} metadata is {} bytes, over the limit of {MAX_METADATA_BYTES}",
                bytes.len()
            ),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| refuse("capsule", format!("{what} metadata: {e}")))
}

/// Counts distinct valid signatures of `role`'s keys over `signed` and requires the
/// threshold.
fn check_threshold<T: Serialize>(
    step: &'static str,
    what: &str,
    keys: &BTreeMap<String, PublicKey>,
    role: &Role,
    metadata: &Signed<T>,
) -> Result<(), crate::Error> {
    if role.threshold == 0 {
        return Err(refuse(step, format!("{what}: threshold 0")));
    }
    let bytes = canonical(&metadata.signed)?;
    let mut valid: Vec<&str> = Vec::new();
    for s in &metadata.signatures {
        if valid.contains(&s.keyid.as_str()) || !role.keyids.contains(&s.keyid) {
            continue;
        }
        let Some(key) = keys.get(&s.keyid).and_then(PublicKey::verifying_key) else {
            continue;
        };
        let Some(sig) = unhex(&s.sig).and_then(|b| <[u8; 64]>::try_from(b).ok()) else {
            continue;
        };
        if key
            .verify(&bytes, &ed25519_dalek::Signature::from_bytes(&sig))
            .is_ok()
        {
            valid.push(&s.keyid);
        }
    }
    if (valid.len() as u64) < u64::from(role.threshold) {
        return Err(refuse(
            step,
            format!(
                "{what} has {} valid signature(s) of trusted keys, the threshold is {}",
                valid.len(),
                role.threshold
            ),
        ));
    }
    Ok(())
}

fn role<'a>(root: &'a Root, name: &str) -> Result<&'a Role, crate::Error> {
    root.roles
        .get(name)
        .ok_or_else(|| refuse("5.3.4", format!("root has no {name} role")))
}

impl Root {
    /// A version-1 root: `root_keys` sign root metadata, `targets_keys` sign targets.
    pub fn new(
        root_keys: &[PublicKey],
        root_threshold: u32,
        targets_keys: &[PublicKey],
        targets_threshold: u32,
        expires: u64,
    ) -> Root {
        let mut keys = BTreeMap::new();
        for k in root_keys.iter().chain(targets_keys) {
            keys.insert(k.keyid(), k.clone());
        }
        let ids = |ks: &[PublicKey]| ks.iter().map(PublicKey::keyid).collect();
        let mut roles = BTreeMap::new();
        roles.insert(
            "root".into(),
            Role {
                keyids: ids(root_keys),
                threshold: root_threshold,
            },
        );
        roles.insert(
            "targets".into(),
            Role {
                keyids: ids(targets_keys),
                threshold: targets_threshold,
            },
        );
        Root {
            kind: "root".into(),
            version: 1,
            expires,
            keys,
            roles,
        }
    }
}

/// Checks a pinned root file on its own: self-signed by its root threshold, not expired.
pub fn trust_root(metadata: &Signed<Root>, now: u64) -> Result<Root, crate::Error> {
    let root = &metadata.signed;
    if root.kind != "root" {
        return Err(refuse(
            "5.3.4",
            format!("type is {:?}, not root", root.kind),
        ));
    }
    check_threshold("5.3.4", "root", &root.keys, role(root, "root")?, metadata)?;
    role(root, "targets")?;
    if root.expires <= now {
        return Err(refuse(
            "5.3.10",
            format!("root version {} expired", root.version),
        ));
    }
    Ok(root.clone())
}

/// TUF 5.3.4–5.3.5: a new root, signed by a threshold of the trusted root's keys and of its
/// own, with version trusted + 1. (Expiry is checked on the final root, 5.3.10.)
pub fn rotate_root(trusted: &Root, new: &Signed<Root>) -> Result<Root, crate::Error> {
    let next = &new.signed;
    if next.kind != "root" {
        return Err(refuse(
            "5.3.4",
            format!("type is {:?}, not root", next.kind),
        ));
    }
    check_threshold(
        "5.3.4",
        "new root (old keys)",
        &trusted.keys,
        role(trusted, "root")?,
        new,
    )?;
    check_threshold(
        "5.3.4",
        "new root (new keys)",
        &next.keys,
        role(next, "root")?,
        new,
    )?;
    let want = trusted
        .version
        .checked_add(1)
        .ok_or_else(|| refuse("5.3.5", "version overflow"))?;
    if next.version != want {
        return Err(refuse(
            "5.3.5",
            format!(
                "root version {} does not follow {}",
                next.version, trusted.version
            ),
        ));
    }
    Ok(next.clone())
}

/// Checks that a target path is a plain relative path (`model/1.0.0.capsule.wasm`): no `..`,
/// no leading `/`, no backslash, no empty segment, ASCII letters, digits, `._-+`.
pub fn check_target_path(path: &str) -> Result<(), crate::Error> {
    let ok = !path.is_empty()
        && path.len() <= 255
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
        });
    if ok {
        Ok(())
    } else {
        Err(refuse(
            "capsule",
            format!("target path {path:?} is not a plain relative path"),
        ))
    }
}

/// TUF 5.6: new targets metadata against the trusted root and the last trusted targets
/// version: signatures (5.6.3), no rollback (5.6.4), not expired (5.6.5); every target path
/// and hash well-formed.
pub fn verify_targets(
    root: &Root,
    trusted_version: Option<u64>,
    new: &Signed<Targets>,
    now: u64,
) -> Result<Targets, crate::Error> {
    let t = &new.signed;
    if t.kind != "targets" {
        return Err(refuse(
            "5.6.3",
            format!("type is {:?}, not targets", t.kind),
        ));
    }
    check_threshold("5.6.3", "targets", &root.keys, role(root, "targets")?, new)?;
    if let Some(v) = trusted_version
        && t.version < v
    {
        return Err(refuse(
            "5.6.4",
            format!(
                "targets version {} is older than the trusted version {v}",
                t.version
            ),
        ));
    }
    if t.expires <= now {
        return Err(refuse(
            "5.6.5",
            format!(
                "targets version {} expired at {} (now {now})",
                t.version, t.expires
            ),
        ));
    }
    for (path, target) in &t.targets {
        check_target_path(path)?;
        let well_formed = |h: &str| h.len() == 64 && unhex(h).is_some();
        if !well_formed(&target.sha256) || !target.code.as_deref().is_none_or(well_formed) {
            return Err(refuse(
                "capsule",
                format!("target {path:?} has a malformed sha256"),
            ));
        }
    }
    Ok(t.clone())
}

/// TUF 5.7.3: downloaded bytes against the signed length and hash.
pub fn verify_target(path: &str, target: &Target, bytes: &[u8]) -> Result<(), crate::Error> {
    verify_target_length(path, target, bytes.len() as u64)?;
    verify_target_digest(path, target, &hex(&Sha256::digest(bytes)))
}

/// [`verify_target`] for bytes hashed elsewhere (a browser's native SHA-256): `length` bytes
/// whose SHA-256 is `digest` (lowercase hex).
pub fn verify_target_hashed(
    path: &str,
    target: &Target,
    length: u64,
    digest: &str,
) -> Result<(), crate::Error> {
    verify_target_length(path, target, length)?;
    verify_target_digest(path, target, digest)
}

fn verify_target_length(path: &str, target: &Target, length: u64) -> Result<(), crate::Error> {
    if length != target.length {
        return Err(refuse(
            "5.7.3",
            format!(
                "{path}: {length} bytes, the signed length is {}",
                target.length
            ),
        ));
    }
    Ok(())
}

fn verify_target_digest(path: &str, target: &Target, digest: &str) -> Result<(), crate::Error> {
    if digest != target.sha256 {
        return Err(refuse(
            "5.7.3",
            format!(
                "{path}: sha256 {digest}, the signed hash is {}",
                target.sha256
            ),
        ));
    }
    Ok(())
}

/// The path of a capsule in targets metadata.
pub fn target_path(model: &str, version: &str) -> String {
    format!("{model}/{version}.capsule.wasm")
}

/// The path of a model image (split form) in targets metadata.
pub fn image_target_path(model: &str, version: &str) -> String {
    format!("{model}/{version}{}", crate::split::IMAGE_SUFFIX)
}

/// The path of a guest code module in targets metadata.
pub fn code_target_path(code_sha256: &str) -> String {
    format!("code/{code_sha256}.wasm")
}

/// The targets `capsule sign` signs for one capsule, each `(length, sha256)`: the single file,
/// its model image (naming its code) and the code module.
pub fn capsule_targets(
    model: &str,
    version: &str,
    capsule: (u64, &str),
    image: (u64, &str),
    code: (u64, &str),
) -> [(String, Target); 3] {
    let target =
        |(length, sha256): (u64, &str), model: &str, version: &str, code: Option<&str>| Target {
            length,
            sha256: sha256.to_owned(),
            model: model.to_owned(),
            version: version.to_owned(),
            code: code.map(str::to_owned),
        };
    [
        (
            target_path(model, version),
            target(capsule, model, version, None),
        ),
        (
            image_target_path(model, version),
            target(image, model, version, Some(code.1)),
        ),
        (code_target_path(code.1), target(code, "", "", None)),
    ]
}

/// The signed targets of a model image and of the code it must be joined with (TUF 5.7, with
/// a step of ours for the pairing): the image is a target that names its code (`code`), and
/// that code is a target of its own at [`code_target_path`] with exactly that hash. A client
/// installs the image only with this code, never with another it happens to have.
pub fn image_and_code<'a>(
    targets: &'a Targets,
    image_path: &str,
) -> Result<(&'a Target, &'a Target), crate::Error> {
    let image = targets.targets.get(image_path).ok_or_else(|| {
        refuse(
            "5.7.1",
            format!(
                "{image_path} is not in the signed targets (version {})",
                targets.version
            ),
        )
    })?;
    let code = image.code.as_deref().ok_or_else(|| {
        refuse(
            "capsule",
            format!("{image_path}: the signed target names no code module"),
        )
    })?;
    let code_path = code_target_path(code);
    let code_target = targets.targets.get(&code_path).ok_or_else(|| {
        refuse(
            "5.7.1",
            format!("{image_path} needs code {code}, which is not a signed target ({code_path})"),
        )
    })?;
    if code_target.sha256 != code {
        return Err(refuse(
            "5.7.3",
            format!(
                "{code_path}: signed with sha256 {}, the image's target names {code}",
                code_target.sha256
            ),
        ));
    }
    Ok((image, code_target))
}

/// A downloaded model image against the code its signed target names: the image's own header
/// must name the same code (an image that passed [`verify_target`] is the publisher's, so this
/// catches a publisher's error, not an attack; the join then checks the code bytes).
pub fn verify_image_code(
    image_path: &str,
    image_target: &Target,
    header: &crate::split::ImageHeader,
) -> Result<(), crate::Error> {
    if image_target.code.as_deref() != Some(header.code_sha256.as_str()) {
        return Err(refuse(
            "capsule",
            format!(
                "{image_path} names code {}, its signed target names {:?}",
                header.code_sha256, image_target.code
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_secret([n; 32])
    }

    fn root(threshold: u32) -> Signed<Root> {
        let root = Root::new(
            &[key(1).public(), key(2).public()],
            threshold,
            &[key(3).public(), key(4).public()],
            threshold,
            NOW + 1000,
        );
        let mut s = Signed {
            signed: root,
            signatures: vec![],
        };
        key(1).sign(&mut s).unwrap();
        key(2).sign(&mut s).unwrap();
        s
    }

    fn targets(version: u64, expires: u64) -> Signed<Targets> {
        let mut targets = BTreeMap::new();
        targets.insert(
            target_path("digits", "1.0.0"),
            Target {
                length: 3,
                sha256: hex(&Sha256::digest(b"abc")),
                model: "digits".into(),
                version: "1.0.0".into(),
                code: None,
            },
        );
        Signed {
            signed: Targets {
                kind: "targets".into(),
                version,
                expires,
                targets,
            },
            signatures: vec![],
        }
    }

    fn step(e: crate::Error) -> &'static str {
        match e {
            crate::Error::Refused { step, .. } => step,
            other => panic!("{other}"),
        }
    }

    /// Mix-and-match of split artifacts: an image pairs only with the code its signed target
    /// names, and that code must be signed too, with that hash.
    #[test]
    fn an_image_pairs_only_with_its_signed_code() {
        let code = hex(&Sha256::digest(b"code A"));
        let other = hex(&Sha256::digest(b"code B"));
        let image = |code: Option<&str>| Target {
            length: 10,
            sha256: hex(&Sha256::digest(b"image")),
            model: "digits".into(),
            version: "1.0.0".into(),
            code: code.map(str::to_owned),
        };
        let code_target = |sha: &str| Target {
            length: 6,
            sha256: sha.to_owned(),
            model: String::new(),
            version: String::new(),
            code: None,
        };
        let path = image_target_path("digits", "1.0.0");
        let with = |entries: Vec<(String, Target)>| Targets {
            kind: "targets".into(),
            version: 1,
            expires: NOW + 10,
            targets: entries.into_iter().collect(),
        };
        let good = with(vec![
            (path.clone(), image(Some(&code))),
            (code_target_path(&code), code_target(&code)),
        ]);
        let (i, c) = image_and_code(&good, &path).unwrap();
        assert_eq!(
            (i.code.as_deref(), c.sha256.as_str()),
            (Some(&*code), &*code)
        );
        // Not a target; names no code; its code unsigned; the code's path signed with B.
        let cases = [
            (with(vec![]), "5.7.1"),
            (
                with(vec![
                    (path.clone(), image(None)),
                    (code_target_path(&code), code_target(&code)),
                ]),
                "capsule",
            ),
            (with(vec![(path.clone(), image(Some(&code)))]), "5.7.1"),
            (
                with(vec![
                    (path.clone(), image(Some(&code))),
                    (code_target_path(&code), code_target(&other)),
                ]),
                "5.7.3",
            ),
        ];
        for (targets, want) in cases {
            assert_eq!(step(image_and_code(&targets, &path).unwrap_err()), want);
        }
        // The image's header must name the signed code.
        let header = |sha: &str| crate::split::ImageHeader {
            code_sha256: sha.to_owned(),
            code_len: 6,
            payload_len: 1,
        };
        verify_image_code(&path, &image(Some(&code)), &header(&code)).unwrap();
        let e = verify_image_code(&path, &image(Some(&code)), &header(&other)).unwrap_err();
        assert_eq!(step(e), "capsule");
        // A malformed code hash makes the whole metadata invalid.
        let trusted = trust_root(&root(2), NOW).unwrap();
        let mut t = targets(1, NOW + 10);
        t.signed
            .targets
            .insert(path.clone(), image(Some("not hex")));
        key(3).sign(&mut t).unwrap();
        key(4).sign(&mut t).unwrap();
        assert_eq!(
            step(verify_targets(&trusted, None, &t, NOW).unwrap_err()),
            "capsule"
        );
    }

    #[test]
    fn a_signed_round_trip_verifies() {
        let trusted = trust_root(&root(2), NOW).unwrap();
        let mut t = targets(1, NOW + 10);
        key(3).sign(&mut t).unwrap();
        key(4).sign(&mut t).unwrap();
        let bytes = canonical(&t).unwrap();
        let parsed: Signed<Targets> = parse(&bytes, "targets").unwrap();
        let v = verify_targets(&trusted, None, &parsed, NOW).unwrap();
        let (path, target) = v.targets.iter().next().unwrap();
        verify_target(path, target, b"abc").unwrap();
    }

    #[test]
    fn every_attack_is_refused_at_its_step() {
        let trusted = trust_root(&root(2), NOW).unwrap();
        let signed = |t: &mut Signed<Targets>, keys: &[u8]| {
            for k in keys {
                key(*k).sign(t).unwrap();
            }
        };
        // Wrong key: a root key, not a targets key.
        let mut t = targets(1, NOW + 10);
        signed(&mut t, &[1, 2]);
        assert_eq!(
            step(verify_targets(&trusted, None, &t, NOW).unwrap_err()),
            "5.6.3"
        );
        // Below threshold: one of two.
        let mut t = targets(1, NOW + 10);
        signed(&mut t, &[3, 3]);
        let e = verify_targets(&trusted, None, &t, NOW).unwrap_err();
        assert_eq!(
            e.to_string(),
            "refused (5.6.3): targets has 1 valid signature(s) of trusted keys, the threshold is 2"
        );
        // Tampered after signing.
        let mut t = targets(1, NOW + 10);
        signed(&mut t, &[3, 4]);
        t.signed.version = 9;
        assert_eq!(
            step(verify_targets(&trusted, None, &t, NOW).unwrap_err()),
            "5.6.3"
        );
        // Expired.
        let mut t = targets(1, NOW - 1);
        signed(&mut t, &[3, 4]);
        assert_eq!(
            step(verify_targets(&trusted, None, &t, NOW).unwrap_err()),
            "5.6.5"
        );
        // Rollback.
        let mut t = targets(1, NOW + 10);
        signed(&mut t, &[3, 4]);
        assert_eq!(
            step(verify_targets(&trusted, Some(2), &t, NOW).unwrap_err()),
            "5.6.4"
        );
        // Path traversal in a target name.
        let mut t = targets(1, NOW + 10);
        let entry = t.signed.targets.values().next().unwrap().clone();
        t.signed.targets.insert("../../etc/passwd".into(), entry);
        signed(&mut t, &[3, 4]);
        assert_eq!(
            verify_targets(&trusted, None, &t, NOW)
                .unwrap_err()
                .to_string(),
            "refused (capsule): target path \"../../etc/passwd\" is not a plain relative path"
        );
        // Oversized metadata, refused before parsing.
        let big = vec![b' '; MAX_METADATA_BYTES + 1];
        assert_eq!(
            step(parse::<Targets>(&big, "targets").unwrap_err()),
            "5.6.1"
        );
        // Tampered blob: wrong length, then wrong hash.
        let t = targets(1, NOW + 10);
        let target = t.signed.targets.values().next().unwrap();
        assert_eq!(
            step(verify_target("p", target, b"abcd").unwrap_err()),
            "5.7.3"
        );
        assert_eq!(
            step(verify_target("p", target, b"abd").unwrap_err()),
            "5.7.3"
        );
    }

    #[test]
    fn root_rotation_needs_both_thresholds_and_the_next_version() {
        let trusted = trust_root(&root(1), NOW).unwrap();
        let next = Root {
            version: 2,
            ..Root::new(&[key(5).public()], 1, &[key(3).public()], 1, NOW + 1000)
        };
        let mut s = Signed {
            signed: next,
            signatures: vec![],
        };
        key(5).sign(&mut s).unwrap();
        assert_eq!(step(rotate_root(&trusted, &s).unwrap_err()), "5.3.4");
        key(1).sign(&mut s).unwrap();
        let rotated = rotate_root(&trusted, &s).unwrap();
        assert_eq!(rotated.version, 2);
        let mut skip = s.clone();
        skip.signed.version = 3;
        skip.signatures.clear();
        key(5).sign(&mut skip).unwrap();
        key(1).sign(&mut skip).unwrap();
        assert_eq!(step(rotate_root(&trusted, &skip).unwrap_err()), "5.3.5");
        // After rotation, the old root key no longer signs anything.
        let mut t = targets(1, NOW + 10);
        key(4).sign(&mut t).unwrap();
        assert_eq!(
            step(verify_targets(&rotated, None, &t, NOW).unwrap_err()),
            "5.6.3"
        );
        let mut t = targets(1, NOW + 10);
        key(3).sign(&mut t).unwrap();
        verify_targets(&rotated, None, &t, NOW).unwrap();
    }
}
