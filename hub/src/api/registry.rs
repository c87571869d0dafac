//! The registry: blobs, signed metadata, models, versions, comparisons, aliases.

use super::*;

pub(super) async fn health(State(s): State<AppState>) -> Result<axum::Json<HubHealth>> {
    Ok(axum::Json(HubHealth {
        status: HealthStatus::Ok,
        generation: s.db.generation().await?,
    }))
}

/// The manifest of a capsule, read from its custom section (the hub never runs capsules).
pub(super) fn manifest_of(bytes: &[u8]) -> Result<CapsuleManifest> {
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| Error::BadRequest(format!("not a capsule: {e}")))?;
        if let wasmparser::Payload::CustomSection(c) = payload
            && c.name() == MANIFEST_SECTION
        {
            return CapsuleManifest::from_section_bytes(c.data())
                .map_err(|e| Error::BadRequest(format!("capsule manifest: {e}")));
        }
    }
    Err(Error::BadRequest(
        "not a capsule: no capsule.manifest section".into(),
    ))
}

/// What an uploaded blob is: a single-file capsule (it has a manifest), a model image (its
/// header reads) or a guest code module (a core module without a manifest).
pub(super) fn blob_kind(bytes: &[u8]) -> Result<BlobKind> {
    if split::is_image(bytes) {
        split::image_header(bytes).map_err(Error::Invalid)?;
        return Ok(BlobKind::Image);
    }
    if manifest_of(bytes).is_ok() {
        return Ok(BlobKind::Capsule);
    }
    // No manifest: a code module is still a well-framed core module.
    split::code_module(bytes).map_err(|e| {
        Error::BadRequest(format!("not a capsule, model image or code module: {e}"))
    })?;
    Ok(BlobKind::Code)
}

pub(super) async fn put_blob(
    State(s): State<AppState>,
    Admin(c): Admin,
    RawBody(body): RawBody,
) -> Result<axum::Json<BlobStored>> {
    let kind = blob_kind(&body)?;
    let store = s.blobs.clone();
    let bytes = body.clone();
    let sha256 = tokio::task::spawn_blocking(move || store.put(&bytes)).await??;
    audit(
        &s,
        &c,
        "blob.upload",
        json!({"sha256": sha256, "length": body.len(), "kind": kind}),
    )
    .await?;
    Ok(axum::Json(BlobStored {
        sha256,
        length: body.len() as u64,
        kind,
    }))
}

/// Reads a stored blob; 404 naming it when it is not there.
pub(super) async fn read_blob(s: &Shared, sha256: &str, what: &str) -> Result<Vec<u8>> {
    let path = s
        .blobs
        .path(sha256)
        .ok_or_else(|| Error::BadRequest(format!("{sha256:?} is not a SHA-256")))?;
    tokio::fs::read(&path)
        .await
        .map_err(|_| Error::NotFound(format!("no {what} {sha256} (upload it first)")))
}

/// Joins a version's split form into its single-file capsule (the hub stores only the split
/// form of versions pushed as images).
pub(super) async fn join_version(s: &Shared, split: &SplitBlobs) -> Result<Vec<u8>> {
    let image = read_blob(s, &split.image_sha256, "model image").await?;
    let code = read_blob(s, &split.code_sha256, "code module").await?;
    Ok(tokio::task::spawn_blocking(move || split::join(&code, &image)).await??)
}

/// A blob, with `Range: bytes=N-` for resumed downloads, streamed from its file. A single-file
/// capsule the hub has only in split form is joined once (one join at a time) and stored, so
/// no request makes the hub hold more than one joined capsule. Downloads (not `HEAD`, which
/// answers "have") are counted by kind: capsule, image, code.
pub(super) async fn get_blob(
    State(s): State<AppState>,
    _caller: Caller,
    method: axum::http::Method,
    headers: HeaderMap,
    Path(sha256): Path<String>,
) -> Result<Response> {
    use tokio::io::AsyncSeekExt;
    let path = s
        .blobs
        .path(&sha256)
        .ok_or_else(|| Error::BadRequest(format!("{sha256:?} is not a SHA-256")))?;
    if !path.exists() {
        let split =
            s.db.version_by_capsule(&sha256)
                .await?
                .and_then(|v| v.split)
                .ok_or_else(|| Error::NotFound(format!("no blob {sha256}")))?;
        let _one = s.joins.lock().await;
        // Another request may have stored it while this one waited.
        if !path.exists() {
            let joined = join_version(&s, &split).await?;
            if split::sha256_hex(&joined) != sha256 {
                return Err(Error::Internal(format!(
                    "the split form of {sha256} joins into another capsule"
                )));
            }
            let store = s.blobs.clone();
            tokio::task::spawn_blocking(move || store.put(&joined)).await??;
        }
    }
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| Error::NotFound(format!("no blob {sha256}")))?;
    let total = file
        .metadata()
        .await
        .map_err(Error::io(format!("reading blob {sha256}")))?
        .len();
    let start = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse::<u64>().ok());
    if method == axum::http::Method::GET {
        s.metrics
            .blob_downloads
            .with_label_values(&[s.db.blob_kind(&sha256).await?.as_str()])
            .inc();
    }
    // Streamed from the file: a large capsule never sits whole in the hub's memory.
    let stream = |file| Body::from_stream(tokio_util::io::ReaderStream::new(file));
    match start {
        Some(start) if start <= total => {
            file.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(Error::io(format!("reading blob {sha256}")))?;
            Ok((
                StatusCode::PARTIAL_CONTENT,
                [
                    (header::CONTENT_TYPE, "application/wasm".to_owned()),
                    (header::CONTENT_LENGTH, (total - start).to_string()),
                    (
                        header::CONTENT_RANGE,
                        format!("bytes {start}-{}/{total}", total.saturating_sub(1)),
                    ),
                ],
                stream(file),
            )
                .into_response())
        }
        Some(_) => Err(Error::BadRequest("range past the end of the blob".into())),
        None => Ok((
            [
                (header::CONTENT_TYPE, "application/wasm".to_owned()),
                (header::CONTENT_LENGTH, total.to_string()),
            ],
            stream(file),
        )
            .into_response()),
    }
}

