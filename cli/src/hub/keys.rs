//! `capsule keys` and `capsule sign`: the publisher's offline side (keys, root and targets
//! metadata), never touching the hub.

use super::*;

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `capsule keys`.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Generate an ed25519 key pair: NAME.key (secret, mode 0600; keep it offline) and NAME.pub.
    Generate {
        /// Path prefix of the two files.
        name: PathBuf,
    },
    /// Write signed root metadata: which keys sign root and targets metadata, and how many must.
    Root {
        /// Public keys (NAME.pub) of the root role.
        #[arg(long = "root-key", required = true)]
        root_keys: Vec<PathBuf>,
        /// Signatures the root role needs.
        #[arg(long, default_value_t = 1)]
        root_threshold: u32,
        /// Public keys of the targets role (publishers).
        #[arg(long = "targets-key", required = true)]
        targets_keys: Vec<PathBuf>,
        /// Signatures the targets role needs.
        #[arg(long, default_value_t = 1)]
        targets_threshold: u32,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        expires_days: u64,
        /// The root this one replaces (key rotation: version + 1; sign with a threshold of
        /// the old root keys and of the new ones).
        #[arg(long)]
        previous: Option<PathBuf>,
        /// Secret keys to sign with.
        #[arg(long = "sign", required = true)]
        signers: Vec<PathBuf>,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
    },
}

pub(super) fn read_key(path: &Path) -> Result<SigningKey> {
    let text = String::from_utf8(read_limited(path, 4096, "key")?).context("key is not UTF-8")?;
    SigningKey::from_hex(&text)
        .with_context(|| format!("{} is not an ed25519 secret key", path.display()))
}

pub(super) fn read_pub(path: &Path) -> Result<PublicKey> {
    serde_json::from_slice(&read_limited(path, 4096, "public key")?)
        .with_context(|| format!("{} is not a public key", path.display()))
}

pub(super) fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

pub fn run_keys(cmd: &KeysCommand) -> Result<()> {
    match cmd {
        KeysCommand::Generate { name } => {
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret)
                .map_err(|e| anyhow::anyhow!("no system randomness: {e}"))?;
            let key = SigningKey::from_secret(secret);
            let key_path = name.with_extension("key");
            let pub_path = name.with_extension("pub");
            {
                use std::io::Write;
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    options.mode(0o600);
                }
                let mut f = options.open(&key_path).with_context(|| {
                    format!("creating {} (it must not exist)", key_path.display())
                })?;
                writeln!(f, "{}", key.to_hex())?;
            }
            write_json(&pub_path, &key.public())?;
            println!(
                "wrote {} and {} (key id {})",
                key_path.display(),
                pub_path.display(),
                key.public().keyid()
            );
            Ok(())
        }
        KeysCommand::Root {
            root_keys,
            root_threshold,
            targets_keys,
            targets_threshold,
            expires_days,
            previous,
            signers,
            output,
        } => {
            let rk: Vec<PublicKey> = root_keys
                .iter()
                .map(|p| read_pub(p))
                .collect::<Result<_>>()?;
            let tk: Vec<PublicKey> = targets_keys
                .iter()
                .map(|p| read_pub(p))
                .collect::<Result<_>>()?;
            let mut root = Root::new(
                &rk,
                *root_threshold,
                &tk,
                *targets_threshold,
                unix_now() + expires_days * 86_400,
            );
            if let Some(prev) = previous {
                let old: Signed<Root> = tuf::parse(&read_limited(prev, 1 << 20, "root")?, "root")?;
                root.version = old.signed.version + 1;
            }
            let mut signed = Signed {
                signed: root,
                signatures: vec![],
            };
            for s in signers {
                read_key(s)?.sign(&mut signed)?;
            }
            write_json(output, &signed)?;
            println!(
                "wrote {} (root version {})",
                output.display(),
                signed.signed.version
            );
            Ok(())
        }
    }
}

/// `capsule sign`.
#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// Targets metadata to create or update.
    #[arg(long)]
    targets: PathBuf,
    /// Capsules to add (name and version from their manifests); adding bumps the version.
    #[arg(long = "add")]
    add: Vec<PathBuf>,
    /// Secret keys to sign with (several for a threshold).
    #[arg(long = "key", required = true)]
    keys: Vec<PathBuf>,
    /// Validity in days from now (when adding).
    #[arg(long, default_value_t = 30)]
    expires_days: u64,
}

pub fn run_sign(args: &SignArgs) -> Result<()> {
    let mut metadata: Signed<Targets> = if args.targets.exists() {
        tuf::parse(&read_limited(&args.targets, 1 << 20, "targets")?, "targets")?
    } else {
        Signed {
            signed: Targets {
                kind: "targets".into(),
                version: 0,
                expires: 0,
                targets: BTreeMap::new(),
            },
            signatures: vec![],
        }
    };
    if !args.add.is_empty() || metadata.signed.version == 0 {
        for path in &args.add {
            // Both forms: the single file (browsers, older nodes), the model image that
            // names its code, and the code as a target of its own.
            let forms = crate::split::BothForms::read(path)?;
            let m = &forms.capsule.manifest;
            let version = m.version.to_string();
            let sha = capsule_format::split::sha256_hex(&forms.image);
            metadata.signed.targets.extend(tuf::capsule_targets(
                &m.name,
                &version,
                (forms.capsule.size() as u64, &forms.capsule.sha256),
                (forms.image.len() as u64, &sha),
                (forms.code.len() as u64, &forms.code_sha256),
            ));
        }
        metadata.signed.version += 1;
        metadata.signed.expires = unix_now() + args.expires_days * 86_400;
        metadata.signatures.clear();
    }
    for k in &args.keys {
        read_key(k)?.sign(&mut metadata)?;
    }
    write_json(&args.targets, &metadata)?;
    println!(
        "wrote {} (targets version {}, {} targets, {} signatures)",
        args.targets.display(),
        metadata.signed.version,
        metadata.signed.targets.len(),
        metadata.signatures.len()
    );
    Ok(())
}
