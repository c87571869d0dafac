//! Builds the guest (`capsule-guest`) for `wasm32-unknown-unknown` with `simd128`, so the
//! runtime (and through it the `capsule` binary) carries the guest it builds capsules from.
//! Only with the `builder` feature: without it the runtime carries no guest.
//!
//! The guest gets its own target directory (`target/guest`) because its RUSTFLAGS differ and
//! changing RUSTFLAGS rebuilds everything. Profile: `CAPSULE_GUEST_PROFILE` when set, else
//! `guest-release` (fat LTO, what ships) for release host builds and `guest-dev` (no LTO,
//! fast to build) otherwise.
//!
//! `CAPSULE_GUEST_SIMD=relaxed` builds the fast guest: `relaxed-simd` as well, so tract's
//! matrix kernels use `f32x4.relaxed_madd` (a fused multiply-add where the machine has one;
//! its rounding may differ between machines). Its capsules say so in their manifest
//! (`numerics = relaxed-simd`). It has its own target directory (`target/guest-relaxed`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const TARGET: &str = "wasm32-unknown-unknown";

fn fail(msg: &str) -> ! {
    eprintln!("\nerror: {msg}\n");
    std::process::exit(1);
}

fn ensure_wasm_target(rustc: &str) {
    let sysroot = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or_else(|| {
            fail("cannot run `rustc --print sysroot` to find the wasm32 standard library")
        });
    if sysroot.join("lib/rustlib").join(TARGET).exists() {
        return;
    }
    println!(
        "cargo:warning=installing the {TARGET} target with rustup (needed to build the capsule guest)"
    );
    let installed = Command::new("rustup")
        .args(["target", "add", TARGET])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !installed || !sysroot.join("lib/rustlib").join(TARGET).exists() {
        fail(&format!(
            "the Rust standard library for {TARGET} is missing and `rustup target add {TARGET}` failed.\n\
             The capsule guest cannot be built without it. Install it with:\n    rustup target add {TARGET}\n\
             (toolchain sysroot: {})",
            sysroot.display()
        ));
    }
}

fn main() {
    if std::env::var_os("CARGO_FEATURE_BUILDER").is_none() {
        // No builder, no guest: the runtime runs capsules that carry their own code.
        println!("cargo:rustc-env=CAPSULE_GUEST_PROFILE=none");
        println!("cargo:rustc-env=CAPSULE_GUEST_NUMERICS=none");
        return;
    }
    let manifest_dir = PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| fail("CARGO_MANIFEST_DIR is not set")),
    );
    let root = manifest_dir
        .parent()
        .unwrap_or(Path::new(".."))
        .to_path_buf();
    for path in [
        "guest",
        "model",
        "format",
        "pipeline",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }
    println!("cargo:rerun-if-env-changed=CAPSULE_GUEST_PROFILE");
    println!("cargo:rerun-if-env-changed=CAPSULE_GUEST_SIMD");
    let relaxed = match std::env::var("CAPSULE_GUEST_SIMD").as_deref() {
        Err(_) | Ok("" | "deterministic") => false,
        Ok("relaxed") => true,
        Ok(other) => fail(&format!(
            "CAPSULE_GUEST_SIMD={other:?}: expected \"deterministic\" (the default) or \"relaxed\""
        )),
    };

    let profile = std::env::var("CAPSULE_GUEST_PROFILE").unwrap_or_else(|_| {
        match std::env::var("PROFILE").as_deref() {
            Ok("release") => "guest-release".to_owned(),
            _ => "guest-dev".to_owned(),
        }
    });
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    ensure_wasm_target(&rustc);

    let target_dir = root
        .join("target")
        .join(if relaxed { "guest-relaxed" } else { "guest" });
    let features = if relaxed {
        "-Ctarget-feature=+simd128,+relaxed-simd"
    } else {
        "-Ctarget-feature=+simd128"
    };
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root)
        .args([
            "build",
            "--package",
            "capsule-guest",
            "--target",
            TARGET,
            "--profile",
            &profile,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        // What the outer build set for the host must not leak into the wasm build.
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_PRIMARY_PACKAGE")
        // getrandom (pulled in by tract through rand) must not look for a JS backend: the
        // guest has no imports at all (design section 9).
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [features, "--cfg", "getrandom_backend=\"unsupported\""].join("\x1f"),
        )
        .stdout(Stdio::inherit());
    for (key, _) in std::env::vars() {
        if key.starts_with("CARGO_PROFILE_")
            || key.starts_with("CARGO_CFG_")
            || key.starts_with("CARGO_FEATURE_")
        {
            cmd.env_remove(key);
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| fail(&format!("cannot run {cargo}: {e}")));
    if !status.success() {
        fail(&format!(
            "building the capsule guest for {TARGET} (profile {profile}) failed; see the cargo output above"
        ));
    }
    let wasm = target_dir
        .join(TARGET)
        .join(&profile)
        .join("capsule_guest.wasm");
    let out =
        PathBuf::from(std::env::var("OUT_DIR").unwrap_or_else(|_| fail("OUT_DIR is not set")))
            .join("capsule_guest.wasm");
    std::fs::copy(&wasm, &out)
        .unwrap_or_else(|e| fail(&format!("cannot copy {}: {e}", wasm.display())));
    println!("cargo:rustc-env=CAPSULE_GUEST_WASM={}", out.display());
    println!("cargo:rustc-env=CAPSULE_GUEST_PROFILE={profile}");
    println!(
        "cargo:rustc-env=CAPSULE_GUEST_NUMERICS={}",
        if relaxed {
            "relaxed-simd"
        } else {
            "deterministic"
        }
    );
}
