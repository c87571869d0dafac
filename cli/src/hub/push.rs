//! `capsule push`: a capsule (both forms), its version with provenance and metrics, signed
//! metadata and an alias, uploaded to the hub.

use capsule_format::hub::{BlobStored, MetadataStored, NewVersion, SetAlias};

use super::*;

/// `capsule push`.
#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// The capsule.
    capsule: PathBuf,
    #[command(flatten)]
    client: HubOptions,
    /// Signed targets metadata to publish with it (from `capsule sign`).
    #[arg(long)]
    targets: Option<PathBuf>,
    /// Provenance (JSON file: dataset_sha256, params, code_revision, ...).
    #[arg(long)]
    provenance: Option<PathBuf>,
    /// Metrics (JSON file of name -> value; default: the model card's).
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Point this alias at the version (e.g. production).
    #[arg(long)]
    alias: Option<String>,
}

pub fn run_push(args: &PushArgs) -> Result<()> {
    let forms = crate::split::BothForms::read(&args.capsule)?;
    let m = &forms.capsule.manifest;
    let read_json = |p: &Option<PathBuf>| -> Result<Value> {
        match p {
            Some(p) => Ok(serde_json::from_slice(&read_limited(p, 1 << 20, "JSON")?)?),
            None => Ok(Value::Null),
        }
    };
    let provenance = read_json(&args.provenance)?;
    let metrics = read_json(&args.metrics)?;
    runtime()?.block_on(async {
        let c = &args.client;
        // The split form: the code only when the hub lacks it (every model of one guest
        // build shares it), then the model image; the hub joins the single file on demand.
        let code_path = format!("/api/v1/blobs/{}", forms.code_sha256);
        if c.has(&code_path).await? {
            println!("code {} already on the hub", forms.code_sha256);
        } else {
            let _: BlobStored = c
                .call_as(
                    reqwest::Method::POST,
                    "/api/v1/blobs",
                    Some(forms.code.clone()),
                )
                .await?;
            println!(
                "uploaded code {} ({} bytes)",
                forms.code_sha256,
                forms.code.len()
            );
        }
        let blob: BlobStored = c
            .call_as(
                reqwest::Method::POST,
                "/api/v1/blobs",
                Some(forms.image.clone()),
            )
            .await?;
        println!("uploaded model image ({} bytes)", forms.image.len());
        let sha = blob.sha256;
        let body = NewVersion {
            sha256: sha.clone(),
            provenance,
            metrics,
        };
        let _: VersionInfo = c
            .call_as(
                reqwest::Method::POST,
                &format!("/api/v1/models/{}/versions", m.name),
                Some(serde_json::to_vec(&body)?),
            )
            .await?;
        println!(
            "pushed {} {} (sha256 {}, image {sha})",
            m.name, m.version, forms.capsule.sha256
        );
        if let Some(t) = &args.targets {
            let text = read_limited(t, 1 << 20, "targets")?;
            let r: MetadataStored = c
                .call_as(
                    reqwest::Method::POST,
                    "/api/v1/metadata/targets",
                    Some(text),
                )
                .await?;
            println!("published targets version {}", r.version);
        }
        if let Some(alias) = &args.alias {
            let body = SetAlias {
                version: m.version.to_string(),
            };
            let _: AliasSet = c
                .call_as(
                    reqwest::Method::PUT,
                    &format!("/api/v1/models/{}/aliases/{alias}", m.name),
                    Some(serde_json::to_vec(&body)?),
                )
                .await?;
            println!("{alias} -> {} {}", m.name, m.version);
        }
        Ok(())
    })
}