pub(super) async fn get_metadata(
    State(s): State<AppState>,
    _caller: Caller,
    Path(role): Path<String>,
) -> Result<Response> {
    let (_, body) =
        s.db.metadata(&role)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no {role} metadata")))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// Stores signed metadata. The hub parses it and keeps versions monotonic to catch
/// mistakes; the security checks are the nodes' (they verify signatures against pinned keys).
pub(super) async fn post_metadata(
    State(s): State<AppState>,
    Admin(c): Admin,
    Path(role): Path<String>,
    RawBody(body): RawBody,
) -> Result<axum::Json<MetadataStored>> {
    let version = match role.as_str() {
        "root" => {
            tuf::parse::<Root>(&body, "root")
                .map_err(Error::Invalid)?
                .signed
                .version
        }
        "targets" => {
            tuf::parse::<Targets>(&body, "targets")
                .map_err(Error::Invalid)?
                .signed
                .version
        }
        other => {
            return Err(Error::NotFound(format!(
                "no metadata role {other:?} (root, targets)"
            )));
        }
    };
    let version =
        i64::try_from(version).map_err(|_| Error::BadRequest("version too large".into()))?;
    if let Some((current, _)) = s.db.metadata(&role).await?
        && version < current
    {
        return Err(Error::Conflict(format!(
            "{role} version {version} is older than the stored version {current}"
        )));
    }
    let text =
        String::from_utf8(body.to_vec()).map_err(|_| Error::BadRequest("not UTF-8".into()))?;
    s.db.set_metadata(&role, version, &text).await?;
    if role == "root" {
        // Every root version stays fetchable: a node walks the chain N+1, N+2, ... (TUF 5.3.3).
        s.db.set_metadata(&format!("root.{version}"), version, &text)
            .await?;
    }
    audit(
        &s,
        &c,
        "metadata.upload",
        json!({"role": role, "version": version}),
    )
    .await?;
    s.changed().await?;
    Ok(axum::Json(MetadataStored { role, version }))
}

pub(super) async fn list_models(
    State(s): State<AppState>,
    Admin(_): Admin,
) -> Result<axum::Json<ModelList>> {
    let mut models = Vec::new();
    for name in s.db.models().await? {
        let versions = s.db.versions(&name).await?;
        models.push(ModelSummary {
            aliases: s.db.aliases(&name).await?,
            versions: versions.into_iter().map(|v| v.version).collect(),
            name,
        });
    }
    Ok(axum::Json(ModelList { models }))
}

pub(super) async fn show_model(
    State(s): State<AppState>,
    Admin(_): Admin,
    Path(model): Path<String>,
) -> Result<axum::Json<ModelDetail>> {
    let versions = s.db.versions(&model).await?;
    if versions.is_empty() {
        return Err(Error::NotFound(format!("no model {model:?}")));
    }
    Ok(axum::Json(ModelDetail {
        aliases: s.db.aliases(&model).await?,
        versions,
        name: model,
    }))
}

/// Registers a version from an uploaded blob; its manifest must name this model, and the
/// version is the manifest's.
pub(super) async fn add_version(
    State(s): State<AppState>,
    Admin(c): Admin,
    Path(model): Path<String>,
    RawBody(body): RawBody,
) -> Result<axum::Json<VersionInfo>> {
    let req: NewVersion = json_body(&body)?;
    let uploaded = read_blob(&s, &req.sha256, "blob").await?;
    // Either form registers both: a model image is joined with its code (which must be
    // uploaded already) to read its manifest; a single file is split and its image and code
    // stored (once: blobs are content-addressed).
    let (bytes, split_blobs) = if split::is_image(&uploaded) {
        let header = split::image_header(&uploaded).map_err(Error::Invalid)?;
        // The joined capsule is bounded like an uploaded one.
        if header.joined_len_bound() > s.config.max_blob_bytes {
            return Err(Error::TooLarge(format!(
                "the model image joins into up to {} bytes, over the limit of {}",
                header.joined_len_bound(),
                s.config.max_blob_bytes
            )));
        }
        let blobs = SplitBlobs {
            image_sha256: req.sha256.clone(),
            image_length: uploaded.len() as i64,
            code_sha256: header.code_sha256,
            code_length: header.code_len as i64,
        };
        (join_version(&s, &blobs).await?, blobs)
    } else {
        manifest_of(&uploaded)?;
        let store = s.blobs.clone();
        tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, SplitBlobs)> {
            let parts = split::split(&uploaded).map_err(Error::Invalid)?;
            let blobs = SplitBlobs {
                image_sha256: store.put(&parts.image)?,
                image_length: parts.image.len() as i64,
                code_sha256: store.put(&parts.code)?,
                code_length: parts.code.len() as i64,
            };
            Ok((uploaded, blobs))
        })
        .await??
    };
    let m = manifest_of(&bytes)?;
    if m.name != model {
        return Err(Error::BadRequest(format!(
            "the capsule is model {:?}, not {model:?}",
            m.name
        )));
    }
    let provenance = if req.provenance.is_null() {
        json!({"source_sha256": m.source.sha256, "guest_sha256": m.guest_sha256})
    } else {
        let mut p = req.provenance.clone();
        if let Some(o) = p.as_object_mut() {
            o.entry("source_sha256").or_insert(json!(m.source.sha256));
            o.entry("guest_sha256").or_insert(json!(m.guest_sha256));
        }
        p
    };
    let metrics = if req.metrics.is_null() {
        Value::Object(
            m.card
                .metrics
                .iter()
                .map(|x| (x.name.clone(), json!(x.value)))
                .collect(),
        )
    } else {
        req.metrics
    };
    let row = VersionInfo {
        model: model.clone(),
        version: m.version.to_string(),
        sha256: split::sha256_hex(&bytes),
        length: bytes.len() as i64,
        split: Some(split_blobs),
        manifest: ManifestSummary {
            inputs: m.inputs.iter().map(ToString::to_string).collect(),
            outputs: m.outputs.iter().map(ToString::to_string).collect(),
            labels: m.labels.clone(),
            description: m.card.description.clone(),
            golden_samples: m.golden.len(),
            reference: m.reference.clone(),
            created_at_unix: m.created_at_unix,
        },
        provenance,
        metrics,
        created_at: s.db.now(),
        created_by: c.token.name.clone(),
    };
    s.db.add_version(&row).await?;
    audit(
        &s,
        &c,
        "version.register",
        json!({"model": model, "version": row.version, "sha256": row.sha256}),
    )
    .await?;
    Ok(axum::Json(row))
}

