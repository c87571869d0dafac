//! The runtime image, built offline and run with podman: `deploy/container/rootfs.sh` makes
//! the root filesystem from the binary under test (the same step as the Dockerfile's build
//! stage), `podman build -f deploy/container/Containerfile.prebuilt` makes the image (no base
//! image to pull), then a hub container and a node container synced with it serve a signed
//! capsule end to end: pushed from the host, verified and installed by the node in its
//! container, answered over V2 REST. Both run as the image's non-root user.
//!
//! podman runs here as this sandbox allows (runc, host network, cgroupfs, no default
//! ulimits, vfs storage under the test's temporary directory).

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::common::{
    self, ADMIN, free_port, http, node_token, publisher_keys, run, sign_and_push, wait_until,
    wait_until_within,
};

/// podman with its storage, run directory and configuration under `dir`.
struct Podman {
    dir: std::path::PathBuf,
    containers: Vec<String>,
}

impl Podman {
    fn command(&self) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .arg("--root")
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(["--storage-driver", "vfs"]);
        c
    }

    fn run(&self, args: &[&str]) -> Result<Output> {
        let out = self.command().args(args).output()?;
        if !out.status.success() {
            bail!(
                "podman {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// Starts a detached container on the host network from the test image.
    /// Volumes are `(host path or volume name, container path[:options])`; the root
    /// filesystem is read-only, as deploy/compose.yaml and deploy/k8s run it.
    fn start(&mut self, name: &str, volumes: &[(&str, &str)], args: &[&str]) -> Result<()> {
        let mut all: Vec<String> = [
            "run",
            "-d",
            "--read-only",
            "--name",
            name,
            "--network",
            "host",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for (host, container) in volumes {
            all.push("-v".into());
            all.push(format!("{host}:{container}"));
        }
        all.push("localhost/capsule:test".into());
        all.extend(args.iter().map(|s| s.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        self.run(&all)?;
        self.containers.push(name.to_owned());
        Ok(())
    }

    fn logs(&self, name: &str) -> String {
        self.command()
            .args(["logs", name])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for name in &self.containers {
            let _ = self.command().args(["rm", "-f", "-t", "2", name]).output();
        }
    }
}

/// A directory the container's user (65532) may write.
fn shared_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
    Ok(())
}

/// The instructions of a Containerfile's last stage, comments and `--from=build /out/`
/// (where the Dockerfile's build stage leaves the root filesystem) removed.
fn final_stage(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .unwrap_or_default();
    lines
        .into_iter()
        .skip(start)
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.replace("--from=build /out/", ""))
        .collect()
}

/// The Dockerfile (which CI cannot build: it pulls a Rust image) ends with the stage that
/// the offline Containerfile is, so the image tested below is the image it builds.
#[test]
fn the_dockerfile_ends_with_the_tested_stage() -> Result<()> {
    let repo = common::repo();
    let dockerfile = std::fs::read_to_string(repo.join("Dockerfile"))?;
    let prebuilt = std::fs::read_to_string(repo.join("deploy/container/Containerfile.prebuilt"))?;
    assert_eq!(final_stage(&dockerfile), final_stage(&prebuilt));
    assert!(final_stage(&prebuilt).contains(&"FROM scratch".to_owned()));
    assert!(dockerfile.contains("deploy/container/rootfs.sh target/release/capsule /out"));
    Ok(())
}

#[test]
fn hub_and_node_containers_serve_a_signed_capsule() -> Result<()> {
    let found = |tool: &str| Command::new(tool).arg("--version").output().is_ok();
    let missing: Vec<&str> = ["podman", "runc", "objcopy", "ldd"]
        .into_iter()
        .filter(|t| !found(t))
        .collect();
    if !missing.is_empty() {
        if common::in_ci() {
            bail!("CI must provide {}", missing.join(", "));
        }
        eprintln!(
            "skipped: needs {} (Debian's podman and runc)",
            missing.join(", ")
        );
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let repo = common::repo();
    std::fs::write(
        d.join("containers.conf"),
        "[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\n",
    )?;
    let mut podman = Podman {
        dir: d.to_path_buf(),
        containers: Vec::new(),
    };

    // The image, from the binary under test.
    let context = d.join("context");
    let status = Command::new("bash")
        .arg(repo.join("deploy/container/rootfs.sh"))
        .arg(common::bin())
        .arg(&context)
        .status()?;
    assert!(status.success(), "rootfs.sh failed");
    podman.run(&[
        "build",
        "-q",
        "-f",
        &repo
            .join("deploy/container/Containerfile.prebuilt")
            .to_string_lossy(),
        "-t",
        "localhost/capsule:test",
        &context.to_string_lossy(),
    ])?;
    let version = podman.run(&["run", "--rm", "localhost/capsule:test", "--version"])?;
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("capsule "));
    let user = podman.run(&[
        "image",
        "inspect",
        "--format",
        "{{.Config.User}}",
        "localhost/capsule:test",
    ])?;
    assert_eq!(String::from_utf8_lossy(&user.stdout).trim(), "65532:65532");

    // The hub, its database and blobs on a named volume (made from the image's /data, owned
    // by the image's user, as deploy/compose.yaml mounts it).
    let hub_port = free_port()?;
    let hub = format!("http://127.0.0.1:{hub_port}");
    podman.start(
        "capsule-test-hub",
        &[("capsule-test-hub-data", "/data")],
        &[
            "hub",
            "--http",
            &format!("127.0.0.1:{hub_port}"),
            "--database",
            "sqlite:///data/hub.db",
            "--blobs",
            "/data/blobs",
            "--admin-token",
            ADMIN,
        ],
    )?;
    wait_until("the hub container", || {
        http()
            .get(format!("{hub}/api/v1/health"))
            .send()
            .is_ok_and(|r| r.status().is_success())
    })
    .with_context(|| podman.logs("capsule-test-hub"))?;

    // A signed capsule, pushed from the host as production.
    let keys = d.join("keys");
    std::fs::create_dir_all(&keys)?;
    publisher_keys(&keys, &[])?;
    let capsule = d.join("digits.capsule.wasm");
    let fixture = repo.join("tests/fixtures/models/digits_mlp");
    run(&[
        "build",
        &fixture.join("model.onnx").to_string_lossy(),
        "--name",
        "digits",
        "--golden",
        &fixture.join("golden").to_string_lossy(),
        "-o",
        &capsule.to_string_lossy(),
    ])?;
    sign_and_push(
        &keys,
        &hub,
        &capsule,
        &d.join("targets.json"),
        &["--alias", "production"],
    )?;

    // A node synced with the hub, its repository on a volume, the pinned root read-only.
    let models = d.join("node-models");
    shared_dir(&models)?;
    let token = node_token(&hub, "edge-container")?;
    let node_port = free_port()?;
    let node = format!("http://127.0.0.1:{node_port}");
    podman.start(
        "capsule-test-node",
        &[
            (&models.to_string_lossy(), "/models"),
            (&keys.to_string_lossy(), "/keys:ro"),
        ],
        &[
            "serve",
            "--models",
            "/models",
            "--http",
            &format!("127.0.0.1:{node_port}"),
            "--no-grpc",
            "--hub",
            &hub,
            "--hub-token",
            &token,
            "--node-id",
            "edge-container",
            "--trusted-root",
            "/keys/root.json",
        ],
    )?;
    // The node compiles the capsule's guest code in the container, with no cache: the whole
    // test took 27 s alone, and this wait alone passed 30 s beside the binary's other tests.
    wait_until_within(
        "the node container to serve digits",
        Duration::from_secs(180),
        || {
            http()
                .get(format!("{node}/v2/models/digits/ready"))
                .send()
                .is_ok_and(|r| r.status().is_success())
        },
    )
    .with_context(|| podman.logs("capsule-test-node"))?;
    let request = std::fs::read(fixture.join("sample_request.json"))?;
    let resp = http()
        .post(format!("{node}/v2/models/digits/infer"))
        .header("content-type", "application/json")
        .body(request)
        .send()?;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json()?;
    assert_eq!(body["model_name"], "digits");
    assert!(
        body["outputs"][0]["data"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    );
    // The node installed the capsule (its guest code and its image) as the container's
    // user, in the volume.
    use std::os::unix::fs::MetadataExt;
    let installed = walk(&models)?;
    let image = installed
        .iter()
        .find(|p| p.ends_with("digits/0.1.0/digits.capsule.img"))
        .with_context(|| format!("no installed image in {installed:?}"))?;
    assert_eq!(std::fs::metadata(image)?.uid(), 65532, "{image}");
    Ok(())
}

fn walk(dir: &Path) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            found.extend(walk(&path)?);
        } else {
            found.push(path.to_string_lossy().into_owned());
        }
    }
    Ok(found)
}
