//! Link-time settings for the `ci-runner` binary.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    println!("cargo:rerun-if-env-changed=CI_RUNNER_RELR");
    let relr = std::env::var("CI_RUNNER_RELR").map_or(true, |v| v != "0");
    if os == "linux" && env == "gnu" && relr {
        // Packed relative relocations (DT_RELR, glibc 2.36+, binutils 2.38+): the dynamic
        // loader reads ~10 KB of relocations at start instead of ~700 KB of RELA records,
        // and those pages count in the resident memory of both processes (PID 1 and the
        // supervisor), whose bar is 10 MiB. `CI_RUNNER_RELR=0` turns it off for an older glibc.
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