pub(super) async fn show_version(
    State(s): State<AppState>,
    Admin(_): Admin,
    Path((model, version)): Path<(String, String)>,
) -> Result<axum::Json<VersionInfo>> {
    s.db.version(&model, &version)
        .await?
        .map(axum::Json)
        .ok_or_else(|| Error::NotFound(format!("no version {version} of {model:?}")))
}

#[derive(Deserialize)]
pub(super) struct CompareQuery {
    a: String,
    b: String,
}

/// Two versions side by side, with the metric differences (b - a).
pub(super) async fn compare(
    State(s): State<AppState>,
    Admin(_): Admin,
    Path(model): Path<String>,
    Query(q): Query<CompareQuery>,
) -> Result<axum::Json<Comparison>> {
    let get = |v: String| {
        let s = Arc::clone(&s);
        let model = model.clone();
        async move {
            s.db.version(&model, &v)
                .await?
                .ok_or_else(|| Error::NotFound(format!("no version {v} of {model:?}")))
        }
    };
    let (a, b) = (get(q.a).await?, get(q.b).await?);
    Ok(axum::Json(Comparison::new(a, b)))
}

pub(super) async fn set_alias(
    State(s): State<AppState>,
    Admin(c): Admin,
    Path((model, alias)): Path<(String, String)>,
    RawBody(body): RawBody,
) -> Result<axum::Json<AliasSet>> {
    let req: SetAlias = json_body(&body)?;
    if s.db.version(&model, &req.version).await?.is_none() {
        return Err(Error::NotFound(format!(
            "no version {} of {model:?}",
            req.version
        )));
    }
    if alias.is_empty()
        || !alias
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(Error::BadRequest(format!(
            "alias {alias:?}: letters, digits, - and _ only"
        )));
    }
    s.db.set_alias(&model, &alias, &req.version).await?;
    audit(
        &s,
        &c,
        "alias.set",
        json!({"model": model, "alias": alias, "version": req.version}),
    )
    .await?;
    s.changed().await?;
    Ok(axum::Json(AliasSet {
        model,
        alias,
        version: req.version,
    }))
}
