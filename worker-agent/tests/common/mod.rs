//! Test functions, kept as source: WebAssembly text compiled with the `wat` crate, C compiled
//! with `clang --target=wasm32-wasi -O2` (Debian `clang`, `lld`, `wasi-libc`,
//! `libclang-rt-14-dev-wasm32`; `./dev test` installs them).

#![allow(dead_code)]

use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The module of fixture `name` (`echo.c`, `spin.wat`, ...).
pub fn wasm(name: &str) -> Vec<u8> {
    let source = fixtures().join(name);
    if name.ends_with(".wat") {
        return wat::parse_file(&source).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    std::fs::create_dir_all(&out_dir).unwrap();
    // One output per process and fixture: tests of one binary may build the same fixture at once.
    let out = out_dir.join(format!("{name}.{}.wasm", std::process::id()));
    if !out.exists() {
        let status = std::process::Command::new("clang")
            .args(["--target=wasm32-wasi", "-O2", "-Wl,--strip-all", "-o"])
            .arg(&out)
            .arg(&source)
            .status()
            .expect("clang runs (apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32)");
        assert!(status.success(), "compiling {name}");
    }
    std::fs::read(out).unwrap()
}
